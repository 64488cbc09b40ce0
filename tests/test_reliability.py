"""Nothing lost, nothing cryptic: outputs appear whole or not at all, runs stop instead of
looping or training on NaN, one writer per run folder, and one-line errors.

Each test here failed on main at 2176ab7 (issue 10 lists what each one did there).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.cli import main
from gpt2_effnet.config import CaptionerConfig, ConfigError

SIZE = 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny captioner saved like a finished run (config.yaml + weights), real vocabulary."""
    from conftest import make_tiny_config

    from gpt2_effnet.captioner import Captioner

    config = make_tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 1},
                              model={"image_size": SIZE, "max_caption_length": 5})
    return Captioner(config).save_pretrained(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _synthetic(folder: Path, n: int = 24, corrupt: int = 0):
    from gpt2_effnet.data.synthetic import write_synthetic

    paths = write_synthetic(folder, n_images=n, image_size=SIZE, seed=1, captions_per_image=1, val_fraction=0.0,
                            progress=False)
    rows = list(paths.train_csv.read_text().splitlines())
    for i in range(corrupt):  # unreadable images, listed like the others
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        rows.append(f"bad{i}.jpg,a picture of nothing")
    paths.train_csv.write_text("\n".join(rows) + "\n")
    return paths


def _trainer(config: CaptionerConfig, run: Path, csv: Path, **kwargs):
    from gpt2_effnet.training.loop import Trainer
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    data = caption_source(config, make_tokenizer(config), csv=csv)
    return Trainer(config, run, data, show_progress=False, log=kwargs.pop("log", lambda _: None), **kwargs)


# --------------------------------------------------------------------- caption outputs


def _one_line(err: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("gpt2-effnet")]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_caption_never_truncates_an_existing_output(tmp_path, run_folder, photos, capsys) -> None:
    out = tmp_path / "captions.jsonl"
    out.write_text("precious\n")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.jpg").write_bytes(b"garbage")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(run_folder / "config.yaml", no_weights / "config.yaml")
    cases = [
        (["--checkpoint", str(run_folder), str(photos), "--beams", "0"], 2, "--beams"),
        (["--checkpoint", str(run_folder), str(photos), "--top-p", "nan"], 2, "--top-p"),
        (["--checkpoint", str(no_weights), str(photos)], 2, "captioner.weights.h5"),
        (["--checkpoint", str(run_folder), str(junk)], 1, "no image could be captioned"),
    ]
    for argv, status, named in cases:
        assert main(["caption", *argv, "--out", str(out)]) == status, argv
        err = capsys.readouterr().err
        _one_line(err)
        assert named in err, (argv, err)
        assert out.read_text() == "precious\n", argv
    assert not list(tmp_path.glob(".*partial"))
    # And when it can run, the new file replaces the old one whole.
    assert main(["caption", "--checkpoint", str(run_folder), str(photos), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["caption"] is not None for r in rows)


def test_caption_output_problems_and_other_models_are_one_line(tmp_path, run_folder, photos, capsys) -> None:
    from conftest import make_tiny_config

    from gpt2_effnet.captioner import Captioner

    assert main(["caption", "--checkpoint", str(run_folder), str(photos), "--out", str(tmp_path / "no" / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "does not exist" in err
    other = Captioner(make_tiny_config(real_vocabulary=True, model={"image_size": SIZE}))
    other_run = other.save_pretrained(tmp_path / "other")
    shutil.copy(run_folder / "captioner.weights.h5", other_run / "captioner.weights.h5")  # weights of another shape
    assert main(["caption", "--checkpoint", str(other_run), str(photos)]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "cannot load --checkpoint" in err


def test_caption_names_a_broken_link_instead_of_dropping_it(tmp_path, run_folder, photos, capsys) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    assert main(["caption", "--checkpoint", str(run_folder), str(folder)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2
    assert "link.png" in captured.err and "broken symbolic link" in captured.err


# ------------------------------------------------------------------- the image reader


def _odd_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    rng = np.random.default_rng(3)
    files = {}
    gray16 = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    files["gray16"] = folder / "gray16.png"
    Image.fromarray(gray16).save(files["gray16"])
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    files["rgba"] = folder / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    files["la"] = folder / "la.png"
    Image.fromarray(rgba[..., :2], "LA").save(files["la"])
    palette = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 3
    files["palette"] = folder / "palette.png"
    palette.save(files["palette"], transparency=3)
    files["gray_jpeg"] = folder / "gray.jpg"
    Image.fromarray(rgba[..., 0]).save(files["gray_jpeg"], quality=95)
    files["cmyk_jpeg"] = folder / "cmyk.jpg"
    Image.fromarray(rgba, "CMYK").save(files["cmyk_jpeg"], quality=95)
    files["gif"] = folder / "anim.gif"
    frames = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).quantize(32) for _ in range(2)]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:])
    return files


def test_training_captioning_and_the_export_read_odd_images_alike(tmp_path) -> None:
    from gpt2_effnet.data.pipeline import PipelineSpec, caption_dataset
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.serving.export import decode_and_resize
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    import tensorflow as tf

    files = _odd_images(tmp_path)
    spec = PipelineSpec(24, 8, len(files), shuffle=False)
    trained = next(iter(caption_dataset([(str(p), k) for k, p in files.items()], GPT2Tokenizer.default(), spec)))
    for row, (kind, path) in enumerate(files.items()):
        captioned = read_image(path, 24)
        np.testing.assert_array_equal(trained["images"][row].numpy(), captioned, err_msg=kind)  # one reader
        exported = decode_and_resize(tf.io.read_file(str(path)), 24).numpy()
        assert np.abs(exported - captioned).max() <= 1.0, kind  # TensorFlow ops, the same rules
        assert 5 < captioned.mean() < 250, kind  # not white, not black


def test_the_export_resizes_large_photos_like_the_reader(tmp_path) -> None:
    """JPEGs big enough for a reduced-scale decode, and PNGs, resized by both readers."""
    from PIL import Image

    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.serving.export import decode_and_resize

    import tensorflow as tf

    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:300, 0:460]
    for name, (h, w) in {"a.jpg": (300, 460), "b.jpg": (130, 70), "c.png": (300, 460)}.items():
        smooth = np.stack([np.sin(x[:h, :w] / 17.0 + c) * 60 + np.cos(y[:h, :w] / 23.0) * 50 + 128 for c in range(3)], -1)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / name, quality=92)
        for size in (64, 96):
            reference = read_image(tmp_path / name, size)
            exported = decode_and_resize(tf.io.read_file(str(tmp_path / name)), size).numpy()
            diff = np.abs(exported - reference)
            assert diff.mean() < 0.3 and diff.max() <= 3, (name, size, diff.mean(), diff.max())


def test_pixel_limit_applies_before_decoding_everywhere(tmp_path, tiny_config) -> None:
    import tensorflow as tf

    from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, caption_dataset
    from gpt2_effnet.image_input import ImageTooLarge, read_image
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    from PIL import Image

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "large.png")
    with pytest.raises(ImageTooLarge, match="40x40 = 1,600 pixels"):
        read_image(tmp_path / "large.png", SIZE, max_pixels=1000)
    skips = SkipCounter()
    pairs = [(str(tmp_path / "small.png"), "small"), (str(tmp_path / "large.png"), "large")]
    spec = PipelineSpec(SIZE, 8, 2, shuffle=False, max_image_pixels=1000)
    batches = list(caption_dataset(pairs, GPT2Tokenizer.default(), spec, skips=skips))
    assert [int(m.sum() > 0) for m in batches[0]["mask"].numpy()] == [1, 0]  # refused: its row is masked
    assert skips.unreadable == 1 and skips.unreadable_samples() == [str(tmp_path / "large.png")]
    assert tf.is_tensor(batches[0]["images"])


# --------------------------------------------------------------------------- configs


def test_non_finite_and_impossible_config_values_are_refused(tmp_path) -> None:
    for text, key in (("optim:\n  learning_rate: .nan\n", "optim.learning_rate"),
                      ("optim:\n  beta_2: .inf\n", "optim.beta_2"),
                      ("model:\n  dropout: .nan\n", "model.dropout"),
                      ("gpt2:\n  n_positions: 16\nmodel:\n  max_caption_length: 40\n", "model.max_caption_length")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            CaptionerConfig.load(tmp_path / "c.yaml")


def test_train_command_names_a_folder_config_and_a_file_out(tmp_path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path), "--csv", "x.csv", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "is a folder" in err
    (tmp_path / "c.yaml").write_text("train:\n  steps: 1\n")
    (tmp_path / "file").write_text("not a folder")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--csv", "x.csv", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "--out" in err and "not a folder" in err


def test_coco_with_null_or_non_string_captions_is_refused(tmp_path) -> None:
    from gpt2_effnet.data.captions import CaptionFileError, read_coco

    for data, named in (({"images": None, "annotations": []}, "'images' must be a list"),
                        ({"images": [{"id": 1, "file_name": "a.jpg"}],
                          "annotations": [{"image_id": 1, "caption": None}]}, "captions must be strings"),
                        ({"images": [{"id": 1, "file_name": "a.jpg"}],
                          "annotations": [{"image_id": 1, "caption": ["a", "b"]}]}, "captions must be strings")):
        (tmp_path / "c.json").write_text(json.dumps(data))
        with pytest.raises(CaptionFileError, match=named):
            read_coco(tmp_path / "c.json")


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow  # trains
def test_an_epoch_without_a_full_batch_stops_and_writes_no_config(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.loop import TrainingStopped

    # 4 readable + 6 unreadable, batch 8: the first epoch shows the set is mostly unusable.
    paths = _synthetic(tmp_path / "data", n=4, corrupt=6)
    config = tiny_config(real_vocabulary=True, train={"batch_size": 8, "steps": 5})
    trainer = _trainer(config, tmp_path / "run", paths.train_csv)
    with pytest.raises(TrainingStopped, match=r"6 of the 10 samples read so far were unreadable or missing \(60% >"):
        trainer.fit()
    assert not (tmp_path / "run" / "config.yaml").exists()
    # The corrected CSV at the same path is a new run, not "a different config or data".
    rows = paths.train_csv.read_text().splitlines()
    paths.train_csv.write_text("\n".join(line for line in rows if "bad" not in line) + "\n")
    fixed = _trainer(config.replace(train={"batch_size": 4, "steps": 2}), tmp_path / "run", paths.train_csv)
    assert fixed.fit().step == 2


@pytest.mark.slow  # trains
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training import DataSource, Trainer
    from gpt2_effnet.training.loop import TrainingStopped

    rng = np.random.default_rng(0)
    batch = {"images": rng.uniform(0, 255, (16, SIZE, SIZE, 3)).astype(np.float32),
             "token_ids": rng.integers(0, 90, (16, 6)).astype(np.int32), "mask": np.ones((16, 6), np.int32)}
    config = tiny_config(train={"batch_size": 8, "steps": 4, "checkpoint_every": 4, "log_every": 2})
    Trainer(config, tmp_path / "run", DataSource.from_tensors(batch), show_progress=False, log=lambda _: None).fit()
    weights = tmp_path / "run" / "captioner.weights.h5"
    before = weights.read_bytes()
    poisoned = {**batch, "images": np.full_like(batch["images"], np.nan)}
    resumed = Trainer(config.replace(train={"steps": 8}), tmp_path / "run", DataSource.from_tensors(poisoned),
                      show_progress=False, log=lambda _: None)
    with pytest.raises(TrainingStopped, match="loss became nan"):
        resumed.fit()
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-4")
    assert weights.read_bytes() == before


@pytest.mark.slow  # trains
def test_one_writer_per_run_folder(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.run_lock import LOCK_FILE, RunLocked

    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 2})
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(RunLocked, match=f"process {holder.pid}"):
            _trainer(config, run, paths.train_csv)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock is stale and taken over.
    assert _trainer(config, run, paths.train_csv).fit().step == 2
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow  # trains
def test_resume_notices_other_data_at_the_same_path(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.checkpoints import RunConfigMismatch

    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 2})
    _trainer(config, tmp_path / "run", paths.train_csv).fit()
    rows = paths.train_csv.read_text().splitlines()
    paths.train_csv.write_text("\n".join(rows[:1] + rows[1:][::-1]) + "\n")  # same rows, other order, same size
    with pytest.raises(RunConfigMismatch, match="data.train.sha1"):
        _trainer(config.replace(train={"steps": 4}), tmp_path / "run", paths.train_csv)
    assert _trainer(config.replace(train={"steps": 4}), tmp_path / "run", paths.train_csv, override=True).fit().step == 4


@pytest.mark.slow  # trains
def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, tiny_config, monkeypatch) -> None:
    import tensorflow as tf

    from gpt2_effnet.training import checkpoints

    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 2, "checkpoint_every": 2})
    run = tmp_path / "run"
    _trainer(config, run, paths.train_csv).fit()
    weights = (run / "captioner.weights.h5").read_bytes()

    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(checkpoints.OutOfSpace, match=r"not enough disk space in .*checkpoints to save step 4: about [\d.]+ MB needed"):
        _trainer(config.replace(train={"steps": 4}), run, paths.train_csv).fit()
    monkeypatch.undo()

    def fill_up(self, *args, **kwargs):  # the disk fills half-way through TensorFlow's save
        (run / "checkpoints" / "ckpt-4_temp").mkdir(exist_ok=True)
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", fill_up)
    with pytest.raises(checkpoints.OutOfSpace, match="partial files were removed"):
        _trainer(config.replace(train={"steps": 4}), run, paths.train_csv).fit()
    monkeypatch.undo()
    assert not (run / "checkpoints" / "ckpt-4_temp").exists()
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-2")
    assert not list(run.glob("partial-*"))
    assert (run / "captioner.weights.h5").read_bytes() == weights


@pytest.mark.slow  # trains
def test_leftovers_are_removed_and_stale_weights_refreshed_at_start(tmp_path, tiny_config) -> None:
    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 2, "checkpoint_every": 2})
    run = tmp_path / "run"
    _trainer(config, run, paths.train_csv).fit()
    (run / "checkpoints" / "ckpt-9_temp").mkdir()
    (run / "partial-captioner.weights.h5").write_bytes(b"half")
    weights = run / "captioner.weights.h5"
    os.utime(weights, (1, 1))  # as if the export after the last checkpoint had been cut short
    said: list[str] = []
    _trainer(config, run, paths.train_csv, log=said.append)
    assert not (run / "checkpoints" / "ckpt-9_temp").exists() and not (run / "partial-captioner.weights.h5").exists()
    assert weights.stat().st_mtime > 1
    assert any("re-exported" in line for line in said) and any("ckpt-9_temp" in line for line in said)


@pytest.mark.slow  # trains
def test_skips_are_counted_as_they_happen_and_a_ceiling_stops_the_run(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.loop import TrainingStopped

    paths = _synthetic(tmp_path / "data", n=24, corrupt=2)
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 4, "log_every": 2, "shuffle_buffer": 0})
    said: list[str] = []
    result = _trainer(config, tmp_path / "run", paths.train_csv, log=said.append).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("skipped" in r and "skip_rate" in r for r in records if "loss" in r)
    assert result.step == 4
    assert any("bad0.jpg" in line for line in said)
    # Mostly unreadable data stops at a log line instead of training on what is left.
    bad = _synthetic(tmp_path / "bad", n=100, corrupt=150)
    config = config.replace(train={"batch_size": 16, "steps": 40, "log_every": 4, "max_skip_rate": 0.2})
    with pytest.raises(TrainingStopped, match=r"unreadable or missing \(\d+% > train.max_skip_rate 20%\)"):
        _trainer(config, tmp_path / "run2", bad.train_csv).fit()


def test_every_image_missing_is_named_before_the_model_is_built(tmp_path, tiny_config) -> None:
    from gpt2_effnet.data.captions import CaptionFileError

    (tmp_path / "c.csv").write_text("image,caption\nnowhere/a.jpg,a dog\nnowhere/b.jpg,a cat\n")
    config = tiny_config(real_vocabulary=True, train={"steps": 1})
    with pytest.raises(CaptionFileError, match="none of the 2 image file"):
        _trainer(config, tmp_path / "run", tmp_path / "c.csv")
    assert not (tmp_path / "run").exists()


def test_a_broken_safetensors_file_is_a_weight_error_naming_it(tmp_path) -> None:
    from gpt2_effnet.weights import WeightLoadError, load_gpt2

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 11, "n_positions": 8, "n_embd": 8, "n_layer": 1,
                                                       "n_head": 2, "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        load_gpt2(tmp_path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height, with one tiny (wrong) data chunk: a bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_images_over_pillows_own_bomb_limit_are_refused_from_the_header_everywhere(tmp_path) -> None:
    """20000 x 20000 is over twice Pillow's limit: Pillow raises DecompressionBombError on open,
    which must read as 'too large', never as 'size unknown, decode it'."""
    from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, caption_dataset
    from gpt2_effnet.image_input import ImageTooLarge, decode_rgb
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_rgb(bomb, SIZE)
    with pytest.raises(ImageTooLarge):
        decode_rgb(bomb.read_bytes(), SIZE, max_pixels=None)  # even with our own limit off
    skips = SkipCounter()
    out = list(caption_dataset([(str(bomb), "a bomb")], GPT2Tokenizer.default(), PipelineSpec(SIZE, 8, 1, shuffle=False), skips=skips))
    assert out[0]["mask"].numpy().sum() == 0 and skips.unreadable_samples() == [str(bomb)]


def test_tiff_is_refused_by_name_by_every_reader(tmp_path) -> None:
    from PIL import Image

    from gpt2_effnet.image_input import UnsupportedImage, decode_rgb

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.tif")
    with pytest.raises(UnsupportedImage, match="TIFF images are not read here"):
        decode_rgb(tmp_path / "a.tif", SIZE)


# --------------------------------------------------------- round 2 (issue 33, main at 7b0ac0c)


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter importing this very gpt2_effnet (not whichever one is installed)."""
    import gpt2_effnet

    env = dict(os.environ, PYTHONPATH=str(Path(gpt2_effnet.__file__).parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow  # trains
def test_resume_falls_back_past_deleted_or_corrupt_checkpoints_and_never_starts_over(tmp_path, tiny_config) -> None:
    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 3, "checkpoint_every": 1, "log_every": 1})
    run = tmp_path / "run"
    _trainer(config, run, paths.train_csv).fit()
    for path in (run / "checkpoints").glob("ckpt-3.*"):  # the obvious way back to the one before
        path.unlink()
    said: list[str] = []
    result = _trainer(config.replace(train={"steps": 4}), run, paths.train_csv, log=said.append).fit()
    assert result.resumed_from == 2 and result.step == 4
    assert any("ckpt-3 has no files" in line for line in said), said
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4]  # one history: 1, 2, the resume event, then 3 and 4 again
    # A zeroed data file in the newest checkpoint: the one before restores instead.
    data = next((run / "checkpoints").glob("ckpt-4.data-*"))
    data.write_bytes(bytes(data.stat().st_size))
    said.clear()
    result = _trainer(config.replace(train={"steps": 5}), run, paths.train_csv, log=said.append).fit()
    assert result.resumed_from == 3 and result.step == 5
    assert any("ckpt-4 does not restore" in line for line in said), said
    # TensorFlow's state file garbled: 7b0ac0c read it as "no checkpoint" and started at step 0.
    (run / "checkpoints" / "checkpoint").write_text("garbage {{{\n")
    said.clear()
    result = _trainer(config.replace(train={"steps": 6}), run, paths.train_csv, log=said.append).fit()
    assert result.resumed_from == 5 and result.step == 6
    assert any("not a checkpoint list" in line for line in said), said
    # None restores: one error, and nothing in the folder is trained over.
    for index in (run / "checkpoints").glob("*.index"):
        index.write_bytes(index.read_bytes()[:10])
    weights = (run / "captioner.weights.h5").read_bytes()
    with pytest.raises(ValueError, match="none restores"):  # CheckpointUnusable
        _trainer(config.replace(train={"steps": 7}), run, paths.train_csv)
    # Every checkpoint deleted: the weights are still a trained run's, not a folder to start over in.
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ValueError, match="no checkpoint files to resume from"):
        _trainer(config.replace(train={"steps": 7}), run, paths.train_csv)
    assert (run / "captioner.weights.h5").read_bytes() == weights


@pytest.mark.slow  # subprocesses
def test_run_lock_cannot_be_held_twice_by_processes_started_together(tmp_path) -> None:
    script = tmp_path / "race.py"
    script.write_text(
        "import multiprocessing as mp, os, sys\n"
        "from gpt2_effnet.training.run_lock import RunLock, RunLocked\n"
        "def contend(folder, barrier, held):\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        lock = RunLock(folder).acquire()\n"
        "    except RunLocked:\n"
        "        lock = None\n"
        "    if lock is not None:\n"
        "        with held.get_lock():\n"
        "            held.value += 1\n"
        "    barrier.wait()  # both have tried before either lets go\n"
        "    if lock is not None:\n"
        "        lock.release()\n"
        "ctx, both = mp.get_context('fork'), 0\n"
        "for trial in range(60):\n"
        "    barrier, held = ctx.Barrier(2), ctx.Value('i', 0)\n"
        "    procs = [ctx.Process(target=contend, args=(os.path.join(sys.argv[1], str(trial)), barrier, held)) for _ in range(2)]\n"
        "    [p.start() for p in procs]\n"
        "    [p.join() for p in procs]\n"
        "    both += held.value == 2\n"
        "print(both)\n"
    )
    # A fresh interpreter without TensorFlow's threads, so forking is safe.
    out = _python(str(script), str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", out.stdout  # 7b0ac0c: both held it in 74 of 100 trials


@pytest.mark.slow  # a subprocess
def test_run_lock_reads_any_lock_file_and_names_its_holder(tmp_path) -> None:
    from gpt2_effnet.training.run_lock import LOCK_FILE, RunLock, RunLocked

    for junk in (b"[1]", b"", b"\x00\xff", b'{"pid": "x"}'):  # no live holder named: taken over
        (tmp_path / LOCK_FILE).write_bytes(junk)
        with RunLock(tmp_path) as lock:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid() and lock.held
        assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):
        code = ("from gpt2_effnet.training.run_lock import RunLock, RunLocked\n"
                "try:\n    RunLock(r'%s').acquire()\nexcept RunLocked as err:\n    print(err)\n" % tmp_path)
        out = _python("-c", code)
    assert f"in use by process {os.getpid()}" in out.stdout, (out.stdout, out.stderr)


def _cli(args: list[str], limit_bytes: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``gpt2-effnet ARGS`` in a fresh interpreter; ``limit_bytes``: no file it writes may grow past
    that (RLIMIT_FSIZE: a write past it fails as on a full disk, with EFBIG)."""
    import resource

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    import gpt2_effnet

    env = dict(os.environ, PYTHONPATH=str(Path(gpt2_effnet.__file__).parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "gpt2_effnet.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=limit, cwd=cwd)


def _one_error_line(out: subprocess.CompletedProcess, command: str) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-3000:])
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"gpt2-effnet {command}:")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


@pytest.mark.slow  # trains, then subprocesses
def test_a_disk_that_refuses_writes_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_config_data) -> None:
    import yaml

    paths = _synthetic(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config_data(
        real_vocabulary=True, train={"batch_size": 4, "checkpoint_every": 2, "log_every": 1})))
    run = tmp_path / "run"
    train = ["train", "--config", str(tmp_path / "c.yaml"), "--csv", str(paths.train_csv), "--no-progress"]
    assert _cli([*train, "--out", str(run), "--steps", "2"]).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # The lock fits, the metrics' rewrite at resume does not (7b0ac0c: a traceback, and
    # .lock and .metrics.jsonl.partial left behind).
    line = _one_error_line(_cli([*train, "--out", str(run), "--steps", "4"], limit_bytes=200), "train")
    assert "metrics.jsonl" in line, line
    assert {p.name for p in run.iterdir() if p.is_file()} == set(before)  # no .lock, no .partial
    assert all((run / name).read_bytes() == data for name, data in before.items())
    # A fresh run whose first save cannot be written: no half-written vocabulary or config.
    fresh = tmp_path / "fresh"
    _one_error_line(_cli([*train, "--out", str(fresh), "--steps", "2"], limit_bytes=2000), "train")
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(".")] and not (fresh / "config.yaml").exists()
    # caption --out at its final write, synthetic and shards into a place they cannot write.
    out = tmp_path / "captions.jsonl"
    images = str(paths.image_dir)
    line = _one_error_line(_cli(["caption", "--checkpoint", str(run), images, "--out", str(out)], limit_bytes=100),
                           "caption")
    assert str(out) in line and not out.exists() and not list(tmp_path.glob(".captions*"))
    (tmp_path / "a_file").write_text("x")
    for args, command in ((["synthetic", "--out", str(tmp_path / "a_file"), "--n", "2"], "synthetic"),
                          (["shards", "--csv", str(paths.train_csv), "--out", str(tmp_path / "a_file")], "shards"),
                          (["download", "124M", "--dir", str(tmp_path / "a_file"), "--base-url", "http://127.0.0.1:9"],
                           "download")):
        assert "a_file" in _one_error_line(_cli(args), command)


@pytest.mark.slow  # trains
def test_an_override_of_the_model_shape_is_one_line(tmp_path, tiny_config) -> None:
    paths = _synthetic(tmp_path / "data")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 2, "checkpoint_every": 2})
    _trainer(config, tmp_path / "run", paths.train_csv).fit()
    deeper = config.replace(train={"steps": 4})
    deeper = type(deeper).from_dict({**deeper.to_dict(), "gpt2": {**deeper.to_dict()["gpt2"], "n_layer": 3}})
    with pytest.raises(ValueError, match=r"none restores.*--override cannot change"):  # 7b0ac0c: AssertionError
        _trainer(deeper, tmp_path / "run", paths.train_csv, override=True)
    assert tmp_path.joinpath("run", "checkpoints", "ckpt-2.index").is_file()


def test_caption_and_export_check_what_they_can_before_the_work(tmp_path, run_folder, photos, capsys) -> None:
    # run_folder: 16 positions, so at most 15 new tokens (7b0ac0c: a traceback after loading the model).
    assert main(["caption", "--checkpoint", str(run_folder), str(photos), "--max-new-tokens", "100"]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "--max-new-tokens 100" in err and "at most 15" in err
    broken = tmp_path / "run"
    shutil.copytree(run_folder, broken)
    (broken / "tokenizer").mkdir()
    (broken / "tokenizer" / "vocab.json").write_text("{oops")
    (broken / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    assert main(["export", str(broken), "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "vocab.json" in err and not list(tmp_path.glob(".sm*")) and not (tmp_path / "sm").exists()


def test_an_export_the_disk_cannot_hold_leaves_nothing(tmp_path, run_folder, capsys, monkeypatch) -> None:
    import keras
    import tensorflow as tf

    class FullDisk:  # TensorFlow's writer, stopped half-way through the variables
        def track(self, model) -> None:
            pass

        def add_endpoint(self, *args, **kwargs) -> None:
            pass

        def write_out(self, path, **kwargs) -> None:
            Path(path, "variables").mkdir(parents=True)
            raise tf.errors.ResourceExhaustedError(None, None, f"{{{{function_node x}}}} {path}/variables/v; No space left on device")

    monkeypatch.setattr(keras.export, "ExportArchive", FullDisk)
    assert main(["export", str(run_folder), "--out", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "No space left on device" in err and "function_node" not in err
    assert not list(tmp_path.glob(".sm*")) and not (tmp_path / "sm").exists()  # 7b0ac0c left .sm.partial/


def test_broken_run_files_are_named_not_tracebacks(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.checkpoints import prepare_run_dir
    from gpt2_effnet.training.reporting import Reporter

    config = tiny_config()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-1.index").write_bytes(b"x")
    for name, data, named in (("config.yaml", bytes(300), "config.yaml"),  # NUL-filled
                              ("config.yaml", b"\xff\xfe binary", "config.yaml")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=named):  # 7b0ac0c: yaml's ReaderError / UnicodeDecodeError
            prepare_run_dir(tmp_path, config, {}, write=False)
    config.save(tmp_path / "config.yaml")
    (tmp_path / "run.json").write_text("{cut")
    with pytest.raises(ValueError, match="run.json"):  # 7b0ac0c: JSONDecodeError naming no file
        prepare_run_dir(tmp_path, config, {"train": {}}, write=False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 2.0}\n[1, 2]\n\xff\xfe\n{"step": "x"}\n{"step": 3}\n')
    dropped = Reporter(tmp_path, is_chief=True, show_progress=False).forget_metrics_after(2)
    assert dropped == 3 and metrics.read_text() == '{"step": 1, "loss": 2.0}\n'


@pytest.mark.slow  # trains
def test_a_run_stopped_before_its_first_checkpoint_does_not_refuse_the_corrected_data(tmp_path, tiny_config) -> None:
    from gpt2_effnet.training.loop import TrainingStopped

    bad = _synthetic(tmp_path / "data", n=100, corrupt=150)
    rows = bad.train_csv.read_text()
    config = tiny_config(real_vocabulary=True, train={"batch_size": 16, "steps": 6, "log_every": 4,
                                                      "checkpoint_every": 6, "max_skip_rate": 0.2})
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="max_skip_rate"):
        _trainer(config, run, bad.train_csv).fit()
    assert not (run / "config.yaml").exists() and not (run / "run.json").exists()
    # The same path, corrected: a new run (7b0ac0c: "a different config or data", data.train.sha1).
    bad.train_csv.write_text("\n".join(line for line in rows.splitlines() if "bad" not in line) + "\n")
    assert _trainer(config, run, bad.train_csv).fit().step == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 6]  # one history: the stopped start's lines are gone


def test_what_a_run_folder_lacks_is_said(tmp_path, tiny_config, caplog) -> None:
    import logging

    from gpt2_effnet.tokenizer import GPT2Tokenizer
    from gpt2_effnet.training.checkpoints import RunConfigMismatch, prepare_run_dir

    config = tiny_config()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-4.index").write_bytes(b"x")
    # config.yaml deleted: 7b0ac0c compared nothing and resumed with whatever it was given.
    with pytest.raises(RunConfigMismatch, match="no config.yaml"):
        prepare_run_dir(tmp_path, config, {}, write=False)
    _, notes = prepare_run_dir(tmp_path, config, {}, override=True, write=False)
    assert any("--override" in note for note in notes)
    # A training run's vocabulary removed: decoded with GPT-2's, and said so.
    (tmp_path / "run.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        GPT2Tokenizer.for_run(tmp_path)
    assert any("no tokenizer/ folder" in r.getMessage() for r in caplog.records)


def test_mostly_missing_images_stop_before_the_first_step(tmp_path, tiny_config) -> None:
    from gpt2_effnet.data.captions import CaptionFileError
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    paths = _synthetic(tmp_path / "data", n=4)
    rows = paths.train_csv.read_text().splitlines() + [f"nowhere/{i}.jpg,a thing" for i in range(396)]
    paths.train_csv.write_text("\n".join(rows) + "\n")
    config = tiny_config(real_vocabulary=True, train={"batch_size": 4, "steps": 5})
    with pytest.raises(CaptionFileError, match=r"396 of the 400 rows .* \(99% > train.max_skip_rate 10%"):
        caption_source(config, make_tokenizer(config), csv=paths.train_csv)


def test_caption_names_fifos_and_devices_instead_of_dropping_them(tmp_path, run_folder, photos, capsys) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    os.mkfifo(folder / "pipe.png")
    os.symlink("/dev/zero", folder / "zero.jpg")
    assert main(["caption", "--checkpoint", str(run_folder), str(folder)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2
    assert "pipe.png: a FIFO" in captured.err and "zero.jpg: a device" in captured.err, captured.err
    assert main(["caption", "--checkpoint", str(run_folder), str(folder / "pipe.png")]) == 2  # named: never opened
    err = capsys.readouterr().err
    _one_line(err)
    assert "a FIFO" in err


def test_wrong_or_silent_inputs_are_refused(tmp_path, run_folder, photos, capsys) -> None:
    from gpt2_effnet.data.captions import CaptionFileError, read_coco, read_csv
    from gpt2_effnet.decoding import check_generation

    with pytest.raises(ValueError, match="temperature must be >= 1e-06"):  # 7b0ac0c: captions of commas
        check_generation({"do_sample": True, "temperature": 1e-45})
    assert main(["caption", "--checkpoint", str(run_folder), str(photos), "--temperature", "1e-45"]) == 2
    _one_line(capsys.readouterr().err)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the config is empty"):  # 7b0ac0c: every default
        CaptionerConfig.load(tmp_path / "empty.yaml")
    (tmp_path / "q.csv").write_text('image,caption\na.jpg,"an open quote\nb.jpg,b\nc.jpg,c\n')
    with pytest.raises(CaptionFileError, match=r"q.csv:4: malformed CSV"):  # 7b0ac0c: one row swallowing the rest
        read_csv(tmp_path / "q.csv")
    for images, named in (([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "share id 1"),
                          ([{"id": 1, "file_name": None}], "file names must be non-empty strings")):
        (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "caption": "x"}]}))
        with pytest.raises(CaptionFileError, match=named):  # 7b0ac0c: the last one kept / "None"
            read_coco(tmp_path / "c.json")
    references = tmp_path / "refs.csv"
    references.write_text("image,caption\na.jpg,a dog\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"image": str(tmp_path / "a.jpg"), "caption": None}) + "\n")
    for extra, named in (([], "p.jsonl:1: 'image' and 'caption' must be strings"), (["--limit", "-1"], "--limit")):
        args = ["evaluate", "--predictions", str(predictions), "--csv", str(references), *extra]
        assert main(args) == 2, extra  # 7b0ac0c: scored "None" / took --limit -1
        err = capsys.readouterr().err
        _one_line(err)
        assert named in err, err


def test_messages_name_the_file(tmp_path, run_folder, photos, capsys) -> None:
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import GPT2Config
    from gpt2_effnet.data.captions import CaptionFileError, read_csv

    (tmp_path / "b.yaml").write_bytes(b"\x89\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="b.yaml: not a text"):
        CaptionerConfig.load(tmp_path / "b.yaml")
    (tmp_path / "l.csv").write_bytes("image,caption\na.jpg,a dog\nb.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CaptionFileError, match=r"l.csv:3: not UTF-8"):
        read_csv(tmp_path / "l.csv")
    (tmp_path / "config.json").write_text('{"vocab_size": 11, ')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GPT2Config.from_hf_json(tmp_path / "config.json")
    cut = tmp_path / "cut"
    shutil.copytree(run_folder, cut)
    (cut / "captioner.weights.h5").write_bytes((run_folder / "captioner.weights.h5").read_bytes()[:5000])
    with pytest.raises(OSError, match="captioner.weights.h5"):
        Captioner.load(cut)
    (tmp_path / "junk.keras").write_bytes(os.urandom(3000))
    assert main(["caption", "--checkpoint", str(tmp_path / "junk.keras"), str(photos)]) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "not a Keras archive" in err and "File not found" not in err
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": \n')
    (tmp_path / "refs.csv").write_text("image,caption\na.jpg,a dog\n")
    assert main(["evaluate", "--predictions", str(lines), "--csv", str(tmp_path / "refs.csv")]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err


def test_a_read_only_file_system_is_one_line(tmp_path, run_folder, photos, capsys, monkeypatch) -> None:
    import errno
    import pathlib

    paths = _synthetic(tmp_path / "data", n=8)
    (tmp_path / "c.yaml").write_text("train:\n  steps: 1\n")
    read_only = tmp_path / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # as a read-only mount answers
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    for argv in (["synthetic", "--out", str(read_only / "syn"), "--n", "2"],
                 ["shards", "--csv", str(paths.train_csv), "--out", str(read_only / "sh")],
                 ["train", "--config", str(tmp_path / "c.yaml"), "--csv", str(paths.train_csv), "--out", str(read_only / "run")],
                 ["caption", "--checkpoint", str(run_folder), str(photos), "--attention", str(read_only / "att")]):
        assert main(argv) == 2, argv  # 7b0ac0c: OSError tracebacks
        err = capsys.readouterr().err
        _one_line(err)
        assert "Read-only file system" in err and str(read_only) in err, err
