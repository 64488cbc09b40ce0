"""Image files in, pixels out: the one reader used by caption, evaluate, the demo and serving.

Pillow decodes (not TensorFlow), so captioning works on any Keras backend. Every odd
format comes out as the training pipeline's TensorFlow decoder gives it: 16-bit images
scaled to 8 bits (not clipped to white), palettes expanded, alpha dropped (not
composited), grayscale copied to three channels; tests/test_reliability.py compares the
two readers pixel for pixel. Images larger than ``max_pixels`` are refused from their
header, before any decoding (Pillow's decompression-bomb limit by default, as in training:
``train.max_image_pixels``). Images are resized straight to the model's square input with
Pillow's bilinear filter, which antialiases when shrinking, like the training pipeline's
``tf.image.resize(antialias=True)``.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow's own default limit (Image.MAX_IMAGE_PIXELS), also train.max_image_pixels' default.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """The header announces more pixels than allowed; nothing was decoded."""


def find_images(inputs: Iterable[str], recursive: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files named on the command line (whatever their suffix) plus image files in folders.

    Returns ``(files, unusable)``: broken symbolic links, FIFOs, devices and sockets (inside
    folders or named) are not dropped silently but listed with the reason, so the caller
    reports them as skipped; none of them is ever opened (reading a FIFO would wait for a
    writer, a device for ever).
    """
    found: list[Path] = []
    unusable: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for candidate in sorted(path.glob(pattern)):
                if candidate.suffix.lower() not in IMAGE_SUFFIXES or candidate.is_dir():
                    continue
                if candidate.is_file():
                    found.append(candidate)
                else:
                    unusable.append((candidate, _not_a_file(candidate)))
        elif path.is_file():
            found.append(path)
        elif path.is_symlink() and not path.exists():
            raise FileNotFoundError(f"{item}: broken symbolic link to {os.readlink(path)}")
        elif path.exists():
            unusable.append((path, _not_a_file(path)))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return found, unusable


def _not_a_file(path: Path) -> str:
    """Why a path that is neither a file nor a folder cannot be captioned."""
    link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode
    except OSError:
        return f"broken symbolic link to {os.readlink(path)}" if path.is_symlink() else "cannot be read"
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"{kind}{link}, not an image file"


def open_image(source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "Image.Image":
    """Decode a file or encoded bytes to an 8-bit RGB Pillow image, the way training decodes it."""
    from PIL import Image

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(stream) as image:
        width, height = image.size  # from the header; nothing decoded yet
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                "(a decompression bomb, or raise train.max_image_pixels)"
            )
        image.seek(0)  # an animation's first frame, like training's expand_animations=False
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit samples: scale to 8 bits as libpng does for TensorFlow (x * 255 / 65535, rounded).
            wide = np.asarray(image, dtype=np.int64)
            gray = ((wide * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
            return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
        if image.mode == "P":
            image = image.convert("RGBA")  # the palette's colours; transparency then dropped below
        return image.convert("RGB")


def read_image(path: str | os.PathLike | bytes, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB float32 ``[S, S, 3]`` in 0..255; raises on anything Pillow cannot decode or that is too large."""
    from PIL import Image

    image = open_image(path, max_pixels)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def caption_files(
    paths: Sequence[Any],
    image_size: int,
    batch_size: int,
    caption_fn: Callable[[np.ndarray], list[str]],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
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
                    pixels.append(read_image(Path(path), image_size, max_pixels))
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
