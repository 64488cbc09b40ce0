"""Image files in, pixels out: the one reader every pipeline uses, training included.

Training (CSV/COCO and shards on the CPU), caption, evaluate, the demo and serving all
decode with :func:`decode_rgb`, so a model sees at training time exactly the pixels it is
captioned on. Pillow decodes (not TensorFlow), so captioning works on any Keras backend, and
every odd format is treated one way: 16-bit images scaled to 8 bits (not clipped to
white), palettes expanded, alpha dropped (not composited), grayscale copied to three
channels, an animation's first frame. Images larger than ``max_pixels`` are refused from
their header, before any decoding (Pillow's decompression-bomb limit by default:
``train.max_image_pixels``). Images are resized straight to the model's square input with
Pillow's bilinear filter, which antialiases when shrinking; large JPEGs are first decoded
at a reduced scale. The SavedModel export (TensorFlow ops only) and DALI on a GPU
reproduce this path closely, not bit for bit (tests bound the difference).
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

# The formats every reader takes (training, caption, evaluate, serve and the SavedModel,
# whose TensorFlow decoders know exactly these): one set, so an image that trains also
# captions everywhere and the other way round. TIFF and the rest are refused by name.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Pillow's own default limit (Image.MAX_IMAGE_PIXELS), also train.max_image_pixels' default.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """The header announces more pixels than allowed; nothing was decoded."""


class UnsupportedImage(ValueError):
    """A file Pillow may know but the project does not read everywhere (TIFF, ...)."""


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


def open_image(
    source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, size: int | None = None
) -> "Image.Image":
    """Decode a file or encoded bytes to an 8-bit RGB Pillow image, the way every reader does.

    ``size``: the square side the image will be resized to; a JPEG at least twice that on
    both sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (never below
    ``size``), which costs a fraction of a full decode and of the resize after it.
    """
    from PIL import Image

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit: refused from the header
        raise ImageTooLarge(f"{err}; a decompression bomb, or raise train.max_image_pixels") from None
    with image:
        if image.format not in IMAGE_FORMATS:
            raise UnsupportedImage(
                f"{image.format} images are not read here (only {', '.join(IMAGE_FORMATS)}); convert it to PNG or JPEG"
            )
        check_pixels(*image.size, max_pixels)  # from the header; nothing decoded yet
        image.seek(0)  # an animation's first frame, like training's expand_animations=False
        if size is not None and image.format == "JPEG":
            image.draft("RGB", (size, size))
        return _as_rgb(image)


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse (:class:`ImageTooLarge`) a size over ``max_pixels`` (None: no limit) before decoding."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb, or raise train.max_image_pixels)"
        )


def _as_rgb(image: "Image.Image") -> "Image.Image":
    """8-bit RGB, every mode treated one way (see the module's docstring)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit samples: scale to 8 bits as libpng does (x * 255 / 65535, rounded).
        wide = np.asarray(image, dtype=np.int64)
        gray = ((wide * 255 + 32767) // 65535).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if image.mode == "P":
        image = image.convert("RGBA")  # the palette's colours; transparency then dropped below
    return image.convert("RGB")


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers; C4/C8/CC are tables and reserved


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking its markers; None if it is not a
    well-formed JPEG up to that header. A few microseconds, where opening it with Pillow costs
    tens: loaders that hand the decode to someone else (DALI) check every image with it."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if pos + 9 > len(data) or length < 7:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if width and height else None
        if marker in (0xD9, 0xDA) or length < 2:  # end of image, or scan data before any frame header
            return None
        pos += 2 + length
    return None


def decode_rgb(source: str | os.PathLike | bytes, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 ``[S, S, 3]``: the pixels every pipeline trains and captions on.

    Pillow's bilinear filter antialiases when it shrinks. Raises :class:`ImageTooLarge`,
    :class:`UnsupportedImage`, or Pillow's own error for bytes that do not decode.
    """
    from PIL import Image

    image = open_image(source, max_pixels, size=image_size)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def read_image(path: str | os.PathLike | bytes, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_rgb` as float32 ``[S, S, 3]`` in 0..255 (what the models take)."""
    return decode_rgb(path, image_size, max_pixels).astype(np.float32)


def split_images(images: Any) -> list[Any]:
    """One item per image: a list or tuple as it is, a ``[N, H, W, C]`` array row by row,
    anything else (a path, encoded bytes, a Pillow image, one ``[H, W(, C)]`` array) alone."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil(images):
        return [images]
    array = np.asarray(images)
    if array.ndim == 4:
        return list(array)
    return [array]


def to_pixels(image: Any, image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image as the models take it, float32 ``[S, S, 3]`` in 0..255.

    A path or encoded bytes is read by :func:`read_image`, as every command reads files. A
    Pillow image is converted and resized the same way (the frame it shows; a JPEG the
    caller opened but did not load is decoded in full, not at a reduced scale). An array is
    ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (alpha dropped): uint8, or a
    float or integer array of pixel values in 0..255 (what :func:`read_image` returns).
    Another size is resized with the bilinear filter the files get.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return read_image(bytes(image) if isinstance(image, (bytearray, memoryview)) else image, image_size, max_pixels)
    if _is_pil(image):
        check_pixels(*image.size, max_pixels)
        rgb = _as_rgb(image)
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.float32)
    array = _pixel_array(image)
    if array.shape[:2] == (image_size, image_size):
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        resized = Image.fromarray(array).resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32)
    channels = [Image.fromarray(array[..., c].astype(np.float32), mode="F").resize(
        (image_size, image_size), Image.Resampling.BILINEAR) for c in range(3)]
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)


def _is_pil(value: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # a Pillow image exists only once Pillow was imported
    return pil is not None and isinstance(value, pil.Image)


def _pixel_array(value: Any) -> np.ndarray:
    """An image array checked and made ``[H, W, 3]``: integers as uint8, floats as float32."""
    try:
        array = np.asarray(value)
    except Exception as err:  # a type numpy cannot read
        raise TypeError(f"cannot read {type(value).__name__} as an image: give a path, a Pillow image or an array") from err
    if array.dtype == object or array.dtype.kind not in "uif":
        raise TypeError(f"cannot read {type(value).__name__} of dtype {array.dtype} as an image")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"an image array is [H, W] or [H, W, 1|3|4] (a batch: [N, H, W, C]), got shape {array.shape}")
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 255.0):
            raise ValueError(f"image values must lie in 0..255 (as 8-bit pixels), got {low:g}..{high:g}")
        if array.dtype.kind == "f" and 0.0 < high <= 1.0:
            import warnings

            warnings.warn("this float image's values all lie in 0..1; pixel values are read as 0..255, so multiply "
                          "by 255 if it was scaled", stacklevel=3)
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.uint8)  # integers: 8-bit pixels
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def fill_batch(images: np.ndarray, batch_size: int, total: int) -> np.ndarray:
    """A short batch padded to ``batch_size`` with copies of its last image when more than
    one batch is captioned (``total`` images), so a compiled decoder is not traced again
    for the odd size; the caption command and :meth:`Captioner.caption` batch alike."""
    if len(images) < batch_size and total > batch_size:
        filler = np.repeat(images[-1:], batch_size - len(images), axis=0)
        images = np.concatenate([images, filler])
    return images


def caption_files(
    paths: Sequence[Any],
    image_size: int,
    batch_size: int,
    caption_fn: Callable[[np.ndarray], list[str]],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[Any, str | None, str | None]]:
    """Caption image files in batches: yields ``(path, caption, None)`` or ``(path, None, reason)``.

    An unreadable file is reported and skipped; the rest of its batch goes on. A short batch
    is padded by :func:`fill_batch`.
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
                images = fill_batch(np.stack(pixels), batch_size, len(paths))
                for path, caption in zip(good, caption_fn(images)):
                    yield path, caption, None
            bar.update(len(chunk))
