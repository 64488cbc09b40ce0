"""Token selection for greedy and ancestral (top-k / top-p / temperature) sampling.

Randomness is a counter-based hash of (seed, step, row), written in integer ``keras.ops``:
no random-state variable to thread through a compiled loop, the same seed gives the same
captions on every backend, and a new seed is just a new input (no recompilation).
Sampling uses the inverse CDF, so one uniform number per row and step is enough.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from ..fast_ops import argmax_last

# Everything is int32 (JAX's default integer width): multiplications wrap modulo 2**32 on every
# backend, and right shifts are masked so they act as logical shifts on negative values.
_MULT_A = 0x7FEB352D
_MULT_B = 0x2C1B3C6D
_GOLDEN = 0x61C88647  # 2**32 / golden ratio, as a positive int32


def _shift_right(x: Any, bits: int) -> Any:
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _mix32(x: Any) -> Any:
    """A 32-bit integer finaliser (xor-shift-multiply rounds) on int32 tensors."""
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = x * _MULT_A
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = x * _MULT_B
    return ops.bitwise_xor(x, _shift_right(x, 16))


def uniform_per_row(seed: Any, step: Any, rows: int) -> Any:
    """``[rows]`` float32 in (0, 1), a pure function of (seed, step, row)."""
    seed = ops.cast(seed, "int32")
    step = ops.cast(step, "int32")
    key = _mix32(_mix32(seed) + _mix32(step * _GOLDEN + 1))
    counter = ops.arange(rows, dtype="int32")
    bits = _mix32(_mix32(ops.bitwise_xor(counter, key)) + key)
    # 24 random bits, centred in their bucket so 0 and 1 are never produced.
    return (ops.cast(_shift_right(bits, 8), "float32") + 0.5) / float(1 << 24)


def uniform_matrix(seed: Any, step: Any, rows: int, columns: int) -> Any:
    """``[rows, columns]`` float32 in (0, 1), a pure function of (seed, step, row, column)."""
    seed = ops.cast(seed, "int32")
    step = ops.cast(step, "int32")
    key = _mix32(_mix32(seed + 0x5BD1E995) + _mix32(step * _GOLDEN + 7))
    counter = ops.reshape(ops.arange(rows * columns, dtype="int32"), (rows, columns))
    bits = _mix32(_mix32(ops.bitwise_xor(counter, key)) + key)
    return (ops.cast(_shift_right(bits, 8), "float32") + 0.5) / float(1 << 24)


def sample_without_replacement(scores: Any, count: int, seed: Any, step: Any) -> Any:
    """``count`` column indices per row drawn from ``softmax(scores)`` without replacement.

    The Gumbel-top-k trick: adding independent Gumbel noise to the log-weights and keeping
    the top ``count`` draws exactly as sequential sampling without replacement does
    (what Hugging Face's beam sampling asks of ``torch.multinomial``).
    """
    rows, columns = scores.shape
    gumbel = -ops.log(-ops.log(uniform_matrix(seed, step, rows, columns)))
    _, index = ops.top_k(ops.cast(scores, "float32") + gumbel, count)
    return ops.cast(index, "int32")


def greedy_tokens(scores: Any) -> Any:
    return argmax_last(scores)


def sample_tokens(logits: Any, seed: Any, step: Any) -> Any:
    """One token per row from ``softmax(logits)`` (``-inf`` entries are never chosen)."""
    rows = logits.shape[0]
    probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
    cdf = ops.cumsum(probs, axis=-1)
    target = uniform_per_row(seed, step, rows) * cdf[:, -1]
    # First index whose cumulative mass reaches the target; zero-probability ids are skipped
    # because their cdf equals their predecessor's.
    index = ops.sum(ops.cast(cdf < ops.expand_dims(target, 1), "int32"), axis=-1)
    return ops.minimum(index, logits.shape[-1] - 1)
