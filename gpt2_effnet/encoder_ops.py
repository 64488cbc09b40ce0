"""Operations that ``keras.ops`` makes dearer than they need be on one backend, for the
image encoder (its input normalisation and the folded inference backbone).

Layers stay backend-agnostic by calling these instead.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def channel_affine(x: Any, scale: Any, offset: Any) -> Any:
    """``x * scale + offset`` with per-channel (last axis) ``scale`` and ``offset``, in ``x``'s dtype.

    Elementwise ops that broadcast over a 3-wide channel axis are slow in TensorFlow's
    CPU kernels: an EfficientNet's input normalisation over 8 images of 224 px took 3.4 ms
    (float32) / 4.0 ms (bfloat16) as Keras writes it; the same map as a 1x1 depthwise
    convolution plus bias (oneDNN) takes 0.75 / 0.64 ms (AMD EPYC, 2 cores).
    """
    scale, offset = ops.cast(scale, x.dtype), ops.cast(offset, x.dtype)
    if keras.backend.backend() == "tensorflow" and len(x.shape) == 4:
        import tensorflow as tf

        kernel = tf.reshape(scale, (1, 1, -1, 1))
        return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"), offset)
    return x * scale + offset


def bias_add(x: Any, bias: Any) -> Any:
    """``x + bias`` over the last axis, as TensorFlow's BiasAdd where that is the backend.

    oneDNN fuses convolution, bias and activation into one kernel only when the bias is
    a BiasAdd: after ``conv + bias`` (an AddV2) the swish stays a pass of its own.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.nn.bias_add(x, ops.cast(bias, x.dtype))
    return x + ops.cast(bias, x.dtype)


def fuses_conv_and_frozen_norm(dtype: str) -> bool:
    """Whether ``frozen_batch_norm`` right after a convolution becomes part of its kernel.

    TensorFlow's oneDNN rewrite turns Conv2D -> FusedBatchNorm (inference) -> activation
    into one fused convolution in float32; in bfloat16 the three stay apart (measured,
    TF 2.21), while Conv2D -> BiasAdd -> activation fuses in both.
    """
    return keras.backend.backend() == "tensorflow" and dtype == "float32"


def frozen_batch_norm(x: Any, scale: Any, offset: Any, mean: Any, variance: Any, epsilon: float) -> Any:
    """Inference-mode batch norm over the last axis with float32 statistics, in ``x``'s dtype."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean=mean, variance=variance, epsilon=epsilon, is_training=False
        )
        return y
    factor, shift = norm_as_affine(scale, offset, mean, variance, epsilon)
    return x * ops.cast(factor, x.dtype) + ops.cast(shift, x.dtype)


def norm_as_affine(scale: Any, offset: Any, mean: Any, variance: Any, epsilon: float) -> tuple[Any, Any]:
    """An inference batch norm as ``x * factor + shift``: ``(factor, shift)`` per channel."""
    factor = scale * ops.rsqrt(variance + epsilon)
    return factor, offset - mean * factor
