"""A backbone's BatchNormalization with its training-mode statistics from one fused kernel.

Keras 3's BatchNormalization computes batch statistics from ``keras.ops`` (cast to
float32, moments, normalise, cast back), so a trainable EfficientNet runs each norm as
a dozen elementwise ops forward and as many again backward. :class:`FusedBatchNorm` is
the same layer (same variables, names, momentum, moving statistics, inference path)
whose training step calls :func:`~gpt2_effnet.fast_ops.batch_norm_training` instead.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .fast_ops import batch_norm_training


class FusedBatchNorm(keras.layers.BatchNormalization):
    """Keras' BatchNormalization; training on channels-last inputs goes through one fused op."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any | None = None) -> Any:
        fusable = (
            training and self.trainable and mask is None and not self.renorm and not self.synchronized
            and self.axis in (-1, len(inputs.shape) - 1)
        )
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else ops.ones((channels,), "float32")
        offset = self.beta if self.center else ops.zeros((channels,), "float32")
        outputs, mean, variance = batch_norm_training(inputs, scale, offset, self.epsilon)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + ops.cast(mean, self.moving_mean.dtype) * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + ops.cast(variance, self.moving_variance.dtype) * (1.0 - momentum)
        )
        return ops.cast(outputs, self.compute_dtype)


def swap_layer_class(model: keras.Model, original: type, replacement: type) -> int:
    """Give every layer of ``model`` whose class is exactly ``original`` the class ``replacement``.

    For subclasses that add no state (FusedBatchNorm here, input_norm's
    AffineNormalization): weights, names and saved files stay as they are. Returns how
    many layers changed.
    """
    changed = 0
    for layer in model.layers:
        if type(layer) is original:
            layer.__class__ = replacement
            changed += 1
    return changed


def use_fused_batch_norms(model: keras.Model) -> int:
    """Turn every plain BatchNormalization of ``model`` into a :class:`FusedBatchNorm`, in place."""
    return swap_layer_class(model, keras.layers.BatchNormalization, FusedBatchNorm)
