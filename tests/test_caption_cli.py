"""``gpt2-effnet caption`` over a folder: good images are captioned, a corrupt one is named and skipped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.cli import main
from gpt2_effnet.decoding import caption_strings
from gpt2_effnet.image_input import read_image
from gpt2_effnet.tokenizer import GPT2Tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def saved(tiny_config, tmp_path_factory) -> tuple[Path, Captioner]:
    """A tiny captioner with the real GPT-2 vocabulary (so captions decode to text), saved like a run."""
    config = tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 1},
                         model={"image_size": SIZE, "max_caption_length": 5})
    model = Captioner(config)
    rng = np.random.default_rng(0)
    for variable in model.decoder.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model.save_pretrained(tmp_path_factory.mktemp("run") / "tiny"), model


@pytest.fixture(scope="module")
def run_dir(saved) -> Path:
    return saved[0]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 30), dtype=np.uint8), mode="L").save(folder / "c.jpg")
    (folder / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not reported")
    return folder


def test_caption_folder_skips_and_names_the_corrupt_file(saved, image_dir, tmp_path, capsys) -> None:
    run_dir, model = saved
    out = tmp_path / "captions.jsonl"
    code = main(["caption", "--checkpoint", str(run_dir), str(image_dir), "--out", str(out), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["a.png", "c.jpg"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "b_broken.jpg" in err and "skipped 1 unreadable" in err
    assert "notes.txt" not in err

    # The CLI's (compiled) captions are the library's eager greedy captions of the same pixels
    # by the model that was saved.
    pixels = np.stack([read_image(image_dir / "a.png", SIZE), read_image(image_dir / "c.jpg", SIZE)])
    expected = caption_strings(model, pixels, tokenizer=GPT2Tokenizer.default(), compile=False)
    assert [r["caption"] for r in rows] == expected


def test_explain_prints_each_batch_size_s_plan_and_captions_nothing(saved, image_dir, tmp_path, capsys) -> None:
    from gpt2_effnet.decoding import plan_for

    run_dir, model = saved
    out = tmp_path / "captions.jsonl"
    for name in ("d.png", "e.png"):  # 5 image files (one broken): batches of 3 and of 2
        (image_dir / name).write_bytes((image_dir / "a.png").read_bytes())
    code = main(["caption", "--checkpoint", str(run_dir), str(image_dir), "--explain", "--beams", "2", "--xla",
                 "--batch-size", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    for batch in (3, 2):
        plan = plan_for(model, batch, num_beams=2, length_penalty=1.0, jit_compile=True)
        assert f"{batch} image(s) a batch: " + plan.explain() in printed
    assert plan.program == "xla" and "one XLA program" in printed


def test_caption_csv_with_beams(run_dir, image_dir, tmp_path, capsys) -> None:
    out = tmp_path / "captions.csv"
    code = main(["caption", "--checkpoint", str(run_dir), str(image_dir / "a.png"), str(image_dir / "b_broken.jpg"),
                 "--beams", "2", "--max-new-tokens", "3", "--out", str(out)])
    assert code == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == ["a.png"]
    assert "b_broken.jpg" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, decoding, refused, named",
    [("--precision", "bfloat16-head", {}, "float16", "bfloat16-head"),
     ("--backbone-precision", "bfloat16", {"num_beams": 2}, "bfloat16-head", "'float32', 'bfloat16'")],
    ids=["bfloat16-head", "bfloat16-backbone"],
)
def test_caption_at_a_low_precision_is_the_librarys(saved, image_dir, tmp_path, capsys, option, value, decoding,
                                                    refused, named) -> None:
    run_dir, model = saved
    keyword = option[2:].replace("-", "_")
    out = tmp_path / "captions.jsonl"
    beams = ["--beams", str(decoding["num_beams"])] if decoding else []
    code = main(["caption", "--checkpoint", str(run_dir), str(image_dir / "a.png"), str(image_dir / "c.jpg"),
                 *beams, option, value, "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pixels = np.stack([read_image(image_dir / "a.png", SIZE), read_image(image_dir / "c.jpg", SIZE)])
    expected = caption_strings(model, pixels, tokenizer=GPT2Tokenizer.default(), **decoding, **{keyword: value})
    assert [r["caption"] for r in rows] == expected
    # The option reaches generate() (float32 captions of this tiny model could equal these).
    import argparse

    from gpt2_effnet.commands import caption as caption_command

    parser = argparse.ArgumentParser()
    caption_command.add_arguments(parser)
    parsed = parser.parse_args(["--checkpoint", "run", "x.png", option, value])
    assert caption_command._generation_kwargs(parsed)[keyword] == value
    assert keyword not in caption_command._generation_kwargs(parser.parse_args(["--checkpoint", "run", "x.png"]))
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["caption", "--checkpoint", str(run_dir), str(image_dir), option, refused])
    assert named in capsys.readouterr().err


def test_caption_bad_arguments_are_named(run_dir, image_dir, tmp_path, capsys) -> None:
    assert main(["caption", "--checkpoint", str(run_dir), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["caption", "--checkpoint", str(run_dir), str(image_dir), "--beams", "0", "--top-p", "0.9"]) == 2
    assert "--beams" in capsys.readouterr().err
    assert main(["caption", "--checkpoint", str(run_dir), str(image_dir), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".jsonl or .csv" in capsys.readouterr().err
    # Only corrupt files: nothing captioned, non-zero exit, the file is named.
    assert main(["caption", "--checkpoint", str(run_dir), str(image_dir / "b_broken.jpg")]) == 1
    assert "b_broken.jpg" in capsys.readouterr().err


def test_caption_missing_checkpoint_is_named(image_dir, tmp_path, capsys) -> None:
    assert main(["caption", "--checkpoint", str(tmp_path / "no_run"), str(image_dir)]) == 2
    assert "no_run" in capsys.readouterr().err


def test_evaluate_with_checkpoint_captions_and_scores(run_dir, image_dir, tmp_path) -> None:
    """``gpt2-effnet evaluate --checkpoint``: captions the referenced images, counts the skips."""
    refs = tmp_path / "refs.csv"
    refs.write_text(
        "image,caption\n"
        "a.png,a square of coloured noise\na.png,random pixels\n"
        "c.jpg,a grey noisy picture\n"
        "b_broken.jpg,this file is broken\n"
        "gone.png,this file does not exist\n"
    )
    out, captions = tmp_path / "report.json", tmp_path / "captions.jsonl"
    code = main(["evaluate", "--checkpoint", str(run_dir), "--csv", str(refs), "--images", str(image_dir),
                 "--out", str(out), "--save-captions", str(captions), "--max-new-tokens", "3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images_scored"] == 2
    assert result["skipped"] == {"missing_files": 1, "unreadable": 1, "no_prediction": 0}
    assert set(result["metrics_x100"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert len(captions.read_text().splitlines()) == 2
