"""Webdataset tar shards in img2dataset's layout, plus the DALI index file of each tar.

Layout: one sample per (image, caption) pair, stored as `KEY.jpg`, `KEY.txt`, `KEY.json` with a
9-digit key, so our own data takes exactly the path web-scale img2dataset shards (cc3m, cc12m)
take. Every image is fully decoded once while writing: a file that does not decode is skipped
and counted here, because DALI's decoder would otherwise stop a training run on it. JPEGs in RGB
or grayscale are stored byte for byte; anything else (PNG, GIF, CMYK JPEG, ...) is converted to
RGB and re-encoded as JPEG.

Index files (`NAME.idx` beside `NAME.tar`) follow DALI's v1.2 format (see :mod:`.tars`): their
first line gives a run its sample counts without opening the tar, the rest lets a reader
start at any sample with one seek.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2_effnet.data.captions import CaptionSet, Pair, find_missing
from gpt2_effnet.data.tars import format_index, scan

JPEG_QUALITY = 95


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


def index_path_for(tar_path: str | os.PathLike) -> Path:
    path = Path(tar_path)
    return path.with_suffix(".idx") if path.suffix == ".tar" else path.with_name(path.name + ".idx")


def write_index(tar_path: str | os.PathLike, index_path: str | os.PathLike | None = None) -> Path:
    """Write DALI's v1.2 index for one local tar (what DALI's wds2idx tool writes)."""
    with open(tar_path, "rb") as stream:
        found = scan(stream)
    if not found:
        raise ValueError(f"{tar_path}: no samples in this tar")
    out = Path(index_path) if index_path is not None else index_path_for(tar_path)
    out.write_text(format_index(found))
    return out


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

