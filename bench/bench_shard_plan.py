"""Start-up at cc12m scale without a single tar: planning from a shard index.

Writes a simulated index (``--shards`` shards, ``--samples`` samples in all: cc12m is about
11 M pairs in 10,000 img2dataset shards), then, in a fresh process per measurement, times
what a training process does before its first read: parse the index into a shard set,
cut pipeline ``i`` of ``--pipelines``' share, seed its epoch order and find where reading
starts (at 10 % and at 90 % of the epoch). Reports wall time and the resident memory the
planning added (peak RSS after minus before; the interpreter and imports excluded).

Targets (issue 32): <= 10 s and <= 200 MB per process.

    python bench/bench_shard_plan.py [--shards 10000] [--samples 11000000] [--pipelines 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import headline  # this folder is on sys.path when run as a script


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan(index: str, pipelines: int, at: float) -> dict[str, float]:
    from gpt2_effnet.data.sample_order import EpochOrder, pipeline_pieces
    from gpt2_effnet.data.shard_index import resolve

    before = rss_mb()
    start = time.perf_counter()
    shards = resolve(index, say=lambda _: None)
    resolved = time.perf_counter() - start
    worst = 0.0
    for pipeline in (0, pipelines // 2, pipelines - 1):
        t0 = time.perf_counter()
        pieces = pipeline_pieces(shards.counts, pipelines, pipeline)
        order = EpochOrder(pieces, seed=7, pipeline=pipeline, shuffle=True, block=2048)
        position = int(order.length * at) // 2048 * 2048
        first = next(order.groups(position))
        assert first.pieces
        worst = max(worst, time.perf_counter() - t0)
    return {"seconds": time.perf_counter() - start, "resolve": resolved, "pipeline": worst,
            "added_mb": rss_mb() - before, "samples": shards.total, "shards": len(shards.urls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=11_000_000)
    parser.add_argument("--pipelines", type=int, default=64, help="replicas in the cluster (8 machines x 8 GPUs)")
    parser.add_argument("--one", nargs=2, metavar=("INDEX", "AT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(plan(args.one[0], args.pipelines, float(args.one[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "cc12m.index"
        base, extra = divmod(args.samples, args.shards)
        lines = [f"s3://bucket/cc12m/{i:05d}.tar\t{base + (i < extra)}" for i in range(args.shards)]
        index.write_text("\n".join(lines) + "\n")
        print(f"index: {args.shards} shards, {args.samples:,} samples ({index.stat().st_size / 1e6:.2f} MB); "
              f"{args.pipelines} pipelines")
        for at in (0.1, 0.9):
            out = subprocess.run([sys.executable, __file__, "--one", str(index), str(at), "--pipelines", str(args.pipelines)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  resume at {at:.0%} of an epoch: {result['seconds']:.3f} s in all (index {result['resolve']:.3f} s, "
                  f"slowest pipeline plan {result['pipeline'] * 1e3:.1f} ms), +{result['added_mb']:.1f} MB resident")
            headline.emit(f"shard plan at {at:.0%} of an epoch, {args.shards:,} shards, {args.samples:,} samples, "
                          f"{args.pipelines} pipelines", round(result["seconds"], 3), "s",
                          f"+{result['added_mb']:.1f} MB resident (targets 10 s, 200 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
