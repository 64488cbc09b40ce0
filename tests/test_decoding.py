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
from gpt2_effnet.decoding import DecodeModel, GenerationConfig, generate, generate_captions
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


def test_on_a_cpu_the_decode_loop_is_its_own_xla_program_and_decodes_the_same(rng, monkeypatch) -> None:
    """jit_compile="auto" on a CPU: up to XLA_STEP_MAX_ROWS rows, everything after the image
    encoder is one XLA program called from the plain graph; more rows keep a graph loop
    whose token choice alone is an XLA program. Both must decode what the plain-graph
    loop (jit_compile=False) and the eager loop do."""
    import keras

    from gpt2_effnet.decoding import backend
    from gpt2_effnet.decoding.backend import (
        XLA_STEP_MAX_ROWS,
        XLA_WIDE_MAX_ROWS,
        loop_compiler,
        step_compiler,
    )

    def plus_one(x, select=None, select_args=()):
        return (x + 1 if select is None else select(x + 1, *select_args)), None

    def twice(x):
        return x * 2

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            loop = loop_compiler("auto")(twice)
            assert loop.xla._jit_compile is True
            for rows, traces in ((1, 1), (XLA_STEP_MAX_ROWS, 2), (XLA_STEP_MAX_ROWS + 1, 2)):
                np.testing.assert_array_equal(np.asarray(loop(rows, tf.ones((rows, 2)))), 2.0)
                assert loop.xla.experimental_get_tracing_count() == traces  # larger loops stay in the graph
            step = step_compiler("auto")(plus_one)
            choices = []

            def choose(logits):
                choices.append(tf.executing_eagerly())
                return logits

            for rows in (XLA_STEP_MAX_ROWS, XLA_STEP_MAX_ROWS + 1):
                step(tf.zeros((rows, 2)), select=choose)
            # Inlined at 16 rows (called eagerly here); traced into its own program at 17.
            assert choices == [True, False]
            # A bfloat16 model step (max_xla_rows=0): never an XLA loop, its choice always one.
            step = step_compiler("auto", max_xla_rows=0)(plus_one)
            step(tf.zeros((1, 2)), select=choose)
            assert choices[-1] is False
            graph_loop = loop_compiler("auto", max_xla_rows=0)(twice)
            np.testing.assert_array_equal(np.asarray(graph_loop(1, tf.ones((1, 2)))), 2.0)
            assert graph_loop.xla.experimental_get_tracing_count() == 0
            # The XLA loop's head multiplies a [W, V] copy of the table from 2 rows on a CPU
            # where that is faster (AMD's, or forced); else, and in a graph loop, never.
            sizes = (1, 2, XLA_STEP_MAX_ROWS, XLA_STEP_MAX_ROWS + 1)
            for vendor, forced, want in (("AuthenticAMD", None, True), ("GenuineIntel", None, False),
                                         ("", None, False), ("GenuineIntel", True, True), ("AuthenticAMD", False, False)):
                monkeypatch.setattr(backend, "cpu_vendor", lambda vendor=vendor: vendor)
                monkeypatch.setattr(backend, "TRANSPOSED_HEAD", forced)
                assert [loop.transposed_head(rows) for rows in sizes] == [False, want, want, False], (vendor, forced)
                assert not any(graph_loop.transposed_head(rows) for rows in sizes)
            monkeypatch.undo()
            # Intel and AMD: a float32 loop of 17-96 / 17-64 rows is an XLA program too; Intel's
            # multiplies [N, K] kernel copies, AMD's the kernels as stored.
            wide = loop_compiler("auto", wide_max_rows=XLA_WIDE_MAX_ROWS)(twice)
            wide_step = step_compiler("auto", wide_max_rows=XLA_WIDE_MAX_ROWS)(plus_one)
            amd = backend.XLA_WIDE_VENDOR_ROWS["AuthenticAMD"]
            assert XLA_STEP_MAX_ROWS < amd < XLA_WIDE_MAX_ROWS == backend.XLA_WIDE_VENDOR_ROWS["GenuineIntel"]
            sizes = (XLA_STEP_MAX_ROWS, XLA_STEP_MAX_ROWS + 1, amd, amd + 1, XLA_WIDE_MAX_ROWS, XLA_WIDE_MAX_ROWS + 1)
            # vendor, forced rows, forced copies -> rows of the wide loop, copies
            cases = (("GenuineIntel", None, None, XLA_WIDE_MAX_ROWS, True), ("AuthenticAMD", None, None, amd, False),
                     ("", None, None, 0, False), ("", 40, None, 40, False), ("", 1000, True, XLA_WIDE_MAX_ROWS, True),
                     ("AuthenticAMD", None, True, amd, True), ("GenuineIntel", None, False, XLA_WIDE_MAX_ROWS, False),
                     ("GenuineIntel", 0, None, 0, False), ("AuthenticAMD", 0, True, 0, False))
            for extra, (vendor, forced_rows, forced_copies, limit, copies) in enumerate(cases):
                monkeypatch.setattr(backend, "cpu_vendor", lambda vendor=vendor: vendor)
                monkeypatch.setattr(backend, "XLA_WIDE_ROWS", forced_rows)
                monkeypatch.setattr(backend, "TRANSPOSED_KERNELS", forced_copies)
                case = (vendor, forced_rows, forced_copies)
                want = [copies and XLA_STEP_MAX_ROWS < rows <= limit for rows in sizes]
                assert [wide.transposed_kernels(rows) for rows in sizes] == want, case
                assert not any(loop.transposed_kernels(rows) for rows in sizes)  # no wide rows asked for
                for rows in (XLA_STEP_MAX_ROWS + 1, limit + 1):
                    if not XLA_STEP_MAX_ROWS < rows <= XLA_WIDE_MAX_ROWS + 1:
                        continue
                    xla = XLA_STEP_MAX_ROWS < rows <= limit
                    shape = (rows, 3 + extra)  # a new shape: the XLA program traces it anew
                    traced = wide.xla.experimental_get_tracing_count()
                    np.testing.assert_array_equal(np.asarray(wide(rows, tf.ones(shape))), 2.0)
                    assert wide.xla.experimental_get_tracing_count() == traced + xla, (case, rows)
                    del choices[:]
                    wide_step(tf.zeros(shape), select=choose)
                    assert choices == [xla], (case, rows)  # inlined into the XLA loop (eager here), or its own program
            # A wide loop's head takes the [W, V] copy up to TRANSPOSED_HEAD_MAX_ROWS rows where
            # the CPU favours it; a graph loop of the same rows never does.
            head_max = backend.TRANSPOSED_HEAD_MAX_ROWS
            assert XLA_STEP_MAX_ROWS < head_max < XLA_WIDE_MAX_ROWS
            sizes = (XLA_STEP_MAX_ROWS + 1, head_max, head_max + 1)
            for vendor, forced_rows, want in (("AuthenticAMD", None, True), ("AuthenticAMD", 0, False),
                                              ("GenuineIntel", None, False)):
                monkeypatch.setattr(backend, "cpu_vendor", lambda vendor=vendor: vendor)
                monkeypatch.setattr(backend, "XLA_WIDE_ROWS", forced_rows)
                assert [wide.transposed_head(rows) for rows in sizes] == [want, want, False], (vendor, forced_rows)
                assert not any(loop.transposed_head(rows) for rows in sizes)
            monkeypatch.undo()
    for setting in (False, True):
        assert step_compiler(setting)(plus_one) is plus_one  # no XLA, or XLA for the whole program
        plain = loop_compiler(setting)(twice)
        assert not hasattr(plain, "xla") and float(np.asarray(plain(1, np.float32(3.0)))) == 6.0
        assert not plain.transposed_head(4)
    decoder = tiny_decoder(14, seed=5, n_positions=24)
    prompt = rng.integers(0, 14, (3, 2))
    # 3 rows: model and choice in one XLA program; 24 and 18 rows: the model step in the
    # graph, the token choice as its own XLA program.
    wide = rng.integers(0, 14, (24, 2))
    for prompts, kwargs in ((prompt, dict()), (prompt, dict(num_beams=3, num_return_sequences=2)),
                            (prompt, dict(do_sample=True, top_p=0.9, seed=3)),
                            (wide, dict(repetition_penalty=1.5)), (wide[:6], dict(num_beams=3)),
                            (wide[:, :1], {}),  # no prefill: the step writes into new buffers
                            (wide, dict(do_sample=True, top_k=5, seed=3))):
        common = dict(max_new_tokens=9, eos_token_id=3, return_scores=True, **kwargs)
        auto = generate(decoder, prompts, **common)
        graph = generate(decoder, prompts, jit_compile=False, **common)
        eager = generate(decoder, prompts, compile=False, **common)
        for other in (graph, eager):
            np.testing.assert_array_equal(auto.sequences, other.sequences)
            np.testing.assert_allclose(auto.scores, other.scores, atol=1e-4)


def test_a_transposed_head_table_gives_the_head_s_logits_and_the_cpu_xla_loop_multiplies_it(rng, monkeypatch) -> None:
    """precision.head_tables(transposed=True): float32 [W, V] copies of the head's tables, which
    GPT2Decoder.head multiplies as they lie; same logits as the [V, W] table (specials, a
    restricted output vocabulary, the special column left out). On TensorFlow's CPU split,
    generate hands them to an XLA loop of 2-48 rows (above 16 only where wide loops are
    XLA) and to no other; the tests around this one check those loops' tokens against the
    graph and eager loops."""
    import keras

    from gpt2_effnet.decoding import backend, precision
    from gpt2_effnet.decoding.backend import cpu_split

    config = GPT2Config(vocab_size=14, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    hidden = rng.normal(size=(3, 2, 16)).astype("float32")
    layouts = ({}, {"num_special_tokens": 2}, {"num_special_tokens": 1, "output_vocabulary": [0, 3, 5, 9]})
    for kwargs in layouts:
        decoder = GPT2Decoder(config, **kwargs)
        decoder(np.zeros((1, 1), "int32"))
        tables = precision.head_tables(decoder, "float32", transposed=True)
        for table, plain in zip(tables, decoder.head_tables()):
            assert (table is None) == (plain is None)
            if table is not None:
                assert tuple(table.shape) == tuple(plain.shape)[::-1]
        for specials in (True, False):
            want = np.asarray(decoder.head(hidden, specials=specials))
            got = np.asarray(decoder.head(hidden, tables=tables, specials=specials, transposed=True))
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert precision.head_tables(decoder, "float32") is None
    with pytest.raises(ValueError, match="float32"):
        precision.head_tables(decoder, "bfloat16-head", transposed=True)

    if not cpu_split("auto") or keras.backend.backend() != "tensorflow":
        return
    seen = []
    head = GPT2Decoder.head

    def spy(self, hidden, *args, **kwargs):
        seen.append(kwargs.get("transposed", False))
        return head(self, hidden, *args, **kwargs)

    monkeypatch.setattr(GPT2Decoder, "head", spy)
    monkeypatch.setattr(backend, "TRANSPOSED_HEAD", True)  # whatever this CPU is
    # 17 prompts decode as 32 rows (the batch's bucket), 33 as 64: a graph loop where wide
    # XLA loops are off, else an XLA loop whose head takes the copy up to 48 rows.
    cases = ((1, {}, False, False), (2, {}, False, True), (1, {"num_beams": 3}, False, True), (17, {}, False, False),
             (17, {}, True, True), (33, {}, True, False), (6, {"num_beams": 3}, True, True),
             (17, {"num_beams": 3}, True, False), (17, {"precision": "bfloat16-head"}, True, False),
             (2, {"jit_compile": False}, False, False), (2, {"precision": "bfloat16-head"}, False, False))
    for rows, kwargs, wide, want in cases:
        monkeypatch.setattr(backend, "XLA_WIDE_ROWS", backend.XLA_WIDE_MAX_ROWS if wide else 0)
        decoder = tiny_decoder(14, seed=5, n_positions=24)  # new programs, traced under these settings
        seen.clear()
        generate(decoder, rng.integers(0, 14, (rows, 2)), max_new_tokens=3, **kwargs)
        # The steps' heads (the prefill's logits are unused; its head may take the plain table).
        assert seen and (True in seen) == want, (rows, kwargs, wide, seen)
    # Where the copy is not the faster layout, the 2-row loop multiplies the table as it lies.
    monkeypatch.setattr(backend, "TRANSPOSED_HEAD", False)
    decoder = tiny_decoder(14, seed=5, n_positions=24)
    seen.clear()
    generate(decoder, rng.integers(0, 14, (2, 2)), max_new_tokens=3)
    assert seen and True not in seen, seen


def test_kernel_copies_give_the_dense_layers_products_and_a_wide_xla_loop_decodes_the_same(
    rng, monkeypatch, captioner
) -> None:
    """layers.kernel_copies: while set, every Dense layer multiplies its [N, K] copy (same
    outputs as its kernel), and nothing is left set after. With wide XLA loops forced on
    (backend.XLA_WIDE_ROWS), a float32 loop of 17-96 rows is one XLA program, multiplying the
    copies where backend.TRANSPOSED_KERNELS says (Intel CPUs by default) and the stored
    kernels elsewhere: same tokens and scores as the graph and eager loops, greedy, beam
    and sampling."""
    import keras

    from gpt2_effnet import layers
    from gpt2_effnet.decoding import backend
    from gpt2_effnet.decoding.backend import cpu_split

    decoder = tiny_decoder(14, seed=5, n_positions=24)
    ids = rng.integers(0, 14, (3, 4))
    want = np.asarray(decoder(ids))
    copies = layers.transposed_kernels(decoder)
    dense = layers.dense_layers(decoder)
    assert len(copies) == len(dense) == 4 * decoder.gpt2_config.n_layer
    for layer, copy in zip(dense, copies):
        assert tuple(copy.shape) == tuple(layer.kernel.shape)[::-1]
    with layers.kernel_copies(decoder, copies):
        assert all(layer._kernel_copy is not None for layer in dense)
        # Copies that differ from the kernels show that the layers read them.
        with layers.kernel_copies(decoder, tuple(copy * 2.0 for copy in copies)):
            doubled = np.asarray(decoder(ids))
        assert not np.allclose(doubled, want, atol=1e-3)
    with layers.kernel_copies(decoder, copies):
        np.testing.assert_allclose(np.asarray(decoder(ids)), want, rtol=1e-5, atol=1e-5)
    assert all(layer._kernel_copy is None for layer in dense)
    with pytest.raises(ValueError, match="kernel copies"), layers.kernel_copies(decoder, copies[:-1]):
        pass

    if not cpu_split("auto") or keras.backend.backend() != "tensorflow":
        return
    seen = []
    call = layers.Dense.call

    def spy(self, inputs, *args, **kwargs):
        seen.append(self._kernel_copy is not None)
        return call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(layers.Dense, "call", spy)
    monkeypatch.setattr(backend, "XLA_WIDE_ROWS", backend.XLA_WIDE_MAX_ROWS)
    wide = rng.integers(0, 14, (18, 2))
    # With the copies (Intel's loop) and without (AMD's: the kernels as stored).
    for copies in (True, False):
        monkeypatch.setattr(backend, "TRANSPOSED_KERNELS", copies)
        for prompts, kwargs in ((wide, {}), (wide[:6], {"num_beams": 3}),
                                (wide, {"do_sample": True, "top_k": 5, "seed": 3})):
            common = {"max_new_tokens": 6, "eos_token_id": 3, "return_scores": True, **kwargs}
            decoder = tiny_decoder(14, seed=5, n_positions=24)  # new programs, traced under the spy
            seen.clear()
            auto = generate(decoder, prompts, **common)
            assert seen and all(seen) == copies and any(seen) == copies, kwargs  # every product, or none
            graph = generate(decoder, prompts, jit_compile=False, **common)
            eager = generate(decoder, prompts, compile=False, **common)
            for other in (graph, eager):
                np.testing.assert_array_equal(auto.sequences, other.sequences)
                np.testing.assert_allclose(auto.scores, other.scores, atol=1e-4)
    monkeypatch.setattr(backend, "TRANSPOSED_KERNELS", True)
    # A captioner's loop too (its cross-attention's layers included): 6 images x 3 beams.
    images = rng.uniform(0, 255, (6, 64, 64, 3)).astype("float32")
    seen.clear()
    fast = generate_captions(captioner, images, eos_token_id=0, num_beams=3)
    assert True in seen
    np.testing.assert_array_equal(fast, generate_captions(captioner, images, eos_token_id=0, num_beams=3, compile=False))
    # Below 17 rows, for a bfloat16 head, and for a model whose copies would exceed the
    # memory allowed them, the kernels are multiplied as stored.
    need = 4 * sum(int(np.prod(layer.kernel.shape)) for layer in layers.dense_layers(decoder))  # float32 copies
    assert need == 4 * 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)
    for prompts, kwargs, max_bytes in ((wide[:4], {}, None), (wide, {"precision": "bfloat16-head"}, None),
                                       (wide, {}, need - 1)):
        if max_bytes is not None:
            monkeypatch.setattr(backend, "TRANSPOSED_KERNELS_MAX_BYTES", max_bytes)
        decoder = tiny_decoder(14, seed=5, n_positions=24)
        seen.clear()
        generate(decoder, prompts, max_new_tokens=3, **kwargs)
        assert seen and not any(seen), kwargs
    monkeypatch.setattr(backend, "TRANSPOSED_KERNELS_MAX_BYTES", need)  # exactly enough
    decoder = tiny_decoder(14, seed=5, n_positions=24)
    seen.clear()
    generate(decoder, wide, max_new_tokens=3)
    assert seen and all(seen)
    # The memory limit is the copies' alone: a wide loop that multiplies the stored kernels
    # (AMD's) is asked for whatever the model's size; with copies, only within the limit.
    from gpt2_effnet.decoding import api

    asked = []

    def compiler(*args, **kwargs):
        asked.append(args[3])  # wide_max_rows
        return backend.loop_compiler(*args, **kwargs)

    monkeypatch.setattr(api, "loop_compiler", compiler)
    monkeypatch.setattr(backend, "TRANSPOSED_KERNELS_MAX_BYTES", need - 1)
    for copies, want in ((False, backend.XLA_WIDE_MAX_ROWS), (True, 0)):
        monkeypatch.setattr(backend, "TRANSPOSED_KERNELS", copies)
        generate(tiny_decoder(14, seed=5, n_positions=24), wide, max_new_tokens=3)
        assert asked[-1] == want, copies


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
    decoder.__dict__.pop("_gpt2_effnet_decode_programs")  # traced again with the full ranking
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
        programs = captioner.__dict__["_gpt2_effnet_decode_programs"]
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
        programs = decoder.__dict__["_gpt2_effnet_decode_programs"]
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
    programs = decoder.__dict__["_gpt2_effnet_decode_programs"]
    count = len(programs)
    neutral = dict(do_sample=True, temperature=1.0, top_p=0.9, seed=2)
    compiled = generate(decoder, prompt, **common, **neutral)
    assert len(programs) == count
    np.testing.assert_array_equal(compiled.sequences, generate(decoder, prompt, compile=False, **common, **neutral).sequences)
    generate(decoder, prompt, **common, do_sample=True, temperature=1.0, top_p=1.0, seed=2)
    assert len(programs) == count + 1
