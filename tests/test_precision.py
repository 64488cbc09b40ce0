"""Opt-in bfloat16 decoding: how far it moves the logits, and how often it changes the top token.

bfloat16 keeps 8 bits of mantissa, so it cannot be token-equal to float32; what a user
needs to know is how much it moves the logits and when the winner changes. The model is
a random GPT-2 (no pretrained weights here) with GPT-2's weight scale, decoding held-out
random prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_effnet.config import GPT2Config
from gpt2_effnet.decoding import generate, generate_captions
from gpt2_effnet.decoding.kernels import DecodeKernels, prepare
from gpt2_effnet.decoding.plan import DecodePlan
from gpt2_effnet.decoding.precision import decoder_in
from gpt2_effnet.gpt2 import GPT2Decoder

VOCAB = 512
# Largest |logit change| allowed, relative to the float32 logits' standard deviation.
RELATIVE_BOUND = 0.08  # measured: 0.043 (3 layers x 64 wide, 64 prompts of 16 tokens)


def random_gpt2(seed: int) -> GPT2Decoder:
    decoder = GPT2Decoder(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=3, n_head=4))
    rng = np.random.default_rng(seed)
    for variable in decoder.weights:
        # GPT-2's initialisation scale, with the token table larger so logits have a spread.
        scale = 0.3 if "wte" in variable.path else 0.05
        variable.assign(rng.normal(0.0, scale, variable.shape).astype("float32"))
    return decoder


@pytest.fixture(scope="module")
def decoder() -> GPT2Decoder:
    return random_gpt2(seed=7)


def test_bfloat16_logits_stay_within_a_bound_of_float32(decoder) -> None:
    prompts = np.random.default_rng(1).integers(0, VOCAB, (64, 16))
    exact = np.asarray(decoder(prompts), np.float64)
    twin = decoder_in(decoder, "bfloat16")
    assert twin is not decoder and twin.compute_dtype == "bfloat16"
    low = np.asarray(twin(prompts), np.float64)
    assert low.dtype == np.float64 and np.isfinite(low).all()
    change = np.abs(low - exact).max() / exact.std()
    print(f"\n[bfloat16] max |logit change| = {change:.4f} x the logits' std")
    assert 0 < change <= RELATIVE_BOUND
    # Where float32's top two are further apart than twice the largest change, the winner
    # cannot move; over all positions it moves rarely.
    top2 = np.sort(exact, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * np.abs(low - exact).max()
    same = exact.argmax(-1) == low.argmax(-1)
    assert same[clear].all()
    print(f"[bfloat16] same top token at {same.mean():.3f} of {same.size} positions ({clear.mean():.3f} clear)")
    assert same.mean() >= 0.95


def test_a_bfloat16_head_moves_the_logits_less_than_the_bfloat16_twin(decoder) -> None:
    import keras

    prompts = np.random.default_rng(1).integers(0, VOCAB, (64, 16))
    exact = np.asarray(decoder(prompts), np.float64)
    hidden = decoder.hidden_states(prompts)
    plan = DecodePlan(rows=64, head="bfloat16")
    low = np.asarray(decoder.head(hidden, kernels=DecodeKernels(plan, decoder, prepare(plan, decoder, True))), np.float64)
    twin = np.asarray(decoder_in(decoder, "bfloat16")(prompts), np.float64)
    change = np.abs(low - exact).max() / exact.std()
    twin_change = np.abs(twin - exact).max() / exact.std()
    print(f"\n[bfloat16-head] max |logit change| = {change:.4f} x the logits' std (twin: {twin_change:.4f})")
    assert 0 < change <= RELATIVE_BOUND and change < twin_change
    top2 = np.sort(exact, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * np.abs(low - exact).max()
    same = exact.argmax(-1) == low.argmax(-1)
    assert same[clear].all() and same.mean() >= 0.95
    # What it computes: the final hidden state and the table, each rounded to bfloat16,
    # multiplied and summed in float32 (against a float64 sum of the same products).
    def rounded(x):
        return np.asarray(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"), np.float64)

    reference = rounded(decoder.ln_f(hidden)) @ rounded(decoder.wte.embeddings).T
    np.testing.assert_allclose(low, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("precision", ["bfloat16", "bfloat16-head"])
def test_bfloat16_greedy_decoding_agrees_on_held_out_prompts(decoder, precision) -> None:
    prompts = np.random.default_rng(2).integers(0, VOCAB, (48, 8))
    exact = generate(decoder, prompts, max_new_tokens=8, eos_token_id=None)
    low = generate(decoder, prompts, max_new_tokens=8, eos_token_id=None, precision=precision)
    first = (exact[:, 8] == low[:, 8]).mean()
    whole = (exact[:, 8:] == low[:, 8:]).all(axis=1).mean()
    print(f"\n[{precision} greedy] first token same for {first:.3f}, all 8 tokens for {whole:.3f} of 48 prompts")
    assert first >= 0.9 and whole >= 0.6
    # The low-precision loop decodes what its own (uncompiled, uncached) forward says.
    low_eager = generate(decoder, prompts, max_new_tokens=8, eos_token_id=None, precision=precision,
                         use_cache=False, compile=False)
    assert (low_eager[:, 8] == low[:, 8]).mean() >= 0.95


@pytest.mark.parametrize("precision", ["bfloat16", "bfloat16-head"])
def test_the_bfloat16_copy_follows_the_models_weights(precision) -> None:
    model = random_gpt2(seed=3)
    prompts = np.random.default_rng(4).integers(0, VOCAB, (16, 6))
    before = generate(model, prompts, max_new_tokens=4, eos_token_id=None, precision=precision)
    for variable, value in zip(model.weights, random_gpt2(seed=5).weights):
        variable.assign(value)  # as training would change them
    after = generate(model, prompts, max_new_tokens=4, eos_token_id=None, precision=precision)
    exact = generate(model, prompts, max_new_tokens=4, eos_token_id=None)
    assert (after[:, 6] != before[:, 6]).mean() > 0.5  # it saw the new weights...
    assert (after[:, 6] == exact[:, 6]).mean() >= 0.9  # ...and decodes like them


@pytest.mark.parametrize("precision", ["bfloat16", "bfloat16-head"])
def test_a_captioner_decodes_in_bfloat16(tiny_config, precision) -> None:
    import keras

    from gpt2_effnet.captioner import Captioner

    # Seeded: the agreement of a random tiny captioner depends on its draw (Keras seeds 0-9:
    # 0.97-1.0; the unseeded draw left by running tests/test_export.py, test_serve.py and
    # test_parity.py first gave 0.625).
    keras.utils.set_random_seed(0)

    model = Captioner(tiny_config(gpt2={"vocab_size": 23, "n_positions": 16, "n_embd": 16},
                                  model={"image_size": 64, "max_caption_length": 8}))
    images = np.random.default_rng(6).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    exact = generate_captions(model, images, num_beams=2, eos_token_id=None)
    low = generate_captions(model, images, num_beams=2, eos_token_id=None, precision=precision)
    assert low.shape == exact.shape
    assert (low == exact).mean() >= 0.75


def test_unknown_precision_is_refused(decoder) -> None:
    with pytest.raises(ValueError, match="precision"):
        generate(decoder, [[1, 2]], max_new_tokens=2, precision="float16")


def test_a_bfloat16_backbone_reads_the_models_weights_and_stays_close(tiny_config) -> None:
    """The bfloat16 backbone is a twin sharing the float32 variables: its features follow
    any change to them, stay within a bound of float32's, and building it changes nothing
    on the float32 side (layers, policies, outputs)."""
    import keras

    from gpt2_effnet.captioner import Captioner

    keras.utils.set_random_seed(0)
    model = Captioner(tiny_config(model={"image_size": 64}))
    images = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype("float32")

    def features(precision: str) -> np.ndarray:
        return np.asarray(model.encode_images(images, training=False, backbone_precision=precision))

    before = features("float32")
    low = features("bfloat16")
    assert np.array_equal(features("float32"), before)
    assert {layer.dtype_policy.name for layer in model.encoder.backbone.layers} == {"float32"}
    error = np.abs(low - before).mean() / np.abs(before).mean()
    assert 0 < error < 0.05, error  # bfloat16 keeps ~3 significant digits; 0 would mean it never ran

    kernel = next(v for v in model.encoder.backbone.weights if v.path.endswith("stem_conv/kernel"))
    kernel.assign(kernel.numpy() * -1.5)
    changed, changed_low = features("float32"), features("bfloat16")
    assert np.abs(changed - before).mean() > 10 * np.abs(low - before).mean()  # the change matters...
    assert np.abs(changed_low - changed).mean() / np.abs(changed).mean() < 0.05  # ...and the twin saw it

    captions = generate_captions(model, images, num_beams=2, eos_token_id=None, max_new_tokens=4,
                                 backbone_precision="bfloat16", precision="bfloat16-head")
    assert captions.shape == (3, 4)
    with pytest.raises(ValueError, match="backbone_precision"):
        generate_captions(model, images, backbone_precision="float16")


def test_a_plain_gpt2_refuses_a_backbone_precision(decoder) -> None:
    with pytest.raises(ValueError, match="plain GPT-2 has none"):
        generate(decoder, [[1, 2]], max_new_tokens=2, backbone_precision="bfloat16")
