"""The one backend-specific corner of the samplers: how a whole decode loop gets compiled.

Everything else in ``gpt2_effnet.decoding`` is written with ``keras.ops`` only. Compiling
the *whole* loop (prefill, every step, beam bookkeeping) into one program is what removes
the per-step Python and host round-trips that made the seed's beam search slow.
"""

from __future__ import annotations

import functools
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
# Inside that XLA loop (2 to XLA_STEP_MAX_ROWS rows) the output head may multiply a copy of
# the token table transposed to [W, V] once per call, on the CPUs where that measured
# faster. They disagree. AMD EPYC (Zen 5): XLA's dot read the [V, W] table, as
# `hidden @ table^T`, at about two thirds of the speed (seed configuration, 12 rows: the
# head 3.05 -> 1.9 ms a step, the beam call 1.11-1.14x; GPT-2 124M beam 3 at batch 1 1.16x,
# the copy counted). Intel Xeon (AMX): the [W, V] dot is the slow one (124M at 3 rows,
# ~15 vs 5.8 ms a step), and the copy cost the whole call 10-20 % (124M beam 3 at batch 1
# 0.83x, greedy at batch 4 0.82x, the seed's beam 0.91x). At one row the layouts tie on
# both, and in the graph loop (oneDNN's matmul) the copy gained nothing (0.96-1.02x, AMD).
# In a wide XLA loop (below) the copy still paid at up to 48 rows (AMD, GPT-2 124M over the
# stored table: 24 rows 1.12x, 32 rows 1.06x, 48 rows 1.10x the whole call; 64 rows 0.88x).
TRANSPOSED_HEAD_MIN_ROWS = 2
TRANSPOSED_HEAD_MAX_ROWS = 48
TRANSPOSED_HEAD_VENDORS = ("AuthenticAMD",)
# None: by the CPU's maker (above); True / False: that layout wherever the rows allow it.
TRANSPOSED_HEAD: bool | None = None
# Above XLA_STEP_MAX_ROWS float32 rows, up to a number by the CPU's maker, the loop is one
# XLA program too on the CPUs where that measured faster than the graph loop, which pays for
# hundreds of small ops a step. How its block products read the kernels differs by maker.
# Intel Xeon (AMX): XLA's dot at 32 rows read the stored [K, N] kernels slowly (GPT-2 124M,
# a layer's four products 4.02 ms, 2.94 in oneDNN's graph matmul, 2.57 with [N, K] copies),
# so the loop multiplies copies made once per call in the graph (`hidden @ copy^T`;
# layers.kernel_copies): 124M at batch 32 greedy / nucleus / beam 3 (96 rows) 1.18-1.20x,
# same tokens, the copies (340 MB) counted; without the copies 0.92x, with copies made
# inside the XLA program 0.98x (XLA's transposes are slow); at 3-12 rows the copies cost
# 0.96x, so the smaller loop keeps the kernels as stored.
# AMD EPYC (Zen 5): the stored kernels are the fast layout; 124M, one process alternating
# the loops, over the graph loop: 24 rows 1.26x, 32 rows 1.26-1.39x, 48 rows 1.18x, 64 rows
# 1.02-1.13x, where copies gave 1.06-1.10x at 32 rows; at 96 rows 1.05x there, but 0.91-0.95x
# in separate processes, so AMD stops at 64.
XLA_WIDE_VENDOR_ROWS = {"GenuineIntel": 96, "AuthenticAMD": 64}
XLA_WIDE_MAX_ROWS = max(XLA_WIDE_VENDOR_ROWS.values())
# None: by the CPU's maker (above); a number forces that many rows at most (0: no wide loop).
XLA_WIDE_ROWS: int | None = None
# The copies live for a call beside the weights: a model whose block kernels take more than
# this (GPT-2 124M: 340 MB; 355M: ~1.2 GB) keeps the graph loop rather than double them.
TRANSPOSED_KERNELS_MAX_BYTES = 3 * 2**29
TRANSPOSED_KERNEL_VENDORS = ("GenuineIntel",)
TRANSPOSED_KERNELS: bool | None = None  # None: by the CPU's maker; True / False: forced
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
    jit_compile: JitSetting, compile: bool = True, max_xla_rows: int = XLA_STEP_MAX_ROWS, wide_max_rows: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """How the decode loop (everything after the image encoder) is wrapped inside the program.

    Returns ``wrap(fn)``; ``wrap(fn)(rows, *args)`` calls ``fn(*args)``. On the CPU split,
    a loop of at most ``max_xla_rows`` rows runs as ``tf.function(jit_compile=True)``,
    an XLA program called from the plain graph that encoded the images: XLA then runs the
    steps back to back, without the graph executor's per-step launches and hand-offs.
    ``wrap(fn).transposed_head(rows)``: whether that loop multiplies the output head by a
    ``[W, V]`` copy of the table (rows from :data:`TRANSPOSED_HEAD_MIN_ROWS`, on a CPU where
    that is faster: :func:`transposed_head_faster`). A loop of more than ``max_xla_rows``
    rows, up to ``wide_max_rows`` and :func:`wide_xla_rows`, is an XLA program too;
    ``wrap(fn).transposed_kernels(rows)``: whether it multiplies ``[N, K]`` copies of the
    block kernels (:func:`transposed_kernels_faster`).
    """
    if not cpu_split(jit_compile, compile):

        def plain(fn: Callable[..., Any]) -> Callable[..., Any]:
            def loop(rows: int, *args: Any) -> Any:
                return fn(*args)

            loop.transposed_head = lambda rows: False  # type: ignore[attr-defined]
            loop.transposed_kernels = lambda rows: False  # type: ignore[attr-defined]
            return loop

        return plain
    import tensorflow as tf

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        xla = tf.function(fn, jit_compile=True, autograph=False)

        def loop(rows: int, *args: Any) -> Any:
            return xla(*args) if rows <= max_xla_rows or _wide(rows, max_xla_rows, wide_max_rows) else fn(*args)

        def transposed_head(rows: int) -> bool:
            xla_rows = rows <= max_xla_rows or _wide(rows, max_xla_rows, wide_max_rows)
            return TRANSPOSED_HEAD_MIN_ROWS <= rows <= TRANSPOSED_HEAD_MAX_ROWS and xla_rows and transposed_head_faster()

        loop.xla = xla  # type: ignore[attr-defined]
        loop.transposed_head = transposed_head  # type: ignore[attr-defined]
        loop.transposed_kernels = lambda rows: (  # type: ignore[attr-defined]
            _wide(rows, max_xla_rows, wide_max_rows) and transposed_kernels_faster()
        )
        return loop

    return wrap


def transposed_head_faster() -> bool:
    """Whether the ``[W, V]`` copy of the head's table is the faster layout on this CPU:
    :data:`TRANSPOSED_HEAD` where set, else whether its maker is one of
    :data:`TRANSPOSED_HEAD_VENDORS`.

    A rule by maker, because a timing of the two products alone, tried first, put the copy
    ahead where the whole call was slower with it (Intel Xeon, the seed's shape at 12 rows:
    2.40 vs 3.09 ms a product in a loop of products alone, where the 51 MB table can stay in
    cache; the beam call 0.91x), and it added 0.25-0.7 s to each new program."""
    if TRANSPOSED_HEAD is not None:
        return TRANSPOSED_HEAD
    return cpu_vendor() in TRANSPOSED_HEAD_VENDORS


def wide_xla_rows() -> int:
    """Up to how many float32 rows a loop runs as XLA on this CPU (none above
    ``max_xla_rows`` where 0): :data:`XLA_WIDE_ROWS` where set, else this CPU maker's
    entry in :data:`XLA_WIDE_VENDOR_ROWS`."""
    if XLA_WIDE_ROWS is not None:
        return XLA_WIDE_ROWS
    return XLA_WIDE_VENDOR_ROWS.get(cpu_vendor(), 0)


def transposed_kernels_faster() -> bool:
    """Whether a wide XLA loop multiplies ``[N, K]`` kernel copies on this CPU:
    :data:`TRANSPOSED_KERNELS` where set, else whether its maker is one of
    :data:`TRANSPOSED_KERNEL_VENDORS`."""
    if TRANSPOSED_KERNELS is not None:
        return TRANSPOSED_KERNELS
    return cpu_vendor() in TRANSPOSED_KERNEL_VENDORS


def _wide(rows: int | None, max_xla_rows: int, wide_max_rows: int) -> bool:
    return rows is not None and max_xla_rows < rows <= min(wide_max_rows, wide_xla_rows())


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """``vendor_id`` from ``/proc/cpuinfo`` ("GenuineIntel", "AuthenticAMD"), or "" where
    there is none (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def step_compiler(
    jit_compile: JitSetting, compile: bool = True, max_xla_rows: int = XLA_STEP_MAX_ROWS, wide_max_rows: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """How the decode step (one cached model call, rows first) is wrapped inside the loop.

    On the CPU split, a step of more than ``max_xla_rows`` rows stays in the graph loop
    but its token choice (``select``) runs as an XLA program; a smaller step is inlined,
    since its whole loop is one XLA program already (:func:`loop_compiler`; so is a wide
    loop's step, up to ``wide_max_rows`` where the CPU takes it).
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
            if rows is not None and (rows <= max_xla_rows or _wide(rows, max_xla_rows, wide_max_rows)):
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
