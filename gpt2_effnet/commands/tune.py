"""``gpt2-effnet tune``: measure this machine's decode thresholds and keep them as a local tuning entry.

    gpt2-effnet tune                 # ~4 minutes on 2 cores; writes ~/.cache/gpt2-effnet/tuning.json
    gpt2-effnet tune --dry-run       # measure and print, write nothing

Each threshold of :mod:`gpt2_effnet.decoding.tuning` is a question of the form "is plan
A faster than plan B at R rows?". Both plans decode the same GPT-2-shaped model (random
weights: speed does not depend on them), the same prompts and settings, alternating call
by call so that a swing of the machine hits both alike; the median of the per-pair time
ratios answers it. A branch is taken up to the largest row count at which it paid at
least ``--gain`` (5 %) at every measured row count up to it. The entry written matches
this machine's capability only (device kind, cores, ISA features) and names the command,
the machine, the date and every ratio behind it; ``GPT2_EFFNET_TUNING`` or this file
then decide the plans (``gpt2-effnet caption --explain`` shows which).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from typing import Any

BIG = 1 << 20  # "every row count"
# question -> (row counts, plan A's tuning changes, plan B's), each over a base that turns every branch off.
QUESTIONS: dict[str, tuple[tuple[int, ...], dict[str, Any], dict[str, Any]]] = {
    "xla_loop_rows": ((1, 16), {"xla_loop_rows": BIG}, {}),
    "wide_loop_rows": ((32, 48, 64, 96), {"xla_loop_rows": 16, "wide_loop_rows": BIG}, {"xla_loop_rows": 16}),
    "kernel_copies": ((32, 96), {"xla_loop_rows": 16, "wide_loop_rows": BIG, "kernel_copies": True,
                                 "kernel_copies_max_bytes": BIG << 20}, {"xla_loop_rows": 16, "wide_loop_rows": BIG}),
    "transposed_head_rows": ((3, 12, 24, 48, 64), {"xla_loop_rows": BIG, "transposed_head_rows": (1, BIG)},
                             {"xla_loop_rows": BIG}),
    "split_one_row": ((1,), {"xla_loop_rows": BIG, "split_one_row": True}, {"xla_loop_rows": BIG}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="tuning file to write (default: the local one the plans read)")
    parser.add_argument("--dry-run", action="store_true", help="measure and print the entry, write nothing")
    parser.add_argument("--only", nargs="+", choices=list(QUESTIONS), default=list(QUESTIONS),
                        help="measure these thresholds only (the others are left off)")
    parser.add_argument("--width", type=int, default=768, help="the model's n_embd (default: GPT-2 124M's)")
    parser.add_argument("--layers", type=int, default=12, help="the model's n_layer (default: GPT-2 124M's)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per call (the benchmarks' 16)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating calls per plan and row count")
    parser.add_argument("--gain", type=float, default=1.05, help="the speed-up a branch must show to be taken")


def _model(width: int, layers: int) -> Any:
    import numpy as np

    from ..config import GPT2Config
    from ..gpt2 import GPT2Decoder

    decoder = GPT2Decoder(GPT2Config(n_embd=width, n_layer=layers, n_head=max(width // 64, 1)))
    rng = np.random.default_rng(0)
    for variable in decoder.weights:
        variable.assign(rng.normal(0.0, 0.02, variable.shape).astype("float32"))
    return decoder


def _ratio(decoder: Any, rows: int, faster: Any, slower: Any, args: argparse.Namespace) -> float:
    """Median of ``slower``'s time over ``faster``'s, calls alternating (> 1: ``faster`` is)."""
    import numpy as np

    from ..decoding import generate

    beams = 3 if rows % 3 == 0 else 1  # beam 3 reaches 3 x a batch bucket; greedy the buckets
    prompt = np.random.default_rng(rows).integers(0, 50257, (rows // beams, 8))

    def call(tuning: Any) -> float:
        start = time.perf_counter()
        generate(decoder, prompt, max_new_tokens=args.tokens, eos_token_id=None, num_beams=beams, tuning=tuning)
        return time.perf_counter() - start

    call(faster), call(slower)  # traced apart
    return statistics.median(call(slower) / call(faster) for _ in range(args.pairs))


def _limit(ratios: dict[int, float], gain: float) -> int:
    """The largest row count up to which every measured one paid ``gain`` (0: none)."""
    limit = 0
    for rows in sorted(ratios):
        if ratios[rows] < gain:
            break
        limit = rows
    return limit


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from ..decoding.tuning import Tuning
    from ..machine import FEATURES, current_machine

    machine = current_machine()
    decoder = _model(args.width, args.layers)
    base = Tuning(name="tune")
    found: dict[str, Any] = {}
    evidence: dict[str, str] = {}
    measured: dict[str, dict[int, float]] = {}
    for question in args.only:
        rows, changes, against = QUESTIONS[question]
        ratios = measured[question] = {}
        for count in rows:
            ratios[count] = _ratio(decoder, count, dataclasses.replace(base, **changes),
                                   dataclasses.replace(base, **against), args)
            print(f"  {question}: {count} rows: {ratios[count]:.2f}x", file=sys.stderr, flush=True)
        evidence[question] = ", ".join(f"{count} rows {ratio:.2f}x" for count, ratio in ratios.items())
        if question in ("xla_loop_rows", "wide_loop_rows"):
            found[question] = _limit(ratios, args.gain)
        elif question == "transposed_head_rows":
            paying = [count for count in sorted(ratios) if ratios[count] >= args.gain]
            high = _limit({r: v for r, v in ratios.items() if paying and r >= paying[0]}, args.gain)
            found[question] = [paying[0], high] if paying else [0, 0]
        else:  # kernel_copies (against the stored kernels), split_one_row
            found[question] = _limit(ratios, args.gain) > 0
    if found.get("kernel_copies"):
        found["kernel_copies_max_bytes"] = 3 * 2**29  # copies beside the weights: up to GPT-2 355M's ~1.2 GB
        if "wide_loop_rows" in measured:  # the wide loop with copies against the graph loop
            wide = measured["wide_loop_rows"]
            copies = measured["kernel_copies"]
            found["wide_loop_rows"] = _limit({r: wide[r] * copies[r] for r in wide if r in copies}, args.gain)
    found["whole_program_xla"] = machine.device == "gpu"
    today = datetime.date.today().isoformat()
    command = "gpt2-effnet tune " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["tune"] else "gpt2-effnet tune"
    return {
        "name": f"measured {today}",
        "match": {"device": machine.device, "cores": machine.cores, "features": sorted(machine.features),
                  "without": sorted(set(FEATURES) - machine.features)},
        "tuning": found,
        "measured": {
            "machine": machine.describe(), "date": today, "command": command,
            "method": f"GPT-2 {args.layers} x {args.width} (random weights, 50257 tokens), 8-token prompts, "
                      f"{args.tokens} new tokens, greedy (beam 3 where rows are 3 x a batch), {args.pairs} alternating "
                      f"pairs, median time ratio of plan with / without the branch; taken where >= {args.gain:.2f}x",
            "evidence": evidence,
            "note": "whole_program_xla is not measured here (its model has no image encoder): on for a GPU, off on a CPU",
        },
    }


def main(args: argparse.Namespace) -> int:
    import json

    from ..decoding.tuning import local_path, write_local

    if args.pairs < 1 or args.tokens < 1 or args.gain <= 0:
        print("gpt2-effnet tune: --pairs and --tokens must be >= 1, --gain > 0", file=sys.stderr)
        return 2
    start = time.perf_counter()
    entry = measure(args)
    print(json.dumps(entry, indent=1))
    print(f"measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.dry_run:
        path = write_local(entry, args.out)
        note = "" if path == local_path() else f" (plans read it where GPT2_EFFNET_TUNING={path})"
        print(f"wrote {path}{note}", file=sys.stderr)
    return 0
