"""``gpt2-effnet synthetic``: the synthetic captioned-shapes data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.synthetic import write_synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions-per-image", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--shards", type=int, default=0, metavar="PER_SHARD",
                        help="also write webdataset shards with this many samples each (0: none)")


def main(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"gpt2-effnet synthetic: --out {args.out} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        paths = write_synthetic(args.out, args.n, args.size, args.seed, args.captions_per_image,
                                args.val_fraction, args.format, shards_per=args.shards or None)
    except ValueError as err:
        print(f"gpt2-effnet synthetic: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images to {paths.image_dir}")
    print(f"captions: {paths.train_csv} and {paths.val_csv}")
    if paths.shards:
        print(f"shards: {len(paths.shards)} in {paths.shards[0].parent}")
    return 0

