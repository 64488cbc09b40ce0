"""One-token-per-row decoding: greedy search and sampling share this loop.

Rows that emitted EOS keep getting ``pad`` (their tokens are still computed, so shapes
stay static); the loop ends when every row is done or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from .base import DecodeModel, GenerationConfig, run_loop
from .processors import process_scores, sample_warped, suppress_special
from .sampling import greedy_tokens


def token_loop(
    model: DecodeModel, prompt: Any, image_kv: Any | None, seed: Any, config: GenerationConfig
) -> dict[str, Any]:
    """``prompt [B, P]`` -> ``{"sequences" [B*n, P+new], "scores" [B*n], "lengths" [B*n]}``.

    ``image_kv`` (if any) has B rows; the prompt is repeated ``num_return_sequences`` times,
    image-major, and the image K/V is not (CrossAttention groups each image's rows).
    """
    batch, prompt_length = prompt.shape
    repeats = config.num_return_sequences
    rows = batch * repeats
    total = prompt_length + config.max_new_tokens
    pad, eos = config.pad, config.eos_token_id

    cache = model.prefill(prompt, total, image_kv, repeats)
    if repeats > 1:
        prompt = ops.repeat(prompt, repeats, axis=0)  # image_kv stays one per input: see CrossAttention
    tokens = ops.concatenate([ops.cast(prompt, "int32"), ops.full((rows, config.max_new_tokens), pad, "int32")], 1)

    columns = ops.expand_dims(ops.arange(total, dtype="int32"), 0)

    def cond(step, tokens, cache, done, lengths, scores):
        return ops.logical_and(step < config.max_new_tokens, ops.logical_not(ops.all(done)))

    def select(logits, tokens, length, step, done, seed):
        """The next token per row and its log-probability; runs inside the compiled step."""
        logits = suppress_special(logits, config.suppress_from)
        processed = process_scores(logits, tokens, length, step, config)
        if config.do_sample:
            chosen = sample_warped(processed, config, seed, step)
        else:
            chosen = greedy_tokens(processed)
        chosen = ops.cast(ops.where(done, pad, chosen), "int32")
        log_probs = ops.log_softmax(logits, axis=-1)
        return chosen, ops.take_along_axis(log_probs, ops.expand_dims(chosen, 1), axis=1)[:, 0]

    def body(step, tokens, cache, done, lengths, scores):
        length = prompt_length + step
        (chosen, picked), cache = model.step(
            tokens, length, cache, image_kv, select=select, select_args=(tokens, length, step, done, seed)
        )
        scores = scores + ops.where(done, 0.0, picked)
        lengths = lengths + ops.cast(ops.logical_not(done), "int32")
        # A select, not ops.slice_update: TensorFlow runs that as XlaDynamicUpdateSlice in
        # the graph, ~70 us a step for a one-row buffer (seed configuration, nucleus).
        tokens = ops.where(columns == length, ops.expand_dims(chosen, 1), tokens)
        if eos is not None:
            done = ops.logical_or(done, chosen == eos)
        return step + 1, tokens, cache, done, lengths, scores

    state = (
        ops.convert_to_tensor(0, "int32"),
        tokens,
        cache,
        ops.zeros((rows,), "bool"),
        ops.zeros((rows,), "int32"),
        ops.zeros((rows,), "float32"),
    )
    _, tokens, _, _, lengths, scores = run_loop(cond, body, state, config.max_new_tokens, not model.use_cache)
    return {"sequences": tokens, "scores": scores, "lengths": lengths}
