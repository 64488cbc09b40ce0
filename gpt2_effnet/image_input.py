"""Image files in, pixels out: the one reader used by caption, evaluate and the demo.

Pillow decodes (not TensorFlow), so captioning works on any Keras backend. Images are
resized straight to the model's square input with Pillow's bilinear filter, which
antialiases when shrinking, like the training pipeline's ``tf.image.resize(antialias=True)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(inputs: Iterable[str], recursive: bool = False) -> list[Path]:
    """Files named on the command line (whatever their suffix) plus image files in folders."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found


def read_image(path: Path, image_size: int) -> np.ndarray:
    """RGB float32 ``[S, S, 3]`` in 0..255; raises on anything Pillow cannot decode."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32)


def caption_files(
    paths: Sequence[Any], image_size: int, batch_size: int, caption_fn: Callable[[np.ndarray], list[str]]
) -> Iterator[tuple[Any, str | None, str | None]]:
    """Caption image files in batches: yields ``(path, caption, None)`` or ``(path, None, reason)``.

    An unreadable file is reported and skipped; the rest of its batch goes on. A short batch
    is padded to ``batch_size`` (with copies of its last image) so a compiled decoder is not
    traced again for the odd size.
    """
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            good, pixels = [], []
            for path in chunk:
                try:
                    pixels.append(read_image(Path(path), image_size))
                    good.append(path)
                except Exception as err:  # any decoder failure is a per-file skip, reported to the caller
                    reason = f"{type(err).__name__}: {err}"
                    tqdm.write(f"skipping unreadable image {path}: {reason}", file=sys.stderr)
                    yield path, None, reason
            if pixels:
                images = np.stack(pixels)
                if len(images) < batch_size and len(paths) > batch_size:
                    filler = np.repeat(images[-1:], batch_size - len(images), axis=0)
                    images = np.concatenate([images, filler])
                for path, caption in zip(good, caption_fn(images)):
                    yield path, caption, None
            bar.update(len(chunk))
