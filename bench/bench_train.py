"""Train-step speed, first-step (trace/compile) time and peak memory, side by side.

    python bench/bench_train.py                          # this checkout, its default and float32
    python bench/bench_train.py --against ../base        # ... and another checkout, same run
    python bench/bench_train.py --variants auto,float32,mixed_bfloat16 --jit both

The default shape is the seed's configuration: EfficientNetV2-B0 at 224 px from random
weights, GPT-2 4 x 256 with the full 50257+1 vocabulary, 2 encoder blocks, batch 8 x 32
tokens, Adam with the seed's settings. Every variant runs in a fresh subprocess (so its
peak RSS and its first-step time are its own) on the same fixed batch; variants are run
in rounds, alternating, and the best steady step time of the rounds is kept, because
2-core machines shared with other jobs swing by tens of percent between runs.

A checkout given with ``--against`` is imported through ``PYTHONPATH`` and driven through
whatever train-step entry point it has (``Trainer.train_step``, or the older private
``Trainer._train_fn``), so one script measures both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import headline  # this folder is on sys.path when run as a script

HERE = Path(__file__).resolve()


def cpu_name() -> str:
    """The CPU's model name and its bfloat16 features, as /proc/cpuinfo tells them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX-512'}; {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- the worker


def worker(spec: dict) -> dict:
    """Build a trainer for ``spec`` and time it; runs in its own process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource

    import numpy as np

    from gpt2_effnet.config import CaptionerConfig
    from gpt2_effnet.training import DataRequest, DataSource, Trainer

    vocab = 50257
    train = {"batch_size": spec["batch"], "steps": 10**9, "checkpoint_every": 10**9, "log_every": 10**9}
    if spec["precision"] != "default":
        train["precision"] = spec["precision"]
    if spec["jit"] is not None:
        train["jit_compile"] = spec["jit"]
    model = {"backbone": spec["backbone"], "image_size": spec["image_size"], "encoder_layers": spec["encoder_layers"],
             "encoder_heads": 4, "max_caption_length": spec["length"]}
    if spec.get("feature_stride", 32) != 32:
        model["feature_stride"] = spec["feature_stride"]
    if spec.get("vocabulary"):
        model["output_vocabulary"] = list(range(spec["vocabulary"]))
    config = CaptionerConfig.from_dict({
        "gpt2": {"vocab_size": vocab, "n_positions": 64, "n_embd": spec["width"], "n_layer": spec["layers"], "n_head": 4},
        "model": model,
        "train": train,
    })
    rng = np.random.default_rng(0)
    n, length = spec["batch"], spec["length"]
    lengths = rng.integers(spec["min_tokens"], length + 1, n)
    data = {
        "images": rng.uniform(0, 255, (n, spec["image_size"], spec["image_size"], 3)).astype(np.float32),
        "token_ids": rng.integers(0, spec.get("vocabulary") or vocab, (n, length)).astype(np.int32),
        "mask": (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32),
    }
    source = DataSource.from_tensors(data)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, source, show_progress=False, log=lambda _: None)
        step_fn = getattr(trainer, "train_step", None) or trainer._train_fn
        request = DataRequest(epoch=0, batch_size=n, num_shards=1, shard_index=0, seed=0, shuffle=False)
        step_input = next(iter(source.make_dataset(request)))
        start = time.perf_counter()
        float(step_fn(step_input)[0])
        first = time.perf_counter() - start
        for _ in range(spec["warmup"]):
            float(step_fn(step_input)[0])
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            loss = float(step_fn(step_input)[0])
            times.append(time.perf_counter() - start)
        precision = getattr(trainer, "precision", trainer.config.train.precision)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"first_step_s": first, "step_s": float(np.median(times)), "rss_gib": rss, "loss": loss,
            "precision": precision}


# ----------------------------------------------------------------------------- the driver


def run_worker(script: Path, spec: dict, checkout: Path | None) -> dict:
    """Run ``script --worker SPEC`` in a fresh process importing ``checkout`` (None: this one); its RESULT line."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=str(checkout or HERE.parent.parent))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{checkout or 'this checkout'}, {spec} failed:\n{proc.stderr[-3000:]}")


def run_variant(spec: dict, checkout: Path | None) -> dict:
    return run_worker(HERE, spec, checkout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnetv2-b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32, help="tokens per caption row")
    parser.add_argument("--min-tokens", type=int, default=8,
                        help="shortest real caption in the batch (lengths are uniform in min..length)")
    parser.add_argument("--width", type=int, default=256, help="GPT-2 n_embd")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks")
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--feature-stride", type=int, default=32, help="model.feature_stride (this checkout only)")
    parser.add_argument("--variants", default="default,float32",
                        help="comma list of train.precision values; 'default' leaves the config's default")
    parser.add_argument("--jit", choices=("off", "on", "both", "default"), default="default")
    parser.add_argument("--vocabulary", type=int, default=0,
                        help="also run this checkout with model.output_vocabulary limited to this many ids")
    parser.add_argument("--against", type=Path, default=None, help="another checkout to measure in the same run")
    parser.add_argument("--against-variants", default="default", help="precisions to run on the other checkout")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of them is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    base = {"backbone": args.backbone, "image_size": args.image_size, "batch": args.batch, "length": args.length,
            "min_tokens": args.min_tokens, "width": args.width, "layers": args.layers,
            "encoder_layers": args.encoder_layers, "steps": args.steps, "warmup": args.warmup,
            "feature_stride": args.feature_stride}
    jits = {"off": [False], "on": [True], "both": [False, True], "default": [None]}[args.jit]
    plan: list[tuple[str, Path | None, dict]] = []
    for jit in jits:
        suffix = "" if jit is None else (" +XLA" if jit else " no XLA")
        for precision in args.variants.split(","):
            plan.append((f"this: {precision}{suffix}", None, {**base, "precision": precision, "jit": jit}))
        if args.vocabulary:
            plan.append((f"this: default, vocabulary {args.vocabulary}{suffix}", None,
                         {**base, "precision": "default", "jit": jit, "vocabulary": args.vocabulary}))
        if args.against is not None:
            for precision in args.against_variants.split(","):
                plan.append((f"against: {precision}{suffix}", args.against, {**base, "precision": precision, "jit": jit}))

    print(f"CPU: {cpu_name()}")
    print(f"shape: {args.backbone} @ {args.image_size}px, {args.encoder_layers} encoder blocks, GPT-2 "
          f"{args.layers} x {args.width}, vocabulary 50257+1, batch {args.batch} x {args.length} tokens")
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name, checkout, spec in plan:
            result = run_variant(spec, checkout)
            kept = best.get(name)
            if kept is None or result["step_s"] < kept["step_s"]:
                best[name] = {**result, "first_step_s": min(result["first_step_s"], (kept or result)["first_step_s"]),
                              "rss_gib": max(result["rss_gib"], (kept or result)["rss_gib"])}
            print(f"  round {round_ + 1}: {name:40s} {result['step_s'] * 1000:7.0f} ms/step  "
                  f"first {result['first_step_s']:5.1f} s  RSS {result['rss_gib']:.2f} GiB  ({result['precision']})",
                  flush=True)
    reference = next((v for k, v in best.items() if k.startswith("against")), None)
    print("\n| variant | precision | ms / step | images/s | first step s | peak RSS GiB |"
          + (" speed vs against |" if reference else ""))
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if reference else ""))
    for name, r in best.items():
        row = (f"| {name} | {r['precision']} | {r['step_s'] * 1000:.0f} | {args.batch / r['step_s']:.1f} | "
               f"{r['first_step_s']:.1f} | {r['rss_gib']:.2f} |")
        if reference:
            row += f" {reference['step_s'] / r['step_s']:.2f}x |"
        print(row)
    for name, r in best.items():  # headline lines for bench/run_all.py: this checkout's variants
        if not name.startswith("this: ") or "vocabulary" in name:
            continue
        label = f"seed config, {name[len('this: '):]} ({r['precision']})"
        vs = ", ".join(f"{o['step_s'] / r['step_s']:.2f}x vs {k}" for k, o in best.items() if k != name)
        headline.emit(f"train step, {label}", round(r["step_s"] * 1000, 1), "ms", vs)
        if name == "this: default":
            headline.emit(f"train images/s, {label}", round(args.batch / r["step_s"], 1), "images/s")
            headline.emit(f"first step (trace), {label}", round(r["first_step_s"], 2), "s",
                          f"peak RSS {r['rss_gib']:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
