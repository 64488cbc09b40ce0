"""How many distinct compiled program shapes a captioning call can take, by tuning entry.

    python bench/plan_shapes.py

A shape is a DecodePlan without its row count, tuning name and backbone precision (the
backbone is one graph either way): how the call, the loop and the token choice are
compiled, the head and dense layouts, the cache writes and the decoder's precision. It
enumerates make_plan over every entry of the tuning table, batch sizes 1-128 (greedy,
beam 3, 2 return sequences), the three decode precisions and the three jit_compile
settings, with the KV cache (what captioning runs); the test suite decodes each shape
(tests/test_decode_plan.py).
"""

from __future__ import annotations

import dataclasses
import itertools

from gpt2_effnet.config import GPT2Config
from gpt2_effnet.decoding.base import GenerationConfig
from gpt2_effnet.decoding.plan import make_plan
from gpt2_effnet.decoding.tuning import TABLE, as_tuning, read_entries
from gpt2_effnet.gpt2 import GPT2Decoder

ROWS = sorted({b * r for b in (1, 2, 4, 8, 16, 32, 64, 128) for r in (1, 2, 3)})


def shape(plan) -> tuple:
    return tuple((k, v) for k, v in dataclasses.asdict(plan).items() if k not in ("rows", "tuning", "backbone"))


def main() -> None:
    decoder = GPT2Decoder(GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12))  # GPT-2 124M's copies
    every: set = set()
    for entry in read_entries(TABLE):
        tuning = as_tuning(entry, TABLE)
        counts = {}
        for jits in ((("auto",), "caption (default)"), (("auto", True), "caption, with or without --xla"),
                     (("auto", True, False), "generate(), any jit_compile")):
            found = set()
            for jit, precision, rows in itertools.product(jits[0], ("float32", "bfloat16-head", "bfloat16"), ROWS):
                found.add(shape(make_plan(decoder, GenerationConfig(precision=precision), rows, jit_compile=jit,
                                          tuning=tuning)))
            counts[jits[1]] = len(found)
            every |= found
        float32 = {shape(make_plan(decoder, GenerationConfig(), rows, tuning=tuning)) for rows in ROWS}
        print(f"{tuning.name:24s} float32 default: {len(float32):2d}; " + "; ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"all entries together: {len(every)} shapes")


if __name__ == "__main__":
    main()
