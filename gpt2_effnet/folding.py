"""Inference-mode backbones with every BatchNorm folded into the convolution that feeds it.

In inference a BatchNorm is a fixed per-channel affine map, so ``conv -> BN`` is one
convolution with a rescaled kernel and a bias. Keras runs them as separate layers, and
under mixed precision each BatchNorm also casts its input to float32 and back: in the
seed's frozen EfficientNetV2-B0 those casts, multiplies and adds were ~30 % of the
backbone's forward time, and the separate ops keep oneDNN from fusing convolution, bias
and activation. The folded twin computes the same function (float32: equal to rounding,
tested) from the *same variables*, refolded at every call, so loading or training the
backbone needs no extra step. (On TensorFlow in float32 a regular convolution is followed by
an inference-mode FusedBatchNorm instead, which oneDNN fuses into the convolution: see
:class:`FoldedConvolution`.) Used wherever the backbone runs in inference mode:
captioning, evaluation, export, serving, and training with a frozen backbone.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from . import encoder_ops

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


class FoldedConvolution(keras.layers.Layer):
    """``norm(conv(x))`` in inference mode, as one convolution plus bias.

    On TensorFlow in float32 a regular convolution is not refolded: it is followed by an
    inference-mode FusedBatchNorm, which oneDNN runs inside the convolution's kernel
    together with the activation after it, so the ~220 per-call kernel multiplies of the
    fold (a fifth of a one-image encode) are not needed. Depthwise convolutions and
    bfloat16 (where oneDNN fuses only a bias) fold as before.
    """

    def __init__(self, conv: keras.layers.Layer, norm: keras.layers.BatchNormalization, **kwargs: Any) -> None:
        super().__init__(name=f"{conv.name}_folded", dtype=conv.dtype_policy, **kwargs)
        self.conv = conv
        self.norm = norm

    def folded_weights(self) -> tuple[Any, Any]:
        """``(kernel, bias)`` in float32 from the live variables."""
        conv = self.conv
        scale, bias = encoder_ops.norm_as_affine(*self.norm_parameters(), self.norm.epsilon)
        kernel = ops.cast(conv.kernel, "float32")
        if isinstance(conv, keras.layers.DepthwiseConv2D):
            kernel = kernel * ops.reshape(scale, (kernel.shape[2], kernel.shape[3]))
        else:
            kernel = kernel * scale
        return kernel, bias

    def norm_parameters(self) -> tuple[Any, Any, Any, Any]:
        """``(scale, offset, mean, variance)`` in float32, the conv's bias taken into the mean."""
        norm, conv = self.norm, self.conv
        channels = norm.moving_mean.shape[-1]
        scale = ops.cast(norm.gamma, "float32") if norm.scale else ops.ones((channels,), "float32")
        offset = ops.cast(norm.beta, "float32") if norm.center else ops.zeros((channels,), "float32")
        mean = ops.cast(norm.moving_mean, "float32")
        if conv.use_bias:
            mean = mean - ops.cast(conv.bias, "float32")
        return scale, offset, mean, ops.cast(norm.moving_variance, "float32")

    def call(self, inputs: Any) -> Any:
        conv = self.conv
        depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
        if not depthwise and encoder_ops.fuses_conv_and_frozen_norm(self.compute_dtype):
            outputs = conv.convolution_op(inputs, ops.cast(conv.kernel, self.compute_dtype))
            return encoder_ops.frozen_batch_norm(outputs, *self.norm_parameters(), self.norm.epsilon)
        kernel, bias = self.folded_weights()
        kernel = ops.cast(kernel, self.compute_dtype)
        if depthwise:
            outputs = ops.depthwise_conv(
                inputs, kernel, strides=conv.strides, padding=conv.padding,
                dilation_rate=conv.dilation_rate, data_format=conv.data_format,
            )
        else:
            outputs = conv.convolution_op(inputs, kernel)
        return encoder_ops.bias_add(outputs, bias)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return self.conv.compute_output_shape(input_shape)


class FusableSwish(keras.layers.Layer):
    """``x * sigmoid(x)``, the swish written out.

    TensorFlow's ``silu`` (what Keras' swish calls) is ``x * sigmoid(beta * x)`` under a
    custom gradient, which oneDNN's graph rewrite does not match: after a convolution and
    its bias it stayed a pass of its own over the feature map (55 such passes in
    EfficientNetV2-B0), while ``x * sigmoid(x)`` runs inside the convolution's kernel.
    Same function; only used in the inference twin.
    """

    def call(self, inputs: Any) -> Any:
        return inputs * ops.sigmoid(inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


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
        if isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.silu:
            return FusableSwish(name=f"{layer.name}_fusable", dtype=layer.dtype_policy)
        return layer

    return keras.models.clone_model(model, clone_function=replace)


def low_precision_twin(model: keras.Model, policy: str = "mixed_bfloat16") -> keras.Model:
    """A functional twin of ``model`` (an inference twin from :func:`fold_batch_norms`) that
    computes under ``policy``, sharing ``model``'s variables.

    Each layer is a shallow copy of the original with the policy swapped, so it reads the
    same variables (autocast to bfloat16 as it runs, never copied or refreshed) and the
    original, and any model it belongs to, keeps its float32 policy. Why: on CPUs with
    AVX-512 BF16 the seed's EfficientNetV2-B0 backbone runs ~1.25x faster in bfloat16
    (AMD EPYC, 2 cores: 37.6 vs 47.4 ms for 4 images at 224 px).
    """
    target = keras.dtype_policies.get(policy)

    def copy(layer: keras.layers.Layer) -> keras.layers.Layer:
        twin = object.__new__(type(layer))  # copy.copy would go through Keras' serialization
        twin.__dict__.update(layer.__dict__)
        # Plain attribute writes: Keras' tracking would file them with the original's.
        object.__setattr__(twin, "_dtype_policy", target)
        object.__setattr__(twin, "_inbound_nodes", [])
        object.__setattr__(twin, "_outbound_nodes", [])
        return twin

    return keras.models.clone_model(model, clone_function=copy)
