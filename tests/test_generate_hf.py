"""Greedy and beam search equal Hugging Face ``generate()`` token for token (PyTorch CPU reference)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt2_effnet.config import GPT2Config  # noqa: E402
from gpt2_effnet.gpt2 import GPT2Decoder  # noqa: E402
from gpt2_effnet.decoding import generate  # noqa: E402

VOCAB = 16
MAX_NEW = 12
PROMPTS = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.fixture(scope="module")
def models():
    """A tiny random GPT-2 in transformers (wide init so logits are far apart) and ours with its weights."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2, n_head=2, initializer_range=0.4,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = GPT2Decoder(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2, n_head=2))
    state = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    for name, variable in ours.named_weights().items():
        variable.assign(state[name])
    # Make EOS a token the model actually produces, so finished hypotheses are exercised.
    free = hf_generate(hf, eos=None)[:, PROMPTS.shape[1] :]
    eos = int(np.bincount(free.ravel(), minlength=VOCAB).argmax())
    return hf, ours, eos


def hf_generate(hf, eos, **kwargs) -> np.ndarray:
    prompt = torch.tensor(PROMPTS)
    with torch.no_grad():
        out = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW, eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0, do_sample=False, **kwargs,
        )
    return out.numpy()


CASES = {
    "greedy": dict(),
    "greedy-repetition-penalty": dict(repetition_penalty=1.8),
    "greedy-min-new-tokens": dict(min_new_tokens=6),
    "beam3": dict(num_beams=3),
    "beam3-no-repeat-2gram": dict(num_beams=3, no_repeat_ngram_size=2),
    "beam3-no-repeat-3gram-compiled": dict(num_beams=3, no_repeat_ngram_size=3, _compile=True),
    "beam4-lp0.5-return2": dict(num_beams=4, length_penalty=0.5, num_return_sequences=2),
    "beam4-lp-neg-early-true": dict(num_beams=4, length_penalty=-1.0, early_stopping=True),
    "beam3-lp2-never": dict(num_beams=3, length_penalty=2.0, early_stopping="never"),
    "beam5-repetition-min-new": dict(num_beams=5, repetition_penalty=1.5, min_new_tokens=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers_generate(models, name: str) -> None:
    hf, ours, eos = models
    kwargs = dict(CASES[name])
    compile_ = kwargs.pop("_compile", False)
    reference = hf_generate(hf, eos, **kwargs)
    got = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, compile=compile_, **kwargs)
    assert got.shape == reference.shape, f"{got.shape} != {reference.shape}\nours\n{got}\nhf\n{reference}"
    np.testing.assert_array_equal(got, reference)


def test_beam_scores_match_transformers(models) -> None:
    hf, ours, eos = models
    prompt = torch.tensor(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW, eos_token_id=eos,
            pad_token_id=eos, num_beams=4, num_return_sequences=3, length_penalty=0.7, do_sample=False,
            return_dict_in_generate=True, output_scores=True,
        )
    got = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, num_beams=4, num_return_sequences=3,
                   length_penalty=0.7, return_scores=True, compile=False)
    np.testing.assert_array_equal(got.sequences, ref.sequences.numpy())
    np.testing.assert_allclose(got.scores, ref.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)


def test_the_cases_exercise_eos_and_the_processors(models) -> None:
    """Guard against a vacuous comparison: EOS occurs, and the processors change the output."""
    hf, ours, eos = models
    plain = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, num_beams=3, compile=False)
    assert (plain[:, PROMPTS.shape[1] :] == eos).any()
    greedy = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, compile=False)
    assert (greedy[:, PROMPTS.shape[1] :] == eos).any()
    for kwargs in (dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.8), dict(min_new_tokens=6)):
        changed = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, compile=False, **kwargs)
        assert changed.shape != greedy.shape or (changed != greedy).any(), kwargs
    ngram = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, num_beams=3, no_repeat_ngram_size=2,
                     compile=False)
    assert ngram.shape != plain.shape or (ngram != plain).any()


# Prompts of different lengths, left-padded (pad id 13 is a real token: only the mask says it is padding).
RAGGED = np.array([[13, 13, 1, 2], [5, 6, 7, 8], [13, 13, 13, 9]])
RAGGED_MASK = (np.arange(4)[None, :] >= np.array([2, 0, 3])[:, None]).astype(np.int64)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3), dict(num_beams=4, num_return_sequences=2),
                                    dict(repetition_penalty=1.5), dict(num_beams=3, _compile=True)],
                         ids=["greedy", "beam3", "beam4-return2", "greedy-repetition", "beam3-compiled"])
def test_left_padded_prompts_match_transformers(models, kwargs) -> None:
    hf, ours, eos = models
    kwargs = dict(kwargs)
    compile_ = kwargs.pop("_compile", False)
    with torch.no_grad():
        reference = hf.generate(
            torch.tensor(RAGGED), attention_mask=torch.tensor(RAGGED_MASK), max_new_tokens=MAX_NEW,
            eos_token_id=eos, pad_token_id=eos, do_sample=False, **kwargs,
        ).numpy()
    got = generate(ours, RAGGED, attention_mask=RAGGED_MASK, max_new_tokens=MAX_NEW, eos_token_id=eos,
                   compile=compile_, **kwargs)
    assert got.shape == reference.shape, f"{got.shape} != {reference.shape}\nours\n{got}\nhf\n{reference}"
    np.testing.assert_array_equal(got, reference)
    # A padded row decodes as the same prompt alone would (the padding changes nothing).
    alone = generate(ours, RAGGED[2:3, 3:], max_new_tokens=MAX_NEW, eos_token_id=eos, compile=False, **kwargs)
    rows = kwargs.get("num_return_sequences", 1)
    width = min(alone.shape[1], got.shape[1] - 3)
    np.testing.assert_array_equal(got[2 * rows, 3 : 3 + width], alone[0, :width])


def test_attention_mask_must_be_left_padding(models) -> None:
    _, ours, eos = models
    # The mask matters for these prompts: without it the padding is read as text.
    masked = generate(ours, RAGGED, attention_mask=RAGGED_MASK, max_new_tokens=MAX_NEW, eos_token_id=eos, compile=False)
    unmasked = generate(ours, RAGGED, max_new_tokens=MAX_NEW, eos_token_id=eos, compile=False)
    assert masked.shape != unmasked.shape or (masked != unmasked).any()
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, RAGGED, attention_mask=RAGGED_MASK[:, ::-1], max_new_tokens=2, eos_token_id=eos)
    with pytest.raises(ValueError, match="shape"):
        generate(ours, RAGGED, attention_mask=RAGGED_MASK[:2], max_new_tokens=2, eos_token_id=eos)


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2, length_penalty=0.7)],
                         ids=["beam3", "beam4-return2"])
def test_beam_sampling_at_a_tiny_temperature_is_beam_search(models, kwargs) -> None:
    """At temperature 1e-4 every draw is the most likely remaining candidate (the Gumbel noise is
    nothing beside score gaps scaled by 1e4), and scaling all scores keeps their order: beam
    sampling must then return transformers' beam search, token for token. (transformers' own
    beam sampling is not a reference here: at such a temperature its probabilities underflow
    to zero and torch.multinomial picks among the zeros.)"""
    hf, ours, eos = models
    reference = hf_generate(hf, eos, **kwargs)
    got = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, do_sample=True, temperature=1e-4,
                   seed=3, compile=False, **kwargs)
    np.testing.assert_array_equal(got, reference)


def test_beam_sampling_draws_in_proportion_to_the_scores(models) -> None:
    """At temperature 1 the first candidate's token follows softmax(log p): compare frequencies
    over many seeds with the model's own distribution after the prompt."""
    _, ours, _ = models
    logits = np.asarray(ours(PROMPTS[:1].astype(np.int32)))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    firsts = []
    for seed in range(300):
        out = generate(ours, PROMPTS[:1], max_new_tokens=1, num_beams=2, do_sample=True, seed=seed, compile=True,
                       return_scores=True, num_return_sequences=2, eos_token_id=None)
        firsts += out.sequences[:, PROMPTS.shape[1]].tolist()
    # Two draws without replacement per seed: the top token's share is at least its probability.
    top = int(np.argmax(probs))
    share = firsts.count(top) / 300
    assert share >= probs[top] - 0.08, (share, probs[top])
    assert len(set(firsts)) > 2  # not beam search in disguise


def test_sampling_with_several_returned_sequences_matches_transformers(models) -> None:
    """num_return_sequences with do_sample: the rows come out as transformers orders them
    (each prompt's draws together). With top_k=1 every draw is the argmax, so both must
    return the greedy continuation, token for token, repeated per prompt; at temperature 1
    the draws for one prompt differ from each other."""
    hf, ours, eos = models
    with torch.no_grad():
        reference = hf.generate(
            torch.tensor(PROMPTS), attention_mask=torch.ones_like(torch.tensor(PROMPTS)), max_new_tokens=MAX_NEW,
            eos_token_id=eos, pad_token_id=eos, do_sample=True, top_k=1, num_return_sequences=3,
        ).numpy()
    got = generate(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=eos, do_sample=True, top_k=1,
                   num_return_sequences=3, seed=5, compile=False)
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(got[0::3], hf_generate(hf, eos))
    drawn = generate(ours, PROMPTS[:1], max_new_tokens=MAX_NEW, eos_token_id=None, do_sample=True,
                     num_return_sequences=4, seed=5, compile=False)
    assert drawn.shape[0] == 4 and len({row.tobytes() for row in drawn}) > 1
