"""``Captioner.load(run).caption(images, **generate_kwargs)``: the ``caption`` command's captions
in one call, from paths, bytes, Pillow images or arrays, on TensorFlow and on torch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.cli import main
from gpt2_effnet.decoding import caption_strings
from gpt2_effnet.image_input import decode_rgb, read_image
from gpt2_effnet.tokenizer import GPT2Tokenizer

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
NAMES = ("a.png", "b.jpg", "c.gif")
# What the command is asked, and the same request as generate() keywords.
SETTINGS = {
    "greedy": ([], {}),
    "beam": (["--beams", "2", "--length-penalty", "0.7"], {"num_beams": 2, "length_penalty": 0.7}),
    "nucleus": (["--top-p", "0.8", "--temperature", "1.5", "--seed", "3"],
                {"do_sample": True, "top_p": 0.8, "temperature": 1.5, "seed": 3}),
}


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory) -> Path:
    """A tiny captioner with GPT-2's vocabulary and random weights, saved as a run folder.

    An untrained backbone's features differ little from image to image, so it reads an early,
    stride-8 feature map and its image projection and cross-attention are scaled up: then
    its captions depend on the image, and a wrong pixel changes them."""
    config = tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 1},
                         model={"image_size": SIZE, "max_caption_length": 6, "feature_stride": 8})
    keras.utils.set_random_seed(0)  # the encoder too: unseeded, its initial weights changed from process to process
    model = Captioner(config)
    rng = np.random.default_rng(0)
    for variable in model.decoder.weights:
        scale = 3.0 if "crossattention" in variable.path else 0.3
        variable.assign(rng.normal(0, scale, variable.shape).astype("float32"))
    kernel = model.encoder.projection.kernel
    kernel.assign(rng.normal(0, 300.0, kernel.shape).astype("float32"))
    return model.save_pretrained(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Three files of three formats and sizes, none of them the model's: three images, batches of 2."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / NAMES[0])
    Image.fromarray(rng.integers(0, 255, (70, 30), dtype=np.uint8), mode="L").save(folder / NAMES[1])
    Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8)).convert("P").save(folder / NAMES[2])
    return [folder / name for name in NAMES]


@pytest.fixture(scope="module")
def command_captions(run_dir, photos, tmp_path_factory) -> dict[str, list[str]]:
    """What ``gpt2-effnet caption --batch-size 2`` writes for each setting."""
    out = tmp_path_factory.mktemp("out")
    captions = {}
    for name, (options, _) in SETTINGS.items():
        target = out / f"{name}.jsonl"
        assert main(["caption", "--checkpoint", str(run_dir), *map(str, photos), "--batch-size", "2",
                     *options, "--out", str(target)]) == 0
        rows = [json.loads(line) for line in target.read_text().splitlines()]
        assert [Path(r["image"]).name for r in rows] == list(NAMES)
        captions[name] = [r["caption"] for r in rows]
    # The comparisons below can fail: every image has its own caption, and beam search
    # and sampling differ from greedy.
    assert len(set(captions["greedy"])) == len(NAMES), captions
    assert captions["beam"] != captions["greedy"] and captions["nucleus"] != captions["greedy"], captions
    return captions


TORCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    from gpt2_effnet.captioner import Captioner

    assert keras.backend.backend() == "torch"
    run, *paths = sys.argv[1:]
    model = Captioner.load(run)
    out = {"greedy": model.caption(paths, batch_size=2), "beam": model.caption(paths, batch_size=2, num_beams=2,
                                                                               length_penalty=0.7)}
    assert "tensorflow" not in sys.modules, "caption() on torch imported TensorFlow"
    print("CAPTIONS " + json.dumps(out))
    """
)


@pytest.fixture(scope="module", autouse=True)
def torch_run(request, run_dir, photos, tmp_path_factory):
    """The torch-backend captions, started with the module so the subprocess overlaps its tests."""
    if "not slow" in (request.config.getoption("markexpr") or "") or importlib.util.find_spec("torch") is None:
        yield None
        return
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path_factory.mktemp("torch") / "log.txt"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-c", TORCH_SCRIPT, str(run_dir), *map(str, photos)], cwd=REPO,
                                   env=env, stdout=sink, stderr=subprocess.STDOUT)
    yield process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_caption_gives_the_command_s_captions(run_dir, photos, command_captions, setting) -> None:
    model = Captioner.load(run_dir)
    kwargs = SETTINGS[setting][1]
    assert model.caption(photos, batch_size=2, **kwargs) == command_captions[setting]
    assert model.caption([str(p) for p in photos], batch_size=2, **kwargs) == command_captions[setting]


def test_images_in_any_form_give_the_same_captions(run_dir, photos, command_captions) -> None:
    """Bytes, Pillow images, uint8 and float arrays (one, a list, a batch) caption as their files do."""
    from PIL import Image

    model = Captioner.load(run_dir)
    expected = command_captions["beam"]
    beam = SETTINGS["beam"][1]
    forms = {
        "bytes": [p.read_bytes() for p in photos],
        "pillow": [Image.open(p) for p in photos],
        "uint8": [decode_rgb(p, SIZE) for p in photos],
        "float": [read_image(p, SIZE) for p in photos],
        "uint8 batch": np.stack([decode_rgb(p, SIZE) for p in photos]),
        "mixed": [photos[0], Image.open(photos[1]), read_image(photos[2], SIZE)],
    }
    for name, images in forms.items():
        assert model.caption(images, batch_size=2, **beam) == expected, name
    # One image alone is one caption (batched alone, so compared with the library's own call).
    alone = caption_strings(model, read_image(photos[0], SIZE)[None], tokenizer=GPT2Tokenizer.default(), **beam)
    assert model.caption(photos[0], **beam) == alone
    assert model.caption(Image.open(photos[0]), **beam) == alone
    assert model.caption(decode_rgb(photos[0], SIZE), **beam) == alone


def test_arrays_of_another_size_are_resized_as_files_are(run_dir, photos) -> None:
    """An array of the file's own size is resized by the same filter: the file's pixels, its caption."""
    from PIL import Image

    model = Captioner.load(run_dir)
    with Image.open(photos[0]) as image:
        full = np.asarray(image.convert("RGB"))
    expected = model.caption(photos[0])
    assert model.caption(full) == expected  # uint8 [40, 50, 3]
    gray = np.asarray(Image.open(photos[1]))  # uint8 [70, 30]
    assert model.caption(gray) == model.caption(photos[1])
    assert model.caption(gray[..., None]) == model.caption(photos[1])
    rgba = np.concatenate([full, np.full(full.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    assert model.caption(rgba) == expected  # alpha dropped
    from gpt2_effnet.image_input import to_pixels

    # float input takes the float filter: within a rounding step of the uint8 path.
    np.testing.assert_allclose(to_pixels(full.astype(np.float32), SIZE), to_pixels(full, SIZE), atol=1.0)


def test_num_return_sequences_gives_each_image_its_own_captions(run_dir, photos) -> None:
    model = Captioner.load(run_dir)
    sampled = {"do_sample": True, "seed": 5, "num_return_sequences": 2}
    both = model.caption(photos, batch_size=2, **sampled)
    assert len(both) == 2 * len(photos)
    # Rows draw from (seed, step, row index): the first image's rows are the same alone.
    assert model.caption(photos[:1], **sampled) == both[:2]


def test_a_model_built_in_memory_uses_gpt2_s_tokenizer_or_asks_for_one(tiny_config, rng) -> None:
    real = Captioner(tiny_config(real_vocabulary=True, gpt2={"n_embd": 16, "n_layer": 1},
                                 model={"image_size": SIZE, "max_caption_length": 4}))
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    expected = caption_strings(real, images, tokenizer=GPT2Tokenizer.default())
    assert real.caption(images) == expected
    tiny = Captioner(tiny_config(model={"image_size": SIZE, "max_caption_length": 4}))  # 97 tokens
    with pytest.raises(ValueError, match="tokenizer="):
        tiny.caption(images, eos_token_id=0)

    class Letters:
        def decode(self, ids) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

    got = tiny.caption(images, tokenizer=Letters(), eos_token_id=0)
    assert got == caption_strings(tiny, images, tokenizer=Letters(), eos_token_id=0)


def test_a_run_s_own_tokenizer_is_used(run_dir, photos, tmp_path) -> None:
    """A run folder with a tokenizer/ (as training writes) decodes with it, as the command does."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    GPT2Tokenizer.default().save(run / "tokenizer")
    vocab = json.loads((run / "tokenizer" / "vocab.json").read_text())
    # Swap two tokens' strings: the run's vocabulary now decodes the caption differently.
    ids = [int(i) for i in Captioner.load(run).generate(read_image(photos[0], SIZE)[None])[0]]
    assert ids[0] != 50256, "the caption is empty; pick other weights"
    first = ids[0]
    other = next(i for i in range(256, 50000) if i not in ids)
    inverse = {v: k for k, v in vocab.items()}
    vocab[inverse[first]], vocab[inverse[other]] = other, first
    (run / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--checkpoint", str(run), str(photos[0]), "--out", str(out)]) == 0
    command = json.loads(out.read_text())["caption"]
    assert Captioner.load(run).caption(photos[0]) == [command]
    assert Captioner.load(run_dir).caption(photos[0]) != [command]


def test_bad_images_are_named(run_dir, photos) -> None:
    model = Captioner.load(run_dir)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        model.caption(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        model.caption(np.full((8, 8, 3), -1.0, np.float32))
    with pytest.raises(TypeError, match="image"):
        model.caption([{"not": "an image"}])
    with pytest.raises(FileNotFoundError):
        model.caption(photos[0].parent / "missing.png")
    with pytest.raises(ValueError, match="batch_size"):
        model.caption(photos, batch_size=0)
    with pytest.warns(UserWarning, match="multiply by 255"):
        model.caption(np.full((SIZE, SIZE, 3), 0.5, np.float32))


@pytest.mark.slow
def test_caption_on_the_torch_backend_is_tensorflow_s(torch_run, command_captions) -> None:
    if torch_run is None:
        pytest.skip("torch is not installed")
    process, log = torch_run
    process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 0, output
    line = next(line for line in output.splitlines() if line.startswith("CAPTIONS "))
    captions = json.loads(line.removeprefix("CAPTIONS "))
    assert captions == {name: command_captions[name] for name in ("greedy", "beam")}
