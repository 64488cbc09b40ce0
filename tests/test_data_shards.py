"""Webdataset shards: the writer's layout, index files against DALI's own indexer, and the two
shard readers (DALI on the CPU, pure tf.data) against each other and the CSV pipeline."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from gpt2_effnet.data.captions import read_csv
from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, caption_dataset
from gpt2_effnet.data.shards import expand_shards, read_index, scan_tar, write_shards
from gpt2_effnet.data.synthetic import write_synthetic
from gpt2_effnet.data.wds import wds_dataset
from gpt2_effnet.tokenizer import GPT2Tokenizer

SIZE = 32
MAX_LEN = 16


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.default()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """18 synthetic 32 px JPEGs with one caption each; their (path, caption) pairs."""
    root = tmp_path_factory.mktemp("synth")
    paths = write_synthetic(root, n_images=18, image_size=SIZE, seed=7, captions_per_image=1, val_fraction=0.0, progress=False)
    return read_csv(paths.train_csv)


@pytest.fixture(scope="module")
def shards(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = write_shards(synth, out, samples_per_shard=5, prefix="syn", progress=False)
    return result, str(out / "syn-{000000..000003}.tar")


def collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds)
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}


def test_writer_layout_and_skips(tmp_path, synth) -> None:
    first_jpg = synth.pairs[0][0]
    rgba = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "broken.jpg").write_bytes(open(first_jpg, "rb").read()[:150])
    pairs = [(first_jpg, "first"), (str(tmp_path / "alpha.png"), "png one"), (str(tmp_path / "broken.jpg"), "broken"),
             (str(tmp_path / "nowhere.jpg"), "missing"), *synth.pairs[1:4]]
    result = write_shards(pairs, tmp_path / "out", samples_per_shard=2, prefix="x", progress=False)
    assert (result.written, result.missing, result.unreadable) == (5, 1, 1)
    assert [t.name for t in result.tars] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert all(i.is_file() for i in result.indexes)

    members = {}
    for t in result.tars:
        with tarfile.open(t) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    keys = [f"{i:09d}" for i in range(5)]
    assert sorted(members) == sorted(f"{k}.{e}" for k in keys for e in ("jpg", "json", "txt"))
    assert members["000000000.jpg"] == open(first_jpg, "rb").read()  # RGB JPEG kept byte for byte
    assert members["000000001.jpg"][:3] == b"\xff\xd8\xff"  # PNG re-encoded as JPEG
    png_back = np.asarray(Image.open(io.BytesIO(members["000000001.jpg"])))
    assert png_back.shape == (SIZE, SIZE, 3)
    assert [members[f"{k}.txt"].decode() for k in keys] == ["first", "png one"] + [p[1] for p in synth.pairs[1:4]]
    meta = json.loads(members["000000001.json"])
    assert meta["caption"] == "png one" and meta["source"].endswith("alpha.png") and meta["key"] == "000000001"


def test_index_files_match_dalis_indexer(shards, tmp_path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # installed with nvidia-dali
    result, _ = shards
    for tar, index in zip(result.tars, result.indexes):
        reference = tmp_path / "ref.idx"
        with wds2idx.IndexCreator(str(tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert index.read_bytes() == reference.read_bytes()
        assert read_index(index) == scan_tar(tar)


@pytest.mark.parametrize("chunk", [64, 2])
def test_tfdata_reader_matches_csv_pipeline(synth, shards, tok, chunk, monkeypatch) -> None:
    import gpt2_effnet.data.wds as wds_module

    monkeypatch.setattr(wds_module, "CHUNK", chunk)  # chunks smaller than a tar slice, and larger
    _, pattern = shards
    skips = SkipCounter()
    from_tars = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False), skips=skips))
    from_csv = collect(caption_dataset(synth, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False)))
    assert len(from_tars["images"]) == len(synth) == 18 and skips.skipped == 0
    for key in ("images", "token_ids", "mask"):
        np.testing.assert_array_equal(from_tars[key], from_csv[key])


def test_tfdata_reader_skips_and_names_a_corrupt_image(tmp_path, synth, tok) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "c.tar"), encoder=False) as writer:
        for i, (path, text) in enumerate(synth.pairs[:4]):
            jpg = open(path, "rb").read()
            writer.write({"__key__": f"{i:09d}", "jpg": jpg[:100] if i == 1 else jpg, "txt": text.encode()})
    skips = SkipCounter()
    out = collect(wds_dataset(str(tmp_path / "c.tar"), tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False), skips=skips))
    expected, _ = tok.batch_encode([synth.pairs[i][1] for i in (0, 2, 3)], MAX_LEN)
    np.testing.assert_array_equal(out["token_ids"], expected)
    assert (skips.missing, skips.unreadable) == (0, 1)
    assert skips.unreadable_samples() == [f"{tmp_path / 'c.tar'}:000000001.jpg"]


def test_tfdata_reader_workers_partition(shards, tok) -> None:
    _, pattern = shards
    everything = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False)))["token_ids"]
    for workers in (2, 3, 4):
        parts = [collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False, num_shards=workers, shard_index=i)))["token_ids"]
                 for i in range(workers)]
        # Contiguous slices, in order, covering everything once.
        np.testing.assert_array_equal(np.concatenate(parts), everything)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_tfdata_reader_shuffles_whole_epochs(shards, tok) -> None:
    _, pattern = shards
    plain = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False)))["token_ids"]
    mixed = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=1, shuffle_buffer=8)))["token_ids"]
    assert sorted(map(tuple, mixed)) == sorted(map(tuple, plain)) and not np.array_equal(mixed, plain)


def test_expand_shards(shards, tmp_path) -> None:
    result, pattern = shards
    assert expand_shards(pattern) == [str(t) for t in result.tars]
    with pytest.raises(FileNotFoundError, match="1 of 5"):
        expand_shards(pattern.replace("000003", "000004"))


def test_shards_and_synthetic_clis(tmp_path, synth) -> None:
    from gpt2_effnet.cli import main

    csv_path = synth.source
    assert main(["shards", "--csv", csv_path, "--out", str(tmp_path / "s"), "--per-shard", "10", "--prefix", "p"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["p-000000.idx", "p-000000.tar", "p-000001.idx", "p-000001.tar"]
    paths = write_synthetic(tmp_path / "syn", n_images=6, image_size=SIZE, seed=1, captions_per_image=2,
                            val_fraction=0.5, shards_per=6, progress=False)
    names = sorted(p.name for p in paths.shards)
    assert names == ["train-000000.tar", "val-000000.tar"]
    assert sum(len(scan_tar(p)) for p in paths.shards) == 12


# ---------------------------------------------------------------------- DALI (CPU) against tf.data


@pytest.fixture(scope="module")
def dali():
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("nvidia.dali.plugin.tf")
    from gpt2_effnet.data import dali as module

    return module


@pytest.mark.parametrize("image_size", [SIZE, 20])
@pytest.mark.parametrize("workers", [1, 2])
def test_dali_and_tfdata_yield_the_same_samples(dali, shards, tok, workers, image_size) -> None:
    _, pattern = shards
    for index in range(workers):
        spec = PipelineSpec(image_size, MAX_LEN, 4, shuffle=False, num_shards=workers, shard_index=index)
        a = collect(wds_dataset(pattern, tok, spec))
        b = collect(dali.dali_dataset(pattern, tok, spec, device="cpu"))
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        assert a["images"].shape == b["images"].shape and b["images"].dtype == np.float32
        diff = np.abs(a["images"] - b["images"])
        if image_size == SIZE:  # no resampling: both decoders use the accurate integer IDCT
            assert diff.max() <= 1.0
        else:  # two resamplers: close, not identical
            assert diff.mean() < 0.5 and diff.max() < 12


def test_dali_and_tfdata_skip_a_sample_missing_its_caption(dali, tmp_path, synth, tok) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "m.tar"), encoder=False) as writer:
        for i, (path, text) in enumerate(synth.pairs[:5]):
            sample = {"__key__": f"{i:09d}", "jpg": open(path, "rb").read()}
            if i != 2:
                sample["txt"] = text.encode()
            writer.write(sample)
    results = []
    for make in (wds_dataset, lambda *a, **k: dali.dali_dataset(*a, device="cpu", **k)):
        skips = SkipCounter()
        results.append(collect(make(str(tmp_path / "m.tar"), tok, PipelineSpec(SIZE, MAX_LEN, 3, shuffle=False), skips=skips)))
        assert skips.missing == 1 and skips.num_samples == 4
    np.testing.assert_array_equal(results[0]["token_ids"], results[1]["token_ids"])
    expected, _ = tok.batch_encode([t for i, (_, t) in enumerate(synth.pairs[:5]) if i != 2], MAX_LEN)
    np.testing.assert_array_equal(results[1]["token_ids"], expected)


def test_dali_shuffled_epoch_and_endless_stream(dali, shards, tok) -> None:
    _, pattern = shards
    plain = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False)))["token_ids"]
    mixed = collect(dali.dali_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=3, repeat=False), device="cpu"))["token_ids"]
    assert sorted(map(tuple, mixed)) == sorted(map(tuple, plain)) and not np.array_equal(mixed, plain)
    endless = dali.dali_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, repeat=True), device="cpu")
    batches = list(endless.take(7))  # 28 samples > the 18 in one epoch
    assert all(b["images"].shape == (4, SIZE, SIZE, 3) for b in batches)


def test_dali_and_tfdata_skip_images_over_the_pixel_limit_from_their_header(dali, tmp_path, tok) -> None:
    import io

    import webdataset as wds
    from PIL import Image

    sizes = [16, 60, 16, 70, 16, 16]
    with wds.TarWriter(str(tmp_path / "p.tar"), encoder=False) as writer:
        for i, side in enumerate(sizes):
            buffer = io.BytesIO()
            Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(buffer, format="JPEG")
            writer.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": f"picture {i}".encode()})
    spec = PipelineSpec(SIZE, MAX_LEN, 2, shuffle=False, max_image_pixels=50 * 50)
    kept = {}
    for name, make in (("tfdata", wds_dataset), ("dali", lambda *a, **k: dali.dali_dataset(*a, device="cpu", **k))):
        skips = SkipCounter()
        out = collect(make(str(tmp_path / "p.tar"), tok, spec, skips=skips))
        kept[name] = out["token_ids"]
        assert len(out["token_ids"]) == 4 and skips.unreadable == 2, name
    np.testing.assert_array_equal(kept["tfdata"], kept["dali"])
