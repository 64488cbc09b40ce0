"""``gpt2-effnet evaluate``: COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) for a captioner.

The scorers are pycocoevalcap's own pure-Python ones, so figures are comparable with
papers. What differs by default is tokenisation: the official pipeline runs Stanford's
PTB tokenizer in Java; here captions are tokenised by :func:`simple_tokenize` (lower
case, PTB-style split of clitics like "'s" and "n't", punctuation dropped), which agrees
with the PTB tokenizer on ordinary captions (see tests/test_evaluation.py) and needs no
Java. ``--tokenizer ptb`` uses the Java one, and ``--meteor`` adds METEOR, when ``java``
is on PATH. (SPICE needs Stanford CoreNLP models downloaded separately; not offered.)

Every figure is reported twice: on the scorers' own scale (BLEU/ROUGE-L in 0..1, CIDEr-D
as computed by coco-caption, usually 0..~3) and multiplied by 100, the scale papers use
("CIDEr 110" is 1.10 here), under separate keys so nobody confuses them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import regex

# The tokens coco-caption removes after PTB tokenisation (plus '"', which PTB turns into `` or '').
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
# PTB writes brackets as -LRB- etc.; lower-cased, these escape coco-caption's (upper-case) removal
# list and are scored as words. Reproduced so figures match the official pipeline.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = regex.compile(
    r"""n't(?!\w)|'(?:s|re|ve|ll|d|m)(?!\w)|\w+(?:[-.]\w+)*(?=n't(?!\w))|\w+(?:[-.]\w+)*|\.\.\.|--|[^\s\w]"""
)
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")


def simple_tokenize(text: str) -> str:
    """Lower-case, split like PTB ("dog's" -> "dog 's", "don't" -> "do n't"), drop punctuation."""
    text = text.lower().replace("’", "'")
    words = []
    for token in _TOKEN.findall(text):
        if token in _DROPPED:
            continue
        words.append(_BRACKETS.get(token, token))
    return " ".join(words)


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize_all(groups: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    if tokenizer == "simple":
        return {key: [simple_tokenize(t) for t in texts] for key, texts in groups.items()}
    if tokenizer == "ptb":
        if not java_available():
            raise RuntimeError("--tokenizer ptb needs java on PATH (the Stanford PTB tokenizer is a Java program)")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": t} for t in texts] for key, texts in groups.items()})
    raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")


def score_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    tokenizer: str = "simple",
    meteor: bool = False,
) -> dict[str, float]:
    """Corpus-level metrics for one predicted caption per image against its references.

    ``references`` and ``predictions`` are keyed by image; only images present in both are
    scored (the caller reports the rest). Values are on the scorers' own scale.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [k for k in predictions if k in references and len(references[k]) > 0]
    if not keys:
        raise ValueError("no image has both a prediction and at least one reference caption")
    gts = _tokenize_all({k: list(references[k]) for k in keys}, tokenizer)
    res = _tokenize_all({k: [predictions[k]] for k in keys}, tokenizer)
    results: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        results[f"BLEU-{n}"] = float(value)
    results["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    results["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        if not java_available():
            raise RuntimeError("METEOR needs java on PATH")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            results["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
    return results


def report(metrics: Mapping[str, float], **info: Any) -> dict[str, Any]:
    """The JSON report: both scales under separate keys, plus whatever describes the run."""
    return {
        **info,
        "metrics": dict(metrics),
        "metrics_x100": {name: round(100.0 * value, 2) for name, value in metrics.items()},
        "scale_note": "'metrics' are on the scorers' scale (BLEU/ROUGE-L in 0..1); 'metrics_x100' are x100 as in papers",
    }


# ---------------------------------------------------------------------------------- CLI


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
    parser.add_argument("--tokenizer", choices=("simple", "ptb"), default="simple",
                        help="caption tokenisation before scoring (ptb needs java)")
    parser.add_argument("--meteor", action="store_true", help="also compute METEOR (needs java)")
    parser.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    parser.add_argument("--save-captions", default=None, help="also write the generated captions (.jsonl)")


def _read_predictions(path: Path) -> dict[str, str]:
    """``image -> caption`` from the caption command's JSON lines or CSV."""
    import csv

    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return {str(Path(r["image"])): str(r["caption"]) for r in rows}
    except KeyError as err:
        raise ValueError(f"{path}: every row needs 'image' and 'caption' fields (missing {err})") from None


def match_predictions(images: Sequence[str], predictions: Mapping[str, str]) -> dict[str, str]:
    """Pair reference images with predicted captions: same path, same resolved path, or same file
    name when that name is unique on both sides (the caption command writes paths as typed)."""
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
        elif Path(image).name in unique_pred and ref_names.count(Path(image).name) == 1:
            matched[image] = unique_pred[Path(image).name]
    return matched


def _caption_images(args: argparse.Namespace, paths: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Caption ``paths`` in batches; returns (captions, unreadable path -> reason)."""
    from .captioner import Captioner
    from .samplers import caption_strings
    from .samplers.cli import caption_paths
    from .tokenizer import GPT2Tokenizer

    model = Captioner.load(args.checkpoint)
    tokenizer_dir = Path(args.checkpoint) / "tokenizer"
    specials = model.decoder.num_special_tokens
    tokenizer = (
        GPT2Tokenizer.from_pretrained(tokenizer_dir, num_special_tokens=specials)
        if tokenizer_dir.is_dir()
        else GPT2Tokenizer.default(num_special_tokens=specials)
    )
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

    for path, text, error in caption_paths(paths, size, args.batch_size, caption_fn):
        if error is None:
            captions[path] = text
        else:
            bad[path] = error
    return captions, bad


def main(args: argparse.Namespace) -> int:
    from .data.captions import CaptionFileError, read_captions

    try:
        captions = read_captions(args.csv, args.coco, args.images, args.image_column, args.caption_column)
    except (CaptionFileError, FileNotFoundError, ValueError) as err:
        print(f"gpt2-effnet evaluate: {err}", file=sys.stderr)
        return 2
    if (args.tokenizer == "ptb" or args.meteor) and not java_available():
        print("gpt2-effnet evaluate: --tokenizer ptb and --meteor need java on PATH", file=sys.stderr)
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
        predictions, unreadable = _caption_images(args, wanted)
        if args.save_captions:
            with open(args.save_captions, "w", encoding="utf-8") as f:
                for path, text in predictions.items():
                    f.write(json.dumps({"image": path, "caption": text}) + "\n")
    else:
        try:
            predictions = match_predictions(images, _read_predictions(Path(args.predictions)))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            print(f"gpt2-effnet evaluate: {err}", file=sys.stderr)
            return 2
    scored = [p for p in images if p in predictions]
    without = [p for p in images if p not in predictions and p not in unreadable and p not in missing]
    if not scored:
        print("gpt2-effnet evaluate: no image has both a caption and references", file=sys.stderr)
        return 1
    metrics = score_captions(
        {p: references[p] for p in scored}, {p: predictions[p] for p in scored}, args.tokenizer, args.meteor
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
        tokenizer=args.tokenizer,
        decoding={"beams": args.beams or 1, "length_penalty": args.length_penalty} if args.checkpoint else None,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
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
