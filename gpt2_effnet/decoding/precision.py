"""Decoding with bfloat16 weights, opt-in: ``generate(..., precision="bfloat16")`` (the whole
decoder) or ``precision="bfloat16-head"`` (the output head's table only).

Why: many rows at once are matmul-bound, and CPUs with AVX-512 BF16 or AMX run oneDNN's
bfloat16 matmuls at about twice the float32 rate (GPT-2 124M beam 3 at batch 32: 1.4x);
at one row, or where float32 runs an XLA loop, float32 is as fast or faster, so bfloat16
is never chosen for the user (BENCHMARKS.md).

The decoder's bfloat16 twin is built once per model and refreshed from the float32
weights at every call (the model may have trained since), so the float32 model stays the
one source of truth. Attention scores and softmax, layer norms and the logits stay
float32 (layers.attend, GPT2Decoder.head). ``"bfloat16-head"`` keeps the blocks in
float32 and multiplies a bfloat16 copy of the tied token table, made in each call, with
the final hidden state rounded to bfloat16, summing in float32 (kernels.logits_from_table):
the head is the largest matmul of a step at GPT-2's vocabulary. How far each moves the
logits and how often the top token changes is tested (tests/test_precision.py).

``backbone_precision="bfloat16"`` (a separate, opt-in setting) runs a captioner's image
backbone in bfloat16 through a twin that shares its float32 variables
(folding.low_precision_twin); the image features move ~1.5 % (tested).
"""

from __future__ import annotations

from typing import Any

# Keras is imported inside the functions: the CLI reads PRECISIONS for its --help.
PRECISIONS = ("float32", "bfloat16", "bfloat16-head")
# generate(backbone_precision=...): a captioner's image backbone (encoder.ImageEncoder.call).
BACKBONE_PRECISIONS = ("float32", "bfloat16")
HEAD_ONLY = "bfloat16-head"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_backbone_precision(precision: str) -> str:
    if precision not in BACKBONE_PRECISIONS:
        raise ValueError(f"backbone_precision must be one of {BACKBONE_PRECISIONS}, got {precision!r}")
    return precision


def decoder_in(decoder: Any, precision: str) -> Any:
    """``decoder`` itself for float32 (and a bfloat16 head only), else its twin in
    ``precision`` (built and filled on first use, kept with the model's decode state)."""
    if check_precision(precision) in ("float32", HEAD_ONLY):
        return decoder
    from .base import decode_state

    twins = decode_state(decoder).twins
    if precision not in twins:
        config = decoder.get_config()
        config["dtype"] = precision
        twins[precision] = type(decoder).from_config(config)
        _copy_weights(decoder, twins[precision])
    return twins[precision]


def refresh(decoder: Any, precision: str) -> None:
    """Cast the model's current float32 weights into its low-precision twin: the model may
    have changed since. One graph on TensorFlow (GPT-2 124M: 64 vs 115 ms cast one by one,
    Intel Xeon, 2 cores), built once per twin."""
    if check_precision(precision) != "bfloat16":
        return
    from .base import decode_state
    from .plan import graph_function

    twin = decoder_in(decoder, precision)
    refreshers = decode_state(decoder).refreshers
    if precision not in refreshers:
        refreshers[precision] = graph_function(lambda: _copy_weights(decoder, twin))
    refreshers[precision]()


def _copy_weights(source: Any, twin: Any) -> None:
    from keras import ops

    if [v.path for v in source.weights] != [v.path for v in twin.weights]:
        raise RuntimeError("the low-precision twin's weights do not match the model's (same class, same config)")
    for value, target in zip(source.weights, twin.weights):
        target.assign(ops.cast(value, target.dtype))
