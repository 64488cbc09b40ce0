"""Samplers against references nobody here wrote: exhaustive search, direct numpy, full forwards."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from keras import ops

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.config import GPT2Config
from gpt2_effnet.gpt2 import GPT2Decoder
from gpt2_effnet.decoding import DecodeModel, GenerationConfig, compiled_programs, generate, generate_captions
from gpt2_effnet.decoding import beam as beam_module
from gpt2_effnet.decoding.processors import TOP_K_CHUNK, banned_ngram_tokens, top_k_by_chunks, top_k_filter, top_p_filter
from gpt2_effnet.decoding.sampling import sample_tokens

REPO = Path(__file__).resolve().parents[1]


def tiny_decoder(vocab_size: int, seed: int, n_positions: int = 16, scale: float = 0.5) -> GPT2Decoder:
    """Random GPT-2 with large weights, so that sequence scores are far apart (no near-ties)."""
    decoder = GPT2Decoder(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=16, n_layer=2, n_head=2))
    rng = np.random.default_rng(seed)
    for variable in decoder.weights:
        variable.assign(rng.normal(0.0, scale, variable.shape).astype("float32"))
    return decoder


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def exhaustive(decoder: GPT2Decoder, prompt: list[int], max_new: int, eos: int | None, alpha: float):
    """Every finished sequence (EOS only at its end, or max_new long) with sum(log p) / len ** alpha."""
    vocab = decoder.total_vocab_size
    sequences: list[tuple[int, ...]] = []
    for length in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos is not None and eos in seq[:-1]:
                continue
            if length < max_new and (eos is None or seq[-1] != eos):
                continue
            sequences.append(seq)
    scores = {}
    for length in range(1, max_new + 1):
        group = [s for s in sequences if len(s) == length]
        if not group:
            continue
        ids = np.array([prompt + list(s) for s in group])
        logp = log_softmax(np.asarray(decoder(ids)))
        for row, seq in enumerate(group):
            total = sum(logp[row, len(prompt) - 1 + t, tok] for t, tok in enumerate(seq))
            scores[seq] = total / length**alpha
    return scores


@pytest.mark.parametrize(
    "eos, alpha", [(None, 1.0), (3, 1.0), (3, 2.0), (3, -0.7)], ids=["no-eos", "eos-lp1", "eos-lp2", "eos-lp-neg"]
)
def test_beam_search_with_k_at_least_v_to_the_l_is_exhaustive(eos, alpha) -> None:
    vocab, max_new = 4, 3
    decoder = tiny_decoder(vocab, seed=7)
    prompts = [[1, 2], [0, 3]]
    beams = vocab**max_new
    references = [exhaustive(decoder, p, max_new, eos, alpha) for p in prompts]
    count = len(references[0])
    assert count <= beams
    out = generate(
        decoder, np.array(prompts), num_beams=beams, num_return_sequences=count, max_new_tokens=max_new,
        eos_token_id=eos, length_penalty=alpha, return_scores=True, compile=False,
    )
    for b, reference in enumerate(references):
        rows = slice(b * count, (b + 1) * count)
        got = [tuple(seq[2 : 2 + n]) for seq, n in zip(out.sequences[rows], out.lengths[rows])]
        assert set(got) == set(reference), "beam search did not return every finished sequence"
        for seq, score in zip(got, out.scores[rows]):
            assert score == pytest.approx(reference[seq], abs=1e-4)
        np.testing.assert_allclose(out.scores[rows], sorted(reference.values(), reverse=True), atol=1e-4)
    if eos is not None:
        assert {len(s) for s in references[0]} == {1, 2, 3}


def test_beam_best_hypothesis_is_the_exhaustive_argmax_with_fewer_beams() -> None:
    """With K < V^L beam search may miss the optimum; with K = V^(L-1) on this model it must not."""
    decoder = tiny_decoder(5, seed=3)
    reference = exhaustive(decoder, [1], 3, eos=4, alpha=1.0)
    best = max(reference, key=reference.get)
    out = generate(decoder, [[1]], num_beams=25, max_new_tokens=3, eos_token_id=4, return_scores=True, compile=False)
    assert tuple(out.sequences[0, 1 : 1 + out.lengths[0]]) == best
    assert out.scores[0] == pytest.approx(reference[best], abs=1e-4)


def _check_cached_steps(decoder: GPT2Decoder, tokens: np.ndarray, image_kv=None) -> None:
    """Feed tokens one at a time through the cached step and compare with a full forward each step."""
    cached, full = DecodeModel(decoder, use_cache=True), DecodeModel(decoder, use_cache=False)
    total = tokens.shape[1]
    tokens_t = ops.convert_to_tensor(tokens.astype("int32"))
    cache = cached.prefill(tokens_t[:, :2], total, image_kv, repeats=1)  # holds token 0
    for length in range(2, total + 1):
        got, cache = cached.step(tokens_t, length, cache, image_kv)
        want, _ = full.step(tokens_t, length, None, image_kv)
        reference = np.asarray(decoder(tokens[:, :length], image_kv=image_kv))[:, -1]
        np.testing.assert_allclose(np.asarray(got), reference, atol=2e-5)
        np.testing.assert_allclose(np.asarray(want), reference, atol=2e-5)


def test_cached_step_equals_full_forward_plain_decoder(rng) -> None:
    decoder = tiny_decoder(11, seed=1, n_positions=12)
    _check_cached_steps(decoder, rng.integers(0, 11, (3, 9)))


@pytest.fixture(scope="module")
def captioner(tiny_config) -> Captioner:
    """The kit's tiny captioner with 23 token ids and a 64 px image (a 2 x 2 feature map)."""
    model = Captioner(tiny_config(gpt2={"vocab_size": 23, "n_positions": 16, "n_embd": 16},
                                  model={"image_size": 64, "max_caption_length": 8}))
    rng = np.random.default_rng(5)
    for variable in model.decoder.weights:
        variable.assign(rng.normal(0.0, 0.4, variable.shape).astype("float32"))
    return model


def test_cached_step_equals_full_forward_with_cross_attention(captioner, rng) -> None:
    decoder = captioner.decoder
    image_kv = decoder.project_image(rng.normal(size=(2, 5, 16)).astype("float32"))
    tokens = rng.integers(0, decoder.total_vocab_size, (2, 8))
    _check_cached_steps(decoder, tokens, image_kv)
    # The image K/V really are used: other images give other logits.
    other = decoder.project_image(rng.normal(size=(2, 5, 16)).astype("float32"))
    a, b = np.asarray(decoder(tokens, image_kv=image_kv)), np.asarray(decoder(tokens, image_kv=other))
    assert np.abs(a - b).max() > 1e-3


def test_caption_generation_cached_equals_uncached_and_never_emits_bos(captioner, rng) -> None:
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    # Beams exercise the cache reordering; greedy is compared the same way in the torch test.
    fast = generate_captions(captioner, images, eos_token_id=0, num_beams=3, compile=False)
    slow = generate_captions(captioner, images, eos_token_id=0, num_beams=3, compile=False, use_cache=False)
    np.testing.assert_array_equal(fast, slow)
    assert (fast < captioner.decoder.gpt2_config.vocab_size).all()


def test_compiled_loop_equals_eager_loop(rng) -> None:
    decoder = tiny_decoder(12, seed=2, n_positions=24)
    prompt = rng.integers(0, 12, (2, 3))
    # (Compiled greedy is checked against eager greedy by tests/test_caption_cli.py.)
    settings = [
        dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=2),
        dict(do_sample=True, top_p=0.8, top_k=6, temperature=1.3, seed=11, num_return_sequences=2),
    ]
    for kwargs in settings:
        common = dict(max_new_tokens=8, eos_token_id=3, **kwargs)
        compiled = generate(decoder, prompt, return_scores=True, **common)
        eager = generate(decoder, prompt, return_scores=True, compile=False, **common)
        np.testing.assert_array_equal(compiled.sequences, eager.sequences)
        np.testing.assert_allclose(compiled.scores, eager.scores, atol=1e-4)


# -- sampling ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_model() -> GPT2Decoder:
    return tiny_decoder(30, seed=4, n_positions=20, scale=0.3)


PROMPT = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_nucleus_with_tiny_p_and_top_k_1_are_greedy(sampler_model) -> None:
    greedy = generate(sampler_model, PROMPT, max_new_tokens=10, eos_token_id=0, compile=False)
    for seed in (0, 1):
        nucleus = generate(sampler_model, PROMPT, max_new_tokens=10, eos_token_id=0, do_sample=True,
                           top_p=1e-6, temperature=2.0, seed=seed, compile=False)
        np.testing.assert_array_equal(nucleus, greedy)
        top1 = generate(sampler_model, PROMPT, max_new_tokens=10, eos_token_id=0, do_sample=True,
                        top_k=1, seed=seed, compile=False)
        np.testing.assert_array_equal(top1, greedy)


def test_same_seed_same_samples_other_seed_other_samples(sampler_model) -> None:
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=3.0, num_return_sequences=2, compile=False)
    a = generate(sampler_model, PROMPT, seed=5, **kwargs)
    b = generate(sampler_model, PROMPT, seed=5, **kwargs)
    c = generate(sampler_model, PROMPT, seed=6, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # The copies of one prompt are different draws, not repeats.
    assert (a[0::2] != a[1::2]).any()
    greedy = generate(sampler_model, PROMPT, max_new_tokens=10, compile=False)
    assert (a[0::2] != greedy).any()


def _nucleus_sizes(logits: np.ndarray, p: float) -> list[int]:
    sizes = []
    for row in logits:
        probs = np.sort(np.exp(log_softmax(row.astype(np.float64))))[::-1]
        sizes.append(int(np.searchsorted(np.cumsum(probs), p) + 1))  # first prefix with mass >= p
    return sizes


def _mass_above(row: np.ndarray) -> np.ndarray:
    """Per token, the probability mass of the tokens ranked strictly above it (float64)."""
    probs = np.exp(log_softmax(row))
    order = np.argsort(-row, kind="stable")
    above = np.empty_like(probs)
    above[order] = np.cumsum(probs[order]) - probs[order]
    return above


def test_top_p_filter_keeps_the_minimal_set_reaching_p(rng) -> None:
    from gpt2_effnet.decoding.processors import TOP_P_SHORTLIST

    cases = {
        "small vocabulary": rng.normal(0, 2, (6, 40)),
        "peaked, within the shortlist": rng.normal(0, 5, (4, 3 * TOP_P_SHORTLIST)),
        "flat, needs the full search": rng.normal(0, 0.3, (3, 3 * TOP_P_SHORTLIST)),
        "flat, a third banned (-inf)": np.where(rng.random((3, 3 * TOP_P_SHORTLIST)) < 0.3, -np.inf,
                                               rng.normal(0, 0.3, (3, 3 * TOP_P_SHORTLIST))),
        "flat, the real vocabulary's width": rng.normal(0, 0.5, (2, 50258)),
    }
    for name, logits in cases.items():
        logits = logits.astype("float32")
        for p in (0.05, 0.3, 0.5, 0.9, 0.99):
            kept = np.isfinite(np.asarray(top_p_filter(ops.convert_to_tensor(logits), p)))
            for row, size in enumerate(_nucleus_sizes(logits, p)):
                expected = np.zeros(logits.shape[1], bool)
                expected[np.argsort(-logits[row])[:size]] = True
                # float32 sums over 50258 probabilities cannot place a token whose mass above
                # is within ~1e-6 of p (one at p=0.99 sits 3.5e-7 above it): exempt those (2e-6).
                unsure = np.abs(_mass_above(logits[row]) - p) < 2e-6
                np.testing.assert_array_equal(kept[row][~unsure], expected[~unsure], err_msg=f"{name} p={p} row={row}")
                assert unsure.sum() <= 2, (name, p, row, unsure.sum())
    # Both branches of the shortlist logic were really taken.
    assert max(_nucleus_sizes(cases["peaked, within the shortlist"], 0.99)) < TOP_P_SHORTLIST
    assert max(_nucleus_sizes(cases["flat, needs the full search"], 0.9)) > TOP_P_SHORTLIST


def _threshold64(row: np.ndarray, p: float) -> float:
    """The smallest logit whose strictly-larger tokens hold < p of the mass (float64; ties by value)."""
    probs = np.exp(log_softmax(row))
    values = np.unique(row)[::-1]  # descending
    above = np.array([probs[row > v].sum() for v in values])
    return float(values[above < p].min())


def test_top_p_whole_vocabulary_search_narrows_by_value_and_bisects_ties(rng) -> None:
    """The search run when the shortlist falls short of p: the narrowing by value finds the
    float64 threshold on flat rows; rows with more tied logits than it ranks are left to
    the key bisection, which finds it too, and top_p_filter keeps every tie."""
    from gpt2_effnet.decoding.processors import (NARROWED_CANDIDATES, _bisected_threshold, _narrowed_threshold,
                                                 top_p_filter)

    flat = rng.normal(0, 0.5, (4, 5000))
    tied = np.repeat(rng.normal(0, 0.5, (3, 60)), NARROWED_CANDIDATES + 36, axis=1)  # groups of 100 equal logits
    uniform = np.zeros((2, 3000))
    for name, logits, narrowed_ok in (("flat", flat, True), ("tied", tied, False), ("uniform", uniform, False)):
        x = ops.convert_to_tensor(logits.astype("float32"))
        log_total = ops.logsumexp(x, axis=-1, keepdims=True)
        for p in (0.3, 0.9):
            expected = np.array([_threshold64(row, p) for row in logits.astype("float32").astype(np.float64)])
            narrowed, found = (np.asarray(t) for t in _narrowed_threshold(x, log_total, p))
            bisected = np.asarray(_bisected_threshold(x, log_total, p))[:, 0]
            np.testing.assert_array_equal(bisected, expected.astype("float32"), err_msg=f"{name} p={p}")
            if narrowed_ok:
                assert found.all(), (name, p)
                np.testing.assert_array_equal(narrowed[:, 0], expected.astype("float32"), err_msg=f"{name} p={p}")
            else:
                assert not found.any(), (name, p)  # these rows must go to the bisection
            kept = np.isfinite(np.asarray(top_p_filter(x, p)))
            np.testing.assert_array_equal(kept, logits.astype("float32") >= expected[:, None].astype("float32"))


def test_top_k_sampling_on_candidates_draws_what_the_whole_vocabulary_draw_does(rng) -> None:
    from gpt2_effnet.decoding.base import GenerationConfig
    from gpt2_effnet.decoding.processors import sample_warped, top_k_filter
    from gpt2_effnet.decoding.sampling import sample_tokens

    logits = rng.normal(0, 2, (64, 1000)).astype("float32")
    tied = logits.copy()
    tied[:, :12] = 20.0  # twelve-way tie at the top: top_k(8) must keep all twelve, as HF does
    few = np.full_like(logits, -np.inf)
    few[:, :5] = logits[:, :5]  # fewer finite scores than k
    for name, case in (("plain", logits), ("tie at the k-th", tied), ("fewer than k finite", few)):
        for config in (GenerationConfig(do_sample=True, top_k=8), GenerationConfig(do_sample=True, top_k=8, top_p=0.7, temperature=1.5)):
            scores = ops.convert_to_tensor(case)
            for step in range(4):
                warped = top_p_filter(top_k_filter(scores / config.temperature, config.top_k), config.top_p)
                expected = np.asarray(sample_tokens(warped, 9, step))
                got = np.asarray(sample_warped(scores, config, 9, step))
                np.testing.assert_array_equal(got, expected, err_msg=f"{name} {config} step {step}")
    # The tie case really drew among all twelve tied tokens (not only the 8 top_k returned).
    draws = np.concatenate([np.asarray(sample_warped(ops.convert_to_tensor(tied), GenerationConfig(do_sample=True, top_k=8), 9, s))
                            for s in range(30)])
    assert set(draws.tolist()) == set(range(12))


def test_top_k_filter_keeps_k_largest(rng) -> None:
    logits = rng.normal(0, 1, (4, 25)).astype("float32")
    kept = np.isfinite(np.asarray(top_k_filter(ops.convert_to_tensor(logits), 7)))
    expected = logits >= np.sort(logits, axis=1)[:, -7:-6]
    np.testing.assert_array_equal(kept, expected)
    assert kept.sum(1).tolist() == [7] * 4


def test_top_k_by_chunks_is_top_k_of_the_transformed_rows(rng) -> None:
    """Same values and ids as ops.top_k over the whole transformed row, ties to the lower id."""
    for width, k in ((5000, 6), (TOP_K_CHUNK * 20, 4), (TOP_K_CHUNK * 7 + 1, 3)):
        rows = [rng.normal(0, 1, width),
                rng.integers(0, 3, width).astype(float),  # ties everywhere
                np.zeros(width),  # all tied: the first k ids
                np.where(rng.random(width) < 0.999, -np.inf, rng.normal(0, 1, width))]  # mostly -inf
        tied = rng.normal(0, 1, width)
        tied[rng.choice(width, 9, replace=False)] = 10.0  # more maxima than k, across chunks
        rows.append(tied)
        values = ops.convert_to_tensor(np.stack(rows).astype("float32"))
        shift = ops.convert_to_tensor(rng.normal(0, 3, (len(rows), 1)).astype("float32"))
        for transform in (None, lambda v: (v - 1.5) * 0.5 + shift):
            expected = ops.top_k(values if transform is None else transform(values), k)
            got = top_k_by_chunks(values, k, transform)
            np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
            np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))


def test_beam_search_without_processors_ranks_chunks_and_equals_the_full_ranking(monkeypatch) -> None:
    """The default beam search ranks each beam by top_k_by_chunks (the [rows, V] totals are
    never written); with the full log-softmax and one top_k over K x V, as with processors,
    it must find the same hypotheses with the same scores, bit for bit."""
    decoder = tiny_decoder(vocab_size=3000, seed=4, scale=0.3)
    prompts = np.random.default_rng(5).integers(0, 3000, (3, 4))
    settings = [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
                dict(num_beams=3, eos_token_id=7, early_stopping=True)]
    fast = [generate(decoder, prompts, max_new_tokens=6, return_scores=True, **kw) for kw in settings]
    monkeypatch.setattr(beam_module, "processes", lambda config: True)  # the full ranking path
    compiled_programs(decoder).clear()  # traced again with the full ranking
    for kw, got in zip(settings, fast):
        full = generate(decoder, prompts, max_new_tokens=6, return_scores=True, **kw)
        np.testing.assert_array_equal(got.sequences, full.sequences)
        np.testing.assert_array_equal(got.scores, full.scores)


def test_sampled_frequencies_follow_the_distribution() -> None:
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    with np.errstate(divide="ignore"):
        logits = np.log(probs).astype("float32")
    rows = 20000
    tokens = np.asarray(sample_tokens(ops.convert_to_tensor(np.tile(logits, (rows, 1))), 123, 4))
    freq = np.bincount(tokens, minlength=5) / rows
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert freq[4] == 0.0
    # Successive steps draw fresh numbers.
    again = np.asarray(sample_tokens(ops.convert_to_tensor(np.tile(logits, (rows, 1))), 123, 5))
    assert (again != tokens).mean() > 0.3


def test_sampling_draws_the_same_tokens_in_every_compile_mode_on_flat_rows() -> None:
    """Rows as flat as a random GPT-2's (50257 tokens, each ~2e-5 of the mass): eager, graph
    and XLA draw the same tokens, and so do generate()'s XLA and graph loops at 20 rows.
    An inverse CDF over a float32 cumulative sum failed this: its rounding differs by mode
    and is as wide as a token's share here."""
    import keras

    logits = ops.convert_to_tensor(np.random.default_rng(7).normal(0, 0.05, (32, 50257)).astype("float32"))
    modes = [lambda x, s: sample_tokens(x, 11, s)]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        modes += [tf.function(lambda x, s: sample_tokens(x, 11, s), jit_compile=jit) for jit in (False, True)]
    for step in range(6):
        draws = [np.asarray(mode(logits, step)) for mode in modes]
        for other in draws[1:]:
            np.testing.assert_array_equal(other, draws[0], err_msg=f"step {step}")
    decoder = tiny_decoder(20000, seed=8, n_positions=16, scale=0.05)
    prompts = np.random.default_rng(9).integers(0, 20000, (20, 3))
    for kwargs in ({"do_sample": True, "top_k": 0}, {"do_sample": True, "top_k": 0, "top_p": 0.9}):
        common = {"max_new_tokens": 8, "eos_token_id": None, "seed": 4, **kwargs}
        auto = generate(decoder, prompts, **common)
        np.testing.assert_array_equal(generate(decoder, prompts, jit_compile=False, **common), auto)
        np.testing.assert_array_equal(generate(decoder, prompts, compile=False, **common), auto)


def test_no_repeat_ngram_ban_matches_a_direct_scan(rng) -> None:
    tokens = rng.integers(0, 6, (5, 14))
    for n in (1, 2, 3):
        for length in (1, 4, 9, 14):
            banned = np.asarray(banned_ngram_tokens(ops.convert_to_tensor(tokens.astype("int32")), length, n, 6))
            for row in range(5):
                seq = tokens[row, :length].tolist()
                expected = np.zeros(6, bool)
                if length >= n:
                    prefix = seq[length - n + 1 :] if n > 1 else []
                    for j in range(length - n + 1):
                        if seq[j : j + n - 1] == prefix:
                            expected[seq[j + n - 1]] = True
                np.testing.assert_array_equal(banned[row], expected, err_msg=f"n={n} length={length}")


def test_bad_settings_are_named() -> None:
    with pytest.raises(TypeError, match="num_beam"):
        generate(tiny_decoder(5, 0), [[1]], num_beam=3)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="n_positions"):
        generate(tiny_decoder(5, 0), [[1, 2]], max_new_tokens=15)
    with pytest.raises(ValueError, match="input_ids"):
        generate(tiny_decoder(5, 0), [[1, 7]])


TORCH_SCRIPT = textwrap.dedent(
    """
        import sys
        import numpy as np
        import keras
        from gpt2_effnet.captioner import Captioner
        from gpt2_effnet.config import CaptionerConfig
        from gpt2_effnet.decoding import generate_captions, DecodeModel

        assert keras.backend.backend() == "torch"
        config = CaptionerConfig.from_dict({
            "gpt2": {"vocab_size": 23, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2},
            "model": {"backbone": "efficientnetb0", "image_size": 64, "encoder_layers": 1, "encoder_heads": 2,
                      "cross_attention": "ungated", "max_caption_length": 6},
        })
        model = Captioner(config)
        rng = np.random.default_rng(0)
        for v in model.decoder.weights:
            v.assign(rng.normal(0, 0.4, v.shape).astype("float32"))
        images = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
        logits = model({"images": images, "token_ids": np.array([[23, 1, 2], [23, 3, 4]])})
        assert tuple(logits.shape) == (2, 3, 24)
        fast = generate_captions(model, images, eos_token_id=0)
        slow = generate_captions(model, images, eos_token_id=0, use_cache=False)
        beams = generate_captions(model, images, eos_token_id=0, num_beams=3)
        assert fast.shape[0] == 2 and (fast == slow).all(), (fast, slow)
        assert beams.shape[0] == 2
        head = generate_captions(model, images, eos_token_id=0, precision="bfloat16-head")
        assert head.shape[0] == 2
        from keras import ops
        from gpt2_effnet.decoding.processors import top_k_by_chunks
        values = ops.convert_to_tensor(rng.normal(0, 1, (3, 4000)).astype("float32"))
        got, want = top_k_by_chunks(values, 5), ops.top_k(values, 5)
        assert np.array_equal(ops.convert_to_numpy(got[1]), ops.convert_to_numpy(want[1]))
        assert "tensorflow" not in sys.modules, "the torch path imported TensorFlow"
        print("ok", fast.tolist())
        """
)


@pytest.fixture(scope="module", autouse=True)
def torch_run(tmp_path_factory):
    """Start the torch-backend run when this module starts, so it overlaps the other tests."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    log = tmp_path_factory.mktemp("torch") / "log.txt"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-c", TORCH_SCRIPT], cwd=REPO, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
    yield process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_torch_backend_captions_without_tensorflow(torch_run) -> None:
    process, log = torch_run
    process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 0, output
    assert "ok" in output


def test_batch_sizes_share_a_compiled_program_per_bucket(captioner, rng) -> None:
    """Every mode pads the batch to a bucket: batch 3 reuses batch 4's trace, same rows (sampled
    rows too: a row's draws depend on the seed, the step and its index only)."""
    import keras

    from gpt2_effnet.decoding.api import bucket_size

    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 63, 64, 65, 130)] == [1, 2, 4, 4, 8, 64, 64, 128, 192]
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    sampled = {"max_new_tokens": 5, "do_sample": True, "top_k": 6, "temperature": 2.0, "seed": 3}
    for kwargs in ({"max_new_tokens": 5}, {"max_new_tokens": 5, "num_beams": 2}, sampled,
                   dict(sampled, num_return_sequences=2)):
        four = generate_captions(captioner, images, eos_token_id=0, **kwargs)
        three = generate_captions(captioner, images[:3], eos_token_id=0, **kwargs)
        eager = generate_captions(captioner, images[:3], eos_token_id=0, compile=False, **kwargs)
        np.testing.assert_array_equal(three, eager)
        np.testing.assert_array_equal(three, four[: len(three), : three.shape[1]])
    if keras.backend.backend() == "tensorflow":
        programs = compiled_programs(captioner)
        traced = [p.experimental_get_tracing_count() for p in programs.values() if hasattr(p, "experimental_get_tracing_count")]
        assert traced and max(traced) == 1, traced


def test_new_temperature_top_p_and_penalties_reuse_the_compiled_program(rng) -> None:
    """Temperature, top-p and the repetition and length penalties are inputs of the compiled
    program: a new value decodes as the eager loop does with it, without a new trace."""
    import keras

    from gpt2_effnet.decoding.api import decode_function, make_config

    decoder = tiny_decoder(14, seed=6, n_positions=24)
    prompt = rng.integers(0, 14, (2, 3)).astype("int32")
    common = dict(max_new_tokens=9, eos_token_id=3, return_scores=True)
    pairs = [
        (dict(do_sample=True, temperature=0.6, top_p=0.9, seed=2), dict(do_sample=True, temperature=1.7, top_p=0.5, seed=2)),
        (dict(repetition_penalty=1.2), dict(repetition_penalty=6.0)),
        (dict(num_beams=3, length_penalty=2.0), dict(num_beams=3, length_penalty=0.4)),
    ]
    for first, second in pairs:
        before = generate(decoder, prompt, **common, **first)
        programs = compiled_programs(decoder)
        count = len(programs)
        after = generate(decoder, prompt, **common, **second)
        assert len(programs) == count, (first, second)
        eager = generate(decoder, prompt, compile=False, **common, **second)
        np.testing.assert_array_equal(after.sequences, eager.sequences)
        np.testing.assert_allclose(after.scores, eager.scores, atol=1e-4)
        # The value reached the program: the two settings decode differently.
        assert (before.sequences.shape != after.sequences.shape or (before.sequences != after.sequences).any()
                or not np.allclose(before.scores, after.scores, atol=1e-3)), first
        # And the program with the values as constants (the export's) agrees.
        constants = decode_function(decoder, make_config(decoder, **{k: v for k, v in second.items() if k != "seed"},
                                                          max_new_tokens=9, eos_token_id=3))
        out = constants(ops.convert_to_tensor(prompt), None, ops.convert_to_tensor(np.int32(second.get("seed", 0))))
        width = after.sequences.shape[1]
        np.testing.assert_array_equal(np.asarray(out["sequences"])[:, :width], after.sequences)
        if keras.backend.backend() == "tensorflow":
            traced = [p.experimental_get_tracing_count() for p in programs.values() if hasattr(p, "experimental_get_tracing_count")]
            assert max(traced) == 1, traced
    # Sampling always divides by the temperature (exact at 1.0), so 1.0 shares the program and
    # decodes as the eager loop does; top-p switched off (1.0) is a different program.
    programs = compiled_programs(decoder)
    count = len(programs)
    neutral = dict(do_sample=True, temperature=1.0, top_p=0.9, seed=2)
    compiled = generate(decoder, prompt, **common, **neutral)
    assert len(programs) == count
    np.testing.assert_array_equal(compiled.sequences, generate(decoder, prompt, compile=False, **common, **neutral).sequences)
    generate(decoder, prompt, **common, do_sample=True, temperature=1.0, top_p=1.0, seed=2)
    assert len(programs) == count + 1
