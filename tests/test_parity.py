"""Logit parity of ``load_gpt2`` with Hugging Face ``GPT2LMHeadModel`` (PyTorch, CPU).

The reference is transformers' own GPT-2: tiny random models are written with
``save_pretrained`` and read back by our loader, so a misplaced tensor, a wrong
LayerNorm epsilon or a wrong attention split shows up as a logit difference.
Run with ``pytest -s`` to see the measured max |Δlogit| per shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt2_effnet.weights import load_gpt2  # noqa: E402

# float32 against transformers' float32: measured 0.7-1.7e-6 on the shapes below (README
# quotes both figures; tests/test_readme.py keeps them in step).
TOLERANCE = 1e-5

# Heads not a power of two, odd vocabularies, 1-3 layers, non-default epsilons.
SHAPES = {
    "v97-e15-h3-l1-eps1e-6": dict(vocab_size=97, n_positions=12, n_embd=15, n_layer=1, n_head=3, layer_norm_epsilon=1e-6),
    "v101-e40-h5-l3-eps1e-3": dict(vocab_size=101, n_positions=20, n_embd=40, n_layer=3, n_head=5, layer_norm_epsilon=1e-3),
    "v64-e24-h6-l2-eps1e-5": dict(vocab_size=64, n_positions=16, n_embd=24, n_layer=2, n_head=6, layer_norm_epsilon=1e-5),
    "v131-e21-h7-l2-eps3e-4": dict(vocab_size=131, n_positions=9, n_embd=21, n_layer=2, n_head=7, layer_norm_epsilon=3e-4),
}


def randomize(model: "torch.nn.Module", seed: int) -> None:
    """Replace HF's init (LayerNorm 1/0, zero biases) by values where every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def make_case(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A randomised HF GPT-2 of shape ``SHAPES[name]`` saved as safetensors, with its logits for fixed ids."""
    shape = SHAPES[name]
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed=len(name))
    folder: Path = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, shape["vocab_size"], size=(2, shape["n_positions"]), dtype=np.int64)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits.numpy()
    return {"name": name, "shape": shape, "folder": folder, "ids": ids, "reference": reference}


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(case: dict):
    return load_gpt2(case["folder"])


def test_logits_match_transformers(case: dict, loaded) -> None:
    logits = np.asarray(loaded(case["ids"].astype(np.int32)))
    assert logits.shape == case["reference"].shape
    delta = float(np.max(np.abs(logits - case["reference"])))
    scale = float(np.max(np.abs(case["reference"])))
    print(f"\n[parity] {case['name']}: max |Δlogit| = {delta:.3g} (max |logit| {scale:.3g})")
    assert delta <= TOLERANCE
    # The logits must not be trivially small, or the tolerance would prove nothing.
    assert scale > 1.0


def test_cached_decoding_matches_full_forward_and_transformers(case: dict, loaded) -> None:
    ids = case["ids"].astype(np.int32)
    batch, length = ids.shape
    full = np.asarray(loaded(ids))
    cache = loaded.init_cache(batch, length)
    steps = []
    for position in range(length):
        step_logits, cache = loaded.call_with_cache(ids[:, position : position + 1], cache)
        steps.append(np.asarray(step_logits)[:, 0])
    incremental = np.stack(steps, axis=1)
    delta_full = float(np.max(np.abs(incremental - full)))
    delta_hf = float(np.max(np.abs(incremental - case["reference"])))
    print(f"\n[cache] {case['name']}: max |Δ| cached vs full {delta_full:.3g}, cached vs transformers {delta_hf:.3g}")
    assert delta_full <= 1e-5
    assert delta_hf <= TOLERANCE


def test_cached_prefill_then_steps(case: dict, loaded) -> None:
    """A multi-token prefill at position 0, then single steps, as a sampler would run it."""
    ids = case["ids"].astype(np.int32)
    batch, length = ids.shape
    prefill = length // 2
    cache = loaded.init_cache(batch, length)
    first, cache = loaded.call_with_cache(ids[:, :prefill], cache)
    rest = []
    for position in range(prefill, length):
        step_logits, cache = loaded.call_with_cache(ids[:, position : position + 1], cache)
        rest.append(np.asarray(step_logits)[:, 0])
    incremental = np.concatenate([np.asarray(first), np.stack(rest, axis=1)], axis=1)
    assert float(np.max(np.abs(incremental - case["reference"]))) <= TOLERANCE


def test_default_captioner_on_gpt2_weights_starts_as_exactly_gpt2(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The library default (gated cross-attention) on pretrained weights: GPT-2's logits, whatever the image."""
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import CaptionerConfig

    case = make_case("v101-e40-h5-l3-eps1e-3", tmp_path_factory)
    shape = case["shape"]
    config = CaptionerConfig.from_dict({
        "gpt2": shape,
        "model": {"image_size": 32, "encoder_layers": 1, "encoder_heads": 1, "max_caption_length": shape["n_positions"]},
    })
    assert config.model.cross_attention == "gated"
    model = Captioner.create(config, gpt2=case["folder"])
    rng = np.random.default_rng(3)
    ids = case["ids"].astype(np.int32)
    for _ in range(2):
        images = rng.uniform(0, 255, (len(ids), 32, 32, 3)).astype(np.float32)
        logits = np.asarray(model({"images": images, "token_ids": ids}))[..., : shape["vocab_size"]]
        assert float(np.max(np.abs(logits - case["reference"]))) <= TOLERANCE


def test_tolerance_catches_a_small_weight_error(tmp_path: Path) -> None:
    """Negative control: one bias entry off by 0.01 must break parity, so the check above can fail.

    (One entry: a uniform shift of a whole bias would be removed by the next LayerNorm.)
    """
    shape = SHAPES["v64-e24-h6-l2-eps1e-5"]
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(1).integers(0, shape["vocab_size"], size=(1, shape["n_positions"]))
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits.numpy()
    decoder = load_gpt2(tmp_path)
    bias = decoder.named_weights()["h.1.mlp.c_proj.bias"]
    values = bias.numpy()
    values[0] += 0.01
    bias.assign(values)
    delta = float(np.max(np.abs(np.asarray(decoder(ids.astype(np.int32))) - reference)))
    assert delta > TOLERANCE
