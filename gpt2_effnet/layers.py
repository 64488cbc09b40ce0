"""Transformer building blocks, written once for GPT-2 and for the image encoder.

Everything here uses ``keras.ops`` only, so the model runs unchanged on the TensorFlow,
JAX and PyTorch backends. Kernels are ``[in, out]`` like GPT-2's ``Conv1D`` (``[nx, nf]``),
so pretrained weights load without transposes.

Caches are explicit tensors: a self-attention layer's keys and values live in two
preallocated ``[B, heads, max_len, head_dim]`` buffers (a ``(keys, values)`` pair) written
at ``cache_index``, so a decode step has static shapes and can be compiled; image
keys/values are projected once per image (``[B, 2, heads, S, head_dim]``) and handed to
every step. Keys and values are stored heads-first, the layout attention's batched
matmuls read: stored ``[B, S, heads, D]``, every decode step transposed the whole cache
and the image's K/V in every block (31 of ~250 ms of op time in a profiled nucleus call
at the seed's configuration). One pair per layer rather than one stacked tensor: a
graph-mode step otherwise copied the whole cache four times (slice out each layer,
update, split keys from values, stack again; ~20 % of the op time of GPT-2 124M at batch
32), where now each buffer is written once. In TensorFlow's plain graph (steps of more
than 16 rows, the SavedModel export) a decode step writes its one new position into the
buffers in place (:func:`fast_ops.write_slot`) rather than copying them; XLA does that by itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from .fast_ops import one_row_matmul, write_slot, writes_in_place

# Masked scores get this instead of -inf so a fully masked row cannot produce NaN.
_MASK_VALUE = -1e9


class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` whose one-row product (a decode step at batch 1) takes
    :func:`fast_ops.one_row_matmul`, and which multiplies an ``[N, K]`` copy of its kernel
    while a decode program that made one is traced (:func:`kernel_copies`); same weights,
    names and results up to summation order."""

    _kernel_copy: Any = None

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        out = None
        if not (self.quantization_mode or self.lora_enabled):
            if self._kernel_copy is not None:
                out = ops.einsum("...k,nk->...n", inputs, self._kernel_copy)
            else:
                out = one_row_matmul(inputs, self.kernel)
        if out is None:
            return super().call(inputs, training=training)
        if self.bias is not None:
            out = ops.add(out, self.bias)
        return out if self.activation is None else self.activation(out)


def dense_layers(model: Any) -> list[Dense]:
    """The model's :class:`Dense` layers, in a fixed order (the model's own)."""
    return [layer for layer in model._flatten_layers() if isinstance(layer, Dense)]


def transposed_kernels(model: Any) -> tuple[Any, ...]:
    """``[N, K]`` copies of the kernels of :func:`dense_layers`, for :func:`kernel_copies`."""
    return tuple(ops.transpose(layer.kernel) for layer in dense_layers(model))


@contextlib.contextmanager
def kernel_copies(model: Any, kernels: tuple[Any, ...] | None) -> Iterator[None]:
    """While tracing inside this block, the model's Dense layers multiply ``kernels`` (from
    :func:`transposed_kernels`, made in the same program) instead of their kernels; None
    changes nothing. The copies are the traced program's tensors: none outlives it."""
    layers = dense_layers(model) if kernels is not None else []
    if kernels is not None and len(kernels) != len(layers):
        raise ValueError(f"{len(kernels)} kernel copies for {len(layers)} Dense layers")
    for layer, kernel in zip(layers, kernels or ()):
        object.__setattr__(layer, "_kernel_copy", kernel)
    try:
        yield
    finally:
        for layer in layers:
            object.__setattr__(layer, "_kernel_copy", None)


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
        self.c_attn = Dense(3 * width, name="c_attn", dtype=self.dtype_policy)
        self.c_attn.build(input_shape)
        self.c_proj = Dense(width, name="c_proj", dtype=self.dtype_policy)
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
        cache: Any | None = None,
        cache_index: Any | None = None,
        padding_mask: Any | None = None,
        training: bool | None = None,
        cache_rows: Any | None = None,
        cache_in_place: bool = False,
    ) -> tuple[Any, Any | None]:
        """Return ``(output, updated_cache)``; without a cache the second item is None.

        ``padding_mask`` is a ``[B, S]`` boolean over keys (S = cache length when cached).
        ``cache_rows [B]`` (beam search, one token per row): row ``i`` continues the cache
        row ``cache_rows[i]``. Gathered and written in one select, so XLA writes each
        buffer once, where a gather and then an update wrote it twice and copied it once.
        ``cache_in_place``: the caller owns ``cache`` and drops it after this call (a decode
        loop), so one new token may be written into its buffers (:func:`fast_ops.write_slot`).
        """
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        query, key, value = self._split_heads(self.c_attn(x), 3)
        offset = 0
        if cache is not None:
            offset = cache_index
            key_cache, value_cache = cache  # each [B, H, max_len, D]
            if cache_rows is not None:
                if length != 1:
                    raise ValueError(f"cache_rows needs one new token per row, got {length}")
                slot = ops.arange(key_cache.shape[2], dtype="int32") == ops.cast(cache_index, "int32")
                slot = ops.reshape(slot, (1, 1, -1, 1))

                def write(buffer: Any, new: Any) -> Any:
                    gathered = ops.take(buffer, cache_rows, axis=0)
                    if writes_in_place():  # a gather's output is a new buffer: ours to write
                        return write_slot(gathered, new, cache_index, in_place=True)
                    return ops.where(slot, new, gathered)
            else:
                def write(buffer: Any, new: Any) -> Any:
                    return write_slot(buffer, new, cache_index, in_place=cache_in_place)
            key_cache = write(key_cache, ops.cast(key, key_cache.dtype))
            value_cache = write(value_cache, ops.cast(value, value_cache.dtype))
            cache = (key_cache, value_cache)
            key, value = ops.cast(key_cache, query.dtype), ops.cast(value_cache, query.dtype)
        mask = attention_mask(length, ops.shape(key)[2], offset, self.causal)
        if mask is not None:
            mask = mask[None, None]
        if padding_mask is not None:
            keys_ok = ops.cast(padding_mask, "bool")[:, None, None, :]
            mask = keys_ok if mask is None else ops.logical_and(mask, keys_ok)
        out = ops.transpose(attend(query, key, value, mask), (0, 2, 1, 3))
        out = ops.reshape(out, (batch, length, -1))
        return self.resid_dropout(self.c_proj(out), training=training), cache

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
        self.q_attn = Dense(width, name="q_attn", dtype=self.dtype_policy)
        self.q_attn.build(input_shape)
        self.c_attn = Dense(2 * width, name="c_attn", dtype=self.dtype_policy)
        self.c_attn.build(input_shape)
        self.c_proj = Dense(width, name="c_proj", dtype=self.dtype_policy)
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

    def call(self, x: Any, image_kv: Any, training: bool | None = None, return_attention: bool = False) -> Any:
        """``return_attention``: also the per-head weights over the image ``[B, H, T, S]``.

        ``x`` may hold G rows per image (``[B * G, T, W]``, image-major, as beams and
        return sequences are laid out) against ``image_kv`` of the B images: the G rows'
        queries then attend as G * T query positions of their image, so the image K/V is
        neither repeated per row nor read G times at each decode step.
        """
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        depth = self.width // self.num_heads
        images = ops.shape(image_kv)[0]
        query = ops.reshape(self.q_attn(x), (images, -1, self.num_heads, depth))
        query = ops.transpose(query, (0, 2, 1, 3))
        key, value = ops.unstack(ops.cast(image_kv, query.dtype), num=2, axis=1)
        out = attend(query, key, value, return_weights=return_attention)
        if return_attention:
            out, weights = out
            keys = ops.shape(key)[2]  # [B, H, G * T, S] -> the rows' own [B * G, H, T, S]
            weights = ops.reshape(weights, (images, self.num_heads, -1, length, keys))
            weights = ops.reshape(ops.transpose(weights, (0, 2, 1, 3, 4)), (batch, self.num_heads, length, keys))
        out = ops.transpose(out, (0, 2, 1, 3))
        out = self.resid_dropout(self.c_proj(ops.reshape(out, (batch, length, self.width))), training=training)
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
        self.c_fc = Dense(4 * width, name="c_fc", dtype=self.dtype_policy)
        self.c_fc.build(input_shape)
        self.c_proj = Dense(width, name="c_proj", dtype=self.dtype_policy)
        self.c_proj.build(tuple(input_shape[:-1]) + (4 * width,))

    def call(
        self,
        x: Any,
        cache: Any | None = None,
        cache_index: Any | None = None,
        image_kv: Any | None = None,
        padding_mask: Any | None = None,
        training: bool | None = None,
        return_attention: bool = False,
        cache_rows: Any | None = None,
        cache_in_place: bool = False,
    ) -> tuple[Any, ...]:
        """``(x, cache)``; with ``return_attention`` also the cross-attention weights ``[B, H, T, S]``.
        ``cache_rows``, ``cache_in_place``: see SelfAttention.call."""
        attended, cache = self.attn(
            self.ln_1(x), cache=cache, cache_index=cache_index, padding_mask=padding_mask, training=training,
            cache_rows=cache_rows, cache_in_place=cache_in_place,
        )
        x = x + attended
        weights = None
        if image_kv is not None:
            if self.cross_attention is None:
                raise ValueError(f"{self.name} has no cross-attention but was given image keys/values")
            crossed = self.crossattention(self.ln_cross_attn(x), image_kv, training=training, return_attention=return_attention)
            if return_attention:
                crossed, weights = crossed
            x = x + crossed
        hidden = keras.activations.gelu(self.c_fc(self.ln_2(x)), approximate=True)
        x = x + self.mlp_dropout(self.c_proj(hidden), training=training)
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
