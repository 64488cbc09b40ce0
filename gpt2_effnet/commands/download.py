"""``gpt2-effnet download``: GPT-2 weights from Hugging Face or OpenAI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..download import BASE_URL_ENV, MODELS, SOURCES, DownloadError, download


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODELS, help="GPT-2 size")
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="hf",
        help="hf: Hugging Face safetensors (default); openai: OpenAI's original TensorFlow checkpoint",
    )
    parser.add_argument(
        "--dir",
        dest="directory",
        type=Path,
        default=None,
        help="destination folder (default: models/gpt2-MODEL-SOURCE)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"server to fetch from instead of the source's default (also ${BASE_URL_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout in seconds (default 30)")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries per file after a cut or timeout (default 3)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def main(args: argparse.Namespace) -> int:
    if args.directory is not None and args.directory.exists() and not args.directory.is_dir():
        print(f"gpt2-effnet download: --dir {args.directory} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        paths = download(
            args.model,
            args.source,
            args.directory,
            args.base_url,
            progress=not args.quiet,
            timeout=args.timeout,
            retries=args.retries,
        )
    except (DownloadError, ValueError) as err:
        print(f"gpt2-effnet download: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"GPT-2 {args.model} ({args.source}): {len(paths)} files in {paths[0].parent}")
    return 0
