"""The synthetic captioned-shapes set: reproducible, grammatical, and captions that say what the pixels show.

Captions are checked against the pixels with this file's own readers (hue bands, connected
components, extents, a shape probe), not against the generator's tables.
"""

from __future__ import annotations

import colorsys
import csv
import json
import re
from collections import deque

import numpy as np
import pytest

from gpt2_effnet.data import synthetic

# ---------------------------------------------------------------------- an independent caption parser

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
SIZE_OF = {"small": "small", "little": "small", "large": "large", "big": "large"}
NOUNS = {"circle": ("circle", 1), "circles": ("circle", 2), "square": ("square", 1), "squares": ("square", 2),
         "triangle": ("triangle", 1), "triangles": ("triangle", 2), "diamond": ("diamond", 1),
         "diamonds": ("diamond", 2), "cross": ("cross", 1), "crosses": ("cross", 2)}
PLACES = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "centre", "middle": "centre"}
COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple")
# Hue bands (degrees) for each colour word, the test's own reading of colour.
HUES = {"red": (-20, 15), "orange": (15, 43), "yellow": (43, 70), "green": (95, 160), "blue": (200, 250), "purple": (260, 310)}

PHRASE = re.compile(
    r"(?P<det>an|a|one|two|three) (?P<size>small|little|large|big) (?:(?P<colour>\w+) )?(?P<noun>circles?|squares?|triangles?|diamonds?|cross(?:es)?)"
)
PLACE = re.compile(r"\b(?:on|at|near|in) the (left|right|top|bottom|centre|middle)\b")


def parse(caption: str) -> dict:
    m = PHRASE.search(caption)
    assert m, caption
    colour = m.group("colour")
    if colour is None:  # "two small squares, coloured blue, ..."
        cm = re.search(r", coloured (\w+),", caption)
        assert cm, caption
        colour = cm.group(1)
    places = PLACE.findall(caption)
    assert len(places) == 1, caption
    shape, plural = NOUNS[m.group("noun")]
    count = NUMBERS[m.group("det")]
    # Grammar: plural noun iff several, a/an by the next word's first letter, is/are agreement.
    assert (count > 1) == (plural == 2), caption
    if m.group("det") in ("a", "an"):
        assert m.group("det") == ("an" if m.group("size")[0] in "aeiou" else "a"), caption
    for verb in re.findall(r"\b(is|are)\b", caption):
        assert verb == ("is" if count == 1 else "are"), caption
    assert colour in COLOUR_WORDS, caption
    return {"count": count, "size": SIZE_OF[m.group("size")], "colour": colour, "shape": shape, "position": PLACES[places[0]]}


# ---------------------------------------------------------------------- independent pixel readers


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        out.append(np.array(pixels))
    return out


def colourful(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(int)
    return (p.max(axis=2) - p.min(axis=2)) > 60  # the grey background (plus noise) stays far below


def hue_of(rgb: np.ndarray) -> float:
    h, _, _ = colorsys.rgb_to_hsv(*(rgb / 255.0))
    return h * 360


def in_hue_band(hue: float, colour: str) -> bool:
    lo, hi = HUES[colour]
    return lo <= hue <= hi or lo <= hue - 360 <= hi


# ---------------------------------------------------------------------- tests


def test_same_seed_same_images_and_captions() -> None:
    a = list(synthetic.generate(6, 48, seed=11, captions_per_image=3))
    b = list(synthetic.generate(6, 48, seed=11, captions_per_image=3))
    c = list(synthetic.generate(6, 48, seed=12, captions_per_image=3))
    for x, y in zip(a, b):
        assert np.array_equal(x.pixels, y.pixels) and x.captions == y.captions and x.objects == y.objects
    assert any(not np.array_equal(x.pixels, z.pixels) for x, z in zip(a, c))
    # An image does not depend on how many images are drawn after it.
    assert np.array_equal(list(synthetic.generate(2, 48, seed=11))[1].pixels, a[1].pixels)


def test_captions_say_what_the_pixels_show() -> None:
    size = 64
    seen_attrs = {k: set() for k in ("count", "size", "colour", "shape", "position")}
    for item in synthetic.generate(60, size, seed=5, captions_per_image=3):
        meta = item.metadata()
        assert len(set(item.captions)) == 3  # several distinct phrasings
        for text in item.captions:
            attrs = parse(text)
            assert attrs == {k: meta[k] for k in attrs}, (text, meta)
        for k in seen_attrs:
            seen_attrs[k].add(meta[k])

        mask = colourful(item.pixels)
        blobs = components(mask)
        assert len(blobs) == meta["count"], meta
        # Colour: the mean colour of the shapes lies in the hue band of the colour word.
        assert in_hue_band(hue_of(item.pixels[mask].mean(axis=0)), meta["colour"]), meta
        # Position: where the shapes' centroid lies.
        cy, cx = np.nonzero(mask)[0].mean() / size, np.nonzero(mask)[1].mean() / size
        where = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                 "centre": abs(cx - 0.5) < 0.2 and abs(cy - 0.5) < 0.2}
        assert where[meta["position"]], (meta, cx, cy)
        for blob in blobs:
            y, x = blob[:, 0] / size, blob[:, 1] / size
            if meta["position"] in ("left", "right", "top", "bottom"):
                # every shape is in its half, not just the group's centroid
                half = {"left": x.mean() < 0.5, "right": x.mean() > 0.5, "top": y.mean() < 0.5, "bottom": y.mean() > 0.5}
                assert half[meta["position"]], meta
            # Size: the widest extent of each shape (small <= ~0.13 of the side, large >= ~0.16).
            extent = max(np.ptp(blob[:, 0]), np.ptp(blob[:, 1])) + 1
            assert (extent / size < 0.145) == (meta["size"] == "small"), (meta, extent)
    # Every attribute value occurs, so the captions really vary along all five axes.
    assert seen_attrs["count"] == {1, 2, 3} and seen_attrs["size"] == {"small", "large"}
    assert len(seen_attrs["colour"]) == 6 and len(seen_attrs["shape"]) == 5 and len(seen_attrs["position"]) == 5


def _probe(mask: np.ndarray, x: float, y: float, h: float, f: float) -> list[bool]:
    """Mask values at the four diagonal points (+-f*h, +-f*h) from a shape's centre: TL, TR, BL, BR."""
    return [bool(mask[int(round(y + sy * f * h)), int(round(x + sx * f * h))]) for sy in (-1, 1) for sx in (-1, 1)]


def test_shapes_are_drawn_as_named() -> None:
    size = 256  # large enough that a probe a few pixels from an edge is unambiguous
    shapes_seen = set()
    for item in synthetic.generate(30, size, seed=2, captions_per_image=1):
        mask = colourful(item.pixels)
        for x, y, h in item.objects:
            d45, d60, d85 = (_probe(mask, x, y, h, f) for f in (0.45, 0.6, 0.85))
            if not any(d45):
                got = "cross"
            elif d45 == [False, False, True, True]:
                got = "triangle"
            elif all(d85):
                got = "square"
            elif all(d60):
                got = "circle"
            else:
                got = "diamond"
            assert got == item.shape, (item.shape, d45, d60, d85)
        shapes_seen.add(item.shape)
    assert len(shapes_seen) == 5


def test_crowded_layouts_always_fit() -> None:
    # Three large shapes in one region is the tightest case; the smallest size must still work.
    for i in range(300):
        item = synthetic.make_image(synthetic.image_rng(99, i), synthetic.MIN_IMAGE_SIZE)
        assert len(item.objects) == item.count
    with pytest.raises(ValueError, match="image_size"):
        synthetic.make_image(np.random.default_rng(0), 16)


def test_write_synthetic_files_and_split(tmp_path) -> None:
    paths = synthetic.write_synthetic(tmp_path / "a", n_images=12, image_size=32, seed=4, captions_per_image=2,
                                      val_fraction=0.25, progress=False)
    again = synthetic.write_synthetic(tmp_path / "b", n_images=12, image_size=32, seed=4, captions_per_image=2,
                                      val_fraction=0.25, progress=False)
    rows = {}
    for split, path in (("train", paths.train_csv), ("val", paths.val_csv)):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["image", "caption"]
            rows[split] = list(reader)
    train_images = {r["image"] for r in rows["train"]}
    val_images = {r["image"] for r in rows["val"]}
    assert len(val_images) == 3 and len(train_images) == 9 and not train_images & val_images
    assert len(rows["train"]) == 18 and len(rows["val"]) == 6
    for r in rows["train"] + rows["val"]:
        assert (paths.root / r["image"]).is_file()
    meta = json.loads(paths.metadata.read_text())["images"]
    by_image = {m["image"]: m for m in meta}
    for r in rows["train"]:
        assert r["caption"] in by_image[r["image"]]["captions"]
    # Deterministic on disk too.
    assert paths.train_csv.read_bytes() == again.train_csv.read_bytes()
    assert (paths.image_dir / "000005.jpg").read_bytes() == (again.image_dir / "000005.jpg").read_bytes()


def test_synthetic_cli(tmp_path) -> None:
    from gpt2_effnet.cli import main

    assert main(["synthetic", "--out", str(tmp_path), "--n", "4", "--size", "32", "--seed", "1", "--format", "png"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"00000{i}.png" for i in range(4)]
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "val.csv").is_file()
