"""Inference-mode backbones with every BatchNorm folded into the convolution that feeds it.

In inference a BatchNorm is a fixed per-channel affine map, so ``conv -> BN`` is one
convolution with a rescaled kernel and a bias. Keras runs them as separate layers, and
under mixed precision each BatchNorm also casts its input to float32 and back: in the
seed's frozen EfficientNetV2-B0 those casts, multiplies and adds were ~30 % of the
backbone's forward time, and the separate ops keep oneDNN from fusing convolution, bias
and activation. The folded twin computes the same function (float32: equal to rounding,
tested) from the *same variables*, refolded at every call, so loading or training the
backbone needs no extra step. Used wherever the backbone runs in inference mode:
captioning, evaluation, export, serving, and training with a frozen backbone.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


class FoldedConvolution(keras.layers.Layer):
    """``norm(conv(x))`` in inference mode, as one convolution plus bias."""

    def __init__(self, conv: keras.layers.Layer, norm: keras.layers.BatchNormalization, **kwargs: Any) -> None:
        super().__init__(name=f"{conv.name}_folded", dtype=conv.dtype_policy, **kwargs)
        self.conv = conv
        self.norm = norm

    def folded_weights(self) -> tuple[Any, Any]:
        """``(kernel, bias)`` in float32 from the live variables."""
        norm, conv = self.norm, self.conv
        variance = ops.cast(norm.moving_variance, "float32")
        scale = ops.rsqrt(variance + norm.epsilon)
        if norm.scale:
            scale = scale * ops.cast(norm.gamma, "float32")
        bias = -ops.cast(norm.moving_mean, "float32") * scale
        if norm.center:
            bias = bias + ops.cast(norm.beta, "float32")
        if conv.use_bias:
            bias = bias + ops.cast(conv.bias, "float32") * scale
        kernel = ops.cast(conv.kernel, "float32")
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            kernel = kernel * ops.reshape(scale, (kernel.shape[2], kernel.shape[3]))
        else:
            kernel = kernel * scale
        return kernel, bias

    def call(self, inputs: Any) -> Any:
        kernel, bias = self.folded_weights()
        kernel = ops.cast(kernel, self.compute_dtype)
        conv = self.conv
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            outputs = ops.depthwise_conv(
                inputs, kernel, strides=conv.strides, padding=conv.padding,
                dilation_rate=conv.dilation_rate, data_format=conv.data_format,
            )
        else:
            outputs = conv.convolution_op(inputs, kernel)
        return outputs + ops.cast(bias, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return self.conv.compute_output_shape(input_shape)


class AbsorbedNorm(keras.layers.Layer):
    """Stands where a folded BatchNorm was: its work is done by the convolution before it."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any | None = None) -> Any:
        return inputs

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


def foldable_pairs(model: keras.Model) -> dict[int, keras.layers.BatchNormalization]:
    """``id(conv) -> the BatchNorm it alone feeds``, for the pairs that fold exactly.

    A pair folds when the convolution has no activation, its output goes to that
    BatchNorm only, and both work on channels-last tensors with the norm on the last axis.
    """
    consumers: dict[int, list[keras.layers.Layer]] = {}
    for layer in model.layers:
        try:
            inputs = layer.input
        except (AttributeError, ValueError):  # input layers; layers called more than once
            continue
        for tensor in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            consumers.setdefault(id(tensor), []).append(layer)
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, _CONVOLUTIONS) or layer.activation is not keras.activations.linear:
            continue
        if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
            continue
        after = consumers.get(id(layer.output), [])
        if len(after) == 1 and isinstance(after[0], keras.layers.BatchNormalization):
            norm = after[0]
            if norm.axis in (-1, len(layer.output.shape) - 1):
                pairs[id(layer)] = norm
    return pairs


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """A functional twin of ``model`` for inference, sharing its variables, norms folded.

    Layers that do not fold are the original instances; call the twin with
    ``training=False`` only (folding is exact only with the moving statistics).
    """
    pairs = foldable_pairs(model)
    folded_norms = {id(norm) for norm in pairs.values()}

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer:
        if id(layer) in pairs:
            return FoldedConvolution(layer, pairs[id(layer)])
        if id(layer) in folded_norms:
            return AbsorbedNorm(name=f"{layer.name}_folded", dtype=layer.dtype_policy)
        return layer

    return keras.models.clone_model(model, clone_function=replace)
