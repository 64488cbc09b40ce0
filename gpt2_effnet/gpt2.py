"""The GPT-2 decoder: embeddings, blocks, final LayerNorm, LM head tied to the embeddings.

With no image it is plain GPT-2 (``load_gpt2`` returns one). In a captioner every block
also carries a cross-attention sub-layer, and ``num_special_tokens`` extra trainable
embeddings (BOS first) sit after the vocabulary, so ids ``vocab_size..`` are ours while
the pretrained table stays untouched (and can stay frozen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from .config import GPT2Config
from .layers import PLAIN, Kernels, KVCache, TransformerBlock


# The logit of an id outside ``output_vocabulary``: finite, so softmax, log-softmax and the
# samplers' penalties stay NaN-free, and low enough that exp() of it is exactly 0.
EXCLUDED_LOGIT = -1e9


# GPT-2's pretrained parameters, listed once. Names are Hugging Face's without
# "transformer." (every weight reader maps its own format onto them); each entry gives the
# tensor's shape for a width W and where the decoder keeps it.
Shape = Callable[[GPT2Config], tuple[int, ...]]
GLOBAL_PARAMETERS: dict[str, tuple[Shape, Callable[["GPT2Decoder"], Any]]] = {
    "wte.weight": (lambda c: (c.vocab_size, c.n_embd), lambda d: d.wte.embeddings),
    "wpe.weight": (lambda c: (c.n_positions, c.n_embd), lambda d: d.wpe.embeddings),
    "ln_f.weight": (lambda c: (c.n_embd,), lambda d: d.ln_f.gamma),
    "ln_f.bias": (lambda c: (c.n_embd,), lambda d: d.ln_f.beta),
}
# Per block, after the "h.{i}." prefix.
BLOCK_PARAMETERS: dict[str, tuple[Shape, Callable[[TransformerBlock], Any]]] = {
    "ln_1.weight": (lambda c: (c.n_embd,), lambda b: b.ln_1.gamma),
    "ln_1.bias": (lambda c: (c.n_embd,), lambda b: b.ln_1.beta),
    "attn.c_attn.weight": (lambda c: (c.n_embd, 3 * c.n_embd), lambda b: b.attn.c_attn.kernel),
    "attn.c_attn.bias": (lambda c: (3 * c.n_embd,), lambda b: b.attn.c_attn.bias),
    "attn.c_proj.weight": (lambda c: (c.n_embd, c.n_embd), lambda b: b.attn.c_proj.kernel),
    "attn.c_proj.bias": (lambda c: (c.n_embd,), lambda b: b.attn.c_proj.bias),
    "ln_2.weight": (lambda c: (c.n_embd,), lambda b: b.ln_2.gamma),
    "ln_2.bias": (lambda c: (c.n_embd,), lambda b: b.ln_2.beta),
    "mlp.c_fc.weight": (lambda c: (c.n_embd, 4 * c.n_embd), lambda b: b.c_fc.kernel),
    "mlp.c_fc.bias": (lambda c: (4 * c.n_embd,), lambda b: b.c_fc.bias),
    "mlp.c_proj.weight": (lambda c: (4 * c.n_embd, c.n_embd), lambda b: b.c_proj.kernel),
    "mlp.c_proj.bias": (lambda c: (c.n_embd,), lambda b: b.c_proj.bias),
}


def parameter_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every pretrained tensor of a plain GPT-2 with this config, by canonical name, in load order."""
    shapes = {name: shape(config) for name, (shape, _) in GLOBAL_PARAMETERS.items()}
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{suffix}": shape(config) for suffix, (shape, _) in BLOCK_PARAMETERS.items()})
    return shapes


@keras.saving.register_keras_serializable("gpt2_effnet")
class GPT2Decoder(keras.Model):
    """Token ids ``[B, T]`` -> logits ``[B, T, vocab_size + num_special_tokens]`` (float32)."""

    def __init__(
        self,
        gpt2_config: GPT2Config | dict[str, Any],
        num_special_tokens: int = 0,
        cross_attention: str | None = None,
        dropout: float = 0.0,
        output_vocabulary: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(gpt2_config, dict):
            gpt2_config = GPT2Config(**gpt2_config)
        self.gpt2_config = gpt2_config
        self.num_special_tokens = num_special_tokens
        self.cross_attention = cross_attention
        self.dropout = dropout
        cfg = gpt2_config
        self.output_vocabulary = _output_vocabulary(output_vocabulary, cfg.vocab_size)
        policy = self.dtype_policy
        self.wte = keras.layers.Embedding(cfg.vocab_size, cfg.n_embd, name="wte", dtype=policy)
        self.wpe = keras.layers.Embedding(cfg.n_positions, cfg.n_embd, name="wpe", dtype=policy)
        self.wte_special = (
            keras.layers.Embedding(num_special_tokens, cfg.n_embd, name="wte_special", dtype=policy)
            if num_special_tokens
            else None
        )
        self.embed_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.blocks = [
            TransformerBlock(
                cfg.n_head,
                epsilon=cfg.layer_norm_epsilon,
                causal=True,
                cross_attention=cross_attention,
                dropout=dropout,
                name=f"h_{i}",
                dtype=policy,
            )
            for i in range(cfg.n_layer)
        ]
        self.ln_f = keras.layers.LayerNormalization(epsilon=cfg.layer_norm_epsilon, name="ln_f", dtype=policy)
        self.build((None, None))

    # -- structure ---------------------------------------------------------------------
    def build(self, input_shape: tuple = (None, None)) -> None:
        if self.built:
            return
        width = self.gpt2_config.n_embd
        self.wte.build((None, None))
        self.wpe.build((None, None))
        if self.wte_special is not None:
            self.wte_special.build((None, None))
        for block in self.blocks:
            block.build((None, None, width))
        self.ln_f.build((None, None, width))
        self.built = True

    @property
    def total_vocab_size(self) -> int:
        return self.gpt2_config.vocab_size + self.num_special_tokens

    def named_weights(self) -> dict[str, keras.Variable]:
        """Pretrained GPT-2 variables by their Hugging Face name (without ``transformer.``).

        This is the one name map every foreign-format loader targets; captioner-only
        weights (cross-attention, special tokens) are deliberately not in it.
        """
        names = {name: where(self) for name, (_, where) in GLOBAL_PARAMETERS.items()}
        for i, block in enumerate(self.blocks):
            names.update({f"h.{i}.{suffix}": where(block) for suffix, (_, where) in BLOCK_PARAMETERS.items()})
        return names

    # -- forward -------------------------------------------------------------------------
    def _embed(self, token_ids: Any, position_ids: Any, training: bool | None) -> Any:
        # Look the two tables up separately rather than concatenating them: the pretrained
        # table is large (50257 rows), and a concatenation would copy it at every step.
        token_ids = ops.cast(token_ids, "int32")
        vocab = self.gpt2_config.vocab_size
        tokens = ops.take(self.wte.embeddings, ops.minimum(token_ids, vocab - 1), axis=0)
        if self.wte_special is not None:
            special = ops.take(self.wte_special.embeddings, ops.maximum(token_ids - vocab, 0), axis=0)
            tokens = ops.where(ops.expand_dims(token_ids >= vocab, -1), ops.cast(special, tokens.dtype), tokens)
        tokens = ops.cast(tokens, self.compute_dtype)
        positions = ops.cast(self.wpe(position_ids), self.compute_dtype)
        return self.embed_dropout(tokens + positions, training=training)

    def head(self, hidden: Any, compact: bool = False, kernels: Kernels | None = None) -> Any:
        """Final LayerNorm and the tied LM head: hidden ``[B, T, W]`` -> float32 logits ``[B, T, V]``.

        Public so a training step can apply it to the positions that have targets only
        (the head is the largest matmul of a small captioner with GPT-2's vocabulary).
        With an ``output_vocabulary`` only its rows of the table are multiplied; the
        logits are then spread back to all V ids with :data:`EXCLUDED_LOGIT` elsewhere,
        so every sampler sees the same restriction, or with ``compact=True`` returned
        as ``[B, T, K + 1]`` (the kept ids in :meth:`compact_targets` order, then one
        column standing for every excluded id) for a loss that needs no more.
        ``kernels`` give the tables and their product (a decode plan's may leave the
        special tokens' table out: then so are their columns).
        """
        kernels = kernels or PLAIN
        hidden = self.ln_f(hidden)
        tables = [table for table in kernels.head_tables(self) if table is not None]
        parts = [kernels.head(hidden, table) for table in tables]
        logits = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        return self._spread(ops.cast(logits, "float32"), compact, specials=len(tables) > 1)

    def head_tables(self) -> tuple[Any, Any | None]:
        """What :meth:`head` multiplies: the token table (its kept rows with an
        ``output_vocabulary``) and the special tokens' table (None without specials)."""
        table = self.wte.embeddings
        if self.output_vocabulary is not None:
            table = ops.take(table, ops.convert_to_tensor(self.output_vocabulary, "int32"), axis=0)
        return table, None if self.wte_special is None else self.wte_special.embeddings

    def _spread(self, logits: Any, compact: bool, specials: bool = True) -> Any:
        if self.output_vocabulary is None:
            return logits
        excluded = ops.full_like(logits[..., :1], EXCLUDED_LOGIT)
        logits = ops.concatenate([logits, excluded], axis=-1)
        if compact:
            return logits
        return ops.take(logits, ops.convert_to_tensor(self._compact_index(specials), "int32"), axis=-1)

    def compact_targets(self, token_ids: Any) -> Any:
        """Token ids -> column of ``head(..., compact=True)`` (excluded ids -> the last column)."""
        if self.output_vocabulary is None:
            return token_ids
        return ops.take(ops.convert_to_tensor(self._compact_index(), "int32"), ops.cast(token_ids, "int32"), axis=0)

    def _compact_index(self, specials: bool = True) -> np.ndarray:
        """For each of the V ids, its column among the kept ids and specials, or K + S if
        excluded (``specials=False``: the plain vocabulary's ids, among the kept ids, or K)."""
        kept = len(self.output_vocabulary)
        vocab = self.gpt2_config.vocab_size
        extra = self.num_special_tokens if specials else 0
        index = np.full(vocab + extra, kept + extra, np.int32)
        index[list(self.output_vocabulary)] = np.arange(kept, dtype=np.int32)
        index[vocab:] = kept + np.arange(extra, dtype=np.int32)
        return index

    def call(
        self,
        token_ids: Any,
        image_kv: Any | None = None,
        padding_mask: Any | None = None,
        position_ids: Any | None = None,
        training: bool | None = None,
    ) -> Any:
        """Full (uncached) forward. ``image_kv`` comes from :meth:`project_image`."""
        return self.head(self.hidden_states(token_ids, image_kv, padding_mask, position_ids, training))

    def hidden_states(
        self,
        token_ids: Any,
        image_kv: Any | None = None,
        padding_mask: Any | None = None,
        position_ids: Any | None = None,
        training: bool | None = None,
    ) -> Any:
        """The last block's output ``[B, T, W]``, before :meth:`head`."""
        token_ids = ops.convert_to_tensor(token_ids)
        if position_ids is None:
            position_ids = ops.expand_dims(ops.arange(ops.shape(token_ids)[1], dtype="int32"), 0)
        x = self._embed(token_ids, position_ids, training)
        layer_kv = self._per_layer(image_kv)
        for block, kv in zip(self.blocks, layer_kv):
            x, _ = block(x, image_kv=kv, padding_mask=padding_mask, training=training)
        return x

    def _per_layer(self, image_kv: Any | None) -> list[Any | None]:
        """``[B, n_layer, ...]`` -> one tensor per block, by unstacking (its gradient is one stack,
        where indexing each block's slice costs a zero-filled copy of the whole tensor apiece)."""
        if image_kv is None:
            return [None] * len(self.blocks)
        return ops.unstack(image_kv, num=len(self.blocks), axis=1)

    def cross_attention_weights(self, token_ids: Any, image_kv: Any) -> Any:
        """Each block's cross-attention weights over the image, ``[B, n_layer, n_head, T, S]`` (float32).

        A full forward over given tokens: for a generated caption fed back with its BOS,
        position t holds the attention that produced token t + 1 (the model is causal, so
        this is exactly what the decode loop computed). Decoding itself never pays for it.
        """
        token_ids = ops.convert_to_tensor(token_ids)
        position_ids = ops.expand_dims(ops.arange(ops.shape(token_ids)[1], dtype="int32"), 0)
        x = self._embed(token_ids, position_ids, training=False)
        maps = []
        for block, kv in zip(self.blocks, self._per_layer(image_kv)):
            x, _, weights = block(x, image_kv=kv, return_attention=True)
            maps.append(weights)
        return ops.stack(maps, axis=1)

    # -- incremental decoding ----------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, kernels: Kernels | None = None) -> KVCache:
        """An empty :class:`~gpt2_effnet.layers.KVCache` at index 0: per layer a ``(keys, values)``
        pair of ``[B, n_head, max_length, head_dim]`` buffers (``kernels`` allocate them)."""
        cfg = self.gpt2_config
        if max_length > cfg.n_positions:
            raise ValueError(f"max_length {max_length} exceeds GPT-2's n_positions {cfg.n_positions}")
        shape, new = (batch_size, cfg.n_head, max_length, cfg.head_dim), (kernels or PLAIN).new_buffer
        return KVCache(tuple((new(shape, self.compute_dtype), new(shape, self.compute_dtype)) for _ in range(cfg.n_layer)))

    def call_with_cache(
        self,
        token_ids: Any,
        cache: KVCache,
        image_kv: Any | None = None,
        padding_mask: Any | None = None,
        position_ids: Any | None = None,
        kernels: Kernels | None = None,
    ) -> tuple[Any, KVCache]:
        """Feed ``token_ids [B, T]`` at positions ``cache.index`` on: ``(logits [B, T, V], the
        cache with their keys and values, at index + T)``. Shapes are static for a fixed T, so
        one compiled step serves the whole decode loop. ``padding_mask [B, max_len]``: False
        on keys never to attend to; ``position_ids [B, T]``: default ``index..index+T-1``."""
        token_ids = ops.convert_to_tensor(token_ids)
        length = ops.shape(token_ids)[1]
        if position_ids is None:
            position_ids = ops.expand_dims(ops.arange(length, dtype="int32") + ops.cast(cache.index, "int32"), 0)
        x = self._embed(token_ids, position_ids, training=False)
        pairs = []
        for block, pair, kv in zip(self.blocks, cache.buffers, self._per_layer(image_kv)):
            x, layer = block(x, cache=cache.replace(buffers=pair), image_kv=kv, padding_mask=padding_mask, kernels=kernels)
            pairs.append(layer.buffers)
        cache = KVCache(tuple(pairs), cache.index + length)
        return self.head(x, kernels=kernels), cache

    def project_image(self, image_tokens: Any) -> Any:
        """Every block's cross-attention K/V of the image: ``[B, n_layer, 2, n_head, S, head_dim]``."""
        if self.cross_attention is None:
            raise ValueError("this decoder has no cross-attention (it is a plain GPT-2)")
        return ops.stack([block.crossattention.project_image(image_tokens) for block in self.blocks], axis=1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "gpt2_config": dataclasses.asdict(self.gpt2_config),
            "num_special_tokens": self.num_special_tokens,
            "cross_attention": self.cross_attention,
            "dropout": self.dropout,
            "output_vocabulary": None if self.output_vocabulary is None else list(self.output_vocabulary),
        }


def _output_vocabulary(ids: Sequence[int] | None, vocab_size: int) -> tuple[int, ...] | None:
    if ids is None:
        return None
    kept = tuple(sorted({int(i) for i in ids}))
    if not kept or kept[0] < 0 or kept[-1] >= vocab_size:
        raise ValueError(f"output_vocabulary must hold ids in [0, {vocab_size}), got {len(kept)} ids from {kept[:1]} to {kept[-1:]}")
    return kept
