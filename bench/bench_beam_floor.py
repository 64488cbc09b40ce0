"""How fast a float32 beam call at the seed's configuration could be on this machine, from
the fastest kernels its libraries offer, against the issue-12 target (half of another
checkout's time).

    python bench/bench_beam_floor.py --against ../base

The call (4 images, K = 3, 20 new tokens) cannot avoid three kinds of work:

* the image encoder on 4 images (EfficientNetV2-B0, 224 px, 2 encoder blocks), timed
  through this checkout's own inference path (BatchNorm folded, oneDNN fused kernels);
* per step, the tied output head at 12 rows, ``[12, 256] x [256, 50258]``: the best of
  XLA (on the table as stored and transposed), TensorFlow's oneDNN matmul on a table
  transposed beforehand, NumPy's BLAS and PyTorch (when installed), each on its best layout;
* per step, the 24 weight matmuls of the four blocks at 12 rows, each shape at the best of
  NumPy's BLAS and PyTorch, timed alone in a loop (so its weights stay in cache).

Everything else a step does (attention, LayerNorms, cache writes, ranking) is left out,
so the printed floor is below what any implementation built on these kernels can reach.
The beam call itself is then timed for this checkout and, with ``--against``, for the
other one (each in its own process, best of ``--reps`` calls, ``--rounds`` alternating).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# This folder is on sys.path when run as a script.
from bench_decode_seed import worker as seed_worker
from bench_train import cpu_name, run_worker

HERE = Path(__file__).resolve()
VOCAB, WIDTH, LAYERS, ROWS, STEPS, IMAGES = 50258, 256, 4, 12, 20, 4
# (inputs, outputs) of each block's weight matmuls: qkv, attention out, cross-attention
# query and out, MLP in and out (the image keys/values are projected once per call).
BLOCK_MATMULS = [(WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, 4 * WIDTH), (4 * WIDTH, WIDTH)]


def _best_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def kernels(reps: int) -> dict:
    """Milliseconds of the unavoidable kernels, each at its fastest here."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import CaptionerConfig

    rng = np.random.default_rng(0)
    config = CaptionerConfig.from_dict({
        "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": WIDTH, "n_layer": LAYERS, "n_head": 4},
        "model": {"backbone": "efficientnetv2-b0", "image_size": 224, "encoder_layers": 2, "encoder_heads": 4,
                  "max_caption_length": 32},
    })
    model = Captioner.create(config)
    images = tf.constant(rng.uniform(0, 255, (IMAGES, 224, 224, 3)).astype(np.float32))
    encode = tf.function(lambda x: model.encode_images(x, training=False))
    out = {"encoder_4_images": _best_ms(lambda: encode(images).numpy(), reps)}

    table = rng.standard_normal((VOCAB, WIDTH), dtype=np.float32) * 0.02
    table_t = np.ascontiguousarray(table.T)
    hidden = rng.standard_normal((ROWS, WIDTH), dtype=np.float32)
    tf_table, tf_table_t, tf_hidden = tf.constant(table), tf.constant(table_t), tf.constant(hidden)
    xla = tf.function(lambda h, t: tf.matmul(h, t, transpose_b=True), jit_compile=True)
    xla_t = tf.function(lambda h, t: tf.matmul(h, t), jit_compile=True)
    graph = tf.function(lambda h, t: tf.matmul(h, t))
    heads = {
        "XLA, table [V, W]": _best_ms(lambda: xla(tf_hidden, tf_table).numpy(), reps),
        "XLA, table [W, V] (what the decode loop multiplies)": _best_ms(lambda: xla_t(tf_hidden, tf_table_t).numpy(), reps),
        "TF oneDNN, table [W, V]": _best_ms(lambda: graph(tf_hidden, tf_table_t).numpy(), reps),
        "NumPy BLAS, table [W, V]": _best_ms(lambda: hidden @ table_t, reps),
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        th, tt, ttt = torch.from_numpy(hidden), torch.from_numpy(table), torch.from_numpy(table_t)
        heads["PyTorch, table [V, W]"] = _best_ms(lambda: th @ tt.T, reps)
        heads["PyTorch, table [W, V]"] = _best_ms(lambda: th @ ttt, reps)
    out["head_12_rows"] = heads

    # Each block matmul alone, best of NumPy's BLAS and PyTorch: a loop of one small matmul
    # keeps its weights in cache, which a real step (~66 MB of weights) cannot.
    per_shape = {}
    for inputs, outputs in BLOCK_MATMULS:
        x = rng.standard_normal((ROWS, inputs), dtype=np.float32)
        w = rng.standard_normal((inputs, outputs), dtype=np.float32)
        times = [_best_ms(lambda x=x, w=w: x @ w, reps * 10)]
        if torch is not None:
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            times.append(_best_ms(lambda tx=tx, tw=tw: tx @ tw, reps * 10))
        per_shape[f"{inputs}x{outputs}"] = min(times)
    out["block_matmuls_12_rows"] = LAYERS * sum(per_shape[f"{i}x{o}"] for i, o in BLOCK_MATMULS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=None, help="the checkout whose time the target halves")
    parser.add_argument("--reps", type=int, default=20, help="calls per kernel (best kept)")
    parser.add_argument("--call-reps", type=int, default=6, help="beam calls per round (best kept)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        result = kernels(spec["reps"]) if spec.get("kernels") else seed_worker(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"CPU: {cpu_name()}")
    floor = run_worker(HERE, {"kernels": True, "reps": args.reps}, None)
    head = min(floor["head_12_rows"].values())
    for name, ms in floor["head_12_rows"].items():
        print(f"  head at {ROWS} rows, {name}: {ms:.2f} ms")
    print(f"  block matmuls at {ROWS} rows (24, each at its best alone): {floor['block_matmuls_12_rows']:.2f} ms")
    print(f"  encoder, {IMAGES} images: {floor['encoder_4_images']:.1f} ms")
    total = floor["encoder_4_images"] + STEPS * (head + floor["block_matmuls_12_rows"])
    print(f"floor of a beam call: {floor['encoder_4_images']:.1f} + {STEPS} x ({head:.2f} + "
          f"{floor['block_matmuls_12_rows']:.2f}) = {total:.1f} ms = {total / IMAGES / 1000:.4f} s/image")
    sides = [("this", None)] + ([("against", args.against)] if args.against else [])
    best: dict[str, float] = {}
    spec = {"tokens": STEPS, "reps": args.call_reps, "only": "beam"}
    for round_ in range(args.rounds):
        for side, checkout in sides:
            seconds = run_worker(HERE, spec, checkout)["beam"]["per_image_s"]
            best[side] = min(best.get(side, seconds), seconds)
            print(f"  round {round_ + 1}: {side}: beam {seconds:.4f} s/image", flush=True)
    print(f"this checkout's beam call: {best['this']:.4f} s/image ({best['this'] / (total / IMAGES / 1000):.2f}x the floor)")
    if args.against:
        target = best["against"] / 2
        verdict = "below" if total / IMAGES / 1000 <= target else "ABOVE"
        print(f"target, half of {args.against}'s {best['against']:.4f}: {target:.4f} s/image; the floor is {verdict} it")


if __name__ == "__main__":
    main()
