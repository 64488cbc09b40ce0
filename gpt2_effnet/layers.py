"""Transformer building blocks, written once for GPT-2 and for the image encoder.

Everything here uses ``keras.ops`` only, so these layers run unchanged on any Keras
backend (the tests run them on TensorFlow and PyTorch). Kernels are ``[in, out]`` like GPT-2's ``Conv1D`` (``[nx, nf]``),
so pretrained weights load without transposes.

Caches are explicit values (:class:`KVCache`): a self-attention layer's keys and values
live in two preallocated ``[B, heads, max_len, head_dim]`` buffers written at the cache's
index, so a decode step has static shapes and compiles; image keys/values are projected
once per image and handed to every step. Heads first, the layout attention reads (else
every step transposes the cache), and one pair per layer (a stacked cache is copied
whole to update one layer).

A forward's three hot spots (dense products, the tied head's product, cache writes) go
through a :class:`Kernels` object: the plain one here, or one a decode plan chose
(:mod:`gpt2_effnet.decoding.kernels`), equal up to summation order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

# Masked scores get this instead of -inf so a fully masked row cannot produce NaN.
_MASK_VALUE = -1e9


@dataclass(frozen=True)
class KVCache:
    """Self-attention keys and values. ``buffers``: per layer a ``(keys, values)`` pair of
    ``[B, heads, max_len, head_dim]`` tensors (a layer's view: its pair); the next tokens
    are written at ``index``. ``rows [B]`` (beam search, one token a row): row ``i``
    continues buffer row ``rows[i]``. ``owned``: the holder drops these buffers after the
    call (a decode loop), so a write may go into them in place. A dataclass, so Keras
    hands it to a layer as it is."""

    buffers: Any
    index: Any = 0
    rows: Any = None
    owned: bool = False

    def replace(self, **changes: Any) -> "KVCache":
        return dataclasses.replace(self, **changes)


class Kernels:
    """How a forward computes its dense products, its head's product and its cache writes,
    written plainly (training and the full forward use this one)."""

    def dense(self, layer: keras.layers.Dense, x: Any) -> Any:
        return layer(x)

    def head_tables(self, decoder: Any) -> tuple[Any, ...]:
        """The tables the head multiplies (``[V, W]``; None for a missing special table)."""
        return decoder.head_tables()

    def head(self, hidden: Any, table: Any) -> Any:
        return ops.einsum("btw,vw->btv", hidden, ops.cast(table, hidden.dtype))

    def new_buffer(self, shape: tuple, dtype: str) -> Any:
        return ops.zeros(shape, dtype=dtype)

    def write(self, buffer: Any, new: Any, cache: KVCache) -> Any:
        """``buffer [B, H, L, D]`` with ``new [B, H, T, D]`` at ``cache.index``. With
        ``cache.rows`` gathered and written in one select: XLA then writes each buffer
        once, where a gather and then an update wrote it twice and copied it once."""
        if cache.rows is None:
            return ops.slice_update(buffer, [0, 0, cache.index, 0], new)
        slot = ops.arange(buffer.shape[2], dtype="int32") == ops.cast(cache.index, "int32")
        return ops.where(ops.reshape(slot, (1, 1, -1, 1)), new, ops.take(buffer, cache.rows, axis=0))


PLAIN = Kernels()


def attend(query: Any, key: Any, value: Any, mask: Any | None = None, return_weights: bool = False) -> Any:
    """Scaled dot-product attention, heads first: query ``[B, H, T, D]``, keys/values
    ``[B, H, S, D]`` -> ``[B, H, T, D]``; mask broadcasts to [B, H, T, S].

    Scores and softmax run in float32 whatever the compute dtype, as in GPT-2, so
    mixed precision does not change which token wins. ``return_weights`` also gives the
    float32 attention weights ``[B, H, T, S]`` (for attention maps; off in every hot path).
    """
    depth = ops.shape(query)[-1]
    scores = ops.einsum("bhtd,bhsd->bhts", query, key)
    scores = ops.cast(scores, "float32") / math.sqrt(depth)
    if mask is not None:
        scores = ops.where(mask, scores, ops.full_like(scores, _MASK_VALUE))
    probabilities = ops.softmax(scores, axis=-1)
    out = ops.einsum("bhts,bhsd->bhtd", ops.cast(probabilities, value.dtype), value)
    return (out, probabilities) if return_weights else out


def attention_mask(query_length: Any, key_length: int, query_offset: Any, causal: bool) -> Any | None:
    """Boolean ``[T, S]`` mask: query ``t`` (at absolute position offset+t) sees keys <= it."""
    if not causal:
        return None
    query_pos = ops.arange(query_length, dtype="int32") + ops.cast(query_offset, "int32")
    key_pos = ops.arange(key_length, dtype="int32")
    return ops.expand_dims(query_pos, 1) >= ops.expand_dims(key_pos, 0)


@keras.saving.register_keras_serializable("gpt2_effnet")
class SelfAttention(keras.layers.Layer):
    """GPT-2 attention: fused ``c_attn`` QKV projection, ``c_proj`` output projection."""

    def __init__(self, num_heads: int, causal: bool = True, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.c_attn: keras.layers.Dense | None = None
        self.c_proj: keras.layers.Dense | None = None
        self.resid_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        width = input_shape[-1]
        if width % self.num_heads:
            raise ValueError(f"{self.name}: width {width} is not divisible by {self.num_heads} heads")
        self.c_attn = keras.layers.Dense(3 * width, name="c_attn", dtype=self.dtype_policy)
        self.c_attn.build(input_shape)
        self.c_proj = keras.layers.Dense(width, name="c_proj", dtype=self.dtype_policy)
        self.c_proj.build(input_shape)

    def _split_heads(self, x: Any, parts: int) -> list[Any]:
        """``[B, T, parts * W]`` -> ``parts`` tensors ``[B, H, T, D]``."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        width = ops.shape(x)[-1] // parts
        x = ops.reshape(x, (batch, length, parts, self.num_heads, width // self.num_heads))
        x = ops.transpose(x, (2, 0, 3, 1, 4))  # [parts, B, H, T, D]: one transpose for all three
        # unstack, not x[i]: TensorFlow's gradient of a strided slice writes a zeroed
        # copy of the whole input per slice, which cost ~15 % of a small captioner's step.
        return ops.unstack(x, num=parts, axis=0)

    def call(
        self,
        x: Any,
        cache: KVCache | None = None,
        padding_mask: Any | None = None,
        training: bool | None = None,
        kernels: Kernels | None = None,
    ) -> tuple[Any, KVCache | None]:
        """``(output, cache)`` with this token's keys and values written into ``cache``
        (this layer's view; None stays None). ``padding_mask``: ``[B, S]`` boolean over keys."""
        kernels = kernels or PLAIN
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        query, key, value = self._split_heads(kernels.dense(self.c_attn, x), 3)
        offset = 0
        if cache is not None:
            offset = cache.index
            pair = tuple(kernels.write(buffer, ops.cast(new, buffer.dtype), cache)
                         for buffer, new in zip(cache.buffers, (key, value)))
            cache = cache.replace(buffers=pair)
            key, value = (ops.cast(buffer, query.dtype) for buffer in pair)
        mask = attention_mask(length, ops.shape(key)[2], offset, self.causal)
        if mask is not None:
            mask = mask[None, None]
        if padding_mask is not None:
            keys_ok = ops.cast(padding_mask, "bool")[:, None, None, :]
            mask = keys_ok if mask is None else ops.logical_and(mask, keys_ok)
        out = ops.transpose(attend(query, key, value, mask), (0, 2, 1, 3))
        out = kernels.dense(self.c_proj, ops.reshape(out, (batch, length, -1)))
        return self.resid_dropout(out, training=training), cache

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads, "causal": self.causal, "dropout": self.dropout}


@keras.saving.register_keras_serializable("gpt2_effnet")
class CrossAttention(keras.layers.Layer):
    """Text queries attend to the image sequence; K/V of the image are projected once.

    Named after Hugging Face's GPT-2 cross-attention (``q_attn`` for queries, ``c_attn``
    for the fused image K/V). Gated: the output is scaled by ``tanh(gate)`` with the gate
    starting at zero, so an untrained captioner's text path is exactly GPT-2.
    """

    def __init__(self, num_heads: int, gated: bool, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.gated = gated
        self.dropout = dropout
        self.resid_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        width = input_shape[-1]
        self.width = width
        self.q_attn = keras.layers.Dense(width, name="q_attn", dtype=self.dtype_policy)
        self.q_attn.build(input_shape)
        self.c_attn = keras.layers.Dense(2 * width, name="c_attn", dtype=self.dtype_policy)
        self.c_attn.build(input_shape)
        self.c_proj = keras.layers.Dense(width, name="c_proj", dtype=self.dtype_policy)
        self.c_proj.build(input_shape)
        if self.gated:
            self.gate = self.add_weight(name="gate", shape=(), initializer="zeros")

    def project_image(self, image_tokens: Any) -> Any:
        """Image sequence ``[B, S, W]`` -> keys/values ``[B, 2, H, S, D]``, reused at every step."""
        batch, length = ops.shape(image_tokens)[0], ops.shape(image_tokens)[1]
        kv = ops.reshape(
            self.c_attn(image_tokens), (batch, length, 2, self.num_heads, self.width // self.num_heads)
        )
        return ops.transpose(kv, (0, 2, 3, 1, 4))

    def call(
        self, x: Any, image_kv: Any, training: bool | None = None, return_attention: bool = False,
        kernels: Kernels | None = None,
    ) -> Any:
        """``return_attention``: also the per-head weights over the image ``[B, H, T, S]``.

        ``x`` may hold G rows per image (``[B * G, T, W]``, image-major, as beams and
        return sequences are laid out) against ``image_kv`` of the B images: the G rows'
        queries then attend as G * T query positions of their image, so the image K/V is
        neither repeated per row nor read G times at each decode step.
        """
        kernels = kernels or PLAIN
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        depth = self.width // self.num_heads
        images = ops.shape(image_kv)[0]
        query = ops.reshape(kernels.dense(self.q_attn, x), (images, -1, self.num_heads, depth))
        query = ops.transpose(query, (0, 2, 1, 3))
        key, value = ops.unstack(ops.cast(image_kv, query.dtype), num=2, axis=1)
        out = attend(query, key, value, return_weights=return_attention)
        if return_attention:
            out, weights = out
            keys = ops.shape(key)[2]  # [B, H, G * T, S] -> the rows' own [B * G, H, T, S]
            weights = ops.reshape(weights, (images, self.num_heads, -1, length, keys))
            weights = ops.reshape(ops.transpose(weights, (0, 2, 1, 3, 4)), (batch, self.num_heads, length, keys))
        out = ops.transpose(out, (0, 2, 1, 3))
        out = kernels.dense(self.c_proj, ops.reshape(out, (batch, length, self.width)))
        out = self.resid_dropout(out, training=training)
        if self.gated:
            out = out * ops.cast(ops.tanh(self.gate), out.dtype)
        return (out, weights) if return_attention else out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads, "gated": self.gated, "dropout": self.dropout}


@keras.saving.register_keras_serializable("gpt2_effnet")
class TransformerBlock(keras.layers.Layer):
    """A GPT-2 block: pre-LayerNorm self-attention, optional cross-attention, tanh-GELU MLP.

    ``causal=False`` and no cross-attention gives the image encoder's bidirectional block.
    """

    def __init__(
        self,
        num_heads: int,
        epsilon: float = 1e-5,
        causal: bool = True,
        cross_attention: str | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if cross_attention not in (None, "gated", "ungated"):
            raise ValueError(f"cross_attention must be None, 'gated' or 'ungated', got {cross_attention!r}")
        self.num_heads = num_heads
        self.epsilon = epsilon
        self.causal = causal
        self.cross_attention = cross_attention
        self.dropout = dropout
        policy = self.dtype_policy
        self.ln_1 = keras.layers.LayerNormalization(epsilon=epsilon, name="ln_1", dtype=policy)
        self.attn = SelfAttention(num_heads, causal=causal, dropout=dropout, name="attn", dtype=policy)
        if cross_attention is not None:
            self.ln_cross_attn = keras.layers.LayerNormalization(epsilon=epsilon, name="ln_cross_attn", dtype=policy)
            self.crossattention = CrossAttention(
                num_heads, gated=cross_attention == "gated", dropout=dropout, name="crossattention", dtype=policy
            )
        self.ln_2 = keras.layers.LayerNormalization(epsilon=epsilon, name="ln_2", dtype=policy)
        self.mlp_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        width = input_shape[-1]
        for layer in (self.ln_1, self.ln_2, self.attn):
            layer.build(input_shape)
        if self.cross_attention is not None:
            self.ln_cross_attn.build(input_shape)
            self.crossattention.build(input_shape)
        self.c_fc = keras.layers.Dense(4 * width, name="c_fc", dtype=self.dtype_policy)
        self.c_fc.build(input_shape)
        self.c_proj = keras.layers.Dense(width, name="c_proj", dtype=self.dtype_policy)
        self.c_proj.build(tuple(input_shape[:-1]) + (4 * width,))

    def call(
        self,
        x: Any,
        cache: KVCache | None = None,
        image_kv: Any | None = None,
        padding_mask: Any | None = None,
        training: bool | None = None,
        return_attention: bool = False,
        kernels: Kernels | None = None,
    ) -> tuple[Any, ...]:
        """``(x, cache)``; with ``return_attention`` also the cross-attention weights ``[B, H, T, S]``."""
        kernels = kernels or PLAIN
        attended, cache = self.attn(self.ln_1(x), cache=cache, padding_mask=padding_mask, training=training,
                                    kernels=kernels)
        x = x + attended
        weights = None
        if image_kv is not None:
            if self.cross_attention is None:
                raise ValueError(f"{self.name} has no cross-attention but was given image keys/values")
            crossed = self.crossattention(self.ln_cross_attn(x), image_kv, training=training,
                                          return_attention=return_attention, kernels=kernels)
            if return_attention:
                crossed, weights = crossed
            x = x + crossed
        hidden = keras.activations.gelu(kernels.dense(self.c_fc, self.ln_2(x)), approximate=True)
        x = x + self.mlp_dropout(kernels.dense(self.c_proj, hidden), training=training)
        return (x, cache, weights) if return_attention else (x, cache)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "epsilon": self.epsilon,
            "causal": self.causal,
            "cross_attention": self.cross_attention,
            "dropout": self.dropout,
        }
