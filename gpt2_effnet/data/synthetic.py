"""Procedurally drawn captioned images: a group of 1-3 identical shapes on a noisy grey background.

Why it exists: tests and the embedded demo need captioned images that cost nothing to make,
are exactly reproducible from a seed, and are learnable by a small model on a CPU in minutes
but not trivially: every caption names five attributes (count, size, colour, shape, position)
that can only be read off the pixels, in one of several phrasings with a few synonyms, so a
model must both see and speak.

Each image holds one group of `count` shapes that share shape, colour and size, placed
together in one region (left/right/top/bottom/centre). Regions are defined on the shape
centres with a margin, so a "left" group is never also plausibly "top".
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Well separated in RGB, and far from every grey the background can take.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 190),
    "orange": (250, 135, 15),
}
# Half-extent of a shape's bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.055, "large": 0.09}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
MAX_COUNT = 3
NUM_TEMPLATES = 6

# Region geometry on normalised centre coordinates (u right, v down, both in 0..1).
CENTRE_HALF = 0.16  # "centre" = centres within this distance of the middle along both axes
EDGE_MARGIN = 0.04  # an edge region's centres are nearer its edge than the perpendicular edges by this much
BACKGROUND_RANGE = (70, 175)
NOISE_STD = 5.0
COLOUR_JITTER = 12
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class SyntheticImage:
    pixels: np.ndarray  # uint8 [size, size, 3]
    count: int
    shape: str
    colour: str
    size: str
    position: str
    objects: tuple[tuple[float, float, float], ...]  # (x centre, y centre, half-extent) in pixels
    background: int
    captions: tuple[str, ...]

    def metadata(self) -> dict:
        return {
            "count": self.count,
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "objects": [list(o) for o in self.objects],
            "background": self.background,
            "captions": list(self.captions),
        }


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    train_csv: Path
    val_csv: Path
    image_dir: Path
    metadata: Path
    shards: tuple[Path, ...] = ()


# ---------------------------------------------------------------------- regions and layout


def in_region(u: float, v: float, position: str) -> bool:
    """Does a shape centre at normalised (u, v) belong to `position`? Regions are disjoint."""
    in_centre = abs(u - 0.5) <= CENTRE_HALF and abs(v - 0.5) <= CENTRE_HALF
    if position == "centre":
        return in_centre
    if in_centre:
        return False
    distances = {"left": u, "right": 1.0 - u, "top": v, "bottom": 1.0 - v}
    perpendicular = {"left": ("top", "bottom"), "right": ("top", "bottom"), "top": ("left", "right"), "bottom": ("left", "right")}
    a, b = perpendicular[position]
    return distances[position] + EDGE_MARGIN < min(distances[a], distances[b])


def _apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    """Bounding boxes separated by at least `gap` pixels along x or y (so shapes never touch)."""
    reach = a[2] + b[2] + gap
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _edge_proposal(rng: np.random.Generator, position: str, halves: list[float], size: int, gap: float) -> list[tuple[float, float, float]] | None:
    """Shapes in a row along the region's edge: crowded groups (three large shapes) that blind
    rejection sampling rarely hits are proposed directly."""
    depths = [float(rng.uniform(h + 1.0, h + 1.0 + 0.05 * size)) for h in halves]
    spans = [halves[i] + halves[i + 1] + gap for i in range(len(halves) - 1)]
    lo = max(depths) + EDGE_MARGIN * size + 1.0
    free = (size - 2 * lo) - sum(spans)
    if free < 0:
        return None
    along = lo + np.sort(rng.uniform(0.0, free, size=len(halves))) + np.concatenate([[0.0], np.cumsum(spans)])
    placed = []
    for depth, a, h in zip(depths, along.tolist(), halves):
        x, y = {"left": (depth, a), "right": (size - depth, a), "top": (a, depth), "bottom": (a, size - depth)}[position]
        placed.append((x, y, h))
    return placed


def _centre_proposal(rng: np.random.Generator, halves: list[float], size: int) -> list[tuple[float, float, float]]:
    """Shapes on distinct corners of a box around the middle: the tightest centre groups fit this way."""
    corners = [(-1, -1), (1, -1), (-1, 1), (1, 1)]
    chosen = rng.choice(len(corners), size=len(halves), replace=False)
    reach = rng.uniform(CENTRE_HALF - 0.03, CENTRE_HALF, size=2) * size
    mid = size / 2.0
    return [(mid + corners[c][0] * reach[0], mid + corners[c][1] * reach[1], h) for c, h in zip(chosen.tolist(), halves)]


def _layout(rng: np.random.Generator, count: int, position: str, halves: list[float], size: int) -> list[tuple[float, float, float]]:
    """Random non-touching centres inside the region: rejection sampling one shape at a time,
    then (for crowded edge groups) rows along the edge, each checked against the region rules."""
    gap = max(2.0, 0.04 * size)

    def valid(placed: list[tuple[float, float, float]]) -> bool:
        return all(in_region(x / size, y / size, position) for x, y, _ in placed) and all(
            _apart(a, b, gap) for i, a in enumerate(placed) for b in placed[i + 1 :]
        )

    for _ in range(20):
        placed: list[tuple[float, float, float]] = []
        for h in halves:
            lo, hi = h + 1.0, size - 1.0 - h
            for _ in range(60):
                x, y = rng.uniform(lo, hi, size=2)
                cand = (float(x), float(y), h)
                if in_region(x / size, y / size, position) and all(_apart(cand, p, gap) for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == count:
            return placed
    for _ in range(100):
        if position == "centre":
            placed = _centre_proposal(rng, halves, size)
        else:
            placed = _edge_proposal(rng, position, halves, size, gap)
        if placed is not None and valid(placed):
            return placed
    raise RuntimeError(f"could not place {count} shapes {position} in a {size}px image")


def _draw(draw: "ImageDraw.ImageDraw", shape: str, colour: tuple[int, int, int], x: float, y: float, h: float) -> None:
    box = [x - h, y - h, x + h, y + h]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=colour)
    elif shape == "cross":
        arm = max(1.0, 0.35 * h)
        draw.rectangle([x - h, y - arm, x + h, y + arm], fill=colour)
        draw.rectangle([x - arm, y - h, x + arm, y + h], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _is_are(count: int) -> str:
    return "is" if count == 1 else "are"


def caption(template: int, count: int, size_word: str, colour: str, shape: str, place: str, one_as_number: bool) -> str:
    """One phrasing of the attributes; `template` in 0..NUM_TEMPLATES-1."""
    noun = shape if count == 1 else PLURALS[shape]

    def det(next_word: str) -> str:
        if count > 1:
            return COUNT_WORDS[count]
        return "one" if one_as_number else _article(next_word)

    phrase = f"{det(size_word)} {size_word} {colour} {noun}"
    if template == 0:
        return f"{phrase} {place}"
    if template == 1:
        return f"there {_is_are(count)} {phrase} {place}"
    if template == 2:
        return f"{place} there {_is_are(count)} {phrase}"
    if template == 3:
        return f"{phrase} {_is_are(count)} {place}"
    if template == 4:
        return f"a picture of {phrase} {place}"
    if template == 5:
        return f"{det(size_word)} {size_word} {noun}, coloured {colour}, {place}"
    raise ValueError(f"template must be in 0..{NUM_TEMPLATES - 1}, got {template}")


# ---------------------------------------------------------------------- reading captions back

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "size", "position")
# Every word a caption can use for an attribute value, mapped to the value.
_WORDS: dict[str, dict[str, str | int]] = {
    "colour": {c: c for c in COLOURS},
    "shape": {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}},
    "size": {w: size for size, words in SIZE_WORDS.items() for w in words},
    "position": {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "centre", "middle": "centre"},
}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def read_attributes(text: str) -> dict[str, str | int | None]:
    """The attribute values a (generated) caption states, read by keyword.

    Why keywords and not a grammar: a model's caption may be ungrammatical and still right
    (or fluent and wrong), and the demo must score what it *says*, per attribute. A value
    the caption does not state, or states twice with different values, reads as None.
    Count comes from the number word, else from a plural noun ("crosses" alone is >= 2: None).
    """
    words = [w for w in "".join(ch if ch.isalpha() else " " for ch in text.lower()).split()]
    found: dict[str, str | int | None] = {}
    for attribute, table in _WORDS.items():
        values = {table[w] for w in words if w in table}
        found[attribute] = values.pop() if len(values) == 1 else None
    counts = {_COUNT_WORDS[w] for w in words if w in ("one", "two", "three")}
    if not counts:
        # "a"/"an" only count as one when they introduce the object, not in "a picture of".
        nouns = [w for w in words if w in _WORDS["shape"]]
        plural = any(w in PLURALS.values() for w in nouns)
        article = any(w in ("a", "an") for w, nxt in zip(words, words[1:]) if nxt != "picture")
        counts = {1} if (article and nouns and not plural) else set()
    found["count"] = counts.pop() if len(counts) == 1 else None
    return found


def attribute_accuracy(captions: dict[str, str], truth: dict[str, dict]) -> dict[str, float]:
    """Per attribute, the fraction of images whose caption states the true value.

    ``captions`` maps image name -> generated caption; ``truth`` maps image name -> its
    metadata record (``metadata.json``). Missing or ambiguous statements count as wrong.
    """
    if not captions:
        raise ValueError("no captions to score")
    hits = {a: 0 for a in ATTRIBUTES}
    for name, text in captions.items():
        said = read_attributes(text)
        for attribute in ATTRIBUTES:
            hits[attribute] += int(said[attribute] == truth[name][attribute])
    return {a: hits[a] / len(captions) for a in ATTRIBUTES}


def read_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """``metadata.json`` as image name -> record."""
    return {item["image"]: item for item in json.loads(Path(path).read_text())["images"]}


# ---------------------------------------------------------------------- generation


def make_image(rng: np.random.Generator, image_size: int, captions_per_image: int = 3) -> SyntheticImage:
    """Draw one image and phrase its captions; everything random comes from `rng`."""
    from PIL import Image, ImageDraw

    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= captions_per_image <= NUM_TEMPLATES:
        raise ValueError(f"captions_per_image must be in 1..{NUM_TEMPLATES}, got {captions_per_image}")
    count = int(rng.integers(1, MAX_COUNT + 1))
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))

    halves = [SIZES[size] * image_size * float(rng.uniform(0.9, 1.1)) for _ in range(count)]
    objects = _layout(rng, count, position, halves, image_size)
    rgb = np.clip(np.asarray(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    fill = tuple(int(c) for c in rgb)

    canvas = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    for x, y, h in objects:
        _draw(draw, shape, fill, x, y, h)
    pixels = np.asarray(canvas)
    noise = rng.normal(0.0, NOISE_STD, size=pixels.shape)
    pixels = np.clip(pixels.astype(np.float64) + noise, 0, 255).astype(np.uint8)

    templates = rng.choice(NUM_TEMPLATES, size=captions_per_image, replace=False)
    captions = []
    for t in templates:
        size_word = SIZE_WORDS[size][rng.integers(len(SIZE_WORDS[size]))]
        place = POSITION_PHRASES[position][rng.integers(len(POSITION_PHRASES[position]))]
        captions.append(caption(int(t), count, size_word, colour, shape, place, bool(rng.integers(2))))
    return SyntheticImage(pixels, count, shape, colour, size, position, tuple(objects), background, tuple(captions))


def image_rng(seed: int, index: int) -> np.random.Generator:
    """Each image has its own stream, so image i is the same whatever n_images is."""
    return np.random.default_rng([seed, index])


def generate(n_images: int, image_size: int = 64, seed: int = 0, captions_per_image: int = 3) -> Iterator[SyntheticImage]:
    for i in range(n_images):
        yield make_image(image_rng(seed, i), image_size, captions_per_image)


def split_indices(n_images: int, seed: int, val_fraction: float) -> set[int]:
    """Held-out images (all of an image's captions stay on one side, so nothing leaks)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_images * val_fraction))
    if val_fraction > 0 and n_images >= 2:
        n_val = max(1, n_val)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_images)
    return set(int(i) for i in order[:n_val])


def write_synthetic(
    out_dir: str | os.PathLike,
    n_images: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 3,
    val_fraction: float = 0.1,
    image_format: str = "jpg",
    shards_per: int | None = None,
    progress: bool = True,
) -> SyntheticPaths:
    """Write images/, train.csv, val.csv (columns image, caption; one row per caption) and metadata.json.

    Image paths in the CSVs are relative to `out_dir`, so `--csv out/train.csv` works without
    `--images`. With `shards_per`, train and val are also written as webdataset shards
    (shards/train-*.tar, shards/val-*.tar) with DALI index files.
    """
    from PIL import Image
    from tqdm import tqdm

    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}.get(image_format.lower())
    if fmt is None:
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    ext = "png" if fmt == "PNG" else "jpg"
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    val = split_indices(n_images, seed, val_fraction)

    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    meta = []
    images = generate(n_images, image_size, seed, captions_per_image)
    for i, item in enumerate(tqdm(images, total=n_images, desc="synthetic", disable=not progress, unit="img")):
        name = f"images/{i:06d}.{ext}"
        save_kwargs = {"quality": 95} if fmt == "JPEG" else {}
        Image.fromarray(item.pixels).save(root / name, fmt, **save_kwargs)
        split = "val" if i in val else "train"
        rows[split].extend((name, c) for c in item.captions)
        meta.append({"image": name, "split": split, **item.metadata()})

    paths = {}
    for split, split_rows in rows.items():
        path = root / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows(split_rows)
        paths[split] = path
    meta_path = root / "metadata.json"
    meta_path.write_text(json.dumps({"seed": seed, "image_size": image_size, "images": meta}, indent=1))

    shard_paths: list[Path] = []
    if shards_per:
        from gpt2_effnet.data.shards import write_shards

        for split, split_rows in rows.items():
            if split_rows:
                pairs = [(str(root / name), text) for name, text in split_rows]
                shard_paths += write_shards(pairs, root / "shards", shards_per, prefix=split, progress=progress).tars
    return SyntheticPaths(root, paths["train"], paths["val"], image_dir, meta_path, tuple(shard_paths))


# ---------------------------------------------------------------------- CLI
