"""The one backend-specific corner of the samplers: how a whole decode loop gets compiled.

Everything else in ``gpt2_effnet.decoding`` is written with ``keras.ops`` only. Compiling
the *whole* loop (prefill, every step, beam bookkeeping) into one program is what removes
the per-step Python and host round-trips that made the seed's beam search slow.
"""

from __future__ import annotations

from typing import Any, Callable

import keras

# "auto" resolves to XLA on GPU only. On CPU (bench/bench_generate.py, 1 thread) XLA ran the
# loop 1.1-1.3x faster but took about twice as long to compile (20-30 s for GPT-2 124M), which
# a short captioning job or a test never earns back; pass jit_compile=True (--xla) for long runs.
JitSetting = bool | str


def backend_name() -> str:
    return keras.backend.backend()


def resolve_jit(jit_compile: JitSetting) -> bool:
    """``"auto"``: XLA when TensorFlow sees a GPU, plain graph mode otherwise."""
    if jit_compile == "auto":
        if backend_name() != "tensorflow":
            return False
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if not isinstance(jit_compile, bool):
        raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
    return jit_compile


def compile_loop(fn: Callable[..., Any], compile: bool = True, jit_compile: JitSetting = "auto") -> Callable[..., Any]:
    """Wrap a decode function so the backend runs it as one compiled program.

    TensorFlow: ``tf.function`` (XLA if ``jit_compile``); JAX: ``jax.jit``; PyTorch: the
    function itself (``torch.compile`` takes far longer to compile than a caption takes to
    decode, and ``keras.ops.while_loop`` is a plain Python loop there anyway).
    """
    if not compile:
        return fn
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=resolve_jit(jit_compile))
    if name == "jax":
        import jax

        return jax.jit(fn)
    return fn
