"""Webdataset tar shards in img2dataset's layout, plus the DALI index file of each tar.

Layout: one sample per (image, caption) pair, stored as `KEY.jpg`, `KEY.txt`, `KEY.json` with a
9-digit key, so our own data takes exactly the path web-scale img2dataset shards (cc3m, cc12m)
take. Every image is fully decoded once while writing: a file that does not decode is skipped
and counted here, because DALI's decoder would otherwise stop a training run on it. JPEGs in RGB
or grayscale are stored byte for byte; anything else (PNG, GIF, CMYK JPEG, ...) is converted to
RGB and re-encoded as JPEG.

Index files (`NAME.idx` beside `NAME.tar`) follow DALI's v1.2 format, one line per sample:
`ext offset size filename` for each component, offsets pointing at the data (past the header).
They let DALI start without scanning every tar, and let the tf.data reader seek straight to
a worker's samples.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2_effnet.data.captions import CaptionSet, Pair, find_missing

INDEX_VERSION = "v1.2"
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
JPEG_QUALITY = 95

Component = tuple[str, int, int, str]  # (ext, data offset, size, member name)


@dataclass(frozen=True)
class ShardsWritten:
    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    written: int
    missing: int  # pairs whose image file does not exist
    unreadable: int  # pairs whose image did not decode

    def summary(self) -> str:
        return (f"wrote {self.written} samples in {len(self.tars)} shards"
                f" (skipped {self.missing} missing and {self.unreadable} unreadable images)")


# ---------------------------------------------------------------------- index files


def split_name(name: str) -> tuple[str, str]:
    """Sample key and extension: the extension starts at the first dot of the base name."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def scan_tar(tar_path: str | os.PathLike) -> list[list[Component]]:
    """Samples of a tar as lists of components, grouping consecutive members by key.

    Same rules as DALI's own indexer: only regular files, names whose base name starts with a
    dot (hidden files) are ignored.
    """
    samples: list[list[Component]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/"):
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    return samples


def index_path_for(tar_path: str | os.PathLike) -> Path:
    path = Path(tar_path)
    return path.with_suffix(".idx") if path.suffix == ".tar" else path.with_name(path.name + ".idx")


def write_index(tar_path: str | os.PathLike, index_path: str | os.PathLike | None = None) -> Path:
    """Write DALI's v1.2 index for one tar (what DALI's wds2idx tool writes)."""
    samples = scan_tar(tar_path)
    if not samples:
        raise ValueError(f"{tar_path}: no samples in this tar")
    out = Path(index_path) if index_path is not None else index_path_for(tar_path)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in samples]
    out.write_text("\n".join(lines) + "\n")
    return out


def read_index(index_path: str | os.PathLike) -> list[list[Component]]:
    """Parse a DALI index (v1.1: `ext offset size`, v1.2: `ext offset size filename`)."""
    with open(index_path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] not in ("v1.1", "v1.2"):
            raise ValueError(f"{index_path}: not a DALI webdataset index (first line {' '.join(head)!r})")
        width = 4 if head[0] == "v1.2" else 3
        n = int(head[1])
        samples: list[list[Component]] = []
        for lineno in range(2, n + 2):
            fields = f.readline().split()
            if not fields or len(fields) % width:
                raise ValueError(f"{index_path}:{lineno}: malformed sample line")
            comps = []
            for j in range(0, len(fields), width):
                name = fields[j + 3] if width == 4 else ""
                comps.append((fields[j], int(fields[j + 1]), int(fields[j + 2]), name))
            samples.append(comps)
    return samples


def tar_samples(tar_path: str | os.PathLike) -> list[list[Component]]:
    """Samples of a tar from its index file when there is one, else by scanning the tar."""
    index = index_path_for(tar_path)
    return read_index(index) if index.is_file() else scan_tar(tar_path)


def pick_components(sample: list[Component], image_exts: Sequence[str] = IMAGE_EXTS) -> tuple[Component, Component] | None:
    """(image, text) components of a sample, first match in tar order (as DALI picks), or None."""
    image = next((c for c in sample if c[0] in image_exts), None)
    text = next((c for c in sample if c[0] == TEXT_EXT), None)
    return (image, text) if image is not None and text is not None else None


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from brace patterns like `cc3m-{000000..000331}.tar` (several may be given)."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths = [p for s in specs for p in braceexpand(str(s))]
    if not paths:
        raise ValueError("no shard paths given")
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of {len(paths)} shard files do not exist (first: {absent[0]})")
    return paths


# ---------------------------------------------------------------------- writing


def _jpeg_bytes(path: str) -> tuple[bytes, int, int]:
    """Bytes to store as `.jpg`; raises if the image does not fully decode."""
    from PIL import Image

    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()  # full decode: truncated or corrupt files raise here
        width, height = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            return raw, width, height
        out = io.BytesIO()
        img.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), width, height


def write_shards(
    pairs: Sequence[Pair] | CaptionSet,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10_000,
    prefix: str = "shard",
    progress: bool = True,
) -> ShardsWritten:
    """Write `{prefix}-000000.tar, ...` (+ `.idx`) into `out_dir`, one sample per pair."""
    import webdataset as wds
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if isinstance(pairs, CaptionSet):
        all_pairs, missing = list(pairs.pairs), pairs.missing
    else:
        all_pairs = list(pairs)
        missing = find_missing([p for p, _ in all_pairs])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tars: list[Path] = []
    n_missing = n_unreadable = written = 0
    cached: tuple[str, tuple[bytes, int, int] | None] | None = None  # rows of one image are usually adjacent
    writer = None
    try:
        for path, text in tqdm(all_pairs, desc="shards", unit="sample", disable=not progress):
            if path in missing:
                n_missing += 1
                continue
            if cached is None or cached[0] != path:
                try:
                    cached = (path, _jpeg_bytes(path))
                except Exception:  # any decoder failure is a bad file, counted, not fatal
                    cached = (path, None)
            if cached[1] is None:
                n_unreadable += 1
                continue
            jpg, width, height = cached[1]
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                                         verbose=0, encoder=False, mtime=0, post=lambda f: tars.append(Path(f)))
            key = f"{written:09d}"
            meta = {"key": key, "caption": text, "source": path, "width": width, "height": height, "status": "success"}
            writer.write({"__key__": key, "jpg": jpg, "txt": text.encode("utf-8"),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if not written:
        raise ValueError(f"no samples written: {n_missing} images missing, {n_unreadable} unreadable")
    indexes = tuple(write_index(t) for t in tars)
    return ShardsWritten(tuple(tars), indexes, written, n_missing, n_unreadable)


# ---------------------------------------------------------------------- CLI
