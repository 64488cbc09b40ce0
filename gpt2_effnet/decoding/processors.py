"""Score processors and sampling filters, with static shapes so they compile inside the loop.

They act on a ``[N, V]`` score matrix given the token buffer ``tokens [N, L]`` (prompt +
generated so far, then filler) and ``length`` (a scalar tensor: how many leading columns
are real). Semantics follow the Hugging Face processors of the same name, including that
the prompt counts for repetition and n-gram bans (GPT-2 is decoder-only).

Per-token masks are built with ``scatter_update`` into a ``[N, V + 1]`` buffer whose last
column swallows every "no-op" write; since all writes store the same value, duplicate
indices are harmless on every backend, and nothing ``N x L x V``-sized is materialised.
"""

from __future__ import annotations

from typing import Any, Callable

from keras import ops

from .base import NEG_INF, GenerationConfig
from .sampling import sample_tokens

# top_p_filter ranks this many tokens first and sorts the whole vocabulary only if needed.
TOP_P_SHORTLIST = 256


def _scatter_mask(columns: Any, vocab_size: int) -> Any:
    """``columns [N, M]`` (value ``vocab_size`` = nothing) -> boolean ``[N, V]`` of marked ids."""
    rows, width = columns.shape
    row_ids = ops.broadcast_to(ops.expand_dims(ops.arange(rows, dtype="int32"), 1), (rows, width))
    columns = ops.minimum(ops.cast(columns, "int32"), vocab_size)  # ids beyond the logits: ignore
    indices = ops.reshape(ops.stack([row_ids, columns], axis=-1), (rows * width, 2))
    marks = ops.scatter_update(
        ops.zeros((rows, vocab_size + 1), "float32"), indices, ops.ones((rows * width,), "float32")
    )
    return marks[:, :vocab_size] > 0.5


def seen_tokens(tokens: Any, length: Any, vocab_size: int) -> Any:
    """Boolean ``[N, V]``: which ids occur in ``tokens[:, :length]``."""
    positions = ops.expand_dims(ops.arange(tokens.shape[1], dtype="int32"), 0)
    columns = ops.where(positions < length, ops.cast(tokens, "int32"), vocab_size)
    return _scatter_mask(columns, vocab_size)


def banned_ngram_tokens(tokens: Any, length: Any, ngram_size: int, vocab_size: int) -> Any:
    """Boolean ``[N, V]``: ids that would repeat an n-gram already in ``tokens[:, :length]``.

    An n-gram starting at ``j`` (``j + n <= length``) whose first n-1 tokens equal the
    current last n-1 tokens bans its own last token.
    """
    rows, total = tokens.shape
    n = ngram_size
    windows = total - n + 1
    if windows <= 0:
        return ops.zeros((rows, vocab_size), "bool")
    tokens = ops.cast(tokens, "int32")
    starts = ops.arange(windows, dtype="int32")
    match = ops.broadcast_to(ops.expand_dims(starts <= length - n, 0), (rows, windows))
    for i in range(n - 1):
        index = ops.maximum(length - n + 1 + i, 0)
        suffix_token = ops.take(tokens, ops.reshape(index, (1,)), axis=1)  # [N, 1]
        match = ops.logical_and(match, tokens[:, i : i + windows] == suffix_token)
    columns = ops.where(match, tokens[:, n - 1 : n - 1 + windows], vocab_size)
    return _scatter_mask(columns, vocab_size)


def suppress_special(scores: Any, first_special: int | None) -> Any:
    """Never generate ids >= ``first_special`` (the captioner's BOS and other extras)."""
    vocab_size = scores.shape[-1]
    if first_special is None or first_special >= vocab_size:
        return scores
    keep = ops.arange(vocab_size, dtype="int32") < first_special
    return ops.where(ops.expand_dims(keep, 0), scores, NEG_INF)


def process_scores(scores: Any, tokens: Any, length: Any, new_tokens: Any, config: GenerationConfig) -> Any:
    """Repetition penalty, no-repeat n-grams, min_new_tokens, in Hugging Face's order.

    ``new_tokens`` is how many tokens have been generated so far (scalar tensor).
    """
    vocab_size = scores.shape[-1]
    if config.uses_repetition_penalty:
        seen = seen_tokens(tokens, length, vocab_size)
        penalty = config.repetition_penalty
        penalised = ops.where(scores < 0, scores * penalty, scores / penalty)
        scores = ops.where(seen, penalised, scores)
    if config.no_repeat_ngram_size > 0:
        banned = banned_ngram_tokens(tokens, length, config.no_repeat_ngram_size, vocab_size)
        scores = ops.where(banned, NEG_INF, scores)
    if config.min_new_tokens > 0 and config.eos_token_id is not None and config.eos_token_id < vocab_size:
        is_eos = ops.expand_dims(ops.arange(vocab_size, dtype="int32") == config.eos_token_id, 0)
        too_early = new_tokens < config.min_new_tokens
        scores = ops.where(ops.logical_and(is_eos, too_early), NEG_INF, scores)
    return scores


def processes(config: GenerationConfig) -> bool:
    """Whether :func:`process_scores` changes anything under ``config``."""
    return (
        config.uses_repetition_penalty
        or config.no_repeat_ngram_size > 0
        or (config.min_new_tokens > 0 and config.eos_token_id is not None)
    )


# -- exact top-k without ranking the whole row ---------------------------------------------------

# top_k_by_chunks splits a row into chunks this wide and ranks only the best ones.
TOP_K_CHUNK = 256


def top_k_by_chunks(values: Any, k: int, transform: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """``ops.top_k(transform(values), k)`` per row of ``values [N, V]``: the same values and
    ids, ties going to the lower id, without ranking (or writing) the transformed row.

    The k best chunks of :data:`TOP_K_CHUNK` columns by their peak hold the k best
    values (a value outside them has k chunk peaks at or above it, each earlier on a
    tie), so only those k chunks are ranked. ``transform`` must act elementwise and
    never decrease (log-softmax plus a constant per row does not): it then commutes
    with the chunk max, so it is applied to the peaks and to the k chunks only. (Beam
    search's TopK over K x 50258 took ~12 % of a seed-configuration step.)
    """
    transform = transform or (lambda v: v)
    rows, width = values.shape
    chunks = -(-width // TOP_K_CHUNK)
    if chunks <= 2 * k:  # narrow rows: ranking them whole is as cheap
        return ops.top_k(transform(values), k)
    padded = ops.pad(values, [[0, 0], [0, chunks * TOP_K_CHUNK - width]], constant_values=NEG_INF)
    peaks = ops.max(ops.reshape(padded, (rows, chunks, TOP_K_CHUNK)), axis=-1)
    _, best = ops.top_k(transform(peaks), k)
    # Chunks back in column order, so the candidates keep the row's order and a tie
    # among them goes to the lower id, as top_k over the whole row would.
    best = -ops.top_k(-ops.cast(best, "int32"), k)[0]
    offsets = ops.arange(TOP_K_CHUNK, dtype="int32")[None, None, :]
    columns = ops.reshape(best[:, :, None] * TOP_K_CHUNK + offsets, (rows, k * TOP_K_CHUNK))
    picked = ops.take_along_axis(values, ops.minimum(columns, width - 1), axis=1)
    top, where = ops.top_k(ops.where(columns < width, transform(picked), NEG_INF), k)
    return top, ops.take_along_axis(columns, ops.cast(where, "int32"), axis=1)


# -- sampling filters ---------------------------------------------------------------------------


def top_k_filter(logits: Any, k: int) -> Any:
    """Keep the k largest logits per row (and anything tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # The min of the top k, not its last column: XLA on a CPU turns a top_k whose values
    # are sliced from the end into a full sort of the row (8.7 vs 0.29 ms over 50258).
    kth = ops.min(ops.top_k(logits, k)[0], axis=-1, keepdims=True)
    return ops.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: Any, p: Any) -> Any:
    """Keep the smallest set of most probable tokens whose probabilities add up to >= p.

    A token is kept when the probability mass of the tokens ranked strictly above it is
    < p, so the set is minimal; the top token is always kept (p -> 0 is greedy). Ties with
    the last kept logit are kept too. ``p`` may be a scalar tensor (a program's runtime
    value): then the caller has decided that the filter is on.
    """
    if isinstance(p, (int, float)) and p >= 1.0:
        return logits
    vocab_size = logits.shape[-1]
    log_total = ops.logsumexp(logits, axis=-1, keepdims=True)

    def threshold_among(count: int) -> tuple[Any, Any]:
        """(smallest kept logit, whether the ``count`` best tokens already reach p) per row."""
        ranked = ops.top_k(logits, count)[0]  # descending
        probs = ops.exp(ranked - log_total)
        cumulative = ops.cumsum(probs, axis=-1)
        keep_count = ops.maximum(ops.sum(ops.cast(cumulative - probs < p, "int32"), axis=-1), 1)
        keep_count = ops.minimum(keep_count, count)
        threshold = ops.take_along_axis(ranked, ops.expand_dims(keep_count - 1, -1), axis=-1)
        return threshold, cumulative[:, -1] >= p

    if vocab_size <= TOP_P_SHORTLIST:
        threshold, _ = threshold_among(vocab_size)
    else:
        # A trained model's nucleus is usually a few dozen tokens: rank a shortlist (cheap
        # top-k) and search the whole vocabulary only when some row's shortlist falls short of p.
        threshold, reached = threshold_among(TOP_P_SHORTLIST)
        threshold = ops.cond(ops.all(reached), lambda: threshold, lambda: _searched_threshold(logits, log_total, p))
    return ops.where(logits < threshold, NEG_INF, logits)


def _searched_threshold(logits: Any, log_total: Any, p: Any) -> Any:
    """The whole-vocabulary search: narrowed by value, else (ties) bisected by key."""
    threshold, found = _narrowed_threshold(logits, log_total, p)
    return ops.cond(ops.all(found), lambda: threshold, lambda: _bisected_threshold(logits, log_total, p))


# _narrowed_threshold: value halvings, then this many candidates ranked exactly.
NARROWING_STEPS = 16
NARROWED_CANDIDATES = 64


def _narrowed_threshold(logits: Any, log_total: Any, p: Any) -> tuple[Any, Any]:
    """top_p_filter's threshold in half the passes of :func:`_bisected_threshold`:
    (``[N, 1]`` threshold, ``[N]`` whether it was found).

    Bisecting by logit value instead of by float32 key brackets the threshold in
    :data:`NARROWING_STEPS` masked sums (the bracket ``(lo, hi]`` keeps mass-above(lo)
    >= p and mass-above(hi) < p); the :data:`NARROWED_CANDIDATES` smallest logits above
    ``lo`` are then ranked exactly, and the first kept one is the threshold. A row is
    not found when none of them is kept for sure: more tied or crowded logits than that
    past ``lo`` (a flat row of equal logits), for which the caller bisects by key.
    (GPT-2 124M nucleus on flat rows at batch 32: 1.12x the call with bisection alone.)
    """
    probs = ops.exp(logits - log_total)
    finite = ops.isfinite(logits)
    hi = ops.max(logits, axis=-1)  # nothing above it: mass 0 < p
    smallest = ops.min(ops.where(finite, logits, float("inf")), axis=-1)
    lo = smallest - (1.0 + ops.abs(smallest))  # every finite logit above it (at any magnitude)
    mass_lo = ops.sum(probs, axis=-1)

    def halve(_: Any, bracket: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        lo, hi, mass_lo = bracket
        middle = lo + (hi - lo) * 0.5
        mass = _mass_above(logits, middle, probs)
        kept = mass < p
        return ops.where(kept, lo, middle), ops.where(kept, middle, hi), ops.where(kept, mass_lo, mass)

    # A loop, not unrolled: the same speed, and XLA compiles one body instead of sixteen.
    lo, hi, mass_lo = ops.fori_loop(0, NARROWING_STEPS, halve, (lo, hi, mass_lo))
    # The smallest logits above lo, ascending (+inf past the last one); taken as a top_k of
    # the negated values, never indexed from the end (XLA would sort the row for that).
    ascending = -ops.top_k(ops.where(logits > lo[:, None], -logits, NEG_INF), NARROWED_CANDIDATES)[0]
    real = ops.isfinite(ascending)
    candidate_probs = ops.where(real, ops.exp(ascending - log_total), 0.0)
    # Mass strictly above each candidate: what is above lo minus the candidates at or below it.
    at_or_below = ops.cast(ascending[:, None, :] <= ascending[:, :, None], "float32")
    above = mass_lo[:, None] - ops.sum(at_or_below * candidate_probs[:, None, :], axis=-1)
    # Logits equal to the last candidate may continue past the list: only values below it
    # (or any value, when the list did not fill) have every logit at or below them listed.
    last = ops.max(ops.where(real, ascending, NEG_INF), axis=-1, keepdims=True)
    complete = ops.logical_or(ascending < last, ops.logical_not(ops.all(real, axis=-1, keepdims=True)))
    kept = ops.logical_and(ops.logical_and(real, complete), above < p)
    threshold = ops.min(ops.where(kept, ascending, float("inf")), axis=-1, keepdims=True)
    return threshold, ops.any(kept, axis=-1)


def _mass_above(values: Any, cut: Any, probs: Any) -> Any:
    """``[N]``: the probability mass of the entries of ``values [N, V]`` strictly above ``cut [N]``
    (one masked sum: a halving step of both whole-vocabulary searches)."""
    return ops.sum(ops.where(values > cut[:, None], probs, 0.0), axis=-1)


def _order_keys(values: Any) -> Any:
    """float32 -> int32 keys in the same order (IEEE bits, negatives' magnitude bits flipped)."""
    bits = ops.view(ops.cast(values, "float32"), "int32")
    return ops.where(bits < 0, ops.bitwise_xor(bits, 0x7FFFFFFF), bits)


def _bisected_threshold(logits: Any, log_total: Any, p: Any) -> Any:
    """top_p_filter's threshold without sorting the vocabulary: ``[N, 1]``.

    A token is kept when the mass strictly above it is < p; that mass only falls as the
    logit rises, so the smallest kept logit is found by bisecting over the 2**32 float32
    values in order (as int keys): 32 masked sums over the vocabulary, exact (no float
    midpoints), 2-3x faster than a full sort, and summed in id order, not rank order,
    which rounds less (against float64 on flat rows it disagreed on 1 row of 32, the
    sorted cumulative sum on 10).
    """
    probs = ops.exp(logits - log_total)
    keys = _order_keys(logits)
    high = ops.max(keys, axis=-1)  # nothing above it: mass 0 < p, so the top token is always kept
    low = ops.min(keys, axis=-1) - 1  # everything above it: mass 1 >= p

    def halve(_: Any, bracket: tuple[Any, Any]) -> tuple[Any, Any]:
        low, high = bracket
        middle = ops.right_shift(low, 1) + ops.right_shift(high, 1) + ops.bitwise_and(ops.bitwise_and(low, high), 1)
        mass_above = _mass_above(keys, middle, probs)
        kept = mass_above < p
        return ops.where(kept, low, middle), ops.where(kept, middle, high)

    # The key range is 2**32 wide: 32 halvings leave high = low + 1.
    low, high = ops.fori_loop(0, 32, halve, (low, high))
    # The smallest kept logit, compared as a float below (so -0.0 and 0.0 stay tied).
    return ops.min(ops.where(keys >= high[:, None], logits, float("inf")), axis=-1, keepdims=True)


def warp_logits(logits: Any, config: GenerationConfig) -> Any:
    """Temperature, then top-k, then top-p: Hugging Face's warper order."""
    if config.uses_temperature:
        logits = logits / config.temperature
    logits = top_k_filter(logits, config.top_k)
    return _top_p(logits, config)


def _top_p(logits: Any, config: GenerationConfig) -> Any:
    return top_p_filter(logits, config.top_p) if config.uses_top_p else logits


def sample_warped(scores: Any, config: GenerationConfig, seed: Any, step: Any) -> Any:
    """One token per row from ``softmax(warp_logits(scores))``: what sampling draws.

    With top-k on, everything after the top-k runs on the k candidates instead of the
    whole vocabulary. The draw's noise is keyed by token id, so it picks the token the
    whole-vocabulary draw picks; the candidates are put back in id order, so an exact tie
    also goes to the same (lowest) id. A tie at the k-th place (HF keeps every tied token),
    or fewer than k finite scores, takes the whole-vocabulary path.
    """
    vocab_size = scores.shape[-1]
    k = config.top_k
    if not 0 < k < vocab_size - 1:
        return sample_tokens(warp_logits(scores, config), seed, step)
    if config.uses_temperature:
        scores = scores / config.temperature
    values, ids = ops.top_k(scores, k + 1)  # descending; one more to see a tie at the k-th

    def on_candidates() -> Any:
        # Back to id order: the ids sorted ascending (as -top_k(-ids)) and where each came from.
        # Gathering top_k's ids by an argsort instead made XLA sort the whole row (11 ms).
        negated, order = ops.top_k(-ids[:, :k], k)
        kept = _top_p(ops.take_along_axis(values[:, :k], order, axis=-1), config)
        picked = sample_tokens(kept, seed, step, ids=-negated)
        return ops.take_along_axis(-negated, picked[:, None], axis=-1)[:, 0]

    def on_vocabulary() -> Any:
        return sample_tokens(_top_p(top_k_filter(scores, k), config), seed, step)

    # A tie at the k-th place: the (k+1)-th value (the smallest) occurs twice or more. Said
    # without indexing the k-th column, which XLA on a CPU would turn into a full sort.
    smallest = ops.min(values, axis=-1, keepdims=True)
    ambiguous = ops.any(ops.sum(ops.cast(values == smallest, "int32"), axis=-1) >= 2)
    return ops.cond(ambiguous, on_vocabulary, on_candidates)
