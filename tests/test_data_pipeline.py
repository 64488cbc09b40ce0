"""CSV / COCO reading and the tf.data caption pipeline: bad files skipped and counted, formats
turned into RGB, captions aligned with their images, per-pipeline shares, exact resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from gpt2_effnet.data.captions import CaptionFileError, read_coco, read_csv
from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, caption_dataset
from gpt2_effnet.tokenizer import GPT2Tokenizer

SIZE = 32
MAX_LEN = 12


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.default()


def smooth_rgb(seed: int, size: int = SIZE) -> np.ndarray:
    """A gentle colour gradient (JPEG keeps it well, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    base = rng.uniform(30, 220, size=3)
    slope = rng.uniform(-30, 30, size=(2, 3))
    img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_csv(path, rows, header=("image", "caption")) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds)
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}


def texts_of(tok: GPT2Tokenizer, out: dict[str, np.ndarray]) -> list[str]:
    return [tok.decode(ids[1 : m.sum() - 1]) for ids, m in zip(out["token_ids"], out["mask"])]


@pytest.fixture()
def mixed_set(tmp_path):
    """corrupt JPEG, RGBA PNG, missing file, grayscale JPEG, in that row order."""
    rgb = smooth_rgb(1)
    alpha = np.linspace(0, 255, SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE, 1)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(tmp_path / "alpha.png")
    gray = smooth_rgb(2)[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.jpg", quality=95)
    good = tmp_path / "gray.jpg"
    (tmp_path / "corrupt.jpg").write_bytes(good.read_bytes()[:200] + b"\x00garbage" * 20)
    rows = [("corrupt.jpg", "a broken file"), ("alpha.png", "a picture with alpha"),
            ("missing.jpg", "a file that is not there"), ("gray.jpg", "a grey picture")]
    write_csv(tmp_path / "captions.csv", rows)
    return tmp_path, rgb, gray


def test_bad_images_keep_their_row_masked_and_counted_formats_become_rgb(mixed_set, tok) -> None:
    folder, rgb, gray = mixed_set
    captions = read_csv(folder / "captions.csv")
    assert len(captions) == 4 and captions.num_missing == 1

    skips = SkipCounter()
    out = collect(caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, batch_size=3, shuffle=False), skips=skips))
    # The missing file is left out up front; the corrupt one keeps its place, masked.
    assert out["images"].shape == (3, SIZE, SIZE, 3) and out["images"].dtype == np.uint8
    assert (skips.skipped, skips.missing, skips.unreadable) == (2, 1, 1)
    assert skips.unreadable_samples() == [str(folder / "corrupt.jpg")]
    assert "skipped 2" in skips.summary() and "corrupt.jpg" in skips.summary()
    assert out["mask"][0].sum() == 0 and not out["images"][0].any()

    # Images stay aligned with their own captions, in file order.
    ids, mask = tok.batch_encode(["a picture with alpha", "a grey picture"], MAX_LEN)
    np.testing.assert_array_equal(out["token_ids"][1:], ids)
    np.testing.assert_array_equal(out["mask"][1:], mask)
    assert out["token_ids"].dtype == np.int32 and out["mask"].dtype == np.int32
    # RGBA -> its RGB channels (lossless PNG, same size: exact); grayscale -> three equal channels.
    np.testing.assert_array_equal(out["images"][1], rgb)
    g = out["images"][2].astype(int)
    np.testing.assert_array_equal(g[..., 0], g[..., 1]) and np.testing.assert_array_equal(g[..., 1], g[..., 2])
    assert np.abs(g[..., 0] - gray).mean() < 2.0


def test_skips_counted_every_time_with_shuffle_and_repeat(mixed_set, tok) -> None:
    folder, _, _ = mixed_set
    skips = SkipCounter()
    ds = caption_dataset(read_csv(folder / "captions.csv"), tok,
                         PipelineSpec(SIZE, MAX_LEN, batch_size=3, shuffle=True, seed=3, repeat=True), skips=skips)
    rows = [b["mask"].numpy().sum(axis=1) > 0 for b in ds.take(4)]  # 4 epochs of 3 present rows
    assert sum(int((~r).sum()) for r in rows) == 4  # the corrupt file, once an epoch, always masked
    assert skips.missing == 1 and skips.num_samples == 3 and skips.unreadable >= 4 and skips.attempted >= 12


def test_cmyk_jpeg_becomes_rgb(tmp_path, tok) -> None:
    rgb = smooth_rgb(3)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    write_csv(tmp_path / "c.csv", [("cmyk.jpg", "ink")])
    out = collect(caption_dataset(read_csv(tmp_path / "c.csv"), tok, PipelineSpec(SIZE, MAX_LEN, 1, shuffle=False)))
    assert np.abs(out["images"][0].astype(int) - rgb).mean() < 4.0


def test_resize_to_model_size(tmp_path, tok) -> None:
    Image.fromarray(smooth_rgb(4, 50)[:, :40]).save(tmp_path / "wide.png")  # 40 x 50, not square
    write_csv(tmp_path / "w.csv", [("wide.png", "a wide one")])
    out = collect(caption_dataset(read_csv(tmp_path / "w.csv"), tok, PipelineSpec(24, MAX_LEN, 1, shuffle=False)))
    assert out["images"].shape == (1, 24, 24, 3)
    assert 0.0 <= out["images"].min() and out["images"].max() <= 255.0


def test_wrong_columns_fail_listing_the_columns(tmp_path, tok) -> None:
    Image.fromarray(smooth_rgb(5)).save(tmp_path / "x.png")
    write_csv(tmp_path / "w.csv", [("x.png", "hello")], header=("file", "text"))
    with pytest.raises(CaptionFileError) as err:
        read_csv(tmp_path / "w.csv")
    message = str(err.value)
    assert "'image'" in message and "'caption'" in message and "['file', 'text']" in message
    pairs = read_csv(tmp_path / "w.csv", image_column="file", caption_column="text")
    assert pairs.existing() == [(str(tmp_path / "x.png"), "hello")]


def test_coco_json(tmp_path, tok) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(smooth_rgb(6)).save(tmp_path / "img" / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
        "annotations": [{"image_id": 7, "caption": "first"}, {"image_id": 9, "caption": "second"},
                        {"image_id": 7, "caption": "third "}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    captions = read_coco(tmp_path / "captions.json", tmp_path / "img")
    a, b = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")
    assert list(captions.pairs) == [(a, "first"), (b, "second"), (a, "third")]
    assert captions.missing == {b} and captions.num_missing == 1
    skips = SkipCounter()
    out = collect(caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False), skips=skips))
    assert texts_of(tok, out) == ["first", "third"] and skips.missing == 1

    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(CaptionFileError, match="annotations"):
        read_coco(tmp_path / "bad.json")


@pytest.fixture()
def numbered_set(tmp_path):
    for i in range(4):
        Image.fromarray(smooth_rgb(10 + i)).save(tmp_path / f"{i}.png")
    rows = [(f"{i % 4}.png", f"picture number {i}") for i in range(11)]
    write_csv(tmp_path / "n.csv", rows)
    return read_csv(tmp_path / "n.csv"), [r[1] for r in rows]


def test_workers_partition_the_samples(numbered_set, tok) -> None:
    captions, texts = numbered_set
    for workers in (1, 2, 3):
        shares = []
        for index in range(workers):
            skips = SkipCounter()
            out = collect(caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=index, num_shards=workers, shard_index=index), skips=skips))
            shares.append(texts_of(tok, out))
            assert skips.num_samples == len(shares[-1])
        assert sorted(t for s in shares for t in s) == sorted(texts)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="shard_index"):
        caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, 4, num_shards=2, shard_index=2))


def test_shuffle_is_seeded_and_differs_per_epoch(numbered_set, tok) -> None:
    captions, texts = numbered_set
    n = len(texts)

    def epochs(seed):
        ds = caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, n, shuffle=True, seed=seed, repeat=True, drop_remainder=True, deterministic=True))
        return [texts_of(tok, {k: v.numpy() for k, v in b.items()}) for b in ds.take(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again
    assert sorted(first[0]) == sorted(first[1]) == sorted(texts)
    assert first[0] != first[1] and first[0] != texts and first != other


def test_image_cache_serves_the_same_batches_and_counts_the_same_skips(mixed_set, tok, capsys) -> None:
    """A cached epoch equals a streamed one: pixels, captions, order, skipped and named files."""
    from gpt2_effnet.data.pipeline import ImageCache

    folder, _, _ = mixed_set
    # Two more rows on already listed images: the cache holds each file once.
    rows = list(csv.reader(open(folder / "captions.csv")))[1:] + [["alpha.png", "alpha again"], ["corrupt.jpg", "again"]]
    write_csv(folder / "captions.csv", rows)
    captions = read_csv(folder / "captions.csv")
    spec = PipelineSpec(SIZE, MAX_LEN, batch_size=2, shuffle=False)
    streamed_skips, cached_skips = SkipCounter(), SkipCounter()
    streamed = collect(caption_dataset(captions, tok, spec, skips=streamed_skips))
    cache = ImageCache(budget_bytes=10 * 2**20)
    for epoch in range(2):
        cached_skips = SkipCounter()
        cached = collect(caption_dataset(captions, tok, spec, skips=cached_skips, cache=cache))
        for key in streamed:
            np.testing.assert_array_equal(cached[key], streamed[key])
        assert (cached_skips.missing, cached_skips.unreadable) == (streamed_skips.missing, streamed_skips.unreadable) == (1, 2)
        assert cached_skips.unreadable_samples() == streamed_skips.unreadable_samples() == [str(folder / "corrupt.jpg")] * 2
    # Decoded once (3 distinct files on disk, one of them corrupt), not once per epoch.
    assert capsys.readouterr().out.count("decoded 2 of 3 images into memory") == 1

    # Over the budget: streamed from disk, nothing decoded up front.
    small = ImageCache(budget_bytes=SIZE * SIZE * 3 * 2)
    assert small.images([str(folder / n) for n in ("alpha.png", "gray.jpg", "corrupt.jpg")], spec) is None
    again = collect(caption_dataset(captions, tok, spec, cache=small))
    np.testing.assert_array_equal(again["images"], streamed["images"])


def test_training_pipelines_run_without_the_autotuner_thread(numbered_set, tok) -> None:
    # The autotuner's thread sleeps for up to a minute between rounds, and deleting an
    # iterator waits for it (a 44 s stall at the end of one demo run). Every pipeline
    # (CSV/COCO, shards, DALI) takes its options from pipeline_options.
    from gpt2_effnet.data.pipeline import ImageCache, pipeline_options

    captions, _ = numbered_set
    spec = PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=0)
    for cache in (None, ImageCache(2**30)):
        options = caption_dataset(captions, tok, spec, cache=cache).options()
        assert options.autotune.enabled is False
        assert options.deterministic is True  # positions must not move: resume reads from a batch
    assert pipeline_options(deterministic=True).autotune.enabled is False


def test_a_resumed_epoch_starts_at_its_batch_without_decoding_what_came_before(numbered_set, tok, monkeypatch) -> None:
    import gpt2_effnet.image_input as image_input

    captions, texts = numbered_set
    spec = dict(shuffle=True, seed=4, drop_remainder=True)
    whole = texts_of(tok, collect(caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, 2, **spec))))
    decoded = []
    original = image_input.decode_rgb
    monkeypatch.setattr(image_input, "decode_rgb", lambda *a, **k: decoded.append(a[0]) or original(*a, **k))
    tail = texts_of(tok, collect(caption_dataset(captions, tok, PipelineSpec(SIZE, MAX_LEN, 2, start_batch=3, **spec))))
    assert tail == whole[6:] and len(decoded) == len(texts) - 6
