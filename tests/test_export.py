"""The SavedModel export: TensorFlow alone (gpt2_effnet blocked from import, and saved_model_cli) gets the same
captions, token for token, as ``gpt2-effnet caption`` with the same settings; bad bytes in
a batch give an empty caption and ok = False for that row only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.cli import main

SIZE = 32
pytestmark = pytest.mark.slow  # each export traces the whole decode loop (~10 s)


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    import keras
    from conftest import make_tiny_config
    from PIL import Image

    from gpt2_effnet.captioner import Captioner

    root = tmp_path_factory.mktemp("export")
    # The backbone keeps its random initialisation: seeded, or one process in ~6 drew a
    # backbone under which the three images gave one caption (seen in CI).
    keras.utils.set_random_seed(0)
    model = Captioner(make_tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 1},
                                       model={"image_size": SIZE, "max_caption_length": 6, "feature_stride": 8}))
    rng = np.random.default_rng(0)
    backbone = {id(v) for v in model.encoder.backbone.weights}
    for variable in model.weights:  # large random weights: captions that differ between inputs
        if id(variable) not in backbone:
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    # A random backbone's features are tiny (std ~0.003) and nearly the same for any image;
    # a large projection makes their differences matter downstream.
    projection = model.encoder.projection.kernel
    projection.assign(rng.normal(0, 300.0, projection.shape).astype("float32"))
    run = model.save_pretrained(root / "run")
    images = root / "images"
    images.mkdir()
    colours = [(250, 20, 20), (20, 20, 250), (240, 240, 240)]
    for i, colour in enumerate(colours):  # at the model's size: no resampling on either path
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    good = [images / f"{i}.png" for i in range(3)]
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "cut.png").write_bytes((images / "0.png").read_bytes()[:60])
    return run, good, [root / "bad.jpg", root / "cut.png"]


def _reference(run: Path, images: list[Path], **kwargs) -> tuple[list[str], np.ndarray]:
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.decoding import caption_strings, generate_captions
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    model = Captioner.load(run)
    pixels = np.stack([read_image(p, SIZE) for p in images])
    tokenizer = GPT2Tokenizer.for_run(run)
    ids = generate_captions(model, pixels, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return caption_strings(model, pixels, tokenizer=tokenizer, **kwargs), ids


def _run_without_gpt2_effnet(saved: Path, files: list[Path]) -> dict:
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["gpt2_effnet"] = None  # any import of it now fails
        import tensorflow as tf
        loaded = tf.saved_model.load({str(saved)!r})
        data = tf.constant([open(p, "rb").read() for p in {[str(f) for f in files]!r}])
        out = loaded.signatures["serving_default"](images=data)
        assert not [m for m, v in sys.modules.items() if m.startswith("gpt2_effnet") and v is not None]
        print(json.dumps({{"captions": [c.decode() for c in out["captions"].numpy()],
                          "ids": out["token_ids"].numpy().tolist(), "ok": out["ok"].numpy().tolist(),
                          "scores": out["scores"].numpy().tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_greedy_export_captions_like_the_caption_command(run_and_images, tmp_path, capsys) -> None:
    run, good, bad = run_and_images
    assert main(["export", str(run), "--out", str(tmp_path / "sm"), "--batch-size", "2"]) == 0
    assert "exported" in capsys.readouterr().err
    files = [good[0], bad[0], good[1], bad[1], good[2]]
    out = _run_without_gpt2_effnet(tmp_path / "sm", files)
    captions, ids = _reference(run, good)
    assert out["ok"] == [True, False, True, False, True]
    assert [out["captions"][i] for i in (0, 2, 4)] == captions
    assert out["captions"][1] == out["captions"][3] == ""
    np.testing.assert_array_equal(np.array([out["ids"][i] for i in (0, 2, 4)]), ids)
    assert len(set(captions)) > 1, "the inputs should give different captions, or the check proves little"
    # saved_model_cli runs it the TF1 way (as TF Serving's loader does), again without us.
    np.save(tmp_path / "in.npy", np.array([good[0].read_bytes(), b"junk"]))  # fixed-width bytes: no pickle
    cli = Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "run", "--dir", str(tmp_path / "sm"), "--tag_set", "serve",
                           "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'in.npy'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert captions[0] in proc.stdout and "[ True False]" in proc.stdout, proc.stdout
    # And what the caption command writes for the same files.
    assert main(["caption", "--checkpoint", str(run), *map(str, good), "--out", str(tmp_path / "c.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == captions


def test_beam_export_matches_beam_search(run_and_images, tmp_path) -> None:
    from gpt2_effnet.serving.export import export_saved_model

    run, good, _ = run_and_images
    info = export_saved_model(run, tmp_path / "beam", batch_size=3, num_beams=3)
    assert info["bytes"] > 0
    out = _run_without_gpt2_effnet(tmp_path / "beam", good + good[:1])  # 4 images: two chunks of 3
    captions, ids = _reference(run, good + good[:1], num_beams=3)
    assert out["captions"] == captions
    np.testing.assert_array_equal(np.array(out["ids"]), ids)


def test_export_with_a_bfloat16_backbone_is_the_librarys(run_and_images, tmp_path) -> None:
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    run, good, _ = run_and_images
    assert main(["export", str(run), "--out", str(tmp_path / "bb"), "--beams", "2", "--batch-size", "2",
                 "--backbone-precision", "bfloat16"]) == 0
    out = _run_without_gpt2_effnet(tmp_path / "bb", good)
    captions, ids = _reference(run, good, num_beams=2, backbone_precision="bfloat16")
    assert out["captions"] == captions
    np.testing.assert_array_equal(np.array(out["ids"]), ids)
    # The backbone in the export is the bfloat16 one: every convolution takes bfloat16.
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((tmp_path / "bb" / "saved_model.pb").read_bytes())
    types = [types_pb2.DataType.Name(node.attr["T"].type) for graph in saved.meta_graphs
             for function in graph.graph_def.library.function for node in function.node_def
             if node.op in ("Conv2D", "DepthwiseConv2dNative")]
    assert types and set(types) == {"DT_BFLOAT16"}, types


def test_export_refuses_what_it_cannot_do(run_and_images, tmp_path, capsys) -> None:
    run, _, _ = run_and_images
    (tmp_path / "taken").mkdir()
    for argv, named in ((["--out", str(tmp_path / "taken")], "exists already"),
                        (["--out", str(tmp_path / "x"), "--beams", "0"], "num_beams"),
                        (["--out", str(tmp_path / "x"), "--beams", "2", "--top-p", "0.9"], "cannot be combined")):
        assert main(["export", str(run), *argv]) == 2
        assert named in capsys.readouterr().err
    from gpt2_effnet.serving.export import export_saved_model

    with pytest.raises(ValueError, match="bfloat16-head"):
        export_saved_model(run, tmp_path / "y", precision="bfloat16-head")
    assert not (tmp_path / "y").exists()
