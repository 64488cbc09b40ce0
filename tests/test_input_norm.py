"""The backbone's input normalisation as one op: the same map as Keras' Normalization."""

from __future__ import annotations

import keras
import numpy as np

from gpt2_effnet.input_norm import AffineNormalization, use_affine_normalization


def test_affine_normalization_equals_keras_normalization() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 17, 13, 3)).astype("float32")
    mean, variance = [0.485, 0.456, 0.406], [0.229**2, 0.224**2, 0.225**2]
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 3e-2)):
        reference = keras.layers.Normalization(mean=mean, variance=variance, dtype=dtype)
        ours = keras.layers.Normalization(mean=mean, variance=variance, dtype=dtype)
        ours.__class__ = AffineNormalization
        expected = np.asarray(keras.ops.cast(reference(images), "float32"))
        got = ours(images)
        assert got.dtype == reference(images).dtype
        np.testing.assert_allclose(np.asarray(keras.ops.cast(got, "float32")), expected, rtol=tolerance, atol=tolerance)
    # Other shapes and the inverse keep Keras' own path.
    inverse = keras.layers.Normalization(mean=mean, variance=variance, invert=True)
    inverse.__class__ = AffineNormalization
    flat = rng.uniform(0, 1, (5, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(inverse(flat)), flat * np.sqrt(variance) + mean, rtol=1e-5)


def test_backbones_normalise_their_input_in_one_op() -> None:
    from gpt2_effnet.encoder import build_backbone

    model = build_backbone("efficientnetv2-b0", 64, weights=None)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]
    assert norms and all(type(layer) is AffineNormalization for layer in norms)
    assert use_affine_normalization(model) == 0  # nothing left to convert
    # The backbone's own statistics, the same map as Keras' call.
    images = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(norms[0](images)),
                               np.asarray(keras.layers.Normalization.call(norms[0], images)), rtol=1e-5, atol=1e-5)
