"""The one backend-specific corner of the samplers: how a whole decode loop gets compiled.

Everything else in ``gpt2_effnet.decoding`` is written with ``keras.ops`` only. Compiling
the *whole* loop (prefill, every step, beam bookkeeping) into one program is what removes
the per-step Python and host round-trips that made the seed's beam search slow.
"""

from __future__ import annotations

from typing import Any, Callable

import keras

# "auto": on a GPU, XLA compiles the whole loop. On a CPU the loop stays a plain graph and,
# for up to XLA_STEP_MAX_ROWS rows, XLA compiles the decode step alone: the model call and
# the sampler's token choice (see `step_compiler`, `DecodeModel.step`'s `select`). The
# whole loop under XLA was slower there (the image encoder: 57 vs 24 ms for one image;
# the loop's bookkeeping). The model step alone, as one fused program, measured (AMD EPYC,
# 2 cores): GPT-2 124M at 1 row 1.26-1.31x faster, at 3 rows 1.00x, at 32 and 96 rows
# 0.97x and 0.95x with a first call 3-4x longer; the seed's captioner 1.42x at 1 row,
# 1.16x at 12 (bench_generate --graph-step, bench_decode_seed).
XLA_STEP_MAX_ROWS = 16
JitSetting = bool | str


def backend_name() -> str:
    return keras.backend.backend()


def resolve_jit(jit_compile: JitSetting) -> bool:
    """Whether XLA compiles the *whole* loop: ``"auto"`` means when TensorFlow sees a GPU."""
    if jit_compile == "auto":
        return _tensorflow_gpu()
    if not isinstance(jit_compile, bool):
        raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
    return jit_compile


def _tensorflow_gpu() -> bool:
    if backend_name() != "tensorflow":
        return False
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def step_compiler(jit_compile: JitSetting, compile: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """How the decode step (one cached model call, rows first) is wrapped inside the loop.

    TensorFlow on a CPU with ``jit_compile="auto"``: a step of at most
    :data:`XLA_STEP_MAX_ROWS` rows runs as ``tf.function(jit_compile=True)``, an XLA
    program called from the plain-graph loop; larger ones are inlined. Everywhere else
    the step is inlined into the loop's own program (JAX jits the loop; PyTorch runs
    eagerly; a whole-loop XLA program needs no second one; ``False`` keeps XLA out, as a
    SavedModel for TF Serving must: its CPU build refuses XLA programs by default).
    """
    if not compile or jit_compile != "auto" or backend_name() != "tensorflow" or _tensorflow_gpu():
        return lambda fn: fn
    import tensorflow as tf

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        xla = tf.function(fn, jit_compile=True, autograph=False)

        def step(rows_first: Any, *rest: Any, select: Callable[..., Any] | None = None, select_args: tuple = ()) -> Any:
            rows = rows_first.shape[0]
            if rows is not None and rows <= XLA_STEP_MAX_ROWS:
                return xla(rows_first, *rest, select=select, select_args=select_args)
            # A larger step stays in the graph, but its token choice (top-k / top-p over
            # the whole vocabulary) is still faster as an XLA program: GPT-2 124M nucleus
            # at 32 rows, 34 -> 20 ms per step.
            logits, state = fn(rows_first, *rest)
            if select is None:
                return logits, state
            return tf.function(select, jit_compile=True, autograph=False)(logits, *select_args), state

        step.xla = xla  # type: ignore[attr-defined]
        return step

    return wrap


def compile_loop(fn: Callable[..., Any], compile: bool = True, jit_compile: JitSetting = "auto") -> Callable[..., Any]:
    """Wrap a decode function so the backend runs it as one compiled program.

    TensorFlow: ``tf.function`` (XLA if ``jit_compile``) without AutoGraph: the loops use
    ``keras.ops`` control flow already, and converting their Python source cost ~1.2 s of a
    2.7 s trace (seed configuration, nucleus); JAX: ``jax.jit``; PyTorch: the
    function itself (``torch.compile`` takes far longer to compile than a caption takes to
    decode, and ``keras.ops.while_loop`` is a plain Python loop there anyway).
    """
    if not compile:
        return fn
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=resolve_jit(jit_compile), autograph=False)
    if name == "jax":
        import jax

        return jax.jit(fn)
    return fn
