"""Webdataset shards: the writer's layout, the tar parser against tarfile and DALI's indexer, the
shard readers (tf.data and DALI on the CPU) against each other and the CSV pipeline, from local
files, http, S3 (moto) and pipes, with bad shards counted instead of fatal."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpt2_effnet.data import locations
from gpt2_effnet.data.captions import read_csv
from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, caption_dataset
from gpt2_effnet.data.shard_index import ShardSet, resolve
from gpt2_effnet.data.shards import write_shards
from gpt2_effnet.data.synthetic import write_synthetic
from gpt2_effnet.data.tars import MemberReader, TarFormatError, format_index, parse_index, samples, scan
from gpt2_effnet.data.wds import wds_dataset
from gpt2_effnet.tokenizer import GPT2Tokenizer

from stores import environment, http_server, s3_server, upload

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


def _jpeg(value: int, side: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_tar(path: Path, samples_: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples_:
            writer.write(sample)


# ---------------------------------------------------------------------- writing and parsing


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
    assert [members[f"{k}.txt"].decode() for k in keys] == ["first", "png one"] + [p[1] for p in synth.pairs[1:4]]
    meta = json.loads(members["000000001.json"])
    assert meta["caption"] == "png one" and meta["source"].endswith("alpha.png") and meta["key"] == "000000001"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_reads_what_tarfile_reads(tmp_path, fmt) -> None:
    """Long names, non-ASCII names, folders, links and hidden files, in each tar dialect."""
    path = tmp_path / "t.tar"
    rng = np.random.default_rng(fmt)
    long_dir = "d" * 70 + "/" + "e" * 60  # > 100 characters: prefix field, GNU long name or pax path
    entries = [("000001.jpg", rng.bytes(700)), ("000001.txt", "ça va".encode()), (f"{long_dir}/000002.jpg", rng.bytes(1)),
               (f"{long_dir}/000002.txt", b""), ("sub/.hidden.txt", b"x"), ("000003.jpg", rng.bytes(1024))]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append(("zürich_%s/000004.txt" % ("z" * 120), b"long and non-ascii"))
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("000003.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "000003.jpg"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, tar.extractfile(m).read()) for m in tar if m.isreg()]
    with open(path, "rb") as stream:
        got = [(m.name, m.offset, m.data) for m in MemberReader(stream).members()]
    assert got == expected
    with open(path, "rb") as stream:
        keys = [s.key for s in samples(MemberReader(stream))]
    assert keys[:3] == ["000001", f"{long_dir}/000002", "000003"]  # hidden file and link left out


def test_tar_parser_reports_cut_and_corrupt_tars(tmp_path) -> None:
    path = tmp_path / "t.tar"
    _write_tar(path, [{"__key__": f"{i:06d}", "jpg": _jpeg(i * 30), "txt": b"x"} for i in range(3)])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        last = [m for m in tar if m.isreg()][-1]
    with pytest.raises(TarFormatError, match="ends inside"):
        list(MemberReader(io.BytesIO(data[: last.offset_data + 3])).members())
    with pytest.raises(TarFormatError, match="without its end-of-archive"):  # cut between members
        list(MemberReader(io.BytesIO(data[: last.offset])).members())
    corrupt = bytearray(data)
    corrupt[0] ^= 0xFF  # the first header's name: its checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        list(MemberReader(io.BytesIO(bytes(corrupt))).members())


def test_index_files_match_dalis_indexer(shards, tmp_path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # installed with nvidia-dali
    result, _ = shards
    for tar, index in zip(result.tars, result.indexes):
        reference = tmp_path / "ref.idx"
        with wds2idx.IndexCreator(str(tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert index.read_bytes() == reference.read_bytes()
        with open(tar, "rb") as stream:
            assert format_index(scan(stream)) == reference.read_text()
        assert parse_index(reference.read_text()) == scan(open(tar, "rb"))


# ---------------------------------------------------------------------- where shards come from


def test_shard_specs_patterns_lists_and_index_files(shards, tmp_path) -> None:
    result, pattern = shards
    tars = [str(t) for t in result.tars]
    assert locations.expand(pattern) == tars
    listing = tmp_path / "list.txt"
    listing.write_text("# my shards\n" + "\n".join(os.path.relpath(t, tmp_path) for t in tars[:2]) + f"\n\n{tars[2]}\n")
    assert locations.expand(str(listing)) == tars[:3]
    # Counts come from the .idx beside each tar (its first line): no tar is opened.
    counted = resolve(pattern, say=lambda _: None)
    assert counted.counts == (5, 5, 5, 3) and counted.urls == tuple(tars)
    # An index file names the counts itself (and its shards relative to it).
    index = tmp_path / "all.index"
    index.write_text("".join(f"{os.path.relpath(t, tmp_path)}\t{n}\n" for t, n in zip(tars, (5, 5, 5, 3))))
    assert resolve(str(index), say=lambda _: None) == counted
    bad = tmp_path / "bad.index"
    bad.write_text(f"{tars[0]}\tfive\n")
    with pytest.raises(locations.ShardSpecError, match="bad.index:1"):
        resolve(str(bad))


def test_credentials_never_reach_messages() -> None:
    for secret_url, shown in [
        ("https://user:hunter2@example.org/a.tar", "https://***@example.org/a.tar"),
        ("https://example.org/a.tar?X-Amz-Signature=abc123&X-Amz-Date=1", "https://example.org/a.tar?X-Amz-Signature=***&X-Amz-Date=1"),
        ("pipe:AWS_SECRET_ACCESS_KEY=abc aws s3 cp s3://b/a.tar -", "pipe:AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/a.tar -"),
    ]:
        assert locations.redact(secret_url) == shown


def _reference(shards_, tok, **spec) -> dict[str, np.ndarray]:
    return collect(wds_dataset(shards_, tok, PipelineSpec(SIZE, MAX_LEN, 4, **spec)))


def test_http_s3_and_pipe_shards_read_like_local_ones(shards, tok, tmp_path) -> None:
    result, pattern = shards
    local = _reference(pattern, tok, shuffle=True, seed=2, shuffle_buffer=6)
    folder = result.tars[0].parent
    names = "syn-{000000..000003}.tar"
    with http_server(folder) as base:
        over_http = _reference(f"{base}/{names}", tok, shuffle=True, seed=2, shuffle_buffer=6)
        # Resuming mid-epoch over a server without range requests: reads from each tar's start.
        tail = collect(wds_dataset(f"{base}/{names}", tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=2, shuffle_buffer=6, start_batch=2)))
    with s3_server() as env:
        upload(env, "shards", {p.name: p.read_bytes() for p in folder.iterdir()})
        with environment(env):
            over_s3 = _reference(f"s3://shards/{names}", tok, shuffle=True, seed=2, shuffle_buffer=6)
            s3_set = resolve(f"s3://shards/{names}", say=lambda _: None)
    piped = _reference([f"pipe:cat {t}" for t in result.tars], tok, shuffle=True, seed=2, shuffle_buffer=6)
    assert s3_set.counts == (5, 5, 5, 3)
    for other in (over_http, over_s3, piped):
        for key in local:
            np.testing.assert_array_equal(other[key], local[key])
    for key in local:
        np.testing.assert_array_equal(tail[key], local[key][8:])


def test_a_shard_that_fails_or_ends_early_is_counted_and_the_rest_trains(shards, tok, tmp_path) -> None:
    result, _ = shards
    tars = [str(t) for t in result.tars]
    cut = tmp_path / "cut.tar"
    data = Path(tars[1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # its .idx (copied) still announces 5 samples
    (tmp_path / "cut.idx").write_bytes(Path(tars[1]).with_suffix(".idx").read_bytes())
    index = tmp_path / "set.index"
    index.write_text(f"{tars[0]}\t5\n{cut}\t5\n{tmp_path / 'gone.tar'}\t5\n{tars[2]}\t5\n")
    skips = SkipCounter()
    out = collect(wds_dataset(str(index), tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False), skips=skips))
    assert len(out["mask"]) == 20  # every position of the plan is a row
    lost = out["mask"].sum(axis=1) == 0
    assert lost[5:15].sum() >= 7 and not lost[:5].any() and not lost[15:].any()
    assert skips.missing == int(lost.sum()) and skips.unreadable == 0
    named = " ".join(skips.missing_samples())
    assert "cut.tar" in named and "ended early" in named and "gone.tar" in named and "could not be opened" in named
    # Rows that came through are the right samples: shard 0 and shard 2 in full.
    whole = _reference(tars, tok, shuffle=False)
    np.testing.assert_array_equal(out["token_ids"][:5], whole["token_ids"][:5])
    np.testing.assert_array_equal(out["token_ids"][15:], whole["token_ids"][10:15])


def test_samples_without_image_or_caption_and_corrupt_images_keep_their_place(tmp_path, synth, tok) -> None:
    jpgs = [open(p, "rb").read() for p, _ in synth.pairs[:5]]
    _write_tar(tmp_path / "m.tar", [
        {"__key__": "000000", "jpg": jpgs[0], "txt": b"zero"},
        {"__key__": "000001", "jpg": jpgs[1][:100], "txt": b"one"},  # corrupt
        {"__key__": "000002", "jpg": jpgs[2]},  # no caption
        {"__key__": "000003", "txt": b"three"},  # no image
        {"__key__": "000004", "jpg": jpgs[4], "txt": b"four"},
    ])
    skips = SkipCounter()
    out = collect(wds_dataset(str(tmp_path / "m.tar"), tok, PipelineSpec(SIZE, MAX_LEN, 5, shuffle=False), skips=skips))
    usable = out["mask"].sum(axis=1) > 0
    assert usable.tolist() == [True, False, False, False, True]
    assert (skips.missing, skips.unreadable) == (2, 1)
    assert skips.unreadable_samples() == [f"{tmp_path / 'm.tar'}:000001"]
    expected, _ = tok.batch_encode(["zero", "four"], MAX_LEN)
    np.testing.assert_array_equal(out["token_ids"][[0, 4]], expected)
    assert out["images"].dtype == np.uint8 and not out["images"][1].any()


# ---------------------------------------------------------------------- order, shares, resume


def test_tfdata_reader_matches_csv_pipeline(synth, shards, tok) -> None:
    _, pattern = shards
    skips = SkipCounter()
    from_tars = collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False), skips=skips))
    from_csv = collect(caption_dataset(synth, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False)))
    assert len(from_tars["images"]) == len(synth) == 18 and skips.skipped == 0
    for key in ("images", "token_ids", "mask"):
        np.testing.assert_array_equal(from_tars[key], from_csv[key])


def test_tfdata_reader_pipelines_partition(shards, tok) -> None:
    _, pattern = shards
    everything = _reference(pattern, tok, shuffle=False)["token_ids"]
    for pipelines in (2, 3, 4):
        parts = [collect(wds_dataset(pattern, tok, PipelineSpec(SIZE, MAX_LEN, 4, shuffle=False, num_shards=pipelines, shard_index=i)))["token_ids"]
                 for i in range(pipelines)]
        np.testing.assert_array_equal(np.concatenate(parts), everything)  # contiguous shares, in order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shuffled_epochs_are_seeded_and_resume_exactly(shards, tok) -> None:
    _, pattern = shards
    plain = _reference(pattern, tok, shuffle=False)["token_ids"]
    mixed = _reference(pattern, tok, shuffle=True, seed=1, shuffle_buffer=8)["token_ids"]
    again = _reference(pattern, tok, shuffle=True, seed=1, shuffle_buffer=8)["token_ids"]
    assert sorted(map(tuple, mixed)) == sorted(map(tuple, plain)) and not np.array_equal(mixed, plain)
    np.testing.assert_array_equal(mixed, again)
    for start in (1, 2, 4):
        tail = _reference(pattern, tok, shuffle=True, seed=1, shuffle_buffer=8, start_batch=start)["token_ids"]
        np.testing.assert_array_equal(tail, mixed[4 * start :])


# ---------------------------------------------------------------------- the shards command


def test_shards_command_writes_and_indexes(tmp_path, synth, capsys) -> None:
    from gpt2_effnet.cli import main

    assert main(["shards", "--csv", synth.source, "--out", str(tmp_path / "s"), "--per-shard", "10", "--prefix", "p"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["index.tsv", "p-000000.idx", "p-000000.tar", "p-000001.idx", "p-000001.tar"]
    written = resolve(str(tmp_path / "s" / "index.tsv"), say=lambda _: None)
    assert written.counts == (10, 8)

    # Shards made elsewhere (img2dataset's layout: NNNNN.tar + NNNNN_stats.json, no .idx).
    elsewhere = tmp_path / "img2dataset"
    elsewhere.mkdir()
    for i in range(3):
        _write_tar(elsewhere / f"{i:05d}.tar", [{"__key__": f"{i}{k:04d}", "jpg": _jpeg(k * 20), "txt": b"c"} for k in range(2 + i)])
    (elsewhere / "00001_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    capsys.readouterr()
    assert main(["shards", "index", str(elsewhere / "{00000..00002}.tar")]) == 0
    printed = capsys.readouterr().out
    assert "3 shards, 9 samples" in printed and "1 from _stats.json" in printed
    assert (elsewhere / "00000.idx").is_file() and not (elsewhere / "00001.idx").exists()
    indexed = resolve(str(elsewhere / "index.tsv"), say=lambda _: None)
    assert indexed.counts == (2, 3, 4)
    assert main(["shards", "index", str(tmp_path / "nowhere" / "{0..1}.tar")]) == 1


def test_shards_bench_measures_the_loader(shards, capsys) -> None:
    from gpt2_effnet.cli import main

    _, pattern = shards
    assert main(["shards", "bench", pattern, "--image-size", "24", "--batch-size", "4", "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert "tfdata" in out and "images/s" in out and "per core" in out


# ---------------------------------------------------------------------- DALI (CPU) against tf.data


@pytest.fixture(scope="module")
def dali():
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("nvidia.dali.plugin.tf")
    from gpt2_effnet.data import dali as module

    return module


@pytest.mark.parametrize("image_size", [SIZE, 20])
@pytest.mark.parametrize("pipelines", [1, 2])
def test_dali_and_tfdata_yield_the_same_samples(dali, shards, tok, pipelines, image_size) -> None:
    _, pattern = shards
    for index in range(pipelines):
        spec = PipelineSpec(image_size, MAX_LEN, 4, shuffle=True, seed=5, shuffle_buffer=4, num_shards=pipelines,
                            shard_index=index, drop_remainder=True, start_batch=index)
        a = collect(wds_dataset(pattern, tok, spec))
        b = collect(dali.dali_dataset(pattern, tok, spec, device="cpu"))
        np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        assert a["images"].shape == b["images"].shape and b["images"].dtype == np.uint8
        diff = np.abs(a["images"].astype(int) - b["images"])
        if image_size == SIZE:  # no resampling: both decoders use libjpeg's accurate integer IDCT
            assert diff.max() <= 1
        else:  # two resamplers: close, not identical
            assert diff.mean() < 1.0 and diff.max() < 16


def test_dali_fills_the_last_batch_and_counts_like_tfdata(dali, tmp_path, synth, tok) -> None:
    jpgs = [open(p, "rb").read() for p, _ in synth.pairs[:5]]
    big = io.BytesIO()
    Image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(big, format="PNG")
    _write_tar(tmp_path / "p.tar", [
        {"__key__": "000000", "jpg": jpgs[0], "txt": b"zero"},
        {"__key__": "000001", "png": big.getvalue(), "txt": b"too big"},
        {"__key__": "000002", "jpg": jpgs[2]},  # no caption
        {"__key__": "000003", "jpg": b"not an image", "txt": b"three"},
        {"__key__": "000004", "jpg": jpgs[4], "txt": b"four"},
    ])
    spec = PipelineSpec(SIZE, MAX_LEN, 2, shuffle=False, max_image_pixels=50 * 50)
    results = {}
    for name, make in (("tfdata", wds_dataset), ("dali", lambda *a, **k: dali.dali_dataset(*a, device="cpu", **k))):
        skips = SkipCounter()
        results[name] = collect(make(str(tmp_path / "p.tar"), tok, spec, skips=skips))
        assert (skips.missing, skips.unreadable) == (1, 2), name
    usable = [True, False, False, False, True]
    assert (results["tfdata"]["mask"].sum(axis=1) > 0).tolist() == usable
    assert (results["dali"]["mask"].sum(axis=1) > 0).tolist() == usable + [False]  # DALI's whole last batch
    np.testing.assert_array_equal(results["tfdata"]["token_ids"][[0, 4]], results["dali"]["token_ids"][[0, 4]])


def test_jpeg_size_reads_frame_headers_like_pillow(tmp_path) -> None:
    from gpt2_effnet.image_input import jpeg_size

    rng = np.random.default_rng(1)
    for width, height, options in [(37, 21, {}), (640, 480, {"progressive": True}), (8, 300, {"quality": 20}),
                                   (100, 80, {"exif": b"Exif\x00\x00" + bytes(300)})]:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", **options)
        data = buffer.getvalue()
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == (width, height)
    png = io.BytesIO()
    Image.new("RGB", (5, 5)).save(png, "PNG")
    assert jpeg_size(png.getvalue()) is None and jpeg_size(b"\xff\xd8\xff") is None and jpeg_size(b"") is None


def test_dali_reads_remote_shards_like_local_ones(dali, shards, tok) -> None:
    result, pattern = shards
    spec = PipelineSpec(SIZE, MAX_LEN, 4, shuffle=True, seed=2, shuffle_buffer=6, drop_remainder=True, start_batch=1)
    local = collect(dali.dali_dataset(pattern, tok, spec, device="cpu"))
    with http_server(result.tars[0].parent) as base:
        remote = collect(dali.dali_dataset(f"{base}/syn-{{000000..000003}}.tar", tok, spec, device="cpu"))
    for key in local:
        np.testing.assert_array_equal(remote[key], local[key])


def test_credentials_in_shard_urls_stay_out_of_run_files_and_messages(shards, tmp_path, capsys, tiny_config) -> None:
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    result, _ = shards
    config = tiny_config(real_vocabulary=True)
    with http_server(result.tars[0].parent) as base:
        secret = base.replace("http://", "http://reader:hunter2@")
        listing = tmp_path / "list.txt"
        listing.write_text(f"{secret}/syn-{{000000..000003}}.tar\n{secret}/gone.tar?sig=s3cr3t\n")
        source = shard_source(config.replace(train={"max_skip_rate": 0.5}), make_tokenizer(config), str(listing))
        collect(source.make_dataset(_request()))
    printed = capsys.readouterr()
    shown = json.dumps(source.description) + printed.out + printed.err
    assert "gone.tar" in shown and "hunter2" not in shown and "s3cr3t" not in shown


def _request():
    from gpt2_effnet.training.data_source import DataRequest

    return DataRequest(epoch=0, batch_size=4, num_shards=1, shard_index=0, seed=0, shuffle=False)


@pytest.mark.gpu
def test_dali_decodes_on_the_gpu_the_samples_tfdata_reads(dali, shards, tok) -> None:
    """Where a GPU is present: DALI's mixed (GPU) decode yields the tf.data loader's samples."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    _, pattern = shards
    spec = PipelineSpec(20, MAX_LEN, 4, shuffle=True, seed=3, shuffle_buffer=4, drop_remainder=True)
    a = collect(wds_dataset(pattern, tok, spec))
    b = collect(dali.dali_dataset(pattern, tok, spec, device="gpu", device_id=0))
    np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
    assert np.abs(a["images"].astype(int) - b["images"]).mean() < 2.0  # GPU decoder and resampler: close
