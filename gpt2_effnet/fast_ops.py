"""Operations that ``keras.ops`` makes dearer than they need be on one backend, for
training (the loss, a trainable backbone's batch norms) and the samplers' argmax.

The encoder's are in :mod:`.encoder_ops`, a decode step's in :mod:`.decoding.kernels`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def argmax_last(x: Any) -> Any:
    """int32 index of the largest value along the last axis (the first, on ties).

    ``keras.ops.argmax`` on TensorFlow first rewrites every -0.0 as the smallest negative
    float (a flush-to-zero fix made for JAX): three more passes over the array, which for
    a training step's ``[150, 50258]`` logits cost twice the argmax itself (8.9 vs 2.9 ms,
    AMD EPYC 2 cores). Logits never need -0.0 told from 0.0.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.argmax(x, axis=-1, output_type=tf.int32)
    return ops.cast(ops.argmax(x, axis=-1), "int32")


def batch_norm_training(x: Any, scale: Any, offset: Any, epsilon: float) -> tuple[Any, Any, Any]:
    """Training-mode batch norm over every axis but the last: ``(y, mean, variance)``.

    ``y`` has ``x``'s dtype; ``mean`` and the population ``variance`` are float32 (what
    Keras' BatchNormalization feeds its moving statistics). On TensorFlow a 4-D input
    takes the fused kernel: one op forward and one backward, where Keras' own layer runs
    a cast, the moments, the normalisation and a cast back as separate ops (and as many
    again for the gradient) -- ~40 % of a trainable backbone's step time in the demo.
    """
    if keras.backend.backend() == "tensorflow" and len(x.shape) == 4:
        import tensorflow as tf

        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(scale, tf.float32), tf.cast(offset, tf.float32), epsilon=epsilon,
            is_training=True, data_format="NHWC",
        )
        # The kernel reports the Bessel-corrected variance; it normalised with the population one.
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
        return y, mean, variance * (count - 1.0) / tf.maximum(count, 1.0)
    x32 = ops.cast(x, "float32")
    axes = tuple(range(len(x.shape) - 1))
    mean, variance = ops.moments(x32, axes=axes)
    y = ops.batch_normalization(x32, mean, variance, axis=-1, offset=offset, scale=scale, epsilon=epsilon)
    return ops.cast(y, x.dtype), mean, variance


def sparse_cross_entropy(logits: Any, targets: Any) -> Any:
    """Per-position ``-log softmax(logits)[target]`` (float32 logits ``[..., V]``, int targets).

    On TensorFlow the loss and its gradient are written out (max, exp, sum; the gradient
    ``softmax - one_hot`` from the kept exponentials): SparseSoftmaxCrossEntropyWithLogits
    runs on one thread, and over a training step's ``[160, 50258]`` logits the written-out
    form takes 14.2 vs 21.8 ms forward and backward (AMD EPYC, 2 cores). The gradient
    subtracts at the targets in place of building a one-hot matrix.
    """
    targets = ops.cast(targets, "int32")
    if keras.backend.backend() != "tensorflow":
        return ops.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    import tensorflow as tf

    @tf.custom_gradient
    def loss(x: Any) -> Any:
        peak = tf.stop_gradient(tf.reduce_max(x, axis=-1, keepdims=True))
        exps = tf.exp(x - peak)
        total = tf.reduce_sum(exps, axis=-1, keepdims=True)
        picked = tf.gather(x, targets[..., None], batch_dims=len(x.shape) - 1)
        value = (tf.math.log(total) + peak - picked)[..., 0]

        def grad(upstream: Any) -> Any:
            # softmax * upstream, then upstream taken off at each target: no one-hot matrix.
            scaled = exps * (upstream[..., None] / total)
            flat = tf.reshape(scaled, (-1, tf.shape(x)[-1]))
            rows = tf.range(tf.shape(flat)[0])
            where = tf.stack([rows, tf.reshape(targets, (-1,))], axis=1)
            flat = tf.tensor_scatter_nd_sub(flat, where, tf.reshape(upstream, (-1,)))
            return tf.reshape(flat, tf.shape(x))

        return value, grad

    return loss(ops.cast(logits, "float32"))
