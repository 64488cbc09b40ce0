"""``gpt2-effnet convert``: GPT-2 weights from any supported layout into ours or Hugging Face's."""

from __future__ import annotations

import argparse
import sys

from ..weights.convert import TARGETS, convert
from ..weights.loader import FORMATS
from ..weights.native import CONFIG_FILE, WEIGHTS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a GPT-2 folder (HF safetensors / tf_model.h5, OpenAI checkpoint, ours) or file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--to",
        choices=TARGETS,
        default="native",
        help=f"native: {CONFIG_FILE} + {WEIGHTS_FILE} (default); safetensors: Hugging Face layout",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="source format (default: detected)")
    parser.add_argument("--no-strict", action="store_true", help="convert what matches; report the rest")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def main(args: argparse.Namespace) -> int:
    try:
        report, written = convert(
            args.src, args.out, to=args.to, format=args.format, strict=not args.no_strict, overwrite=args.force
        )
    except (ValueError, OSError) as err:  # WeightLoadError and ConfigError are ValueErrors
        print(f"gpt2-effnet convert: error: {err}", file=sys.stderr)
        return 1
    print(report)
    print(f"wrote {written}")
    return 0
