"""Beam search over a batch of inputs x K beams, folded into B*K rows of one decode loop.

The bookkeeping is Hugging Face ``generate()``'s (transformers >= 4.50), so results match
it token for token:

* each step keeps the best 2K of the K*V continuations; the best K that did not just end
  keep running (their cache rows are gathered with ``ops.take``);
* a continuation that ends (EOS, or the length limit) and ranks in the top K of those 2K
  becomes a finished hypothesis: it keeps its score, stops growing, and competes for the
  K finished slots. Its score is ``sum(log p) / len ** length_penalty`` where ``len``
  counts the *new* tokens including the EOS (the prompt, or the captioner's BOS, is not
  counted). ``length_penalty > 0`` favours longer captions, ``< 0`` shorter ones;
* an input is done when no running beam can still beat its worst finished one (with
  ``early_stopping=False`` the running beam is judged at its current length, with
  ``"never"`` at the longest reachable length when the penalty favours length, with
  ``True`` as soon as K hypotheses are finished); the loop stops when every input is done.

Processors (repetition penalty, n-gram ban, min_new_tokens) act on the log-probabilities,
as in Hugging Face's beam search.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from .base import IMPOSSIBLE, DecodeModel, GenerationConfig, gather_rows, run_loop
from .processors import process_scores, processes, suppress_special, top_k_by_chunks, warp_logits
from .sampling import sample_without_replacement


def beam_loop(
    model: DecodeModel, prompt: Any, image_kv: Any | None, config: GenerationConfig, seed: Any = 0
) -> dict[str, Any]:
    """``prompt [B, P]`` -> the best ``num_return_sequences`` finished hypotheses per input.

    With ``do_sample`` (beam sampling) the 2K candidates are drawn from the warped
    (temperature, top-k, top-p) scores without replacement instead of taken as the top
    2K, then ranked by score, as in Hugging Face's beam sampling.

    Returns ``{"sequences" [B*n, P+new], "scores" [B*n], "lengths" [B*n]}``, best first.
    """
    batch, prompt_length = prompt.shape
    beams = config.num_beams
    candidates = 2 * beams
    rows = batch * beams
    total = prompt_length + config.max_new_tokens
    vocab_size = model.vocab_size
    if beams * vocab_size < candidates:
        raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {vocab_size}")
    alpha = config.length_penalty
    eos = config.eos_token_id

    cache = model.prefill(prompt, total, image_kv, beams)  # image_kv stays one per input: see CrossAttention
    start = ops.concatenate(
        [ops.cast(prompt, "int32"), ops.full((batch, config.max_new_tokens), config.pad, "int32")], axis=1
    )
    running = ops.repeat(ops.expand_dims(start, 1), beams, axis=1)  # [B, K, L]
    # Only beam 0 is live at first, so the K copies of the prompt do not yield K equal beams.
    first_live = np.full((1, beams), IMPOSSIBLE, np.float32)
    first_live[0, 0] = 0.0
    running_scores = ops.repeat(ops.convert_to_tensor(first_live), batch, axis=0)
    top_half = ops.expand_dims(ops.arange(candidates, dtype="int32") < beams, 0)
    columns = ops.reshape(ops.arange(total, dtype="int32"), (1, 1, total))
    batch_offsets = ops.expand_dims(ops.arange(batch, dtype="int32") * beams, 1)

    def cond(step, running, running_scores, cache, parents, done_seq, done_scores, done_flag, done_len, open_, all_hit):
        go = ops.logical_and(step < config.max_new_tokens, ops.any(open_))
        go = ops.logical_and(go, ops.logical_not(all_hit))
        if config.early_stopping is True:
            go = ops.logical_and(go, ops.logical_not(ops.all(done_flag)))
        return go

    def select(logits, flat, length, step, running_scores):
        """The best 2K continuations per input, ``([B, 2K] scores, [B, 2K] flat ids)``; runs
        inside the compiled step, so the [rows, V] log-probabilities never leave it."""
        if not config.do_sample and not processes(config):
            return best_continuations(suppress_special(logits, config.suppress_from), running_scores)
        log_probs = ops.log_softmax(suppress_special(logits, config.suppress_from), axis=-1)
        log_probs = process_scores(log_probs, flat, length, step, config)
        if config.do_sample:
            log_probs = warp_logits(log_probs, config)
        totals = ops.reshape(log_probs, (batch, beams, vocab_size)) + ops.expand_dims(running_scores, 2)
        totals = ops.reshape(totals, (batch, beams * vocab_size))
        if config.do_sample:
            drawn = sample_without_replacement(totals, candidates, seed, step)
            drawn_scores = ops.take_along_axis(totals, drawn, axis=1)
            top_scores, order = ops.top_k(drawn_scores, candidates)
            top_index = ops.take_along_axis(drawn, ops.cast(order, "int32"), axis=1)
        else:
            top_scores, top_index = ops.top_k(totals, candidates)
        return top_scores, ops.cast(top_index, "int32")

    def best_continuations(logits, running_scores):
        """:func:`select` without processors or sampling: the log-softmax plus each beam's
        score is a non-decreasing map of its logits, so each beam's best 2K come from
        :func:`top_k_by_chunks` and the [rows, V] totals are never written; then the best
        2K of each input's K x 2K, beam-major like the flat K*V index, so ties go alike."""
        # The log-softmax written out as TensorFlow computes it, so the scores equal the
        # full ranking's bit for bit (tests/test_decoding.py).
        peak = ops.max(logits, axis=-1, keepdims=True)
        log_total = ops.log(ops.sum(ops.exp(logits - peak), axis=-1, keepdims=True))
        base = ops.reshape(running_scores, (rows, 1))
        per_beam = min(candidates, vocab_size)  # a beam cannot give more than its row
        scores, ids = top_k_by_chunks(logits, per_beam, lambda v: ((v - peak) - log_total) + base)
        ids = ops.cast(ids, "int32") + ops.expand_dims(ops.arange(rows, dtype="int32") % beams, 1) * vocab_size
        scores = ops.reshape(scores, (batch, beams * per_beam))
        top_scores, order = ops.top_k(scores, candidates)
        top_index = ops.take_along_axis(ops.reshape(ids, (batch, beams * per_beam)), ops.cast(order, "int32"), axis=1)
        return top_scores, top_index

    def body(step, running, running_scores, cache, parents, done_seq, done_scores, done_flag, done_len, open_, all_hit):
        length = prompt_length + step
        flat = ops.reshape(running, (rows, total))
        (top_scores, top_index), cache = model.step(
            flat, length, cache, image_kv, parents, select=select, select_args=(flat, length, step, running_scores)
        )
        source = top_index // vocab_size
        token = top_index % vocab_size
        cand = gather_rows(running, source)
        cand = ops.where(columns == length, ops.expand_dims(token, 2), cand)
        hits = ops.broadcast_to(length + 1 >= total, token.shape)
        if eos is not None:
            hits = ops.logical_or(hits, token == eos)
        hit_cost = ops.cast(hits, "float32") * IMPOSSIBLE

        # Beams that keep running: the best K continuations that did not just end.
        running_scores, keep = ops.top_k(top_scores + hit_cost, beams)
        running = gather_rows(cand, keep)
        # The next step continues each beam's parent cache row (gathered inside that step).
        parents = ops.reshape(gather_rows(source, keep) + batch_offsets, (rows,))

        # Hypotheses that just ended compete with the finished ones for the K slots.
        new_len = step + 1
        ended = ops.logical_and(hits, top_half)
        penalised = top_scores / ops.power(ops.cast(new_len, "float32"), alpha)
        if config.early_stopping is True:
            full = ops.all(done_flag, axis=1, keepdims=True)
            penalised = penalised + ops.cast(full, "float32") * IMPOSSIBLE
        penalised = penalised + ops.cast(ops.logical_not(ops.expand_dims(open_, 1)), "float32") * IMPOSSIBLE
        penalised = penalised + ops.cast(ops.logical_not(ended), "float32") * IMPOSSIBLE
        merged_scores = ops.concatenate([done_scores, penalised], axis=1)
        done_scores, best = ops.top_k(merged_scores, beams)
        done_seq = gather_rows(ops.concatenate([done_seq, cand], axis=1), best)
        done_flag = gather_rows(ops.concatenate([done_flag, ended], axis=1), best)
        new_lengths = ops.full((batch, candidates), 1, "int32") * new_len
        done_len = gather_rows(ops.concatenate([done_len, new_lengths], axis=1), best)

        # Can a running beam still beat the worst finished hypothesis?
        step = step + 1
        if config.early_stopping == "never" and config.rewards_length:
            best_length = ops.convert_to_tensor(float(config.max_new_tokens), "float32")
        else:
            best_length = ops.cast(step, "float32")
        best_possible = running_scores[:, :1] / ops.power(best_length, alpha)
        worst_done = ops.where(done_flag, ops.min(done_scores, axis=1, keepdims=True), IMPOSSIBLE)
        open_ = ops.logical_and(open_, ops.any(best_possible > worst_done, axis=1))
        all_hit = ops.all(hits)
        return step, running, running_scores, cache, parents, done_seq, done_scores, done_flag, done_len, open_, all_hit

    state = (
        ops.convert_to_tensor(0, "int32"),
        running,
        running_scores,
        cache,
        ops.arange(rows, dtype="int32"),
        running,
        ops.full((batch, beams), IMPOSSIBLE, "float32"),
        ops.zeros((batch, beams), "bool"),
        ops.zeros((batch, beams), "int32"),
        ops.ones((batch,), "bool"),
        ops.convert_to_tensor(False),
    )
    state = run_loop(cond, body, state, config.max_new_tokens, not model.use_cache)
    done_seq, done_scores, done_len = state[5], state[6], state[8]
    keep = config.num_return_sequences
    return {
        "sequences": ops.reshape(done_seq[:, :keep], (batch * keep, total)),
        "scores": ops.reshape(done_scores[:, :keep], (batch * keep,)),
        "lengths": ops.reshape(done_len[:, :keep], (batch * keep,)),
    }
