"""Time from start to the first batch when a run resumes at 10 % and at 90 % of an epoch.

Each measurement is a fresh process that builds the shard source exactly as ``train``
does and asks for the resumed epoch's data (this tree: ``DataRequest(start_batch=k)``;
another tree without it, given by ``--against``, the way its loop resumed: the epoch's
dataset with ``.skip(k)``), then times until the first batch arrives. Shards: the photo-like
set of bench_loaders.py (local files, and the same files on moto's S3 server on 127.0.0.1).

Target (issue 32): 10 % and 90 % differ by less than 20 %.

    python bench/bench_resume.py [--data DIR] [--against /work/base]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def first_batch(index: str, fraction: float, loader: str) -> dict[str, float]:
    import dataclasses

    from gpt2_effnet.config import CaptionerConfig
    from gpt2_effnet.training.data_source import DataRequest
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    start = time.perf_counter()
    config = CaptionerConfig.from_dict({"model": {"image_size": 224, "max_caption_length": 40},
                                        "train": {"batch_size": 32, "shuffle_buffer": 2048}})
    source = shard_source(config, make_tokenizer(config), index, loader)
    steps = source.num_examples // 32
    k = int(steps * fraction)
    fields = {f.name for f in dataclasses.fields(DataRequest)}
    request = dict(epoch=0, batch_size=32, num_shards=1, shard_index=0, seed=1, shuffle=True)
    if "start_batch" in fields:
        dataset = source.make_dataset(DataRequest(**request, start_batch=k))
    else:
        dataset = source.make_dataset(DataRequest(**request)).skip(k)
    built = time.perf_counter()
    next(iter(dataset))
    import gpt2_effnet

    return {"seconds": time.perf_counter() - start, "build": built - start, "batch": k, "steps": steps,
            "package": str(Path(gpt2_effnet.__file__).parent.parent)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/bench_photos", help="bench_loaders.py's data folder (made if absent)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--against", help="another tree to time the same way (e.g. a worktree of main)")
    parser.add_argument("--one", nargs=3, metavar=("INDEX", "AT", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(first_batch(args.one[0], float(args.one[1]), args.one[2])), flush=True)
        os._exit(0)

    sys.path.insert(0, str(HERE))
    import headline
    from bench_loaders import make_shards

    index = make_shards(Path(args.data), args.images)
    shard_dir = Path(index).parent
    pattern = str(shard_dir / "photo-{000000..000007}.tar")
    trees = [("this tree", str(HERE.parent))] + ([("against", args.against)] if args.against else [])

    def run(tree: str, spec: str, fraction: float, env: dict[str, str]) -> dict[str, float]:
        command = [sys.executable, __file__, "--one", spec, str(fraction), "tfdata"]
        full_env = {**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": tree}
        out = subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=1800)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
        if line is None:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
        return json.loads(line[7:])

    cases = [("local", pattern, {})]
    sys.path.insert(0, str(HERE.parent / "tests"))
    try:
        from stores import s3_server, upload
    except ImportError:
        s3_server = None
    print(f"{next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')}, "
          f"{len(os.sched_getaffinity(0))} cores; {args.images} photo-like JPEGs in 8 shards; batch 32 at 224 px, tf.data")
    print(f"  {'tree':10s} {'store':6s} {'at 10 %':>9s} {'at 90 %':>9s} {'90 / 10':>8s}")

    def report(env_cases):
        for name, tree in trees:
            for store, spec, env in env_cases:
                if store == "s3" and name != "this tree":
                    continue  # the tree before this one read local files only
                results = [run(tree, spec, f, env) for f in (0.1, 0.9)]
                if any(Path(r["package"]).resolve() != Path(tree).resolve() for r in results):
                    raise RuntimeError(f"{tree}: imported gpt2_effnet from {results[0]['package']} instead")
                times = [r["seconds"] for r in results]
                print(f"  {name:10s} {store:6s} {times[0]:8.2f}s {times[1]:8.2f}s {times[1] / times[0]:7.2f}x", flush=True)
                if name == "this tree":  # a line for bench/run_all.py
                    headline.emit(f"resume at 90 % of an epoch, {store} shards: time to the first batch", round(times[1], 2),
                                  "s", f"{times[0]:.2f} s at 10 % ({times[1] / times[0]:.2f}x; target within 20 %)")

    report(cases)
    if s3_server is not None:
        with s3_server() as env:
            upload(env, "photos", {p.name: p.read_bytes() for p in shard_dir.iterdir() if p.suffix in (".tar", ".idx")})
            report([("s3", "s3://photos/photo-{000000..000007}.tar", env)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
