"""Config readers and validation: errors must name the bad key."""

from __future__ import annotations

import json

import pytest

from gpt2_effnet.config import PRESETS, CaptionerConfig, ConfigError, GPT2Config


def test_124m_preset_matches_transformers_default() -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Config()
    ours = GPT2Config.preset("124M")
    assert (ours.vocab_size, ours.n_positions, ours.n_embd, ours.n_layer, ours.n_head) == (
        ref.vocab_size,
        ref.n_positions,
        ref.n_embd,
        ref.n_layer,
        ref.n_head,
    )
    assert ours.layer_norm_epsilon == ref.layer_norm_epsilon


def test_presets_have_published_shapes() -> None:
    # (n_embd, n_layer, n_head) from the GPT-2 paper / OpenAI's hparams.json files.
    published = {"124M": (768, 12, 12), "355M": (1024, 24, 16), "774M": (1280, 36, 20), "1558M": (1600, 48, 25)}
    assert {k: (v.n_embd, v.n_layer, v.n_head) for k, v in PRESETS.items()} == published


def test_reads_hf_config_written_by_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(vocab_size=97, n_positions=40, n_embd=30, n_layer=3, n_head=5,
                            layer_norm_epsilon=1e-6).save_pretrained(tmp_path)
    cfg = GPT2Config.from_dir(tmp_path)
    assert cfg == GPT2Config(vocab_size=97, n_positions=40, n_embd=30, n_layer=3, n_head=5, layer_norm_epsilon=1e-6)


def test_reads_openai_hparams(tmp_path) -> None:
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024,
                                                       "n_head": 16, "n_layer": 24}))
    assert GPT2Config.from_dir(tmp_path) == PRESETS["355M"]


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        GPT2Config.from_dir(tmp_path)


def test_bad_gpt2_shape_rejected() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)


YAML = """
gpt2: 124M
model:
  backbone: efficientnetv2-s
  image_size: 400
  encoder_layers: 2
  encoder_heads: 12
  cross_attention: ungated
optim:
  learning_rate: 6.25e-5
  epsilon: 1e-8
"""


def test_yaml_round_trip(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    cfg = CaptionerConfig.load(path)
    assert cfg.gpt2 == PRESETS["124M"]
    assert cfg.model.backbone == "efficientnetv2-s" and cfg.model.cross_attention == "ungated"
    assert cfg.optim.epsilon == 1e-8  # YAML reads "1e-8" as a string; it must become a float
    cfg.save(tmp_path / "again.yaml")
    assert CaptionerConfig.load(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  backbon: efficientnetb0\n", "model.backbon"),
        ("modle: {}\n", "modle"),
        ("model:\n  cross_attention: maybe\n", "model.cross_attention"),
        ("model:\n  image_size: big\n", "model.image_size"),
        ("trainable:\n  backbone: 3\n", "trainable.backbone"),
        ("gpt2: 9000M\n", "gpt2"),
        ("gpt2: {n_embd: 32, n_head: 4, n_layers: 2}\n", "gpt2.n_layers"),
        ("optim:\n  schedule: linear\n", "optim.schedule"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        CaptionerConfig.load(path)
    assert key in str(err.value)
    assert str(path) in str(err.value)


def test_replace_validates() -> None:
    cfg = CaptionerConfig()
    assert cfg.replace(model={"image_size": 64}).model.image_size == 64
    with pytest.raises(ConfigError, match="model.cross_attention"):
        cfg.replace(model={"cross_attention": "sometimes"})


def test_new_model_keys_are_checked_and_round_trip(tmp_path) -> None:
    config = CaptionerConfig.from_dict({"model": {"feature_stride": 8, "backbone_drop_path": 0.0,
                                                  "output_vocabulary": [3, 1, 2]}, "train": {"precision": "auto"}})
    path = tmp_path / "c.yaml"
    config.save(path)
    again = CaptionerConfig.load(path)
    assert again == config and again.model.output_vocabulary == [3, 1, 2]
    for model, words in (({"feature_stride": 4}, "feature_stride must be 8, 16 or 32"),
                         ({"backbone_drop_path": 1.0}, "backbone_drop_path must be in [0, 1)"),
                         ({"output_vocabulary": "all"}, "output_vocabulary must be null, 'captions'")):
        with pytest.raises(ConfigError, match="model\\.") as err:
            CaptionerConfig.from_dict({"model": model})
        assert words in str(err.value)
    with pytest.raises(ConfigError, match="train.precision"):
        CaptionerConfig.from_dict({"train": {"precision": "bfloat16"}})


def test_auto_precision_follows_the_cpus_bfloat16_support() -> None:
    from gpt2_effnet.training.precision import cpu_has_bfloat16

    zen4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
    spr = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    skylake = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert cpu_has_bfloat16(zen4) and cpu_has_bfloat16(spr)
    assert not cpu_has_bfloat16(skylake) and not cpu_has_bfloat16("")
