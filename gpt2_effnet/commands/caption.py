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

from ..decoding.precision import BACKBONE_PRECISIONS, PRECISIONS
from ..image_input import caption_files, find_images
from . import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder (config.yaml + captioner.weights.h5) or .keras file")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--recursive", action="store_true", help="also look inside sub-folders")
    search = parser.add_argument_group("decoding (default: greedy)")
    search.add_argument("--beams", type=int, default=None, metavar="K",
                        help="beam search with K beams (with --top-p/--top-k/--temperature: beam sampling)")
    search.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logp / new_len ** this")
    search.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    search.add_argument("--top-k", type=int, default=None, metavar="K", help="top-k sampling")
    search.add_argument("--temperature", type=float, default=None, metavar="T", help="sampling temperature")
    search.add_argument("--seed", type=int, default=0, help="seed for sampling (same seed, same captions)")
    search.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N")
    search.add_argument("--repetition-penalty", type=float, default=1.0)
    search.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_length")
    search.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="opt-in bfloat16 decoding: 'bfloat16-head' (the output head's table) or 'bfloat16' "
                             "(the whole decoder); faster on CPUs with bfloat16 matmuls, not always float32's "
                             "captions (README, BENCHMARKS.md)")
    search.add_argument("--backbone-precision", default="float32", choices=BACKBONE_PRECISIONS,
                        help="opt-in: the image backbone's convolutions in bfloat16 (from the same float32 "
                             "weights); faster on CPUs with bfloat16 matmuls, not always float32's captions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--xla", action="store_true",
                        help="compile the whole call, image encoder included, as one XLA program (TensorFlow); "
                             "by default the decode plan decides what XLA compiles on this machine (--explain shows it)")
    parser.add_argument("--explain", action="store_true",
                        help="print the decode plan of each batch size this run would decode (how it is compiled "
                             "and computed on this machine, and the tuning behind it), then exit without captioning")
    parser.add_argument("--out", default=None, help="output .jsonl or .csv (default: JSON lines on stdout)")
    parser.add_argument("--attention", default=None, metavar="DIR",
                        help="also write, per image, a picture of each word's cross-attention map (DIR is created)")
    parser.add_argument("--tokenizer", default=None, help="vocabulary folder (default: the one training saved in RUN_DIR/tokenizer, else GPT-2's)")


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from ..decoding import decoding_kwargs

    kwargs = decoding_kwargs(beams=args.beams, length_penalty=args.length_penalty, top_p=args.top_p, top_k=args.top_k,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    kwargs.update(no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=args.repetition_penalty)
    if kwargs.get("do_sample"):
        kwargs["seed"] = args.seed
    if args.xla:
        kwargs["jit_compile"] = True
    if args.precision != "float32":
        kwargs["precision"] = args.precision
    if args.backbone_precision != "float32":
        kwargs["backbone_precision"] = args.backbone_precision
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
    return GPT2Tokenizer.for_run(args.checkpoint, num_special_tokens)


# generate() keywords -> this command's options, so errors name what the user typed.
_OPTION_NAMES = {
    "num_beams": "--beams",
    "length_penalty": "--length-penalty",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "temperature": "--temperature",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "repetition_penalty": "--repetition-penalty",
    "max_new_tokens": "--max-new-tokens",
}


def _check_checkpoint(checkpoint: Path) -> Any:
    """The config of a run folder (None for a .keras file: known once loaded); raises naming what is missing."""
    from ..captioner import CONFIG_FILE, WEIGHTS_FILE
    from ..config import CaptionerConfig

    if checkpoint.is_dir():
        if not (checkpoint / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no {CONFIG_FILE} (not a run folder, or its run never started)")
        if not (checkpoint / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no {WEIGHTS_FILE} (the run has not saved weights yet)")
        return CaptionerConfig.load(checkpoint / CONFIG_FILE)
    if checkpoint.suffix != ".keras" or not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a run folder or a .keras file")
    return None


def _check_length(config: Any, max_new_tokens: int | None) -> None:
    """--max-new-tokens against the model's positions (BOS takes one), before any image is read."""
    limit = config.gpt2.n_positions - 1
    if max_new_tokens is not None and max_new_tokens > limit:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} is more than this model can write: it has {config.gpt2.n_positions} "
            f"positions, one of them BOS, so at most {limit}"
        )


def main(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write, check_writable
    from ..captioner import Captioner
    from ..decoding import caption_strings, check_generation

    def fail(message: str, status: int = 2) -> int:
        print(f"gpt2-effnet caption: {message}", file=sys.stderr)
        return status

    # Everything is checked before any output is opened and before the model is built.
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        kwargs = _generation_kwargs(args)
        check_generation(kwargs)  # every option, now
        out_format = "jsonl"
        if args.out is not None:
            suffix = Path(args.out).suffix.lower()
            if suffix not in (".jsonl", ".csv"):
                raise ValueError(f"--out must end in .jsonl or .csv, got {args.out!r}")
            out_format = suffix[1:]
            check_writable(args.out)
        if args.attention and Path(args.attention).exists() and not Path(args.attention).is_dir():
            raise ValueError(f"--attention {args.attention} is a file; give a folder for the pictures")
        paths, unusable = find_images(args.inputs, args.recursive)
        checkpoint = Path(args.checkpoint)
        config = _check_checkpoint(checkpoint)
        if config is not None:
            _check_length(config, args.max_new_tokens)
    except (ValueError, NotImplementedError, FileNotFoundError) as err:  # ConfigError is a ValueError
        message = str(err).splitlines()[0]
        for keyword, option in _OPTION_NAMES.items():
            message = message.replace(keyword, option)
        return fail(message)
    if not paths:
        if unusable:
            return fail(f"no image files found; {len(unusable)} unusable: " +
                        "; ".join(f"{path}: {reason}" for path, reason in unusable[:3]))
        return fail("no image files found")
    try:
        model = Captioner.load(checkpoint)
        tokenizer = _load_tokenizer(args, model.decoder.num_special_tokens)
    except (OSError, ValueError) as err:
        first = first_line(err)
        return fail(f"cannot load --checkpoint {checkpoint}: {first}")
    config = model.captioner_config
    size, max_pixels = config.model.image_size, config.train.max_image_pixels
    try:
        _check_length(config, args.max_new_tokens)  # a .keras file: known once loaded
    except ValueError as err:
        return fail(str(err))
    if args.explain:
        from ..decoding import plan_for

        batches = {min(args.batch_size, len(paths)), len(paths) % args.batch_size} - {0}
        for batch in sorted(batches, reverse=True):
            print(f"{batch} image(s) a batch: " + plan_for(model, batch, **kwargs).explain())
        return 0

    attention_dir = Path(args.attention) if args.attention else None
    pending: list[tuple[np.ndarray, Any]] = []  # this batch's (pixels, CaptionAttention), in order

    def captions_for(images: np.ndarray) -> list[str]:
        if attention_dir is None:
            return caption_strings(model, images, tokenizer=tokenizer, **kwargs)
        from ..attention import captions_with_attention

        settings = {k: v for k, v in kwargs.items() if k != "jit_compile"}
        results = captions_with_attention(model, images, tokenizer, **settings)
        pending[:] = list(zip(images, results))
        return [r.caption for r in results]

    def write_picture(path: Path) -> None:
        from ..plots import attention_figure

        pixels, result = pending.pop(0)
        target = attention_dir / f"{Path(path).stem}.attention.png"
        counter = 1
        while target.exists():
            target = attention_dir / f"{Path(path).stem}-{counter}.attention.png"
            counter += 1
        attention_figure(pixels, result.words, result.layer_mean(), target)

    bad: list[tuple[Any, str]] = list(unusable)
    rows: list[tuple[Path, str]] = []
    stream_out = None if args.out else _Writer(sys.stdout, out_format)
    if attention_dir is not None:
        attention_dir.mkdir(parents=True, exist_ok=True)
    for path, caption, error in caption_files(paths, size, args.batch_size, captions_for, max_pixels):
        if error is not None:
            bad.append((path, error))
            continue
        if attention_dir is not None:
            write_picture(path)
        if stream_out is not None:
            stream_out.write(path, caption)
            rows.append((path, caption))
        else:
            rows.append((path, caption))
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for path, reason in bad:
            print(f"  {path}: {reason}", file=sys.stderr)
    if not rows:
        kept = f"; {args.out} was left as it was" if args.out and Path(args.out).exists() else ""
        return fail(f"no image could be captioned{kept}", 1)
    if args.out:
        with atomic_write(args.out, "w", newline="", encoding="utf-8") as handle:
            writer = _Writer(handle, out_format)
            for path, caption in rows:
                writer.write(path, caption)
    where = f" -> {args.out}" if args.out else ""
    print(f"captioned {len(rows)} image(s){where}", file=sys.stderr)
    return 0
