"""``gpt2-effnet evaluate``: caption a reference set (or read captions already written) and score them.

The scoring itself (and its tokenisation choices) is in :mod:`gpt2_effnet.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..evaluation import java_available, report, score_captions
from ..image_input import caption_files
from . import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="caption the images with this run folder / .keras captioner")
    source.add_argument("--predictions", help="score existing captions: a .jsonl/.csv written by 'gpt2-effnet caption'")
    refs = parser.add_mutually_exclusive_group(required=True)
    refs.add_argument("--csv", help="references: CSV with one row per caption (columns image, caption)")
    refs.add_argument("--coco", help="references: COCO captions JSON (images + annotations)")
    parser.add_argument("--images", default=None, help="folder the reference image paths are relative to")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--beams", type=int, default=None, help="beam search with K beams (default greedy)")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--score-tokenizer", choices=("simple", "ptb"), default="simple",
                        help="how captions are split into words before scoring (ptb: Stanford's, needs java)")
    parser.add_argument("--meteor", action="store_true", help="also compute METEOR (needs java)")
    parser.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    parser.add_argument("--save-captions", default=None, help="also write the generated captions (.jsonl)")
    parser.add_argument("--match-names", action="store_true",
                        help="--predictions: also pair rows by file name when it is unique (paths typed elsewhere)")


def _read_predictions(path: Path) -> dict[str, str]:
    """``image -> caption`` from the caption command's JSON lines or CSV; errors name the line."""
    import csv

    numbered: list[tuple[int, Any]] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                numbered = [(reader.line_num, row) for row in reader]
        else:
            for number, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        numbered.append((number, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    predictions = {}
    for number, row in numbered:
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise ValueError(f"{path}:{number}: every row needs 'image' and 'caption' fields")
        if not isinstance(row["image"], str) or not isinstance(row["caption"], str):
            raise ValueError(
                f"{path}:{number}: 'image' and 'caption' must be strings, got {row['image']!r:.60} and "
                f"{row['caption']!r:.60} (a caption the captioner could not write is left out, not null)"
            )
        predictions[str(Path(row["image"]))] = row["caption"]
    return predictions


def match_predictions(images: Sequence[str], predictions: Mapping[str, str], by_name: bool = False) -> dict[str, str]:
    """Pair reference images with predicted captions: same path, or same resolved path.

    ``by_name`` (``--match-names``) also pairs files whose name is unique on both sides,
    for predictions written from another working folder; off by default, since two data
    sets can share file names and would then be scored against each other silently.
    """
    import os

    by_real = {os.path.realpath(k): v for k, v in predictions.items()}
    names = [Path(k).name for k in predictions]
    unique_pred = {Path(k).name: v for k, v in predictions.items() if names.count(Path(k).name) == 1}
    ref_names = [Path(p).name for p in images]
    matched: dict[str, str] = {}
    for image in images:
        if image in predictions:
            matched[image] = predictions[image]
        elif os.path.realpath(image) in by_real:
            matched[image] = by_real[os.path.realpath(image)]
        elif by_name and Path(image).name in unique_pred and ref_names.count(Path(image).name) == 1:
            matched[image] = unique_pred[Path(image).name]
    return matched


def _caption_images(args: argparse.Namespace, paths: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Caption ``paths`` in batches; returns (captions, unreadable path -> reason)."""
    from ..captioner import Captioner
    from ..decoding import caption_strings
    from ..tokenizer import GPT2Tokenizer

    model = Captioner.load(args.checkpoint)
    tokenizer = GPT2Tokenizer.for_run(args.checkpoint, model.decoder.num_special_tokens)
    kwargs: dict[str, Any] = {}
    if args.beams:
        kwargs.update(num_beams=args.beams, length_penalty=args.length_penalty)
    if args.max_new_tokens:
        kwargs["max_new_tokens"] = args.max_new_tokens
    size = model.captioner_config.model.image_size
    captions: dict[str, str] = {}
    bad: dict[str, str] = {}

    def caption_fn(images: Any) -> list[str]:
        return caption_strings(model, images, tokenizer=tokenizer, **kwargs)

    max_pixels = model.captioner_config.train.max_image_pixels
    for path, text, error in caption_files(paths, size, args.batch_size, caption_fn, max_pixels):
        if error is None:
            captions[path] = text
        else:
            bad[path] = error
    return captions, bad


def main(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write, check_writable
    from ..data.captions import CaptionFileError, read_captions

    try:
        for option, value in (("--out", args.out), ("--save-captions", args.save_captions)):
            if value is not None:
                check_writable(value, option)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.beams is not None and args.beams < 1:
            raise ValueError(f"--beams must be >= 1, got {args.beams}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1 (images to evaluate), got {args.limit}")
        captions = read_captions(args.csv, args.coco, args.images, args.image_column, args.caption_column)
    except (CaptionFileError, FileNotFoundError, ValueError) as err:
        print(f"gpt2-effnet evaluate: {err}", file=sys.stderr)
        return 2
    if (args.score_tokenizer == "ptb" or args.meteor) and not java_available():
        print("gpt2-effnet evaluate: --score-tokenizer ptb and --meteor need java on PATH", file=sys.stderr)
        return 2
    references: dict[str, list[str]] = OrderedDict()
    for image, text in captions.pairs:
        references.setdefault(str(Path(image)), []).append(text)
    images = list(references)
    if args.limit is not None:
        images = images[: args.limit]
    # Image files matter only when we caption them; scored predictions need no pixels.
    missing = {str(Path(p)) for p in captions.missing} if args.checkpoint else set()
    unreadable: dict[str, str] = {}
    if args.checkpoint:
        wanted = [p for p in images if p not in missing]
        try:
            predictions, unreadable = _caption_images(args, wanted)
        except (OSError, ValueError) as err:
            first = first_line(err)
            print(f"gpt2-effnet evaluate: cannot caption with --checkpoint {args.checkpoint}: {first}", file=sys.stderr)
            return 2
        if args.save_captions:
            with atomic_write(args.save_captions, "w", encoding="utf-8") as f:
                for path, text in predictions.items():
                    f.write(json.dumps({"image": path, "caption": text}) + "\n")
    else:
        try:
            predictions = match_predictions(images, _read_predictions(Path(args.predictions)), args.match_names)
        except (OSError, ValueError, json.JSONDecodeError) as err:
            print(f"gpt2-effnet evaluate: {err}", file=sys.stderr)
            return 2
    scored = [p for p in images if p in predictions]
    without = [p for p in images if p not in predictions and p not in unreadable and p not in missing]
    if not scored:
        print("gpt2-effnet evaluate: no image has both a caption and references", file=sys.stderr)
        return 1
    metrics = score_captions(
        {p: references[p] for p in scored}, {p: predictions[p] for p in scored}, args.score_tokenizer, args.meteor
    )
    result = report(
        metrics,
        checkpoint=args.checkpoint,
        predictions=args.predictions,
        references=captions.source,
        images_scored=len(scored),
        references_per_image=round(sum(len(references[p]) for p in scored) / len(scored), 3),
        skipped={"missing_files": len(missing), "unreadable": len(unreadable), "no_prediction": len(without)},
        unreadable=unreadable,
        score_tokenizer=args.score_tokenizer,
        decoding={"beams": args.beams or 1, "length_penalty": args.length_penalty} if args.checkpoint else None,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        with atomic_write(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    for name in metrics:
        print(f"{name:>8}: {metrics[name]:.4f}  (x100: {100 * metrics[name]:.2f})", file=sys.stderr)
    if missing or unreadable or without:
        print(
            f"skipped {len(missing)} missing, {len(unreadable)} unreadable, {len(without)} uncaptioned image(s)",
            file=sys.stderr,
        )
    return 0
