"""Where the captioner looked: per-word cross-attention maps over the image.

Decoding stays as fast as ever; afterwards one forward pass over the generated tokens
(:meth:`~gpt2_effnet.captioner.Captioner.attention_maps`) gives, for every token, the
attention over the image grid that produced it. Tokens are grouped into words (a GPT-2
token that starts with a space starts a word) and a word's map is its tokens' mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class CaptionAttention:
    caption: str
    words: list[str]
    # [n_words, n_layer, h, w]: each word's attention over the image grid, per layer (mean over heads).
    word_maps: np.ndarray
    token_ids: list[int]
    # [n_tokens, n_layer, h, w], the same per token.
    token_maps: np.ndarray

    def layer_mean(self) -> np.ndarray:
        """``[n_words, h, w]``: the maps averaged over the layers (what the pictures show)."""
        return self.word_maps.mean(axis=1)


def group_words(tokenizer: Any, token_ids: list[int]) -> list[tuple[str, list[int]]]:
    """``(word, [token positions])`` for each word of a caption."""
    words: list[tuple[str, list[int]]] = []
    for position, token in enumerate(token_ids):
        piece = tokenizer.decode([token])
        if not words or piece.startswith(" ") or not piece.strip():
            words.append((piece, [position]))
        else:
            text, positions = words[-1]
            words[-1] = (text + piece, positions + [position])
    return [(text.strip(), positions) for text, positions in words if text.strip()]


def captions_with_attention(captioner: Any, images: Any, tokenizer: Any, **generation: Any) -> list[CaptionAttention]:
    """Caption ``images`` (keywords as ``generate()``) and return each caption with its word maps."""
    from .decoding import generate_captions

    generation.setdefault("eos_token_id", tokenizer.eos_token_id)
    ids = np.asarray(generate_captions(captioner, images, **generation))
    return attention_for_captions(captioner, images, ids, tokenizer, generation["eos_token_id"])


def attention_for_captions(
    captioner: Any, images: Any, ids: np.ndarray, tokenizer: Any, eos_token_id: int | None
) -> list[CaptionAttention]:
    """Word maps for captions already generated (``ids [B, T]``, BOS not included)."""
    from .decoding import cut_at_eos

    maps = captioner.attention_maps(images, ids)
    results = []
    for row, row_maps in zip(np.asarray(ids), maps):
        tokens = cut_at_eos(row, eos_token_id)
        token_maps = np.moveaxis(row_maps[:, : len(tokens)], 1, 0)  # [n_tokens, n_layer, h, w]
        words = group_words(tokenizer, tokens)
        word_maps = (
            np.stack([token_maps[positions].mean(axis=0) for _, positions in words])
            if words else np.zeros((0,) + token_maps.shape[1:], np.float32)
        )
        results.append(CaptionAttention(
            caption=tokenizer.decode(tokens).strip(),
            words=[w for w, _ in words],
            word_maps=word_maps,
            token_ids=tokens,
            token_maps=token_maps,
        ))
    return results
