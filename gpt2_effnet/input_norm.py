"""A backbone's input normalisation, ``(x - mean) / std`` per colour channel, as one fast op.

Keras' EfficientNets normalise their input with a Normalization layer: a subtraction and
a division that broadcast over 3 channels, which TensorFlow's CPU kernels run slowly
(see :func:`~gpt2_effnet.encoder_ops.channel_affine`). :class:`AffineNormalization` is the
same layer (same variables and names) computing the same map as one multiply-add.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .batch_norm import swap_layer_class
from .encoder_ops import channel_affine


class AffineNormalization(keras.layers.Normalization):
    """Keras' Normalization; the forward map on channels-last images as ``x * (1 / std) - mean / std``."""

    def call(self, inputs: Any) -> Any:
        last_axis = tuple(self.axis) in ((-1,), (len(inputs.shape) - 1,)) if self.axis else False
        if self.invert or self.mean is None or len(inputs.shape) != 4 or not last_axis:
            return super().call(inputs)
        inputs = ops.convert_to_tensor(inputs, self.compute_dtype)
        channels = inputs.shape[-1]
        mean = ops.reshape(ops.cast(self.convert_weight(self.mean), "float32"), (channels,))
        variance = ops.reshape(ops.cast(self.convert_weight(self.variance), "float32"), (channels,))
        std = ops.maximum(ops.sqrt(variance), keras.backend.epsilon())
        return channel_affine(inputs, 1.0 / std, -mean / std)


def use_affine_normalization(model: keras.Model) -> int:
    """Turn every plain Normalization of ``model`` into an :class:`AffineNormalization`, in place."""
    return swap_layer_class(model, keras.layers.Normalization, AffineNormalization)
