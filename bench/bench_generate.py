"""Decoding speed: our compiled, KV-cached samplers vs the same loop without the cache vs HF generate().

Plain GPT-2 with random weights in two shapes ("small": 4 layers x 256 wide, and GPT-2
124M), the real 50257-token vocabulary, an 8-token prompt and a fixed number of new
tokens (EOS disabled, so every run decodes the same amount). For greedy, beam search (K=3)
and nucleus sampling (top-p 0.9) at batch 1 and 32 it prints tokens/s (new tokens of the
returned sequence per input, beams not counted) for

* ``cached``   - ``gpt2_effnet.decoding.generate`` (one compiled loop, static KV cache);
* ``no-cache`` - the same compiled loop with ``use_cache=False``: every step recomputes
                 the whole prefix (what a decoder without a cache does);
* ``hf``       - ``transformers`` ``GPT2LMHeadModel.generate()`` (PyTorch, its own KV cache)
                 on the same weights;
* ``cached-graph`` (with ``--graph-step``) - the same loop with its step in plain graph mode
                 (``jit_compile=False``; on a CPU the default runs the loop as one XLA program
                 up to 16 rows, and only the token choice under XLA above);
* ``cached-xla`` (with ``--xla``) - the whole cached loop compiled by XLA (``jit_compile=True``);
* ``cached-bf16`` / ``hf-bf16`` (with ``--bf16``) - ours with ``precision="bfloat16"`` (opt-in)
                 and transformers on a bfloat16 copy of its model, the like-for-like pair;
* ``cached-bf16-head`` (with ``--bf16-head``) - ours with ``precision="bfloat16-head"``
                 (opt-in: the output head's table in bfloat16, everything else float32);

and the ratios cached/no-cache and cached/hf, all measured in one run. For greedy at batch
1 it also prints the time per new token over the weight-read bound: the bytes of weights a
step reads over the machine's memory bandwidth, measured first by a streaming copy. A small captioner
(EfficientNetB0 at 224 px) adds images/s, cached vs no-cache. Times are the best of
``--reps`` runs after a warm-up (which includes compilation; shown as "first call").

    python bench/bench_generate.py [--configs small 124M] [--batches 1 32] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import headline  # this folder is on sys.path when run as a script

CONFIGS = {
    "small": dict(n_embd=256, n_layer=4, n_head=4),
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
}
MODES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam3": {"num_beams": 3},
    "nucleus": {"do_sample": True, "top_p": 0.9, "top_k": 0},
}


def timed(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, tuple[float, float]]:
    """name -> (first call incl. compilation, best of ``reps`` later calls) in seconds.

    The implementations take turns within each repetition, so a burst of load from other
    jobs on a shared machine hits them alike instead of skewing one ratio.
    """
    first: dict[str, float] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (first[name], best[name]) for name in fns}


def build_models(name: str, seed: int = 0) -> tuple[Any, Any]:
    """Our GPT2Decoder with random weights, and a transformers GPT-2 holding the same weights."""
    import torch
    import transformers

    from gpt2_effnet.config import GPT2Config
    from gpt2_effnet.gpt2 import GPT2Decoder

    shape = CONFIGS[name]
    ours = GPT2Decoder(GPT2Config(**shape))
    rng = np.random.default_rng(seed)
    for variable in ours.weights:
        variable.assign(rng.normal(0.0, 0.02, variable.shape).astype("float32"))
    hf_config = transformers.GPT2Config(
        vocab_size=50257, n_positions=1024, bos_token_id=None, eos_token_id=None, pad_token_id=0, **shape
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {f"transformer.{k}": torch.from_numpy(np.asarray(v)) for k, v in ours.named_weights().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def bench_plain(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import torch

    from gpt2_effnet.decoding import generate

    for name in args.configs:
        ours, hf = build_models(name)
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16) if args.bf16 else None
        params = sum(int(np.prod(v.shape)) for v in ours.weights)
        for batch in args.batches:
            prompt = np.random.default_rng(batch).integers(0, 50257, (batch, args.prompt_length))
            prompt_t = torch.from_numpy(prompt)
            for mode in args.modes:
                if params > 50e6 and batch > 1 and mode not in args.large_batch_modes:
                    continue
                kw = dict(MODES[mode], max_new_tokens=args.max_new_tokens, eos_token_id=None, seed=1)
                tokens = batch * args.max_new_tokens
                impls: dict[str, Callable[[], Any]] = {"cached": lambda: generate(ours, prompt, **kw)}
                if args.graph_step:
                    impls["cached-graph"] = lambda: generate(ours, prompt, jit_compile=False, **kw)
                if args.xla:
                    impls["cached-xla"] = lambda: generate(ours, prompt, jit_compile=True, **kw)
                if args.bf16:
                    impls["cached-bf16"] = lambda: generate(ours, prompt, precision="bfloat16", **kw)
                if args.bf16_head:
                    impls["cached-bf16-head"] = lambda: generate(ours, prompt, precision="bfloat16-head", **kw)
                # Without a cache the 124M model at batch 32 takes minutes per call on 2 CPU cores.
                if params < 50e6 or batch <= args.no_cache_max_batch_large:
                    impls["no-cache"] = lambda: generate(ours, prompt, use_cache=False, **kw)
                hf_kw = {k: v for k, v in kw.items() if k != "seed"}

                def run_hf() -> Any:
                    torch.manual_seed(1)
                    with torch.no_grad():
                        return hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), **hf_kw)

                impls["hf"] = run_hf
                if args.bf16:
                    def run_hf_bf16() -> Any:
                        torch.manual_seed(1)
                        with torch.no_grad():
                            return hf_bf16.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), **hf_kw)

                    impls["hf-bf16"] = run_hf_bf16
                for impl, (first, best) in timed(impls, args.reps).items():
                    row = dict(kind="plain", config=name, mode=mode, batch=batch, impl=impl, first_s=round(first, 3),
                               seconds=round(best, 4), tokens_per_s=round(tokens / best, 2))
                    rows.append(row)
                    print(f"{name:>5} {mode:>8} batch {batch:>3} {impl:>8}: {tokens / best:9.1f} tok/s "
                          f"({best:.3f} s; first call {first:.1f} s)", flush=True)
                    if impl == "cached" and mode == "greedy" and batch == 1:
                        row.update(weight_read_bound(ours, best / args.max_new_tokens, args.bandwidth))
                        print(f"      greedy batch 1: {row['step_ms']:.1f} ms per new token vs the weight-read bound "
                              f"{row['bound_ms']:.1f} ms ({row['weight_mb']:.0f} MB at {args.bandwidth:.1f} GB/s): "
                              f"{row['step_over_bound']:.2f}x the bound", flush=True)


def bench_captioner(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import CaptionerConfig
    from gpt2_effnet.decoding import generate_captions

    config = CaptionerConfig.from_dict({
        "gpt2": {"vocab_size": 50257, "n_positions": 64, **CONFIGS["small"]},
        "model": {"backbone": "efficientnetb0", "image_size": 224, "encoder_layers": 1, "encoder_heads": 4,
                  "cross_attention": "ungated", "max_caption_length": args.max_new_tokens},
    })
    model = Captioner(config)
    rng = np.random.default_rng(0)
    for variable in model.decoder.weights:
        variable.assign(rng.normal(0.0, 0.02, variable.shape).astype("float32"))
    for batch in args.batches:
        images = rng.uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
        for mode in ("greedy", "beam3"):
            kw = dict(MODES[mode], eos_token_id=None)
            impls = {
                "cached": lambda: generate_captions(model, images, **kw),
                "no-cache": lambda: generate_captions(model, images, use_cache=False, **kw),
            }
            for impl, (first, best) in timed(impls, args.reps).items():
                rows.append(dict(kind="captioner", config="small+effnetb0-224", mode=mode, batch=batch, impl=impl,
                                 first_s=round(first, 3), seconds=round(best, 4), images_per_s=round(batch / best, 3),
                                 tokens_per_s=round(batch * args.max_new_tokens / best, 2)))
                print(f"captioner {mode:>6} batch {batch:>3} {impl:>8}: {batch / best:7.2f} images/s "
                      f"{batch * args.max_new_tokens / best:8.1f} tok/s ({best:.3f} s; first call {first:.1f} s)", flush=True)


def streaming_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """The machine's memory bandwidth in GB/s: the best of a few streaming copies (read +
    write counted) of an array far larger than the caches, numpy's and TensorFlow's
    (all cores), whichever is faster."""
    import tensorflow as tf

    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    x = tf.constant(source)
    tf_copy = tf.function(lambda t: t * 1.0)
    tf_copy(x)
    for _ in range(reps):
        start = time.perf_counter()
        y = tf_copy(x)
        y.numpy()[:1]  # wait for it, without reading it back whole
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def weight_read_bound(decoder: Any, step_seconds: float, bandwidth_gbs: float) -> dict[str, float]:
    """A batch-1 decode step reads every weight once (of the position table only one row):
    its time can be no less than those bytes over the memory bandwidth."""
    weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in decoder.weights if "wpe" not in v.path)
    bound = weights / (bandwidth_gbs * 1e9)
    return dict(step_ms=step_seconds * 1e3, weight_mb=weights / 2**20, bound_ms=bound * 1e3,
                step_over_bound=step_seconds / bound, bandwidth_gbs=bandwidth_gbs)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    index = {(r["kind"], r["config"], r["mode"], r["batch"], r["impl"]): r for r in rows}
    for (kind, config, mode, batch, impl), row in index.items():
        if impl not in ("cached", "cached-bf16", "cached-bf16-head"):
            continue
        parts = []
        others = ("cached-graph", "cached-xla", "no-cache", "hf") if impl == "cached" else ("cached", "hf", "hf-bf16")
        for other in others:
            ref = index.get((kind, config, mode, batch, other))
            if ref is not None:
                parts.append(f"x{ref['seconds'] / row['seconds']:.2f} vs {other}")
        lines.append(f"{kind:>9} {config:>18} {mode:>8} batch {batch:>3} {impl:>11}: " + ", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-cache-max-batch-large", type=int, default=1,
                        help="largest batch at which the 124M model is also run without the cache")
    parser.add_argument("--large-batch-modes", nargs="+", default=["greedy", "beam3"], choices=list(MODES),
                        help="modes run for the 124M model at batch > 1 (each call takes many seconds on CPU)")
    parser.add_argument("--no-captioner", action="store_true")
    parser.add_argument("--xla", action="store_true", help="also time the cached loop compiled with XLA (slow to compile)")
    parser.add_argument("--bf16-head", action="store_true",
                        help="also time precision='bfloat16-head' (ours, opt-in)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time precision='bfloat16' (ours, opt-in) and transformers with bfloat16 weights")
    parser.add_argument("--graph-step", action="store_true",
                        help="also time the cached loop with its step in plain graph mode (jit_compile=False; "
                             "the default on a CPU runs the loop as one XLA program up to 16 rows)")
    parser.add_argument("--json", default=None, help="also write all figures here")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both TensorFlow and PyTorch (0: their defaults). On a shared "
                             "machine 1 keeps the comparison fair: spinning thread pools collapse when "
                             "other jobs hold the cores.")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf
    import torch

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)

    print(f"keras {keras.__version__} ({keras.backend.backend()}), tensorflow {tf.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), TF intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, {os.cpu_count()} CPUs, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    args.bandwidth = streaming_bandwidth()
    print(f"memory bandwidth (best streaming copy, read + write): {args.bandwidth:.1f} GB/s")
    rows: list[dict[str, Any]] = []
    bench_plain(args, rows)
    if not args.no_captioner:
        bench_captioner(args, rows)
    print("\nspeed-up of the cached, compiled samplers (time ratio; > 1 means ours is faster):")
    for line in ratios(rows):
        print(line)
    emit_headlines(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def emit_headlines(rows: list[dict[str, Any]]) -> None:
    """Lines for bench/run_all.py: ours (cached, float32) against transformers, and the bound."""
    index = {(r["kind"], r["config"], r["mode"], r["batch"], r["impl"]): r for r in rows}
    for (kind, config, mode, batch, impl), row in index.items():
        hf = index.get((kind, config, mode, batch, "hf"))
        if impl != "cached" or hf is None:
            continue
        headline.emit(f"GPT-2 {config} {mode}, batch {batch}", row["tokens_per_s"], "tokens/s",
                      f"{hf['seconds'] / row['seconds']:.2f}x vs transformers generate() ({hf['tokens_per_s']:.1f})")
        if "step_over_bound" in row:
            headline.emit(f"GPT-2 {config} greedy batch 1: time a token over the weight-read bound",
                          round(row["step_over_bound"], 2), "x",
                          f"{row['step_ms']:.1f} vs {row['bound_ms']:.1f} ms ({row['bandwidth_gbs']:.1f} GB/s)")


if __name__ == "__main__":
    raise SystemExit(main())
