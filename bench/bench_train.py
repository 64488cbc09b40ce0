"""Train-step time of a small captioner with and without XLA, measured in one run.

    python bench/bench_train.py [--image-size 128] [--batch 16] [--steps 20] [--precision float32]

Both variants run the loop's own train step (``Trainer``) on the same fixed batch, after
warm-up steps that absorb tracing and compilation (reported separately). The printed
ratio is step time without XLA divided by step time with it (> 1: XLA is faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def small_config(args: argparse.Namespace, jit: bool):
    from gpt2_effnet.config import CaptionerConfig

    return CaptionerConfig.from_dict(
        {
            "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": args.width, "n_layer": args.layers, "n_head": 4},
            "model": {"backbone": "efficientnetb0", "image_size": args.image_size, "encoder_layers": 1,
                      "encoder_heads": 4, "max_caption_length": args.length},
            "train": {"batch_size": args.batch, "steps": 10**9, "precision": args.precision, "jit_compile": jit,
                      "checkpoint_every": 10**9, "log_every": 10**9},
        }
    )


def batch(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, length = args.batch, args.length
    lengths = rng.integers(4, length + 1, n)
    return {
        "images": rng.uniform(0, 255, (n, args.image_size, args.image_size, 3)).astype(np.float32),
        "token_ids": rng.integers(0, 50257, (n, length)).astype(np.int32),
        "mask": (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32),
    }


def measure(args: argparse.Namespace, jit: bool, data: dict[str, np.ndarray]) -> tuple[float, float]:
    """(seconds for the warm-up steps incl. tracing/compiling, seconds per steady step)."""
    from gpt2_effnet.training.loop import DataRequest, DataSource, Trainer

    source = DataSource.from_tensors(data)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(small_config(args, jit), run_dir, source, show_progress=False, log=lambda _: None)
        request = DataRequest(epoch=0, batch_size=args.batch, num_shards=1, shard_index=0, seed=0, shuffle=False)
        step_input = next(iter(source.make_dataset(request)))
        start = time.perf_counter()
        for _ in range(args.warmup):
            loss = trainer._train_fn(step_input)[0]
        float(loss)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = trainer._train_fn(step_input)[0]
        float(loss)
        return warmup, (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=24, help="caption length in tokens")
    parser.add_argument("--width", type=int, default=256, help="GPT-2 n_embd")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, compiling)")
    args = parser.parse_args()

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    print(f"device: {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)")
    print(f"config: efficientnetb0 @ {args.image_size}px, GPT-2 {args.layers} x {args.width}, vocab 50257, "
          f"batch {args.batch}, {args.length} tokens, {args.precision}")
    data = batch(args)
    results = {}
    for jit in (False, True):
        warmup, step = measure(args, jit, data)
        results[jit] = step
        name = "XLA   " if jit else "no XLA"
        print(f"{name}: {step * 1000:8.1f} ms/step  ({args.batch / step:7.1f} images/s; "
              f"first {args.warmup} steps incl. tracing/compiling {warmup:.1f} s)")
    print(f"speed-up from XLA (no-XLA step time / XLA step time): {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    main()
