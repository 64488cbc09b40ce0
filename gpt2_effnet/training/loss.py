"""Masked next-token cross-entropy and token accuracy, in ``keras.ops`` (the argmax and the
cross-entropy through :mod:`gpt2_effnet.fast_ops`, which shortcut them on TensorFlow).

The functions return *sums* and token *counts* rather than means: a mean of per-replica or
per-micro-batch means weights short captions wrongly, while summing first and dividing by
the global token count gives the same number however the batch is split (one device,
several replicas, several workers, gradient accumulation).
"""

from __future__ import annotations

from typing import Any

from keras import ops

from ..fast_ops import argmax_last, sparse_cross_entropy


def next_token_split(token_ids: Any, mask: Any) -> tuple[Any, Any, Any]:
    """``(inputs, targets, weights)``: the model reads ``ids[:, :-1]`` and predicts ``ids[:, 1:]``.

    A target counts where its own mask is 1, so BOS is never a target, EOS is, and padding
    is not.
    """
    inputs = token_ids[:, :-1]
    targets = token_ids[:, 1:]
    weights = ops.cast(mask[:, 1:], "float32")
    return inputs, targets, weights


def masked_cross_entropy_sum(logits: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
    """``(sum of -log p(target) over weighted positions, sum of weights)``, both float32 scalars."""
    logits = ops.cast(logits, "float32")
    per_token = sparse_cross_entropy(logits, targets)
    weights = ops.cast(weights, "float32")
    return ops.sum(per_token * weights), ops.sum(weights)


def masked_correct_sum(logits: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
    """``(weighted count of positions whose argmax is the target, sum of weights)``."""
    hits = ops.cast(ops.equal(argmax_last(logits), ops.cast(targets, "int32")), "float32")
    weights = ops.cast(weights, "float32")
    return ops.sum(hits * weights), ops.sum(weights)


def caption_loss(logits: Any, token_ids: Any, mask: Any) -> Any:
    """Mean masked cross-entropy of ``logits`` (computed from ``token_ids[:, :-1]``) against ``token_ids[:, 1:]``."""
    _, targets, weights = next_token_split(token_ids, mask)
    total, count = masked_cross_entropy_sum(logits, targets, weights)
    return total / ops.maximum(count, 1.0)


def caption_accuracy(logits: Any, token_ids: Any, mask: Any) -> Any:
    """Fraction of real (mask 1) next tokens that the logits' argmax gets right."""
    _, targets, weights = next_token_split(token_ids, mask)
    correct, count = masked_correct_sum(logits, targets, weights)
    return correct / ops.maximum(count, 1.0)
