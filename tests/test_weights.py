"""The same GPT-2 weights through every file format, and every way a file can be wrong.

One tiny random ``GPT2LMHeadModel`` (transformers, PyTorch CPU) is the source of truth.
Its tensors are written by this test, independently of our writers, in each layout seen
in practice: ``save_pretrained`` safetensors, the hub's bare-named safetensors with mask
buffers and ``lm_head``, Keras-2 ``tf_model.h5`` in HF naming (two transformers
generations), and an OpenAI-named checkpoint written by ``tf.compat.v1.train.Saver``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt2_effnet.cli import main as cli_main  # noqa: E402
from gpt2_effnet.config import GPT2Config  # noqa: E402
from gpt2_effnet.gpt2 import GPT2Decoder  # noqa: E402
from gpt2_effnet.weights import (  # noqa: E402
    WeightFormatError,
    WeightLoadError,
    detect_format,
    load_gpt2,
    load_into,
    read_weights,
)

SHAPE = dict(vocab_size=83, n_positions=10, n_embd=12, n_layer=2, n_head=3, layer_norm_epsilon=1e-5)
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
BLOCK_SUFFIXES = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip


# -- writers, written from the formats' published naming (not from our readers) ------------


def hf_h5_name(canonical: str, wte_name: str) -> str:
    """transformers' TF GPT-2 weight name (below ``transformer/``) for a PyTorch name."""
    tf_names = {"weight": "gamma", "bias": "beta"}
    if canonical == "wte.weight":
        return f"wte/{wte_name}:0"
    if canonical == "wpe.weight":
        return "wpe/embeddings:0"
    if canonical.startswith("ln_f."):
        return f"ln_f/{tf_names[canonical.split('.')[-1]]}:0"
    _, layer, rest = canonical.split(".", 2)
    module, param = rest.rsplit(".", 1)
    if module in ("ln_1", "ln_2"):
        return f"h_._{layer}/{module}/{tf_names[param]}:0"
    return f"h_._{layer}/{module.replace('.', '/')}/{param}:0"


def write_hf_h5(path: Path, tensors: dict[str, np.ndarray], model_group: str, wte_name: str) -> None:
    """Keras-2 ``save_weights`` layout: one top-level group per layer, datasets nested by weight name."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"transformer"])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        layer = f.create_group("transformer")
        weight_names = []
        for canonical, array in tensors.items():
            name = f"{model_group}/transformer/{hf_h5_name(canonical, wte_name)}"
            if canonical.endswith(".bias") and canonical.rsplit(".", 1)[0].split(".", 2)[-1] in CONV1D:
                array = array[None, :]  # TFConv1D biases are [1, nf]
            layer.create_dataset(name, data=array)
            weight_names.append(name.encode())
        layer.attrs["weight_names"] = np.array(weight_names)


def openai_name(canonical: str) -> str:
    names = {"wte.weight": "model/wte", "wpe.weight": "model/wpe", "ln_f.weight": "model/ln_f/g", "ln_f.bias": "model/ln_f/b"}
    if canonical in names:
        return names[canonical]
    _, layer, rest = canonical.split(".", 2)
    module, param = rest.rsplit(".", 1)
    short = {"weight": "g", "bias": "b"} if module in ("ln_1", "ln_2") else {"weight": "w", "bias": "b"}
    return f"model/h{layer}/{module.replace('.', '/')}/{short[param]}"


def write_openai_checkpoint(folder: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.compat.v1.Graph()
    with graph.as_default():
        for canonical, array in tensors.items():
            if canonical.endswith(".weight") and canonical.rsplit(".", 1)[0].split(".", 2)[-1] in CONV1D:
                array = array[None]  # 1x1 conv kernels: [1, nx, nf]
            tf.compat.v1.get_variable(openai_name(canonical), initializer=array)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"))
    hparams = {
        "n_vocab": config["vocab_size"],
        "n_ctx": config["n_positions"],
        "n_embd": config["n_embd"],
        "n_head": config["n_head"],
        "n_layer": config["n_layer"],
    }
    (folder / "hparams.json").write_text(json.dumps(hparams))


def write_safetensors(folder: Path, tensors: dict[str, np.ndarray], config_src: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_src / "config.json", folder / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def prefixed(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"transformer.{k}": v for k, v in tensors.items()}


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPE, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.2 * noise)
    root = tmp_path_factory.mktemp("weights")
    hf_dir = root / "hf_prefixed"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tensors = {
        k[len("transformer.") :]: v.detach().numpy().copy()
        for k, v in model.state_dict().items()
        if k.startswith("transformer.")
    }
    ids = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], size=(2, SHAPE["n_positions"]))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    return {"model": model, "root": root, "hf_dir": hf_dir, "tensors": tensors, "ids": ids.astype(np.int32), "logits": logits}


def make_bare(ref: dict, folder: Path) -> Path:
    """The hub's original gpt2 layout: no prefix, causal-mask buffers, an explicit tied lm_head."""
    tensors = dict(ref["tensors"])
    positions = SHAPE["n_positions"]
    for i in range(SHAPE["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((positions, positions), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = ref["tensors"]["wte.weight"].copy()
    return write_safetensors(folder, tensors, ref["hf_dir"])


@pytest.fixture(scope="module")
def sources(ref: dict) -> dict[str, Path]:
    root: Path = ref["root"]
    out = {"hf_prefixed": ref["hf_dir"], "hf_bare": make_bare(ref, root / "hf_bare")}
    for label, group, wte in (("h5_old", "tfgp_t2lm_head_model", "weight"), ("h5_new", "tfgpt2lm_head_model_1", "embeddings")):
        folder = root / label
        folder.mkdir()
        shutil.copyfile(ref["hf_dir"] / "config.json", folder / "config.json")
        write_hf_h5(folder / "tf_model.h5", ref["tensors"], group, wte)
        out[label] = folder
    write_openai_checkpoint(root / "openai", ref["tensors"], SHAPE)
    out["openai"] = root / "openai"
    assert cli_main(["convert", str(ref["hf_dir"]), "--out", str(root / "native")]) == 0
    out["native"] = root / "native"
    return out


EXPECTED_FORMAT = {
    "hf_prefixed": "hf_safetensors",
    "hf_bare": "hf_safetensors",
    "h5_old": "hf_h5",
    "h5_new": "hf_h5",
    "openai": "openai_ckpt",
    "native": "native",
}


def assert_same_weights(decoder: GPT2Decoder, tensors: dict[str, np.ndarray]) -> None:
    named = decoder.named_weights()
    assert sorted(named) == sorted(tensors)
    for name, variable in named.items():
        np.testing.assert_array_equal(variable.numpy(), tensors[name], err_msg=name)


# -- every format gives the same model ------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_logits(ref: dict) -> np.ndarray:
    return np.asarray(load_gpt2(ref["hf_dir"])(ref["ids"]))


@pytest.mark.parametrize("label", list(EXPECTED_FORMAT))
def test_every_format_gives_the_same_model(label: str, sources: dict, ref: dict, baseline_logits: np.ndarray) -> None:
    assert detect_format(sources[label]) == EXPECTED_FORMAT[label]
    decoder = load_gpt2(sources[label])
    assert_same_weights(decoder, ref["tensors"])
    report = decoder.load_report
    assert report.complete and report.format == EXPECTED_FORMAT[label]
    assert report.num_tensors == 4 + 12 * SHAPE["n_layer"]
    assert report.num_parameters == sum(v.size for v in ref["tensors"].values())
    logits = np.asarray(decoder(ref["ids"]))
    np.testing.assert_allclose(logits, baseline_logits, rtol=0, atol=1e-6)
    assert float(np.max(np.abs(logits - ref["logits"]))) <= 1e-4


def test_bare_layout_skips_buffers_and_tied_head(sources: dict) -> None:
    report = load_gpt2(sources["hf_bare"]).load_report
    assert sorted(report.skipped) == sorted(
        [f"h.{i}.attn.{b}" for i in range(SHAPE["n_layer"]) for b in ("bias", "masked_bias")] + ["lm_head.weight"]
    )


@pytest.mark.parametrize(
    "relative",
    ["hf_prefixed/model.safetensors", "h5_old/tf_model.h5", "openai/model.ckpt", "openai/model.ckpt.index", "native/gpt2.weights.h5"],
)
def test_direct_file_paths(relative: str, sources: dict, ref: dict) -> None:
    label, name = relative.split("/")
    assert_same_weights(load_gpt2(sources[label] / name), ref["tensors"])


def test_read_weights_returns_canonical_arrays(sources: dict, ref: dict) -> None:
    arrays, config, report = read_weights(sources["h5_new"])
    assert config == GPT2Config(**SHAPE)
    assert sorted(arrays) == sorted(ref["tensors"])
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, ref["tensors"][name], err_msg=name)
    assert report.format == "hf_h5"


def test_sharded_safetensors(tmp_path: Path, ref: dict) -> None:
    names = sorted(ref["tensors"])
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({f"transformer.{n}": ref["tensors"][n] for n in shard_names}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({f"transformer.{n}": shard for n in shard_names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(ref["hf_dir"] / "config.json", tmp_path / "config.json")
    assert_same_weights(load_gpt2(tmp_path), ref["tensors"])


def test_bfloat16_safetensors(tmp_path: Path, ref: dict) -> None:
    from safetensors.torch import save_file as save_torch

    state = {f"transformer.{k}": torch.from_numpy(v).to(torch.bfloat16) for k, v in ref["tensors"].items()}
    save_torch(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ref["hf_dir"] / "config.json", tmp_path / "config.json")
    expected = {k[len("transformer.") :]: v.float().numpy() for k, v in state.items()}
    assert_same_weights(load_gpt2(tmp_path), expected)


def test_native_file_is_what_keras_itself_loads(sources: dict, ref: dict) -> None:
    decoder = GPT2Decoder(GPT2Config(**SHAPE))
    decoder.load_weights(str(sources["native"] / "gpt2.weights.h5"))
    assert_same_weights(decoder, ref["tensors"])


def test_load_into_captioner_decoder_touches_only_gpt2(sources: dict, ref: dict) -> None:
    decoder = GPT2Decoder(GPT2Config(**SHAPE), num_special_tokens=2, cross_attention="gated")
    named_ids = {id(v) for v in decoder.named_weights().values()}
    others = {v.path: v.numpy().copy() for v in decoder.weights if id(v) not in named_ids}
    assert others, "a captioner decoder has weights beyond GPT-2's"
    report = load_into(decoder, sources["openai"])
    assert report.complete
    assert_same_weights(decoder, ref["tensors"])
    for variable in decoder.weights:
        if id(variable) not in named_ids:
            np.testing.assert_array_equal(variable.numpy(), others[variable.path], err_msg=variable.path)


# -- strictness: every problem named, nothing assigned -------------------------------------


def broken_safetensors(tmp_path: Path, ref: dict, defect: str) -> Path:
    tensors = dict(ref["tensors"])
    if defect == "shape":
        tensors["h.1.mlp.c_fc.weight"] = np.zeros((12, 49), np.float32)
    elif defect == "missing":
        del tensors["h.0.ln_2.bias"]
    elif defect == "unexpected":
        tensors["h.0.attn.c_attn.extra"] = np.zeros((3,), np.float32)
    return write_safetensors(tmp_path / defect, prefixed(tensors), ref["hf_dir"])


@pytest.mark.parametrize(
    "defect, kind, needles",
    [
        ("shape", "mismatched", ["h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight", "(12, 48)", "(12, 49)"]),
        ("missing", "missing", ["h.0.ln_2.bias", "transformer.h.0.ln_2.bias", "missing"]),
        ("unexpected", "unexpected", ["transformer.h.0.attn.c_attn.extra", "unexpected"]),
    ],
)
def test_strict_errors_name_the_tensor(tmp_path: Path, ref: dict, defect: str, kind: str, needles: list[str]) -> None:
    folder = broken_safetensors(tmp_path, ref, defect)
    with pytest.raises(WeightLoadError) as info:
        load_gpt2(folder)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    assert len(getattr(info.value, kind)) == 1
    assert isinstance(info.value, ValueError)


def test_strict_failure_assigns_nothing(tmp_path: Path, ref: dict) -> None:
    folder = broken_safetensors(tmp_path, ref, "shape")
    decoder = GPT2Decoder(GPT2Config(**SHAPE))
    before = {n: v.numpy().copy() for n, v in decoder.named_weights().items()}
    with pytest.raises(WeightLoadError):
        load_into(decoder, folder)
    for name, variable in decoder.named_weights().items():
        np.testing.assert_array_equal(variable.numpy(), before[name], err_msg=name)


def test_non_strict_loads_the_rest_and_reports(tmp_path: Path, ref: dict) -> None:
    folder = broken_safetensors(tmp_path, ref, "missing")
    decoder = GPT2Decoder(GPT2Config(**SHAPE))
    report = load_into(decoder, folder, strict=False)
    assert not report.complete
    assert report.missing and "h.0.ln_2.bias" in report.missing[0]
    assert report.num_tensors == 4 + 12 * SHAPE["n_layer"] - 1
    assert "h.0.ln_2.bias" in str(report)
    for name, variable in decoder.named_weights().items():
        if name != "h.0.ln_2.bias":
            np.testing.assert_array_equal(variable.numpy(), ref["tensors"][name], err_msg=name)


def test_h5_wrong_bias_shape_is_named(tmp_path: Path, ref: dict) -> None:
    tensors = dict(ref["tensors"])
    tensors["h.1.attn.c_proj.bias"] = np.zeros((13,), np.float32)
    shutil.copyfile(ref["hf_dir"] / "config.json", tmp_path / "config.json")
    write_hf_h5(tmp_path / "tf_model.h5", tensors, "tfgp_t2lm_head_model", "weight")
    with pytest.raises(WeightLoadError, match=r"h\.1\.attn\.c_proj\.bias.*h_\._1/attn/c_proj/bias:0.*\(12,\).*\(1, 13\)"):
        load_gpt2(tmp_path)


def test_h5_both_embedding_names_is_an_error(tmp_path: Path, ref: dict) -> None:
    shutil.copyfile(ref["hf_dir"] / "config.json", tmp_path / "config.json")
    write_hf_h5(tmp_path / "tf_model.h5", ref["tensors"], "tfgp_t2lm_head_model", "weight")
    with h5py.File(tmp_path / "tf_model.h5", "a") as f:
        f.create_dataset("transformer/tfgp_t2lm_head_model/transformer/wte/embeddings:0", data=ref["tensors"]["wte.weight"])
    with pytest.raises(WeightLoadError, match="wte.weight is stored twice"):
        load_gpt2(tmp_path)


def test_openai_missing_tensor_is_named(tmp_path: Path, ref: dict) -> None:
    tensors = {k: v for k, v in ref["tensors"].items() if k != "h.1.mlp.c_fc.weight"}
    write_openai_checkpoint(tmp_path, tensors, SHAPE)
    with pytest.raises(WeightLoadError, match=r"h\.1\.mlp\.c_fc\.weight \(in file: 'model/h1/mlp/c_fc/w'\)"):
        load_gpt2(tmp_path)


def test_native_with_fewer_layers_in_config_fails(tmp_path: Path, sources: dict) -> None:
    """Keras alone would load this silently (extra blocks ignored); we name the extra tensors."""
    shutil.copytree(sources["native"], tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    config["n_layer"] = 1
    (tmp_path / "native" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError) as info:
        load_gpt2(tmp_path / "native")
    assert len(info.value.unexpected) == 12
    assert "h.1.attn.c_attn.weight" in str(info.value)


def test_untied_lm_head_is_refused(tmp_path: Path, ref: dict) -> None:
    tensors = dict(ref["tensors"])
    tensors["lm_head.weight"] = tensors["wte.weight"] + 1.0
    write_safetensors(tmp_path, tensors, ref["hf_dir"])
    with pytest.raises(WeightLoadError, match="'lm_head.weight' differs from 'wte.weight'"):
        load_gpt2(tmp_path)


def test_config_mismatch_with_decoder_is_refused(sources: dict) -> None:
    decoder = GPT2Decoder(GPT2Config(**{**SHAPE, "n_head": 4}))  # same tensor shapes, different model
    with pytest.raises(WeightLoadError, match="config n_head: the file's config says 3, the model has 4"):
        load_into(decoder, sources["hf_prefixed"])


def test_unsupported_activation_is_refused(tmp_path: Path, ref: dict) -> None:
    write_safetensors(tmp_path, prefixed(ref["tensors"]), ref["hf_dir"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match="activation_function 'relu'"):
        load_gpt2(tmp_path)


class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path, ref: dict) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copyfile(ref["hf_dir"] / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    for target in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(WeightFormatError, match="safetensors") as info:
            load_gpt2(target)
        assert "pytorch_model.bin" in str(info.value)
    assert not marker.exists()
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the trap is real
    assert marker.exists()


def test_empty_folder_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(WeightFormatError, match="model.safetensors"):
        detect_format(tmp_path)


# -- convert --------------------------------------------------------------------------------


def test_convert_round_trips_back_to_transformers(tmp_path: Path, sources: dict, ref: dict, capsys) -> None:
    native = tmp_path / "native"
    assert cli_main(["convert", str(sources["openai"]), "--out", str(native)]) == 0
    assert "loaded 28 tensors" in capsys.readouterr().out
    assert detect_format(native) == "native"
    back = tmp_path / "hf"
    assert cli_main(["convert", str(native), "--out", str(back), "--to", "safetensors"]) == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(back, attn_implementation="eager").eval()
    for name, param in model.state_dict().items():
        canonical = name.removeprefix("transformer.").replace("lm_head.weight", "wte.weight")
        np.testing.assert_array_equal(param.numpy(), ref["tensors"][canonical], err_msg=name)
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["ids"].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-6)


def test_convert_refuses_to_overwrite_and_reports_bad_input(tmp_path: Path, sources: dict, ref: dict, capsys) -> None:
    out = tmp_path / "out"
    assert cli_main(["convert", str(sources["hf_prefixed"]), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["convert", str(sources["hf_prefixed"]), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(sources["hf_prefixed"]), "--out", str(out), "--force"]) == 0
    broken = broken_safetensors(tmp_path, ref, "shape")
    assert cli_main(["convert", str(broken), "--out", str(tmp_path / "never")]) == 1
    assert "h.1.mlp.c_fc.weight" in capsys.readouterr().err
    assert not (tmp_path / "never" / "gpt2.weights.h5").exists()
