"""``gpt2-effnet demo``: the whole toolkit end to end on the CPU, with nothing downloaded.

It draws the synthetic captioned-shapes set, trains a small captioner (EfficientNet
backbone + a small GPT-2-shaped decoder with the real GPT-2 vocabulary) through the same
CSV pipeline and training loop as real runs, captions the held-out images with beam
search and with nucleus sampling, and scores them with the COCO caption metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="captioner YAML (default: configs/demo.yaml)")
    parser.add_argument("--out", default="demo_run", help="folder for the data set, the run and the pictures")
    parser.add_argument("--n-images", type=int, default=6000, help="synthetic images to draw (10%% held out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument(
        "--cross-attention", choices=("gated", "ungated"), default=None, help="override model.cross_attention"
    )
    parser.add_argument("--beams", type=int, default=3, help="beam width for the scored captions")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's p for the sampled captions")
    parser.add_argument("--show", type=int, default=8, help="predictions to print beside their references")
    parser.add_argument("--no-progress", action="store_true")


def _caption_all(model: Any, images: np.ndarray, tokenizer: Any, desc: str, batch: int = 64, **kwargs: Any) -> list[str]:
    from tqdm import tqdm

    from ..decoding import caption_strings

    texts: list[str] = []
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch"):
        texts += caption_strings(model, images[start : start + batch], tokenizer=tokenizer, **kwargs)
    return texts


# Accuracy of a caption that guesses each attribute uniformly (count: one of three numbers).
CHANCE = {"colour": 1 / 6, "shape": 1 / 5, "count": 1 / 3, "size": 1 / 2, "position": 1 / 5}


def attribute_table(beam: dict[str, float], sampled: dict[str, float], beams: int, top_p: float) -> str:
    """The held-out attribute accuracies as a small table beside chance."""
    lines = ["[demo] what the captions say vs what was drawn (held-out accuracy):",
             f"         {'attribute':10s} {'beam K=' + str(beams):>10s} {'nucleus':>10s} {'chance':>8s}"]
    for name, level in CHANCE.items():
        lines.append(f"         {name:10s} {beam[name]:10.3f} {sampled[name]:10.3f} {level:8.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from ..captioner import Captioner
    from ..config import CaptionerConfig
    from ..data.synthetic import attribute_accuracy, read_metadata, write_synthetic
    from ..evaluation import score_captions
    from ..image_input import read_image
    from ..plots import caption_grid, loss_curve
    from ..training.loop import train
    from ..training.optim import learning_rate
    from ..training.sources import caption_source, make_tokenizer

    out = Path(args.out)
    try:
        config = CaptionerConfig.load(args.config)
        if args.steps is not None:
            config = config.replace(train={"steps": args.steps})
        if args.cross_attention is not None:
            config = config.replace(model={"cross_attention": args.cross_attention})
        learning_rate(config.optim, config.train.steps)  # a schedule that cannot run fails here, in one line
    except (OSError, ValueError) as err:  # ConfigError is a ValueError
        print(f"gpt2-effnet demo: {err}", file=sys.stderr)
        return 2

    # 1. Data: drawn once, reused by later runs of the demo.
    data = out / "data"
    if not (data / "val.csv").is_file():
        print(f"[demo] drawing {args.n_images} synthetic images into {data}", flush=True)
        write_synthetic(
            data,
            n_images=args.n_images,
            image_size=config.model.image_size,
            seed=args.seed,
            captions_per_image=6,
            val_fraction=0.1,
            progress=not args.no_progress,
        )

    # 2. Train through the same pipeline and loop as any CSV run.
    tokenizer = make_tokenizer(config)
    train_source = caption_source(config, tokenizer, csv=data / "train.csv", images=data)
    val_source = caption_source(config, tokenizer, csv=data / "val.csv", images=data, training=False)
    run_dir = out / "run"
    print(f"[demo] training {config.train.steps} steps into {run_dir}", flush=True)
    started = time.perf_counter()
    result = train(config, run_dir, train_source, validation=val_source, show_progress=not args.no_progress)
    train_seconds = time.perf_counter() - started
    if result.interrupted:
        print(f"[demo] interrupted ({result.interrupted}); rerun `make demo` to resume", flush=True)
        return 130

    # 3. Caption the held-out images.
    import csv

    references: dict[str, list[str]] = defaultdict(list)
    with open(data / "val.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            references[row["image"]].append(row["caption"])
    names = sorted(references)
    images = np.stack([read_image(data / name, config.model.image_size) for name in names])
    model = Captioner.load(run_dir)
    max_new = config.model.max_caption_length
    eos = tokenizer.eos_token_id
    beam = _caption_all(model, images, tokenizer, f"beam search (K={args.beams})", num_beams=args.beams,
                        max_new_tokens=max_new, eos_token_id=eos)
    sampled = _caption_all(model, images, tokenizer, f"nucleus (p={args.top_p})", do_sample=True, top_p=args.top_p,
                           max_new_tokens=max_new, eos_token_id=eos, seed=args.seed)

    # 4. Score and show: the caption metrics, and what the captions say about each image
    # against what was drawn (a fluent caption of the wrong colour still scores BLEU).
    beam_scores = score_captions(references, dict(zip(names, beam)))
    sampled_scores = score_captions(references, dict(zip(names, sampled)))
    truth = read_metadata(data / "metadata.json")
    beam_attributes = attribute_accuracy(dict(zip(names, beam)), truth)
    sampled_attributes = attribute_accuracy(dict(zip(names, sampled)), truth)
    print(f"\n[demo] {args.show} held-out images (beam | nucleus | a reference):")
    for i in range(min(args.show, len(names))):
        print(f"  {names[i]}\n    beam:    {beam[i]}\n    nucleus: {sampled[i]}\n    ref:     {references[names[i]][0]}")
    caption_grid(images[:12], beam[:12], [references[n][0] for n in names[:12]], out / "predictions.png")
    loss_curve(run_dir / "metrics.jsonl", out / "loss.png", title=f"demo ({config.model.cross_attention} cross-attention)")
    summary = {
        "train_seconds": round(train_seconds, 1),
        "steps": result.step,
        "cross_attention": config.model.cross_attention,
        "held_out_images": len(names),
        "beam": {"num_beams": args.beams, **beam_scores, "attribute_accuracy": beam_attributes},
        "nucleus": {"top_p": args.top_p, **sampled_scores, "attribute_accuracy": sampled_attributes},
        "chance": CHANCE,
    }
    (out / "demo_report.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\n[demo] trained {result.step} steps in {train_seconds:.0f} s "
        f"({config.model.cross_attention} cross-attention)\n"
        f"[demo] held-out ({len(names)} images, 6 references each), 0-1 scale:\n"
        f"         beam K={args.beams}:     BLEU-4 {beam_scores['BLEU-4']:.3f}   CIDEr-D {beam_scores['CIDEr-D']:.3f}\n"
        f"         nucleus p={args.top_p}: BLEU-4 {sampled_scores['BLEU-4']:.3f}   CIDEr-D {sampled_scores['CIDEr-D']:.3f}\n"
        f"[demo] pictures: {out / 'predictions.png'}, {out / 'loss.png'}; report: {out / 'demo_report.json'}",
        flush=True,
    )
    print(attribute_table(beam_attributes, sampled_attributes, args.beams, args.top_p), flush=True)
    return 0
