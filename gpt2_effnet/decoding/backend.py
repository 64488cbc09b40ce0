"""The one backend-specific corner of the samplers: how a whole decode loop gets compiled.

Everything else in ``gpt2_effnet.decoding`` is written with ``keras.ops`` only. Compiling
the *whole* loop (prefill, every step, beam bookkeeping) into one program is what removes
the per-step Python and host round-trips that made the seed's beam search slow.
"""

from __future__ import annotations

from typing import Any, Callable

import keras

# "auto": on a GPU, XLA compiles the whole loop. On a CPU the image encoder stays a plain
# graph (oneDNN's convolutions: one image took 57 ms under XLA, 24 ms without), and for
# up to XLA_STEP_MAX_ROWS decode rows the loop after it (prefill, every step, the
# sampler's token choice, the beam bookkeeping) is one XLA program (`loop_compiler`):
# at the seed's configuration 1.1x (beam, 12 rows) and 1.2-1.3x (nucleus, one row) faster
# than a graph loop calling an XLA step, with the same tokens and scores. Larger steps stay in the graph (XLA's model
# step measured 0.97x / 0.95x at 32 / 96 rows of GPT-2 124M) with only the token choice
# as an XLA program (`step_compiler`).
XLA_STEP_MAX_ROWS = 16
# Inside that XLA loop the output head multiplies a copy of the token table transposed to
# [W, V] once per call, from this many rows: XLA's CPU dot reads the [V, W] table, as
# `hidden @ table^T`, at about two thirds of the speed (seed configuration, 12 rows: the
# head's dot 3.05 -> 1.9 ms a step, the beam call 1.14x; GPT-2 124M at 2 / 3 / 12 rows:
# 1.09-1.11x / 1.03x / 1.05-1.06x with the transpose's 11 ms counted; AMD EPYC, 2 cores).
# At one row the two layouts tie, and in the graph loop (oneDNN's matmul, 32 and 96 rows
# of 124M) the transposed one gained nothing (0.96-1.02x).
TRANSPOSED_HEAD_MIN_ROWS = 2
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


def cpu_split(jit_compile: JitSetting, compile: bool = True) -> bool:
    """Whether decoding takes the CPU split above: TensorFlow, no GPU, ``jit_compile="auto"``."""
    return compile and jit_compile == "auto" and backend_name() == "tensorflow" and not _tensorflow_gpu()


def loop_compiler(
    jit_compile: JitSetting, compile: bool = True, max_xla_rows: int = XLA_STEP_MAX_ROWS
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """How the decode loop (everything after the image encoder) is wrapped inside the program.

    Returns ``wrap(fn)``; ``wrap(fn)(rows, *args)`` calls ``fn(*args)``. On the CPU split,
    a loop of at most ``max_xla_rows`` rows runs as ``tf.function(jit_compile=True)``,
    an XLA program called from the plain graph that encoded the images: XLA then runs the
    steps back to back, without the graph executor's per-step launches and hand-offs.
    ``wrap(fn).transposed_head(rows)``: whether that loop multiplies the output head by a
    ``[W, V]`` copy of the table (see :data:`TRANSPOSED_HEAD_MIN_ROWS`).
    """
    if not cpu_split(jit_compile, compile):

        def plain(fn: Callable[..., Any]) -> Callable[..., Any]:
            def loop(rows: int, *args: Any) -> Any:
                return fn(*args)

            loop.transposed_head = lambda rows: False  # type: ignore[attr-defined]
            return loop

        return plain
    import tensorflow as tf

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        xla = tf.function(fn, jit_compile=True, autograph=False)

        def loop(rows: int, *args: Any) -> Any:
            return xla(*args) if rows <= max_xla_rows else fn(*args)

        loop.xla = xla  # type: ignore[attr-defined]
        loop.transposed_head = lambda rows: TRANSPOSED_HEAD_MIN_ROWS <= rows <= max_xla_rows  # type: ignore[attr-defined]
        return loop

    return wrap


def step_compiler(
    jit_compile: JitSetting, compile: bool = True, max_xla_rows: int = XLA_STEP_MAX_ROWS
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """How the decode step (one cached model call, rows first) is wrapped inside the loop.

    On the CPU split, a step of more than ``max_xla_rows`` rows stays in the graph loop
    but its token choice (``select``) runs as an XLA program; a smaller step is inlined,
    since its whole loop is one XLA program already (:func:`loop_compiler`).
    Everywhere else the step is inlined into the loop's own program (JAX jits the loop;
    PyTorch runs eagerly; a whole-loop XLA program needs no second one; ``False`` keeps
    XLA out, as a SavedModel for TF Serving must: its CPU build refuses XLA programs by
    default).
    """
    if not cpu_split(jit_compile, compile):
        return lambda fn: fn
    import tensorflow as tf

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(rows_first: Any, *rest: Any, select: Callable[..., Any] | None = None, select_args: tuple = ()) -> Any:
            rows = rows_first.shape[0]
            if rows is not None and rows <= max_xla_rows:
                return fn(rows_first, *rest, select=select, select_args=select_args)
            # A larger step stays in the graph, but its token choice (top-k / top-p over
            # the whole vocabulary) is still faster as an XLA program: GPT-2 124M nucleus
            # at 32 rows, 34 -> 20 ms per step.
            logits, state = fn(rows_first, *rest)
            if select is None:
                return logits, state
            return tf.function(select, jit_compile=True, autograph=False)(logits, *select_args), state

        return step

    return wrap


def graph_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as one TensorFlow graph where that is the backend, else ``fn`` itself: a graph
    runs many small ops (a weight cast apiece) without Python between them. For code with
    side effects on variables, which ``jax.jit`` would not keep."""
    if backend_name() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, autograph=False)


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
