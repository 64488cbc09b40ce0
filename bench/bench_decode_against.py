"""GPT-2 124M decoding, this checkout against another, side by side in one run.

    python bench/bench_decode_against.py --against ../base --batches 32 --modes greedy nucleus

``bench_generate.py`` puts one checkout beside transformers; this one puts two checkouts
of ours beside each other, for changes worth a few percent on a shared machine: each
(checkout, setting) runs in a fresh process (imported through ``PYTHONPATH``), rounds
alternate the checkouts, and the best of ``--reps`` calls after a warm-up is kept per
round. Same random weights, prompts and settings as ``bench_generate.py`` (an 8-token
prompt, 16 new tokens, EOS off); ``--precision`` and ``--graph`` (``jit_compile=False``,
the loop a SavedModel export runs) pick the path. Each side prints a checksum of its
tokens: equal checksums mean both decoded the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench_train import (  # this folder is on sys.path when run as a script
    cpu_name,
    run_worker,
)

HERE = Path(__file__).resolve()


def worker(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    from bench_generate import MODES, build_models

    from gpt2_effnet.decoding import generate

    model, _ = build_models("124M")
    prompt = np.random.default_rng(spec["batch"]).integers(0, 50257, (spec["batch"], 8))
    kwargs = dict(MODES[spec["mode"]], max_new_tokens=spec["tokens"], eos_token_id=None, seed=1)
    if spec["precision"]:
        kwargs["precision"] = spec["precision"]
    if spec["graph"]:
        kwargs["jit_compile"] = False
    ids = np.asarray(generate(model, prompt, **kwargs))
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        ids = np.asarray(generate(model, prompt, **kwargs))
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "checksum": int(ids.astype(np.int64).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=None, help="the other checkout (required)")
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument("--modes", nargs="+", default=["greedy", "nucleus"], choices=["greedy", "beam3", "nucleus"])
    parser.add_argument("--precision", default=None, help="generate(precision=...) on both sides")
    parser.add_argument("--graph", action="store_true", help="jit_compile=False on both sides")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.against is None:
        parser.error("--against CHECKOUT is required")
    print(f"CPU: {cpu_name()}")
    rows = []
    for batch in args.batches:
        for mode in args.modes:
            spec = {"batch": batch, "mode": mode, "tokens": args.tokens, "reps": args.reps,
                    "precision": args.precision, "graph": args.graph}
            ratios, best = [], [float("inf"), float("inf")]
            for round_ in range(args.rounds):
                this = run_worker(HERE, spec, None)
                other = run_worker(HERE, spec, args.against)
                ratios.append(other["seconds"] / this["seconds"])
                best = [min(best[0], this["seconds"]), min(best[1], other["seconds"])]
                same = "same tokens" if this["checksum"] == other["checksum"] else "DIFFERENT tokens"
                print(f"  {mode} batch {batch} round {round_ + 1}: this {batch * args.tokens / this['seconds']:.1f} "
                      f"vs against {batch * args.tokens / other['seconds']:.1f} tok/s ({ratios[-1]:.2f}x; {same})",
                      flush=True)
            rows.append((mode, batch, ratios, best[1] / best[0]))
    print("\n| mode | batch | this / against, per round | median | best vs best |")
    print("|---|---:|---|---:|---:|")
    for mode, batch, ratios, best_ratio in rows:
        print(f"| {mode} | {batch} | " + " / ".join(f"{r:.2f}x" for r in ratios)
              + f" | {statistics.median(ratios):.2f}x | {best_ratio:.2f}x |")


if __name__ == "__main__":
    main()
