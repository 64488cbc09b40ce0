"""Cross-attention maps: the weights the model really used (checked against a NumPy GPT-2
block), one per generated token, grouped into words, and drawn by ``caption --attention``."""

from __future__ import annotations

import json

import numpy as np
import pytest

SIZE = 32


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_cross_weights(decoder, ids: np.ndarray, image_tokens: np.ndarray) -> np.ndarray:
    """Block 0's cross-attention weights [B, H, T, S], computed from the weights in NumPy."""
    w = lambda v: np.asarray(v.numpy(), np.float64)  # noqa: E731
    cfg = decoder.gpt2_config
    heads, width = cfg.n_head, cfg.n_embd
    depth = width // heads
    block = decoder.blocks[0]
    x = w(decoder.wte.embeddings)[ids] + w(decoder.wpe.embeddings)[np.arange(ids.shape[1])]
    h = _layer_norm(x, w(block.ln_1.gamma), w(block.ln_1.beta), cfg.layer_norm_epsilon)
    qkv = h @ w(block.attn.c_attn.kernel) + w(block.attn.c_attn.bias)
    q, k, v = (t.reshape(*ids.shape, heads, depth) for t in np.split(qkv, 3, axis=-1))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(depth)
    length = ids.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -1e9)
    attended = np.einsum("bhts,bshd->bthd", _softmax(scores), v).reshape(*ids.shape, width)
    x = x + attended @ w(block.attn.c_proj.kernel) + w(block.attn.c_proj.bias)
    cross = block.crossattention
    query = _layer_norm(x, w(block.ln_cross_attn.gamma), w(block.ln_cross_attn.beta), cfg.layer_norm_epsilon)
    query = (query @ w(cross.q_attn.kernel) + w(cross.q_attn.bias)).reshape(*ids.shape, heads, depth)
    kv = image_tokens @ w(cross.c_attn.kernel) + w(cross.c_attn.bias)
    keys = kv.reshape(image_tokens.shape[0], image_tokens.shape[1], 2, heads, depth)[:, :, 0]
    return _softmax(np.einsum("bthd,bshd->bhts", query, keys) / np.sqrt(depth))


@pytest.fixture(scope="module")
def captioner(tiny_config):
    from gpt2_effnet.captioner import Captioner

    model = Captioner(tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 2},
                                  model={"image_size": SIZE, "max_caption_length": 6, "feature_stride": 8}))
    rng = np.random.default_rng(1)
    backbone = {id(v) for v in model.encoder.backbone.weights}
    for variable in model.weights:
        if id(variable) not in backbone:
            variable.assign(rng.normal(0, 0.4, variable.shape).astype("float32"))
    return model


def test_maps_are_the_weights_the_model_used(captioner, rng) -> None:
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    ids = rng.integers(0, 50257, (2, 5)).astype("int32")
    image_tokens = np.asarray(captioner.encoder(images), np.float64)
    image_kv = captioner.encode_images(images)
    ours = np.asarray(captioner.decoder.cross_attention_weights(ids, image_kv))
    assert ours.shape == (2, 2, 2, 5, 16)  # batch, layers, heads, tokens, 4 x 4 grid
    np.testing.assert_allclose(ours[:, 0], _numpy_cross_weights(captioner.decoder, ids, image_tokens), atol=2e-5)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)


def test_one_map_per_generated_token_and_words_join_to_the_caption(captioner, rng) -> None:
    from gpt2_effnet.attention import captions_with_attention
    from gpt2_effnet.decoding import caption_strings, generate_captions
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.default()
    images = rng.uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    results = captions_with_attention(captioner, images, tokenizer, num_beams=2)
    assert [r.caption for r in results] == caption_strings(captioner, images, tokenizer=tokenizer, num_beams=2)
    ids = np.asarray(generate_captions(captioner, images, num_beams=2, eos_token_id=tokenizer.eos_token_id))
    maps = captioner.attention_maps(images, ids)
    assert maps.shape == (3, 2, ids.shape[1], 4, 4)
    for result, row_maps in zip(results, maps):
        assert result.token_maps.shape == (len(result.token_ids), 2, 4, 4)
        np.testing.assert_allclose(result.token_maps, np.moveaxis(row_maps[:, : len(result.token_ids)], 1, 0))
        assert " ".join(result.words).replace(" ", "") == result.caption.replace(" ", "")
        assert result.word_maps.shape == (len(result.words), 2, 4, 4)
        np.testing.assert_allclose(result.layer_mean().sum(axis=(-1, -2)), 1.0, atol=1e-5)


def test_caption_attention_writes_one_picture_per_image(captioner, tmp_path, capsys) -> None:
    from PIL import Image

    from gpt2_effnet.cli import main

    run = captioner.save_pretrained(tmp_path / "run")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "maps"
    assert main(["caption", "--checkpoint", str(run), str(photos), "--attention", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    pictures = sorted(p.name for p in out.iterdir())
    assert pictures == ["a.attention.png", "b.attention.png", "c.attention.png"]
    with Image.open(out / "a.attention.png") as picture:
        assert picture.size[0] > 200 and picture.size[1] > 150
