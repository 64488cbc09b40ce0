"""The image encoder: an EfficientNet feature map turned into a sequence GPT-2 can attend to.

The backbone's classifier head is dropped (``include_top=False``); its last feature map
``[B, h, w, C]`` is flattened to ``h*w`` image tokens, projected to GPT-2's width, given a
learned position embedding (so the decoder knows *where* things are) and mixed by a few
bidirectional transformer blocks.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import keras
from keras import ops

from .batch_norm import use_fused_batch_norms
from .decoding.precision import check_backbone_precision
from .folding import fold_batch_norms, low_precision_twin
from .input_norm import use_affine_normalization
from .layers import TransformerBlock

# Name -> constructor. Lower-case, hyphenated like the papers ("efficientnetv2-s").
BACKBONES: dict[str, Callable[..., keras.Model]] = {
    **{f"efficientnetb{i}": getattr(keras.applications, f"EfficientNetB{i}") for i in range(8)},
    **{f"efficientnetv2-b{i}": getattr(keras.applications, f"EfficientNetV2B{i}") for i in range(4)},
    "efficientnetv2-s": keras.applications.EfficientNetV2S,
    "efficientnetv2-m": keras.applications.EfficientNetV2M,
    "efficientnetv2-l": keras.applications.EfficientNetV2L,
}

# Beyond this many image tokens every decode step pays a lot for cross-attention.
LONG_SEQUENCE_WARNING = 1024


def build_backbone(
    name: str, image_size: int, weights: str | None, feature_stride: int = 32, drop_path: float | None = None
) -> keras.Model:
    """An EfficientNet/V2 without its head, ending at its last feature map of ``feature_stride``.

    ``weights``: "imagenet", a file path or None. A stride below 32 cuts the network after
    the last layer at that resolution: the next stage's 1x1-expanded input (its widest
    activation, as ``top_activation`` is at 32), so later stages are never built or run.
    ``drop_path`` replaces the residual blocks' stochastic-depth rate.
    """
    key = name.lower().replace("_", "-")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if isinstance(weights, str) and weights.lower() in ("none", "random", ""):
        weights = None
    model = BACKBONES[key](include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    use_fused_batch_norms(model)  # a trainable backbone's norms in one kernel each (batch_norm.py)
    use_affine_normalization(model)  # its input normalisation as one op (input_norm.py)
    if drop_path is not None:
        for layer in model.layers:
            # Keras' EfficientNets implement drop-path as a Dropout with noise_shape
            # (None, 1, 1, 1) named "<block>_drop" in front of each residual add.
            if isinstance(layer, keras.layers.Dropout) and layer.name.endswith("_drop"):
                layer.rate = drop_path
    if feature_stride == 32:
        return model
    side = -(-image_size // feature_stride)  # "same" padding: ceil(size / stride)
    last = None
    for layer in model.layers:
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if shape and len(shape) == 4 and shape[1] == side and shape[2] == side:
            last = layer
    if last is None or side == -(-image_size // 32):
        raise ValueError(f"{name} at {image_size}px has no feature map of stride {feature_stride}")
    return keras.Model(model.input, last.output, name=f"{model.name}_stride{feature_stride}")


@keras.saving.register_keras_serializable("gpt2_effnet")
class ImageEncoder(keras.Model):
    """Images ``[B, S, S, 3]`` (0..255, RGB) -> image tokens ``[B, h*w, width]``."""

    def __init__(
        self,
        backbone: str,
        image_size: int,
        width: int,
        num_layers: int,
        num_heads: int,
        backbone_weights: str | None = None,
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        bn_momentum: float | None = None,
        feature_stride: int = 32,
        drop_path: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.image_size = image_size
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.backbone_weights = backbone_weights
        self.epsilon = epsilon
        self.dropout = dropout
        self.bn_momentum = bn_momentum
        self.feature_stride = feature_stride
        self.drop_path = drop_path
        self.backbone = build_backbone(backbone, image_size, backbone_weights, feature_stride, drop_path)
        if bn_momentum is not None:
            for layer in self.backbone.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = bn_momentum
        # Not an attribute Keras tracks: it shares the backbone's variables, which must be
        # saved once, under the backbone.
        self._inference_backbone = _Untracked(fold_batch_norms(self.backbone))
        self._low_precision_backbone: _Untracked | None = None  # built on first use
        _, height, width_, channels = self.backbone.output_shape
        self.grid = (height, width_)
        self.sequence_length = height * width_
        if self.sequence_length > LONG_SEQUENCE_WARNING:
            warnings.warn(
                f"{backbone} at {image_size}px gives {self.sequence_length} image tokens "
                f"(> {LONG_SEQUENCE_WARNING}); cross-attention will be slow and memory-hungry. "
                "Consider a smaller image_size.",
                stacklevel=2,
            )
        policy = self.dtype_policy
        self.projection = keras.layers.Dense(width, name="projection", dtype=policy)
        self.projection.build((None, None, channels))
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(self.sequence_length, width),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.blocks = [
            TransformerBlock(num_heads, epsilon=epsilon, causal=False, dropout=dropout, name=f"block_{i}", dtype=policy)
            for i in range(num_layers)
        ]
        for block in self.blocks:
            block.build((None, None, width))
        self.ln_f = keras.layers.LayerNormalization(epsilon=epsilon, name="ln_f", dtype=policy)
        self.ln_f.build((None, None, width))
        self.built = True

    def call(self, images: Any, training: bool | None = None, backbone_precision: str = "float32") -> Any:
        """``backbone_precision="bfloat16"`` (inference only, opt-in): the backbone's
        convolutions in bfloat16 (:func:`~gpt2_effnet.folding.low_precision_twin`); the
        features are cast back to float32 before the projection and blocks. Images may come
        as uint8 (what the loaders ship, a quarter of the bytes): they become float here, on
        the device."""
        check_backbone_precision(backbone_precision)
        if "int" in str(getattr(images, "dtype", "float32")):
            images = ops.cast(images, "float32")
        if training and self.backbone.trainable:
            features = self.backbone(images, training=True)
        elif backbone_precision == "bfloat16":
            if self._low_precision_backbone is None:
                self._low_precision_backbone = _Untracked(low_precision_twin(self._inference_backbone.model))
            features = ops.cast(self._low_precision_backbone.model(images, training=False), self.compute_dtype)
        else:
            # A frozen backbone is a fixed feature extractor: moving statistics and no
            # stochastic depth, even while the rest trains. Its norms run folded.
            features = self._inference_backbone.model(images, training=False)
        batch = ops.shape(features)[0]
        tokens = ops.reshape(features, (batch, self.sequence_length, ops.shape(features)[-1]))
        x = self.projection(tokens) + ops.cast(self.position_embedding, self.compute_dtype)
        for block in self.blocks:
            x, _ = block(x, training=training)
        return self.ln_f(x)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            # A rebuilt encoder gets its weights from the saved file, never from the hub.
            "backbone_weights": None,
            "epsilon": self.epsilon,
            "dropout": self.dropout,
            "bn_momentum": self.bn_momentum,
            "feature_stride": self.feature_stride,
            "drop_path": self.drop_path,
        }


class _Untracked:
    """Holds a model out of Keras' and TensorFlow's attribute tracking."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
