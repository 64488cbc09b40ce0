"""The products a decode step makes, as its plan names them: dense layers, the tied head,
cache writes (a :class:`~gpt2_effnet.layers.Kernels` the model core calls).

Each variant computes what the plain kernels do, up to summation order, and exists
because it measured faster somewhere (the tuning table says where and by how much):

* head ``"transposed"``: a ``[W, V]`` copy of the table, made once per call before an
  XLA loop; on some CPUs XLA's dot reads it faster than the ``[V, W]`` table as stored.
* head ``"bfloat16"`` (``precision="bfloat16-head"``): a bfloat16 copy of the table,
  products summed in float32 (:func:`logits_from_table`).
* dense ``"transposed"``: ``[N, K]`` copies of the block kernels, made once per call in
  the graph before a wide XLA loop (XLA's own transposes are slow).
* dense ``"split-one-row"``: a one-row product inside XLA as two half-products, which
  XLA gives a thread each (it runs a one-row product on one thread).
* cache write ``"in-place"``: in TensorFlow's plain graph, one new position written into
  buffers the loop owns (``InplaceUpdate``), where ``slice_update`` copies them whole.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import keras
from keras import ops

from ..layers import Kernels, KVCache


def dense_layers(decoder: Any) -> list[keras.layers.Dense]:
    """The decoder's dense layers, in a fixed order (the model's own)."""
    return [layer for layer in decoder._flatten_layers() if isinstance(layer, keras.layers.Dense)]


def copies_bytes(decoder: Any) -> int:
    """What float32 ``[N, K]`` copies of the decoder's kernels take."""
    return 4 * sum(math.prod(layer.kernel.shape) for layer in dense_layers(decoder))


def prepare(plan: Any, decoder: Any, specials: bool) -> tuple[Any, Any]:
    """``(head tables, kernel copies)`` for :class:`DecodeKernels`, made in the program before
    the loop (so from the live weights, once per call, and by the graph's fast transposes);
    None where the plan multiplies what is stored."""
    tables = copies = None
    if plan.head != "stored":
        convert = ops.transpose if plan.head == "transposed" else (lambda table: ops.cast(table, "bfloat16"))
        tables = tuple(None if t is None else convert(t) for t in decoder.head_tables()[: None if specials else 1])
    if plan.dense == "transposed":
        copies = tuple(ops.transpose(layer.kernel) for layer in dense_layers(decoder))
    return tables, copies


class DecodeKernels(Kernels):
    """The kernels ``plan`` names. ``specials=False``: the head leaves out the special tokens'
    table (decoding never emits them; their column cost ~5 % of a seed-configuration beam step)."""

    def __init__(self, plan: Any, decoder: Any, prepared: tuple[Any, Any], specials: bool = True) -> None:
        self.plan, self.specials = plan, specials
        self.tables, copies = prepared
        self.copies = {} if copies is None else {id(layer): c for layer, c in zip(dense_layers(decoder), copies)}

    def dense(self, layer: keras.layers.Dense, x: Any) -> Any:
        if self.plan.dense == "stored" or layer.quantization_mode or layer.lora_enabled:
            return layer(x)
        if self.plan.dense == "transposed":
            out = ops.einsum("...k,nk->...n", x, self.copies[id(layer)])
        else:
            out = split_one_row(x, ops.cast(layer.kernel, x.dtype))
            if out is None:
                return layer(x)
        if layer.bias is not None:
            out = ops.add(out, ops.cast(layer.bias, out.dtype))
        return layer.activation(out)

    def head_tables(self, decoder: Any) -> tuple[Any, ...]:
        return (decoder.head_tables() if self.tables is None else self.tables)[: None if self.specials else 1]

    def head(self, hidden: Any, table: Any) -> Any:
        if self.plan.head == "bfloat16":
            return logits_from_table(hidden, table)
        if self.plan.head == "transposed":  # a 2-D product: TensorFlow's batched one is slower
            product = ops.matmul(ops.reshape(hidden, (-1, hidden.shape[-1])), ops.cast(table, hidden.dtype))
            return ops.reshape(product, (-1, *hidden.shape[1:-1], table.shape[1]))
        return super().head(hidden, table)

    def new_buffer(self, shape: tuple, dtype: str) -> Any:
        """In a plain graph an ``Empty`` op: ``ops.zeros`` may be folded into a constant and equal
        constants merged, and a write in place would then leak into the other buffers."""
        if self.plan.cache_write != "in-place" or not _plain_tf_graph():
            return super().new_buffer(shape, dtype)
        import tensorflow as tf

        return tf.raw_ops.Empty(shape=tf.constant([int(d) for d in shape], tf.int32), dtype=tf.as_dtype(dtype), init=True)

    def write(self, buffer: Any, new: Any, cache: KVCache) -> Any:
        in_place = self.plan.cache_write == "in-place" and new.shape[2] == 1 and None not in buffer.shape
        if not in_place or not _plain_tf_graph() or (cache.rows is None and not cache.owned):
            return super().write(buffer, new, cache)
        if cache.rows is not None:  # a gather's output is a new buffer: ours to write
            buffer = ops.take(buffer, cache.rows, axis=0)
        import tensorflow as tf

        batch, heads, length, depth = buffer.shape
        rows = tf.range(batch * heads, dtype=tf.int32) * length + tf.cast(cache.index, tf.int32)
        flat = tf.raw_ops.InplaceUpdate(x=tf.reshape(buffer, (-1, depth)), i=rows, v=tf.reshape(new, (-1, depth)))
        return tf.reshape(flat, buffer.shape)


def split_one_row(x: Any, kernel: Any) -> Any | None:
    """``x @ kernel`` for an ``x`` of one row (``[1, ..., 1, K]``) as the sum of its two halves
    along ``K``, taken as one batched product; None for other shapes."""
    shape, depth = tuple(x.shape), x.shape[-1]
    if any(d != 1 for d in shape[:-1]) or depth is None or depth % 2:
        return None
    halves = ops.matmul(ops.reshape(x, (2, 1, depth // 2)), ops.reshape(kernel, (2, depth // 2, kernel.shape[1])))
    return ops.reshape(ops.sum(halves, axis=0), shape[:-1] + (kernel.shape[1],))


def _plain_tf_graph() -> bool:
    """Whether TensorFlow is tracing a graph that is not an XLA program."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext

    return not tf.executing_eagerly() and not GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def logits_from_table(hidden: Any, table: Any) -> Any:
    """float32 ``hidden [..., W]`` times ``table [V, W]`` transposed: ``[..., V]``, each product
    taken between ``table.dtype`` values (``hidden`` is rounded to it) and summed in float32.

    TensorFlow's CPU kernels have no bfloat16 x bfloat16 -> float32 matmul, so there it is
    an XLA program (inlined when the caller is one). Elsewhere both sides are cast to
    float32 first, which computes the same products.
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
