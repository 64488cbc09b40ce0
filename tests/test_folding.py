"""BatchNorm folding: the inference twin of a backbone computes what Keras' own layers do."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gpt2_effnet.encoder import ImageEncoder, build_backbone
from gpt2_effnet.folding import FoldedConvolution, FusableSwish, fold_batch_norms, foldable_pairs


def _randomise_norms(model: keras.Model, rng: np.random.Generator) -> None:
    """Moving statistics and affine weights far from their initial 0/1, so folding matters."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))


# B0 has depthwise convolutions in every block; V2-B0 only after its fused (plain) first stages.
@pytest.mark.parametrize("name", ["efficientnetb0", "efficientnetv2-b0"])
def test_folded_twin_equals_the_backbone_in_inference(name: str, rng: np.random.Generator) -> None:
    keras.utils.set_random_seed(0)
    backbone = build_backbone(name, 64, None)
    _randomise_norms(backbone, rng)
    twin = fold_batch_norms(backbone)
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # Every norm of an EfficientNet follows a convolution of its own: all fold.
    assert len(foldable_pairs(backbone)) == len(norms) > 10
    assert sum(isinstance(layer, FoldedConvolution) for layer in twin.layers) == len(norms)
    kinds = {type(layer.conv) for layer in twin.layers if isinstance(layer, FoldedConvolution)}
    assert kinds == {keras.layers.Conv2D, keras.layers.DepthwiseConv2D}
    # The same variables, none new.
    assert {id(v) for v in twin.weights} <= {id(v) for v in backbone.weights}
    # Every swish activation layer is written out so oneDNN can fuse it into the conv before it.
    swishes = [l for l in backbone.layers if isinstance(l, keras.layers.Activation) and l.activation is keras.activations.silu]
    assert len(swishes) > 10
    assert sum(isinstance(layer, FusableSwish) for layer in twin.layers) == len(swishes)

    # Each folded layer is norm(conv(x)) to float32 rounding.
    for layer in twin.layers:
        if isinstance(layer, FoldedConvolution):
            x = rng.normal(0, 1, (2, *layer.conv.input.shape[1:])).astype("float32")
            want = np.asarray(layer.norm(layer.conv(x), training=False))
            assert np.linalg.norm(np.asarray(layer(x)) - want) / np.linalg.norm(want) < 1e-5, layer.name

    # The whole network: float32 rounding grows through ~60 layers with these randomised
    # norms (a 1e-6 change of the input moves V2-B0's output by 5e-5; measured end-to-end
    # differences 1e-6 to 1.1e-4), while a fold 0.1 % off in one bias gives 5.7e-2.
    images = rng.uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    want = np.asarray(backbone(images, training=False))
    got = np.asarray(twin(images, training=False))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())

    # Refolded at every call: a changed statistic reaches the twin without rebuilding it.
    norms[-1].moving_mean.assign(norms[-1].moving_mean + 1.0)
    want = np.asarray(backbone(images, training=False))
    np.testing.assert_allclose(np.asarray(twin(images, training=False)), want, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_biased_convolution_folds_in_both_precisions(policy: str, rng: np.random.Generator) -> None:
    """float32 on TensorFlow takes the conv -> frozen-norm path, bfloat16 the refolded kernel:
    both must be norm(conv(x)) with the conv's own bias, then the swish."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs = keras.Input((6, 6, 5))
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=True)(inputs)
        x = keras.layers.BatchNormalization()(x)
        model = keras.Model(inputs, keras.layers.Activation("swish")(x))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    _randomise_norms(model, rng)
    conv = model.layers[1]
    conv.bias.assign(rng.normal(0, 1, 8).astype("float32"))
    twin = fold_batch_norms(model)
    assert isinstance(twin.layers[1], FoldedConvolution) and isinstance(twin.layers[-1], FusableSwish)
    images = rng.normal(0, 1, (3, 6, 6, 5)).astype("float32")
    want = np.asarray(model(images, training=False), "float32")
    got = np.asarray(twin(images, training=False), "float32")
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance
    # Leaving the conv's bias out of the norm would be far off.
    conv.bias.assign(conv.bias + 0.5)
    assert np.linalg.norm(np.asarray(twin(images, training=False), "float32") - want) / np.linalg.norm(want) > 0.05


def test_a_convolution_with_two_readers_is_not_folded() -> None:
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    x = conv(inputs)
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, keras.layers.Add()([norm(x), x]))
    assert foldable_pairs(model) == {}
    single = keras.Model(inputs, norm(conv(inputs)))
    assert foldable_pairs(single) == {id(conv): norm}


def test_frozen_backbone_runs_as_inference_while_the_rest_trains(rng: np.random.Generator) -> None:
    """With the backbone frozen, training=True must not drop blocks or use batch statistics."""
    encoder = ImageEncoder("efficientnetb0", 32, 16, num_layers=0, num_heads=2, drop_path=0.5)
    _randomise_norms(encoder.backbone, rng)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    encoder.backbone.trainable = False
    frozen = [np.asarray(encoder(images, training=True)) for _ in range(2)]
    np.testing.assert_allclose(frozen[0], frozen[1], rtol=1e-6)
    np.testing.assert_allclose(frozen[0], np.asarray(encoder(images, training=False)), rtol=1e-6)
    encoder.backbone.trainable = True
    trained = np.asarray(encoder(images, training=True))  # batch statistics and stochastic depth
    assert np.abs(trained - frozen[0]).max() > 1e-3
    # The twin is not tracked: every variable is the encoder's once.
    ids = [id(v) for v in encoder.weights]
    assert len(ids) == len(set(ids)) == len(encoder.backbone.weights) + len(encoder.projection.weights) + 1 + 2
