"""Two decode plans of this checkout against each other, in one process, calls alternating.

    python bench/bench_plans.py --model seed --mode beam --batch 4 --change transposed_head_rows=0,0
    python bench/bench_plans.py --model 124M --mode greedy --batch 64 --change wide_loop_rows=32

Plan A follows this machine's tuning (or ``--entry NAME`` of the table); plan B the same
tuning with ``--change`` applied. Both decode the same model (random weights: speed does
not depend on them), prompts and settings; each pair of calls alternates A and B so a
swing of the machine hits both alike. Prints both plans, the median and the best-vs-best
time ratio B / A (> 1: A is faster) and whether the tokens are the same. This is how the
tuning table's entries and ``gpt2-effnet tune``'s questions are checked.

Models: ``124M`` (GPT-2 124M, an 8-token prompt) and ``seed`` (the seed's captioner:
EfficientNetV2-B0 at 224 px, 2 encoder blocks, GPT-2 4 x 256, as bench_decode_seed.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

from bench_train import cpu_name  # this folder is on sys.path when run as a script

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODES = {"greedy": {}, "beam": {"num_beams": 3},
         "nucleus": {"do_sample": True, "top_k": 8, "top_p": 0.9, "seed": 1}}


def parse_change(text: str) -> dict:
    name, _, value = text.partition("=")
    parts = [int(v) if v.lstrip("-").isdigit() else v == "true" for v in value.split(",")]
    return {name: tuple(parts) if len(parts) > 1 else parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["124M", "seed"], default="124M")
    parser.add_argument("--mode", choices=list(MODES), default="greedy")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--entry", default=None, help="a tuning table entry for plan A (default: this machine's)")
    parser.add_argument("--change", nargs="+", required=True, help="NAME=VALUE[,VALUE] changes to the tuning for plan B")
    args = parser.parse_args()

    import numpy as np

    from gpt2_effnet.decoding import plan_for
    from gpt2_effnet.decoding.api import generate, generate_captions
    from gpt2_effnet.decoding.tuning import TABLE, as_tuning, current_tuning, read_entries

    first = current_tuning() if args.entry is None else as_tuning(
        next(e for e in read_entries(TABLE) if e["name"] == args.entry), TABLE)
    changes = {k: v for change in args.change for k, v in parse_change(change).items()}
    second = dataclasses.replace(first, name=first.name + " " + " ".join(args.change), **changes)
    kwargs = dict(MODES[args.mode], max_new_tokens=args.tokens, eos_token_id=None)
    rng = np.random.default_rng(0)
    if args.model == "seed":
        from gpt2_effnet.captioner import Captioner
        from gpt2_effnet.config import CaptionerConfig

        model = Captioner.create(CaptionerConfig.from_dict({
            "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": 256, "n_layer": 4, "n_head": 4},
            "model": {"backbone": "efficientnetv2-b0", "image_size": 224, "encoder_layers": 2, "encoder_heads": 4,
                      "max_caption_length": 32}}))
        images = rng.uniform(0, 255, (args.batch, 224, 224, 3)).astype(np.float32)
        run = lambda tuning: generate_captions(model, images, tuning=tuning, **kwargs)  # noqa: E731
    else:
        from bench_generate import build_models

        model, _ = build_models("124M")
        prompt = rng.integers(0, 50257, (args.batch, 8))
        run = lambda tuning: generate(model, prompt, tuning=tuning, **kwargs)  # noqa: E731
    print(f"CPU: {cpu_name()}; {args.model} {args.mode} batch {args.batch}, {args.tokens} tokens")
    for name, tuning in (("A", first), ("B", second)):
        plan = plan_for(model, args.batch, tuning=tuning, **kwargs)
        print(f"plan {name}: " + ", ".join(f"{k}={v}" for k, v in plan.as_dict().items() if k != "backbone"))
    tokens = [np.asarray(run(first)), np.asarray(run(second))]  # traced apart
    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.pairs):
        for name, tuning in (("A", first), ("B", second)):
            start = time.perf_counter()
            run(tuning)
            times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["A"], times["B"])]
    same = "same tokens" if np.array_equal(*tokens) else "DIFFERENT tokens"
    print(f"A best {min(times['A']):.4f} s, B best {min(times['B']):.4f} s; B / A: median {statistics.median(ratios):.3f}x, "
          f"best vs best {min(times['B']) / min(times['A']):.3f}x ({same}; pairs " + " ".join(f"{r:.2f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
