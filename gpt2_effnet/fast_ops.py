"""Operations that ``keras.ops`` makes dearer than they need be on one backend, written once.

Layers, losses and samplers stay backend-agnostic by calling these instead.
"""

from __future__ import annotations

import functools
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


def channel_affine(x: Any, scale: Any, offset: Any) -> Any:
    """``x * scale + offset`` with per-channel (last axis) ``scale`` and ``offset``, in ``x``'s dtype.

    Elementwise ops that broadcast over a 3-wide channel axis are slow in TensorFlow's
    CPU kernels: an EfficientNet's input normalisation over 8 images of 224 px took 3.4 ms
    (float32) / 4.0 ms (bfloat16) as Keras writes it; the same map as a 1x1 depthwise
    convolution plus bias (oneDNN) takes 0.75 / 0.64 ms (AMD EPYC, 2 cores).
    """
    scale, offset = ops.cast(scale, x.dtype), ops.cast(offset, x.dtype)
    if keras.backend.backend() == "tensorflow" and len(x.shape) == 4:
        import tensorflow as tf

        kernel = tf.reshape(scale, (1, 1, -1, 1))
        return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"), offset)
    return x * scale + offset


def bias_add(x: Any, bias: Any) -> Any:
    """``x + bias`` over the last axis, as TensorFlow's BiasAdd where that is the backend.

    oneDNN fuses convolution, bias and activation into one kernel only when the bias is
    a BiasAdd: after ``conv + bias`` (an AddV2) the swish stays a pass of its own.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.nn.bias_add(x, ops.cast(bias, x.dtype))
    return x + ops.cast(bias, x.dtype)


def fuses_conv_and_frozen_norm(dtype: str) -> bool:
    """Whether ``frozen_batch_norm`` right after a convolution becomes part of its kernel.

    TensorFlow's oneDNN rewrite turns Conv2D -> FusedBatchNorm (inference) -> activation
    into one fused convolution in float32; in bfloat16 the three stay apart (measured,
    TF 2.21), while Conv2D -> BiasAdd -> activation fuses in both.
    """
    return keras.backend.backend() == "tensorflow" and dtype == "float32"


def frozen_batch_norm(x: Any, scale: Any, offset: Any, mean: Any, variance: Any, epsilon: float) -> Any:
    """Inference-mode batch norm over the last axis with float32 statistics, in ``x``'s dtype."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean=mean, variance=variance, epsilon=epsilon, is_training=False
        )
        return y
    factor, shift = norm_as_affine(scale, offset, mean, variance, epsilon)
    return x * ops.cast(factor, x.dtype) + ops.cast(shift, x.dtype)


def norm_as_affine(scale: Any, offset: Any, mean: Any, variance: Any, epsilon: float) -> tuple[Any, Any]:
    """An inference batch norm as ``x * factor + shift``: ``(factor, shift)`` per channel."""
    factor = scale * ops.rsqrt(variance + epsilon)
    return factor, offset - mean * factor


def one_row_matmul(x: Any, kernel: Any) -> Any | None:
    """``x @ kernel`` for an ``x`` of one row (``[1, ..., 1, K]``) inside an XLA program, as the
    sum of its two halves along ``K`` taken as one batched product; None where it does not
    apply (the caller then takes the plain product).

    XLA's CPU code runs a one-row ``[1, K] x [K, N]`` product on one thread, and a decode
    step at batch 1 is such products over every block weight: on a 2-core Intel Xeon
    (AMX) they read 18.6 GB/s, against 22.9 GB/s as two half-products that XLA gives a
    thread each (GPT-2 124M greedy at batch 1: 26.2 -> 32.7 new tokens/s). Outside XLA
    (TensorFlow's graph, the SavedModel export) the split was slower (greedy 19.5 vs
    22-25 tokens/s), so it stays out there. The halves are summed after, so the float32
    result differs from the plain product in its last bits only (another summation
    order, as between any two BLAS libraries).
    """
    if keras.backend.backend() != "tensorflow" or not _inside_xla():
        return None
    shape, depth = tuple(x.shape), x.shape[-1]
    if any(d != 1 for d in shape[:-1]) or depth is None or depth % 2 or len(kernel.shape) != 2:
        return None
    halves = ops.matmul(ops.reshape(x, (2, 1, depth // 2)), ops.reshape(kernel, (2, depth // 2, kernel.shape[1])))
    return ops.reshape(ops.sum(halves, axis=0), shape[:-1] + (kernel.shape[1],))


def new_buffer(shape: tuple, dtype: str) -> Any:
    """A zero-filled tensor that is its own allocation, for :func:`write_slot` to write into.

    In TensorFlow's plain graph, ``keras.ops.zeros`` may be folded into a constant, and
    equal constants into one: a buffer written in place must be neither, so there it is
    an ``Empty`` op (never folded or merged). Elsewhere ``keras.ops.zeros``.
    """
    if _plain_tf_graph():
        import tensorflow as tf

        dims = [int(d) for d in shape]
        return tf.raw_ops.Empty(shape=tf.constant(dims, tf.int32), dtype=tf.as_dtype(dtype), init=True)
    return ops.zeros(shape, dtype=dtype)


def write_slot(buffer: Any, new: Any, index: Any, in_place: bool = False) -> Any:
    """``buffer [B, H, S, D]`` with ``new [B, H, 1, D]`` written at position ``index`` of axis 2.

    ``in_place=True`` is a promise by the caller that it owns ``buffer`` (made by
    :func:`new_buffer` or a computation, never a constant or variable) and never reads it
    again. In TensorFlow's plain graph the slot is then written into the buffer itself
    (``InplaceUpdate`` on its ``B * H`` rows) where ``keras.ops.slice_update`` copies the
    whole buffer through an XLA op: GPT-2 124M greedy at batch 32, 24 writes a step took
    ~20 ms of a ~110 ms step (Intel Xeon, 2 cores) against ~4 ms in place. Inside XLA
    (which updates loop buffers in place itself), eagerly and on other backends it is
    ``slice_update``.
    """
    batch, heads, length, depth = buffer.shape
    if not in_place or new.shape[2] != 1 or None in (batch, heads, length, depth) or not _plain_tf_graph():
        return ops.slice_update(buffer, [0, 0, index, 0], ops.cast(new, buffer.dtype))
    import tensorflow as tf

    rows = tf.range(batch * heads, dtype=tf.int32) * length + tf.cast(index, tf.int32)
    flat = tf.raw_ops.InplaceUpdate(
        x=tf.reshape(buffer, (-1, depth)), i=rows, v=tf.reshape(tf.cast(new, buffer.dtype), (-1, depth))
    )
    return tf.reshape(flat, buffer.shape)


def writes_in_place() -> bool:
    """Whether :func:`write_slot` with ``in_place=True`` writes into the buffer here (TensorFlow's
    plain graph), so a buffer the caller made itself needs no other copy."""
    return _plain_tf_graph()


def _plain_tf_graph() -> bool:
    """Whether TensorFlow is tracing a graph that is not an XLA program."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly() and not _inside_xla()


def _inside_xla() -> bool:
    """Whether TensorFlow is tracing into an XLA program (``jit_compile=True``) right now."""
    import tensorflow as tf

    try:
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
    except ImportError:  # a TensorFlow without it: keep the plain product
        return False
    return not tf.executing_eagerly() and GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def logits_from_table(hidden: Any, table: Any) -> Any:
    """float32 ``hidden [..., W]`` times ``table [V, W]`` transposed: ``[..., V]``, each product
    taken between ``table.dtype`` values (``hidden`` is rounded to it) and summed in float32.

    For a bfloat16 table this halves what a decode step reads for its largest matmul, the
    tied output head, and keeps float32 logits (bfloat16 ones would tie most of the
    vocabulary's near neighbours). TensorFlow's CPU kernels have no bfloat16 x bfloat16
    -> float32 matmul, so there it is an XLA program (inlined when the caller is one):
    the 50258 x 256 head takes 0.90 / 2.65 / 4.60 ms at 1 / 12 / 32 rows against 2.19 /
    4.81 / 9.01 ms in float32 (AMD EPYC, 2 cores, AVX-512 BF16). Elsewhere both sides
    are cast to float32 first, which computes the same products.
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        return _tf_logits_from_table()(hidden, table.value if isinstance(table, keras.Variable) else table)
    if name == "jax":
        import jax.numpy as jnp

        return jnp.einsum("...w,vw->...v", hidden.astype(table.dtype), table, preferred_element_type=jnp.float32)
    low = ops.cast(ops.cast(hidden, table.dtype), "float32")
    return ops.einsum("...w,vw->...v", low, ops.cast(table, "float32"))


@functools.lru_cache(maxsize=1)
def _tf_logits_from_table() -> Any:
    import tensorflow as tf

    def product(hidden: Any, table: Any) -> Any:
        flat = tf.reshape(tf.cast(hidden, table.dtype), (-1, hidden.shape[-1]))
        one_row = flat.shape[0] == 1
        if one_row:
            # XLA runs a one-row bfloat16 product as a float32 one; inside an XLA loop it
            # then converts the whole table once, before the loop, and every step reads
            # float32 (1.75 ms a step for 50257 x 256, vs 1.09 ms as a two-row product).
            flat = tf.concat([flat, tf.zeros_like(flat)], 0)
        logits = tf.linalg.matmul(flat, table, transpose_b=True, output_type=tf.float32)
        if one_row:
            logits = logits[:1]
        return tf.reshape(logits, tf.concat([tf.shape(hidden)[:-1], tf.shape(table)[:1]], 0))

    return tf.function(product, jit_compile=True, autograph=False)
