"""``gpt2-effnet shards``: webdataset shards (img2dataset layout) from a CSV or COCO set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.shards import write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="caption CSV (one row per caption)")
    source.add_argument("--coco", help="COCO captions JSON (captions_train2017.json layout)")
    parser.add_argument("--images", help="image folder (default: the caption file's folder)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--out", required=True, help="output folder for the .tar and .idx files")
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")


def main(args: argparse.Namespace) -> int:
    from ..data.captions import read_captions

    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"gpt2-effnet shards: --out {args.out} is a file; give a folder", file=sys.stderr)
        return 2

    try:
        captions = read_captions(args.csv, args.coco, args.images, args.image_column, args.caption_column)
        print(captions.summary())
        result = write_shards(captions, args.out, args.per_shard, args.prefix)
    except ValueError as err:  # CaptionFileError is one; so is "no samples written"
        print(f"gpt2-effnet shards: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    first, last = result.tars[0].name, result.tars[-1].name
    pattern = first if len(result.tars) == 1 else f"{args.prefix}-{{{first[len(args.prefix) + 1:-4]}..{last[len(args.prefix) + 1:-4]}}}.tar"
    print(f"train with: --shards {Path(args.out) / pattern}")
    return 0
