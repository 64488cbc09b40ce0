"""``gpt2-effnet caption``: caption image files or folders with a trained captioner.

Images are read by :mod:`gpt2_effnet.image_input`. A file that cannot be read is named on
stderr and skipped; the others are still captioned.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..image_input import caption_files, find_images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder (config.yaml + captioner.weights.h5) or .keras file")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--recursive", action="store_true", help="also look inside sub-folders")
    search = parser.add_argument_group("decoding (default: greedy)")
    search.add_argument("--beams", type=int, default=None, metavar="K", help="beam search with K beams")
    search.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logp / new_len ** this")
    search.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    search.add_argument("--top-k", type=int, default=None, metavar="K", help="top-k sampling")
    search.add_argument("--temperature", type=float, default=None, metavar="T", help="sampling temperature")
    search.add_argument("--seed", type=int, default=0, help="seed for sampling (same seed, same captions)")
    search.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N")
    search.add_argument("--repetition-penalty", type=float, default=1.0)
    search.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--xla", action="store_true",
                        help="compile the decode loop with XLA (TensorFlow): slower first batch, faster steps at small batch sizes")
    parser.add_argument("--out", default=None, help="output .jsonl or .csv (default: JSON lines on stdout)")
    parser.add_argument("--tokenizer", default=None, help="vocabulary folder (default: the one training saved in RUN_DIR/tokenizer, else GPT-2's)")


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    sampling = any(v is not None for v in (args.top_p, args.top_k, args.temperature))
    if args.beams is not None and sampling:
        raise ValueError("--beams cannot be combined with --top-p/--top-k/--temperature (beam sampling is not supported)")
    kwargs: dict[str, Any] = {
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.xla:
        kwargs["jit_compile"] = True
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.beams is not None:
        kwargs.update(num_beams=args.beams, length_penalty=args.length_penalty)
    if sampling:
        kwargs.update(
            do_sample=True,
            top_p=1.0 if args.top_p is None else args.top_p,
            top_k=0 if args.top_k is None else args.top_k,
            temperature=1.0 if args.temperature is None else args.temperature,
            seed=args.seed,
        )
    return kwargs


class _Writer:
    """JSON lines or CSV rows of (image, caption)."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        self.fmt = fmt
        self.csv = csv.writer(stream) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(["image", "caption"])

    def write(self, image: Path, caption: str) -> None:
        if self.csv is not None:
            self.csv.writerow([str(image), caption])
        else:
            self.stream.write(json.dumps({"image": str(image), "caption": caption}) + "\n")
        self.stream.flush()


def _load_tokenizer(args: argparse.Namespace, num_special_tokens: int) -> Any:
    from ..tokenizer import GPT2Tokenizer

    if args.tokenizer:
        return GPT2Tokenizer.from_pretrained(args.tokenizer, num_special_tokens=num_special_tokens)
    checkpoint = Path(args.checkpoint)
    return GPT2Tokenizer.for_run(checkpoint if checkpoint.is_dir() else checkpoint.parent, num_special_tokens)


def main(args: argparse.Namespace) -> int:
    from ..captioner import Captioner
    from ..config import CaptionerConfig
    from ..decoding import caption_strings

    if args.batch_size < 1:
        print("gpt2-effnet caption: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        kwargs = _generation_kwargs(args)
        paths = find_images(args.inputs, args.recursive)
    except (ValueError, FileNotFoundError) as err:
        print(f"gpt2-effnet caption: {err}", file=sys.stderr)
        return 2
    if not paths:
        print("gpt2-effnet caption: no image files found", file=sys.stderr)
        return 2
    out_format = "jsonl"
    if args.out is not None:
        suffix = Path(args.out).suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            print(f"gpt2-effnet caption: --out must end in .jsonl or .csv, got {args.out!r}", file=sys.stderr)
            return 2
        out_format = suffix[1:]

    # A run folder's model is loaded at the first readable image (its config gives the input
    # size), so a folder of broken files fails in a second; a .keras file is loaded now.
    checkpoint = Path(args.checkpoint)
    loaded: dict[str, Any] = {}
    try:
        if checkpoint.is_dir():
            size = CaptionerConfig.load(checkpoint / "config.yaml").model.image_size
        else:
            loaded["model"] = Captioner.load(checkpoint)
            size = loaded["model"].captioner_config.model.image_size
    except (OSError, ValueError) as err:  # missing files, bad config (ConfigError is a ValueError)
        print(f"gpt2-effnet caption: cannot read checkpoint {args.checkpoint}: {err}", file=sys.stderr)
        return 2

    def captions_for(images: np.ndarray) -> list[str]:
        if "model" not in loaded:
            loaded["model"] = Captioner.load(checkpoint)
        if "tokenizer" not in loaded:
            loaded["tokenizer"] = _load_tokenizer(args, loaded["model"].decoder.num_special_tokens)
        return caption_strings(loaded["model"], images, tokenizer=loaded["tokenizer"], **kwargs)

    bad: list[tuple[Path, str]] = []
    done = 0
    stream = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout
    try:
        writer = _Writer(stream, out_format)
        for path, caption, error in caption_files(paths, size, args.batch_size, captions_for):
            if error is not None:
                bad.append((path, error))
                continue
            writer.write(path, caption)
            done += 1
    finally:
        if stream is not sys.stdout:
            stream.close()
    where = f" -> {args.out}" if args.out else ""
    print(f"captioned {done} image(s){where}", file=sys.stderr)
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for path, reason in bad:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0 if done else 1
