"""gpt2_effnet.fast_ops: the same answers as numpy, by a cheaper road."""

from __future__ import annotations

import numpy as np
from keras import ops

from gpt2_effnet.fast_ops import argmax_last, bias_add, frozen_batch_norm


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


def test_one_row_matmul_matches_float64_and_is_taken_only_for_one_row() -> None:
    import keras
    import tensorflow as tf

    from gpt2_effnet.fast_ops import one_row_matmul
    from gpt2_effnet.layers import Dense

    rng = np.random.default_rng(2)
    kernel = rng.normal(0, 0.05, (768, 300)).astype(np.float32)
    for shape in ((1, 768), (1, 1, 768)):
        x = rng.normal(0, 1, shape).astype(np.float32)
        exact = x.astype(np.float64) @ kernel.astype(np.float64)
        plain = ops.convert_to_numpy(ops.matmul(x, kernel))
        got = tf.function(lambda a, b: one_row_matmul(a, b), jit_compile=True)(tf.constant(x), tf.constant(kernel))
        got = np.asarray(got)
        assert got.shape == shape[:-1] + (300,)
        # Within float32's rounding of a 768-term sum, as the plain product is.
        np.testing.assert_allclose(got, exact, rtol=0, atol=2e-5)
        np.testing.assert_allclose(got, plain, rtol=0, atol=2e-5)
    # Outside XLA (eager, a plain graph), more than one row, or an odd depth: the plain
    # product (the caller's fallback).
    one = tf.constant(rng.normal(0, 1, (1, 768)).astype(np.float32))
    assert one_row_matmul(one, tf.constant(kernel)) is None
    assert tf.function(lambda a: tf.constant(one_row_matmul(a, tf.constant(kernel)) is None))(one).numpy()
    in_xla = tf.function(lambda a, b: tf.constant(one_row_matmul(a, b) is None), jit_compile=True)
    assert in_xla(tf.zeros((2, 768)), tf.constant(kernel)).numpy()
    assert in_xla(tf.zeros((1, 767)), tf.zeros((767, 3))).numpy()
    assert not in_xla(one, tf.constant(kernel)).numpy()

    # The layer: same weights and names as keras' Dense, same outputs at one row and many.
    ours, theirs = Dense(300, activation="gelu", name="c_fc"), keras.layers.Dense(300, activation="gelu", name="c_fc")
    ours.build((None, 768))
    theirs.build((None, 768))
    for variable, value in zip(ours.weights + theirs.weights, 2 * [kernel, rng.normal(0, 1, 300).astype(np.float32)]):
        variable.assign(value)
    assert [v.path for v in ours.weights] == [v.path for v in theirs.weights]
    for rows in (1, 5):
        x = tf.constant(rng.normal(0, 1, (rows, 1, 768)).astype(np.float32))
        expected = ops.convert_to_numpy(theirs(x))
        for call in (ours, tf.function(ours, jit_compile=True)):
            np.testing.assert_allclose(ops.convert_to_numpy(call(x)), expected, rtol=0, atol=2e-5)


def test_write_slot_writes_one_position_in_place_only_where_promised() -> None:
    """The slot written equals ``slice_update``'s; ``InplaceUpdate`` only in a plain graph
    with ``in_place=True``; buffers from ``new_buffer`` are zeros at every call and apart
    (a folded, shared constant written in place would leak one call's keys into the next)."""
    import tensorflow as tf

    from gpt2_effnet.fast_ops import new_buffer, write_slot

    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, (3, 2, 5, 4)).astype(np.float32)
    new = rng.normal(0, 1, (3, 2, 1, 4)).astype(np.float32)
    expected = base.copy()
    expected[:, :, 2:3] = new

    def fill_and_write(values, update, index, in_place):
        owned = new_buffer(values.shape, "float32") + values  # a computed buffer: ours to write
        return write_slot(owned, update, index, in_place=in_place)

    for in_place in (True, False):
        for jit in (False, True):
            fn = tf.function(lambda v, u, i, p=in_place: fill_and_write(v, u, i, p), jit_compile=jit)
            got = fn(tf.constant(base), tf.constant(new), tf.constant(2))
            np.testing.assert_array_equal(np.asarray(got), expected)
            ops_used = {op.type for op in fn.get_concrete_function(
                tf.constant(base), tf.constant(new), tf.constant(2)).graph.get_operations()}
            assert ("InplaceUpdate" in ops_used) == (in_place and not jit), (in_place, jit, ops_used)
    eager_base = tf.constant(base)
    np.testing.assert_array_equal(np.asarray(write_slot(eager_base, new, 2, in_place=True)), expected)
    np.testing.assert_array_equal(np.asarray(eager_base), base)  # eagerly: a copy, never in place

    @tf.function
    def two_buffers(index):
        first, second = new_buffer((2, 1, 4, 3), "float32"), new_buffer((2, 1, 4, 3), "float32")
        return write_slot(first, tf.ones((2, 1, 1, 3)), index, in_place=True), second

    for index in (1, 3):
        written, other = (np.asarray(t) for t in two_buffers(tf.constant(index)))
        want = np.zeros((2, 1, 4, 3), np.float32)
        want[:, :, index] = 1.0
        np.testing.assert_array_equal(written, want)  # the slot of this call only
        np.testing.assert_array_equal(other, 0.0)
