"""Beam search on a GPT-2 124M-shaped captioner, this checkout against another, side by side.

    python bench/bench_beam_captioner.py --against ../base --rounds 2

The shape where the image side weighs most: GPT-2 12 x 768 (full vocabulary) with
cross-attention in every block, EfficientNetV2-B0 at 224 px read at stride 16 (196 image
tokens), 1 encoder block, random weights with the cross-attention gates open; 8 images,
16 new tokens, no early stop, beams 3 and 5 and greedy. Each checkout runs in its own
process (``PYTHONPATH``), the first call is timed apart, then the best of ``--reps``; the
process's peak resident memory is reported with it (the model itself is ~0.9 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# This folder is on sys.path when run as a script.
from bench_train import cpu_name, run_worker

HERE = Path(__file__).resolve()
IMAGES, TOKENS = 8, 16


def worker(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource

    import numpy as np

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import CaptionerConfig

    config = CaptionerConfig.from_dict({
        "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": 768, "n_layer": 12, "n_head": 12},
        "model": {"backbone": "efficientnetv2-b0", "image_size": 224, "feature_stride": 16, "encoder_layers": 1,
                  "encoder_heads": 12, "max_caption_length": 32},
    })
    model = Captioner.create(config)
    for variable in model.weights:
        if variable.path.endswith("gate"):  # open, so the image reaches every block
            variable.assign(np.float32(0.8))
    images = np.random.default_rng(0).uniform(0, 255, (IMAGES, 224, 224, 3)).astype(np.float32)
    out = {}
    for beams in spec["beams"]:
        kwargs = {"num_beams": beams, "max_new_tokens": TOKENS, "eos_token_id": None}
        start = time.perf_counter()
        np.asarray(model.generate(images, **kwargs))
        first = time.perf_counter() - start
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            np.asarray(model.generate(images, **kwargs))
            times.append(time.perf_counter() - start)
        out[str(beams)] = {"seconds": min(times), "first_s": first}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=None, help="another checkout, measured in the same run")
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 3, 1], help="1 is greedy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    print(f"CPU: {cpu_name()}")
    sides = [("this", None)] + ([("against", args.against)] if args.against else [])
    best: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for beams in args.beams:  # one process per setting: the peak memory is that setting's
            for side, checkout in sides:
                result = run_worker(HERE, {"beams": [beams], "reps": args.reps}, checkout)
                seconds, rss = result[str(beams)]["seconds"], result["peak_rss_mb"]
                best[(side, str(beams))] = min(best.get((side, str(beams)), seconds), seconds)
                best[(side, f"rss {beams}")] = rss
                print(f"  round {round_ + 1}: {side}: beams {beams}: {seconds:.3f} s for {IMAGES} images, "
                      f"peak RSS {rss:.0f} MB", flush=True)
    print("\n| beams | this s | this peak RSS MB |" + (" against s | against peak RSS MB | speed vs against |" if args.against else ""))
    print("|---:|---:|---:|" + ("---:|---:|---:|" if args.against else ""))
    for beams in args.beams:
        row = f"| {beams} | {best[('this', str(beams))]:.3f} | {best[('this', f'rss {beams}')]:.0f} |"
        if args.against:
            row += (f" {best[('against', str(beams))]:.3f} | {best[('against', f'rss {beams}')]:.0f} |"
                    f" {best[('against', str(beams))] / best[('this', str(beams))]:.2f}x |")
        print(row)


if __name__ == "__main__":
    main()
