"""gpt2_effnet.fast_ops and encoder_ops: the same answers as numpy, by a cheaper road."""

from __future__ import annotations

import numpy as np
from keras import ops

from gpt2_effnet.encoder_ops import bias_add, frozen_batch_norm
from gpt2_effnet.fast_ops import argmax_last


def test_argmax_last_matches_numpy_including_ties() -> None:
    rng = np.random.default_rng(0)
    # Few distinct values, so most rows have ties: numpy (and HF's greedy) take the first.
    for shape in ((5, 9), (2, 3, 7), (1, 50258)):
        x = rng.integers(-3, 3, shape).astype(np.float32)
        got = np.asarray(ops.convert_to_numpy(argmax_last(ops.convert_to_tensor(x))))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    x = np.array([[-1.0, 2.5, 2.5, 0.0], [-0.0, 0.0, -1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(ops.convert_to_numpy(argmax_last(ops.convert_to_tensor(x))), [1, 0])


def test_sparse_cross_entropy_and_its_gradient_match_keras() -> None:
    import tensorflow as tf

    from gpt2_effnet.fast_ops import sparse_cross_entropy

    rng = np.random.default_rng(1)
    for shape in ((3, 5, 40), (96, 1000)):
        logits = tf.constant(rng.normal(0, 3, shape).astype(np.float32))
        targets = tf.constant(rng.integers(0, shape[-1], shape[:-1]).astype(np.int32))
        weights = tf.constant(rng.uniform(0, 1, shape[:-1]).astype(np.float32))  # a mask-like upstream
        results = []
        for fn in (sparse_cross_entropy,
                   lambda x, t: ops.sparse_categorical_crossentropy(t, x, from_logits=True)):
            with tf.GradientTape() as tape:
                tape.watch(logits)
                per_position = fn(logits, targets)
                total = tf.reduce_sum(per_position * weights)
            results.append((per_position.numpy(), tape.gradient(total, logits).numpy()))
        (ours, ours_grad), (keras_, keras_grad) = results
        assert ours.shape == shape[:-1]
        np.testing.assert_allclose(ours, keras_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours_grad, keras_grad, rtol=1e-5, atol=1e-6)
        # And against the definition, in float64.
        x = logits.numpy().astype(np.float64)
        log_p = x - x.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        expected = -np.take_along_axis(log_p, targets.numpy()[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_and_bias_add_match_their_definitions() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (2, 5, 5, 7)).astype("float32")
    scale, offset, mean = (rng.normal(0, 1, 7).astype("float32") for _ in range(3))
    variance = rng.uniform(0.1, 3.0, 7).astype("float32")
    want = (x.astype("float64") - mean) / np.sqrt(variance.astype("float64") + 1e-3) * scale + offset
    got = np.asarray(frozen_batch_norm(ops.convert_to_tensor(x), scale, offset, mean, variance, 1e-3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A wrong epsilon or a swapped scale/offset is far outside that tolerance.
    assert np.abs(np.asarray(frozen_batch_norm(ops.convert_to_tensor(x), offset, scale, mean, variance, 1e-3)) - want).max() > 0.1
    np.testing.assert_allclose(np.asarray(bias_add(ops.convert_to_tensor(x), offset)), x + offset, rtol=1e-6)
