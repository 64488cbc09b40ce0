"""A restricted output vocabulary: same logits where kept, nothing elsewhere, in every path."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.config import ConfigError
from gpt2_effnet.gpt2 import EXCLUDED_LOGIT
from gpt2_effnet.training.loss import masked_cross_entropy_sum

KEPT = [0, 3, 5, 11, 42, 96]  # of the kit's 97 token ids


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(vocabulary)``: the kit's tiny captioner, two special tokens, that output vocabulary."""
    return lambda vocabulary=None: tiny_config(model={"num_special_tokens": 2, "output_vocabulary": vocabulary})


@pytest.fixture(scope="module")
def pair(config) -> tuple[Captioner, Captioner]:
    full = Captioner(config())
    restricted = Captioner(config(KEPT))
    restricted.set_weights(full.get_weights())
    return full, restricted


def test_kept_ids_keep_their_logits_and_the_rest_are_excluded(pair, rng) -> None:
    full, restricted = pair
    batch = {"images": rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32"), "token_ids": rng.integers(0, 99, (2, 7))}
    a, b = np.asarray(full(batch)), np.asarray(restricted(batch))
    assert b.shape == a.shape == (2, 7, 99)
    kept = KEPT + [97, 98]  # the special tokens always stay
    np.testing.assert_allclose(b[..., kept], a[..., kept], atol=1e-5)
    excluded = np.setdiff1d(np.arange(99), kept)
    assert np.all(b[..., excluded] == EXCLUDED_LOGIT)


def test_compact_loss_equals_the_loss_over_all_ids(pair, rng) -> None:
    _, restricted = pair
    decoder = restricted.decoder
    hidden = rng.normal(size=(1, 9, decoder.gpt2_config.n_embd)).astype("float32")
    targets = np.array([0, 3, 5, 11, 42, 96, 97, 98, 7])  # the last one is excluded
    weights = np.ones(9, "float32")
    full_sum, _ = masked_cross_entropy_sum(decoder.head(hidden)[0], targets, weights)
    compact = decoder.head(hidden, compact=True)[0]
    assert compact.shape[-1] == len(KEPT) + 2 + 1
    compact_sum, _ = masked_cross_entropy_sum(compact, decoder.compact_targets(targets), weights)
    np.testing.assert_allclose(float(compact_sum), float(full_sum), rtol=1e-6)
    # Without the excluded target the loss is an ordinary, finite one.
    part_full, _ = masked_cross_entropy_sum(decoder.head(hidden)[0, :8], targets[:8], weights[:8])
    part_compact, _ = masked_cross_entropy_sum(compact[:8], decoder.compact_targets(targets[:8]), weights[:8])
    assert float(part_full) < 1e3
    np.testing.assert_allclose(float(part_compact), float(part_full), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3}, {"do_sample": True, "top_p": 0.95, "seed": 3},
                                    {"do_sample": True, "top_k": 5, "temperature": 2.0, "seed": 1}])
def test_every_sampler_emits_only_kept_ids(pair, rng, kwargs) -> None:
    _, restricted = pair
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    ids = np.asarray(restricted.generate(images, max_new_tokens=8, eos_token_id=96, **kwargs))
    assert set(np.unique(ids).tolist()) <= set(KEPT) | {97, 98}


def test_the_list_saves_and_loads_with_the_model(pair, tmp_path, rng) -> None:
    _, restricted = pair
    restricted.save_pretrained(tmp_path / "run")
    loaded = Captioner.load(tmp_path / "run")
    assert loaded.decoder.output_vocabulary == tuple(KEPT)
    batch = {"images": rng.uniform(0, 255, (1, 32, 32, 3)).astype("float32"), "token_ids": rng.integers(0, 97, (1, 5))}
    np.testing.assert_array_equal(np.asarray(loaded(batch)), np.asarray(restricted(batch)))


@pytest.mark.parametrize("bad, message", [
    ("words", "null, 'captions' or a list"),
    ([], "non-empty list"),
    ([1, 1], "repeats"),
    ([1, -2], "integers >= 0"),
    ([5, 97], "outside GPT-2's vocabulary of 97"),
])
def test_bad_lists_are_refused_naming_the_key(config, bad, message) -> None:
    with pytest.raises(ConfigError, match="output_vocabulary") as err:
        config(bad)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs", [
    {"num_beams": 3},
    {"num_beams": 3, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "compile": False},
    {"num_beams": 3, "num_return_sequences": 2, "precision": "bfloat16-head", "compile": False},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "compile": False},
    {"do_sample": True, "top_k": 5, "top_p": 0.9, "num_return_sequences": 2, "seed": 4, "compile": False},
])
@pytest.mark.parametrize("which", ["full", "restricted"])
def test_decoding_leaves_out_the_special_columns_and_changes_nothing(pair, rng, monkeypatch, which, kwargs) -> None:
    """Decoding suppresses every special token, so it computes no logits for them; the
    tokens and scores must equal those of the logits with the (masked) special columns,
    processors included (they see the BOS id, past the narrower logits, in the buffers)."""
    from gpt2_effnet.decoding import api

    model = pair[0] if which == "full" else pair[1]
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    widths: dict[bool, set[int]] = {False: set(), True: set()}
    results = []
    plain = api.DecodeModel
    for force_specials in (False, True):
        class Recording(plain):
            def __init__(self, *args, forced=force_specials, **options) -> None:
                super().__init__(*args, **options)
                widths[forced].add(self.vocab_size)

        monkeypatch.setattr(api, "DecodeModel", Recording)
        if force_specials:
            monkeypatch.setattr(api, "_computes_specials", lambda decoder, config: True)
        api.compiled_programs(model).clear()  # programs built with the other class
        results.append(model.generate(images, max_new_tokens=6, eos_token_id=96, return_scores=True, **kwargs))
    api.compiled_programs(model).clear()
    assert widths == {False: {97}, True: {99}}  # the plain vocabulary; with the two special tokens
    without, with_ = results
    np.testing.assert_array_equal(without.sequences, with_.sequences)
    # The log-softmax sums 97 or 99 columns (two of them -inf): the same up to summation order.
    np.testing.assert_allclose(without.scores, with_.scores, rtol=1e-6)
    assert (without.sequences[:, 1:] < 97).all()
