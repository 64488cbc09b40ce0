"""The captioner's structure: gating, freezing, encoder variants, persistence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.encoder import BACKBONES, ImageEncoder

# Heads of width 10 and two special tokens: shapes a power-of-two-only bug would miss.
TINY_GPT2 = {"vocab_size": 97, "n_positions": 24, "n_embd": 30, "n_layer": 2, "n_head": 3}


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(**model)``: the kit's tiny captioner with this module's odd shapes."""
    return lambda **model: tiny_config(gpt2=TINY_GPT2, model={"encoder_heads": 3, "num_special_tokens": 2, **model})


def random_images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    return rng.uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def gated(config) -> Captioner:
    return Captioner(config(cross_attention="gated"))


def test_gated_captioner_at_init_is_plain_gpt2(gated: Captioner, rng) -> None:
    ids = rng.integers(0, 97 + 2, (3, 9))
    plain = np.asarray(gated.decoder(ids))
    for _ in range(2):
        images = random_images(rng, 3)
        with_image = np.asarray(gated({"images": images, "token_ids": ids}))
        np.testing.assert_array_equal(with_image, plain)


def test_opening_the_gate_lets_the_image_in(config, rng) -> None:
    model = Captioner(config(cross_attention="gated"))
    for block in model.decoder.blocks:
        block.crossattention.gate.assign(0.5)
    ids = rng.integers(0, 97, (2, 5))
    # A randomly initialised EfficientNet maps every image to almost the same features,
    # so feed the cross-attention distinct image tokens directly.
    a = np.asarray(model.decoder(ids, image_kv=model.decoder.project_image(rng.normal(size=(2, 4, 30)))))
    b = np.asarray(model.decoder(ids, image_kv=model.decoder.project_image(rng.normal(size=(2, 4, 30)))))
    assert np.abs(a - b).max() > 1e-3


def test_ungated_captioner_sees_the_image(config, rng) -> None:
    model = Captioner(config(cross_attention="ungated"))
    ids = rng.integers(0, 97, (2, 5))
    a = np.asarray(model({"images": random_images(rng, 2), "token_ids": ids}))
    plain = np.asarray(model.decoder(ids))
    assert np.abs(a - plain).max() > 1e-3


def test_cached_decoding_with_image_equals_full_forward(config, rng) -> None:
    model = Captioner(config(cross_attention="ungated"))
    images = random_images(rng, 2)
    ids = rng.integers(0, 99, (2, 8))
    image_kv = model.encode_images(images)
    full = np.asarray(model.decoder(ids, image_kv=image_kv))
    cache = model.decoder.init_cache(2, 12)
    steps = []
    for t in range(ids.shape[1]):
        logits, cache = model.decoder.call_with_cache(ids[:, t : t + 1], cache, image_kv=image_kv)
        steps.append(np.asarray(logits)[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
    # A prompt fed in one call, then single steps, gives the same logits too.
    logits, cache = model.decoder.call_with_cache(ids[:, :5], model.decoder.init_cache(2, 12), image_kv=image_kv)
    np.testing.assert_allclose(np.asarray(logits), full[:, :5], atol=1e-5)


def test_rows_grouped_per_image_equal_the_image_kv_repeated(config, rng) -> None:
    """Beams and return sequences (G rows per image, image-major) read their image's K/V
    once: the forward, the cached steps and the attention maps equal those with the K/V
    repeated per row, and differ from a wrong pairing of rows and images."""
    model = Captioner(config(cross_attention="ungated", feature_stride=8))  # 16 image tokens, not 1
    group = 3
    shape = tuple(model.encode_images(random_images(rng, 2)).shape)  # two images far apart:
    image_kv = rng.normal(0, 1, shape).astype("float32")  # an untrained backbone's are alike
    repeated = np.repeat(np.asarray(image_kv), group, axis=0)
    ids = rng.integers(0, 99, (2 * group, 6))
    grouped = np.asarray(model.decoder(ids, image_kv=image_kv))
    np.testing.assert_allclose(grouped, np.asarray(model.decoder(ids, image_kv=repeated)), atol=1e-5)
    tiled = np.tile(np.asarray(image_kv), (group, 1, 1, 1, 1, 1))  # image-minor: the wrong pairing
    assert np.abs(grouped - np.asarray(model.decoder(ids, image_kv=tiled))).max() > 1e-3
    cache = model.decoder.init_cache(2 * group, 8)
    for t in range(ids.shape[1]):
        logits, cache = model.decoder.call_with_cache(ids[:, t : t + 1], cache, image_kv=image_kv)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], grouped[:, t], atol=1e-5)
    maps = np.asarray(model.decoder.cross_attention_weights(ids, image_kv))
    np.testing.assert_allclose(maps, np.asarray(model.decoder.cross_attention_weights(ids, repeated)), atol=1e-6)


def test_logits_cover_special_tokens_and_special_embeddings_are_used(gated: Captioner, rng) -> None:
    bos = 97
    logits = np.asarray(gated.decoder(np.array([[bos, 5]])))
    assert logits.shape == (1, 2, 99)
    other = np.asarray(gated.decoder(np.array([[bos + 1, 5]])))
    assert np.abs(logits - other).max() > 1e-6


@pytest.mark.parametrize("name, grid", [("efficientnetb0", 2), ("efficientnetv2-b0", 2)])
def test_encoder_flattens_feature_map(name: str, grid: int, rng) -> None:
    encoder = ImageEncoder(name, image_size=64, width=16, num_layers=1, num_heads=2)
    tokens = np.asarray(encoder(random_images(rng, 2, 64)))
    assert encoder.sequence_length == grid * grid
    assert tokens.shape == (2, grid * grid, 16)


def test_every_named_backbone_exists() -> None:
    assert {"efficientnetb0", "efficientnetb7", "efficientnetv2-b0", "efficientnetv2-b3", "efficientnetv2-s",
            "efficientnetv2-m", "efficientnetv2-l"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone"):
        ImageEncoder("resnet50", image_size=32, width=8, num_layers=0, num_heads=1)


def test_long_image_sequence_warns_and_never_prompts() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageEncoder("efficientnetb0", image_size=33 * 32, width=8, num_layers=0, num_heads=1)
    assert any("1089 image tokens" in str(w.message) for w in caught)


def test_freezing_follows_the_config(config) -> None:
    cfg = config(cross_attention="gated")
    frozen = Captioner(cfg)
    trainable = {w.path for w in frozen.trainable_weights}
    assert not any("efficientnet" in p or p.startswith("encoder/stem") for p in trainable if "backbone" in p)
    backbone_vars = {w.path for w in frozen.encoder.backbone.weights}
    assert not trainable & backbone_vars
    assert frozen.decoder.wte.embeddings.path not in trainable
    assert frozen.decoder.wte_special.embeddings.path in trainable
    assert all(b.crossattention.gate.path in trainable for b in frozen.decoder.blocks)
    assert frozen.decoder.blocks[0].attn.c_attn.kernel.path in trainable

    opened = Captioner(cfg.replace(trainable={"backbone": True, "gpt2_embeddings": True, "gpt2_blocks": False}))
    trainable = {w.path for w in opened.trainable_weights}
    assert {w.path for w in opened.encoder.backbone.trainable_weights} <= trainable
    assert opened.decoder.wte.embeddings.path in trainable
    assert opened.decoder.blocks[0].attn.c_attn.kernel.path not in trainable
    assert opened.decoder.blocks[0].crossattention.q_attn.kernel.path in trainable


def test_save_and_load_round_trip(config, tmp_path, rng) -> None:
    model = Captioner(config(cross_attention="ungated"))
    batch = {"images": random_images(rng, 2), "token_ids": rng.integers(0, 99, (2, 6))}
    expected = np.asarray(model(batch))
    model.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(Captioner.load(tmp_path / "m.keras")(batch)), expected)
    model.save_pretrained(tmp_path / "run")
    reloaded = Captioner.load(tmp_path / "run")
    assert reloaded.captioner_config == model.captioner_config
    np.testing.assert_array_equal(np.asarray(reloaded(batch)), expected)


@pytest.mark.slow
def test_decoder_runs_identically_on_the_torch_backend(tmp_path, rng) -> None:
    """Layers are pure keras.ops: the same weights give the same logits under PyTorch."""
    pytest.importorskip("torch")
    from gpt2_effnet.config import GPT2Config
    from gpt2_effnet.gpt2 import GPT2Decoder

    decoder = GPT2Decoder(GPT2Config(**TINY_GPT2), num_special_tokens=1)
    ids = rng.integers(0, 98, (2, 7))
    decoder.save_weights(tmp_path / "d.weights.h5")
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "tf.npy", np.asarray(decoder(ids)))
    script = textwrap.dedent(f"""
        import os, numpy as np
        os.environ["KERAS_BACKEND"] = "torch"
        import keras
        assert keras.backend.backend() == "torch"
        from gpt2_effnet.config import GPT2Config
        from gpt2_effnet.gpt2 import GPT2Decoder
        d = GPT2Decoder(GPT2Config(**{TINY_GPT2!r}), num_special_tokens=1)
        d.load_weights(r"{tmp_path / 'd.weights.h5'}")
        ids = np.load(r"{tmp_path / 'ids.npy'}")
        full = keras.ops.convert_to_numpy(d(ids))
        cache = d.init_cache(2, 8)
        steps = []
        for t in range(ids.shape[1]):
            logits, cache = d.call_with_cache(ids[:, t:t+1], cache)
            steps.append(keras.ops.convert_to_numpy(logits)[:, 0])
        np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
        np.save(r"{tmp_path / 'torch.npy'}", full)
        import sys; assert "tensorflow" not in sys.modules, "the model path imported TensorFlow"
    """)
    env = {**__import__("os").environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "tf.npy"), atol=1e-5)


def test_backbone_bn_momentum_is_applied(config) -> None:
    import keras

    model = Captioner(config(backbone_bn_momentum=0.9))
    norms = [l for l in model.encoder.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.9 for l in norms)
    default = Captioner(config())
    assert all(l.momentum == 0.99 for l in default.encoder.backbone.layers
               if isinstance(l, keras.layers.BatchNormalization))


@pytest.mark.parametrize("backbone, stride, grid, last", [
    ("efficientnetb0", 16, 4, "block6a_expand_activation"),
    ("efficientnetb0", 8, 8, "block4a_expand_activation"),
    ("efficientnetv2-b0", 8, 8, "block4a_expand_activation"),
    ("efficientnetb0", 32, 2, "top_activation"),
])
def test_feature_stride_picks_the_last_map_at_that_stride(backbone, stride, grid, last) -> None:
    import keras

    encoder = ImageEncoder(backbone, image_size=64, width=30, num_layers=0, num_heads=3, feature_stride=stride,
                           drop_path=0.0)
    assert encoder.grid == (grid, grid) and encoder.sequence_length == grid * grid
    # The widest activation at that resolution (the next stage's expanded input; at 32
    # the 1x1-expanded top map), and nothing after it is built.
    assert encoder.backbone.layers[-1].name == last
    if stride < 32:
        full = ImageEncoder(backbone, image_size=64, width=30, num_layers=0, num_heads=3).backbone
        assert len(encoder.backbone.layers) < len(full.layers)
    drops = [l for l in encoder.backbone.layers if isinstance(l, keras.layers.Dropout) and l.name.endswith("_drop")]
    assert drops and all(l.rate == 0.0 for l in drops)
    out = encoder(np.zeros((2, 64, 64, 3), "float32"))
    assert tuple(out.shape) == (2, grid * grid, 30)
