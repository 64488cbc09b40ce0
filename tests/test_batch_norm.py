"""FusedBatchNorm against Keras' own BatchNormalization: same outputs, gradients and moving statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from gpt2_effnet.batch_norm import FusedBatchNorm, use_fused_batch_norms


def _pair(dtype: str, **kwargs):
    layers = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNorm):
        layer = cls(momentum=0.9, epsilon=1e-3, dtype=dtype, **kwargs)
        layer.build((None, 6, 6, 5))
        layers.append(layer)
    rng = np.random.default_rng(0)
    for a, b in zip(layers[0].weights, layers[1].weights):
        value = rng.normal(1.0 if "variance" in a.name else 0.0, 0.3, a.shape)
        value = np.abs(value) if "variance" in a.name else value
        a.assign(value.astype("float32"))
        b.assign(value.astype("float32"))
    return layers


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
@pytest.mark.parametrize("center_scale", [True, False])
def test_fused_training_norm_equals_keras(dtype, tol, center_scale) -> None:
    import tensorflow as tf

    keras_bn, fused_bn = _pair(dtype, center=center_scale, scale=center_scale)
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, (4, 6, 6, 5)).astype("float32"))
    results = []
    for layer in (keras_bn, fused_bn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.range(1.0, 6.0))
        grads = tape.gradient(loss, [x] + [v.value for v in layer.trainable_weights])
        stats = [np.asarray(v.numpy()) for v in (layer.moving_mean, layer.moving_variance)]
        results.append((np.asarray(tf.cast(y, tf.float32)), [np.asarray(g) for g in grads], stats))
    (y0, g0, s0), (y1, g1, s1) = results
    assert y0.dtype == y1.dtype
    np.testing.assert_allclose(y1, y0, atol=tol * 10, rtol=tol)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, atol=tol * 10, rtol=tol)
    for a, b in zip(s0, s1):  # moving statistics move by the population variance, as Keras'
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    # Inference is Keras' own path, untouched.
    np.testing.assert_allclose(np.asarray(fused_bn(x, training=False)), np.asarray(keras_bn(x, training=False)), atol=1e-5)


def test_backbones_use_it_and_keep_their_weight_names() -> None:
    from gpt2_effnet.encoder import build_backbone

    backbone = build_backbone("efficientnetv2-b0", 64, None, feature_stride=8)
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(type(layer) is FusedBatchNorm for layer in norms)
    plain = keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(64, 64, 3))
    names = {v.path for v in plain.weights}
    assert {v.path for v in backbone.weights} <= names
    assert use_fused_batch_norms(backbone) == 0  # already done: nothing left to change
    out = backbone(ops.ones((2, 64, 64, 3)) * 100.0, training=True)
    assert np.isfinite(np.asarray(out)).all()
