"""Read (image path, caption) pairs from a CSV or a COCO captions JSON.

Everything is checked before any training starts: a CSV without the named columns or a COCO
file without the expected keys fails at once with a message that says what *is* there, and
image files that do not exist are found up front, so they become a counted skip instead of an
error an hour into an epoch.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Pair = tuple[str, str]


class CaptionFileError(ValueError):
    """A caption file is malformed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class CaptionSet:
    """All well-formed rows of a caption file; `missing` holds the image paths not on disk.

    Rows keep their order; `existing()` drops the rows whose image is missing. Pipelines take
    the whole set so that each worker can count the missing rows of its own share.
    """

    pairs: tuple[Pair, ...]
    missing: frozenset[str] = field(default_factory=frozenset)
    source: str = ""
    empty_captions: int = 0  # rows dropped while reading because the caption was blank

    def existing(self) -> list[Pair]:
        return [p for p in self.pairs if p[0] not in self.missing]

    @property
    def num_missing(self) -> int:
        """Rows (captions) whose image file is missing."""
        return sum(1 for p in self.pairs if p[0] in self.missing)

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        n_images = len({p[0] for p in self.pairs})
        text = f"{self.source}: {len(self.pairs)} captions of {n_images} images"
        if self.missing:
            example = sorted(self.missing)[0]
            text += f"; {self.num_missing} captions skipped: {len(self.missing)} image files missing (e.g. {example})"
        if self.empty_captions:
            text += f"; {self.empty_captions} blank captions dropped"
        return text


def find_missing(paths: Sequence[str]) -> frozenset[str]:
    """Image paths that are not files, each unique path checked once."""
    return frozenset(p for p in set(paths) if not os.path.isfile(p))


def _resolve(path: str, image_dir: Path) -> str:
    return path if os.path.isabs(path) else str(image_dir / path)


def read_csv(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    delimiter: str = ",",
) -> CaptionSet:
    """One row per caption (an image may have several rows). Relative image paths are taken
    relative to `image_dir`, or to the CSV's own folder when it is None."""
    path = Path(path)
    base = Path(image_dir) if image_dir is not None else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"caption CSV {str(path)!r} does not exist")
    pairs: list[Pair] = []
    blank = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        # strict: an unterminated quote is an error, not a field that swallows every row after it
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise CaptionFileError(f"{path}: the CSV is empty (no header row)")
            header = [h.strip() for h in header]
            absent = [c for c in (image_column, caption_column) if c not in header]
            if absent:
                raise CaptionFileError(
                    f"{path}: no column {' or '.join(repr(c) for c in absent)}; "
                    f"the CSV has columns {header}. Name the right ones with --image-column / --caption-column."
                )
            i_img, i_cap = header.index(image_column), header.index(caption_column)
            for row in reader:
                if not row:
                    continue
                if len(row) <= max(i_img, i_cap):
                    raise CaptionFileError(f"{path}:{reader.line_num}: row has {len(row)} fields, expected {len(header)}")
                image, text = row[i_img].strip(), row[i_cap].strip()
                if not image:
                    raise CaptionFileError(f"{path}:{reader.line_num}: empty {image_column!r} value")
                if not text:
                    blank += 1
                    continue
                pairs.append((_resolve(image, base), text))
        except UnicodeDecodeError as err:
            raise CaptionFileError(
                f"{path}:{_first_undecodable_line(path)}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                "save the CSV as UTF-8"
            ) from None
        except csv.Error as err:
            raise CaptionFileError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not pairs:
        raise CaptionFileError(f"{path}: no caption rows")
    return CaptionSet(tuple(pairs), find_missing([p for p, _ in pairs]), str(path), blank)


def _first_undecodable_line(path: Path) -> int:
    """The line a UTF-8 decoder stops at (the reader decodes ahead, so it cannot say)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def read_coco(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> CaptionSet:
    """A COCO captions file (captions_train2017.json layout): images[{id, file_name}] and
    annotations[{image_id, caption}]. Relative file names are taken relative to `image_dir`
    (default: the JSON's folder)."""
    path = Path(path)
    base = Path(image_dir) if image_dir is not None else path.parent
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO caption file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CaptionFileError(f"{path}: a COCO captions file needs top-level 'images' and 'annotations'; found {keys}")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise CaptionFileError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    files: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise CaptionFileError(f"{path}: images[{i}] needs 'id' and 'file_name', got {image!r:.200}")
        name = image["file_name"]
        if not isinstance(name, str) or not name.strip():
            raise CaptionFileError(f"{path}: images[{i}] has file_name {name!r:.100}; file names must be non-empty strings")
        try:
            resolved, earlier = _resolve(name, base), files.get(image["id"])
        except TypeError:  # an id that cannot be a key (a list, a mapping)
            raise CaptionFileError(f"{path}: images[{i}] has id {image['id']!r:.100}; ids must be numbers or strings") from None
        if earlier is not None and earlier != resolved:
            raise CaptionFileError(
                f"{path}: images[{first_index[image['id']]}] and images[{i}] share id {image['id']!r} "
                f"but name different files ({earlier}, {resolved}); captions would go to the last one"
            )
        files[image["id"]] = resolved
        first_index.setdefault(image["id"], i)
    pairs: list[Pair] = []
    blank = 0
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptionFileError(f"{path}: annotations[{i}] needs 'image_id' and 'caption', got {ann!r:.200}")
        if ann["image_id"] not in files:
            raise CaptionFileError(f"{path}: annotations[{i}] refers to image_id {ann['image_id']!r}, which is not in 'images'")
        if not isinstance(ann["caption"], str):
            raise CaptionFileError(
                f"{path}: annotations[{i}] has caption {ann['caption']!r:.100} ({type(ann['caption']).__name__}); "
                "captions must be strings"
            )
        text = ann["caption"].strip()
        if not text:
            blank += 1
            continue
        pairs.append((files[ann["image_id"]], text))
    if not pairs:
        raise CaptionFileError(f"{path}: no annotations")
    return CaptionSet(tuple(pairs), find_missing([p for p, _ in pairs]), str(path), blank)


def read_captions(
    csv_path: str | os.PathLike | None = None,
    coco_path: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> CaptionSet:
    """The `--csv F | --coco F` (+ `--images D`) choice every command offers."""
    if (csv_path is None) == (coco_path is None):
        raise ValueError("give exactly one of a CSV file or a COCO captions JSON")
    if csv_path is not None:
        return read_csv(csv_path, image_dir, image_column, caption_column)
    return read_coco(coco_path, image_dir)  # type: ignore[arg-type]
