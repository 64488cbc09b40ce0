"""Public entry points: ``generate`` (plain GPT-2 or captioner), ``generate_captions``,
``caption_strings``, and ``plan_for`` (the :class:`~.plan.DecodePlan` a call would run).

Each distinct (settings, plan) pair is compiled once into one program (image encoding,
prompt prefill and the whole decode loop) and kept with the model; the seed, the inputs
and the numeric settings that do not change the program's shape (temperature, top-p,
repetition and length penalties) are runtime arguments, and batches are padded to a
bucket size, so a new seed, a new such value or a new batch size in a traced bucket
reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from keras import ops

from .base import DecodeModel, GenerationConfig, GenerationOutput, RuntimeSettings, decode_state
from .beam import beam_loop
from .greedy import token_loop
from .kernels import DecodeKernels, prepare
from .plan import DecodePlan, JitSetting, compile_program, make_plan, xla_function
from .precision import decoder_in, refresh
from .tuning import Tuning

GPT2_EOS = 50256  # <|endoftext|> in the real GPT-2 vocabulary
_SETTINGS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"suppress_from"}


def _is_captioner(model: Any) -> bool:
    return hasattr(model, "encode_images") and hasattr(model, "decoder")


def _default_eos(decoder: Any) -> int | None:
    return GPT2_EOS if decoder.gpt2_config.vocab_size > GPT2_EOS else None


def make_config(model: Any, **kwargs: Any) -> GenerationConfig:
    """Settings from ``generate()`` keywords, with defaults that depend on the model.

    Defaults: ``eos_token_id`` 50256 when the vocabulary has it (else none: pass it for
    tiny test vocabularies); ``max_new_tokens`` the captioner's ``max_caption_length``, or
    20 for a plain GPT-2; special tokens after the vocabulary are never generated.
    """
    unknown = sorted(set(kwargs) - _SETTINGS)
    if unknown:
        raise TypeError(f"unknown generation keyword(s) {unknown}; known: {sorted(_SETTINGS)}")
    decoder = model.decoder if _is_captioner(model) else model
    kwargs.setdefault("eos_token_id", _default_eos(decoder))
    if _is_captioner(model):
        kwargs.setdefault("max_new_tokens", model.captioner_config.model.max_caption_length)
    if decoder.num_special_tokens:
        kwargs["suppress_from"] = decoder.gpt2_config.vocab_size
    return GenerationConfig(**kwargs)


def _repeats(config: GenerationConfig) -> int:
    return config.num_beams if config.num_beams > 1 else config.num_return_sequences


def plan_for(
    model: Any,
    batch_size: int,
    *,
    use_cache: bool = True,
    compile: bool = True,
    jit_compile: JitSetting = "auto",
    tuning: Tuning | None = None,
    **kwargs: Any,
) -> DecodePlan:
    """The plan ``generate(model, ...)`` runs for ``batch_size`` inputs with these keywords."""
    config = make_config(model, **{k: v for k, v in kwargs.items() if k not in ("seed", "images", "return_scores")})
    return _plan(model, config, batch_size, use_cache, compile, jit_compile, tuning)


def _plan(model: Any, config: GenerationConfig, batch: int, use_cache: bool, compile: bool, jit: JitSetting,
          tuning: Tuning | None) -> DecodePlan:
    rows = (bucket_size(batch) if compile else batch) * _repeats(config)
    decoder = model.decoder if _is_captioner(model) else model
    return make_plan(decoder, config, rows, use_cache=use_cache, compile=compile, jit_compile=jit, tuning=tuning)


def _computes_specials(decoder: Any, config: GenerationConfig) -> bool:
    """Whether the head computes the special tokens' logits: not when all are suppressed."""
    return not (decoder.num_special_tokens and config.suppress_from == decoder.gpt2_config.vocab_size)


def compiled_programs(model: Any) -> dict[tuple[GenerationConfig, DecodePlan], Callable]:
    """The model's compiled decode programs, by (settings as traced, plan)."""
    return decode_state(model).programs


def _program(model: Any, config: GenerationConfig, plan: DecodePlan) -> Callable:
    """The compiled decode program for these settings and this plan, built on first use.

    Keyed by the settings' :meth:`~GenerationConfig.program_key`: the program is traced
    with the stand-in values and reads the real ones from its ``values`` input."""
    config = config.program_key()
    programs = compiled_programs(model)
    if (config, plan) not in programs:
        programs[config, plan] = compile_program(decode_function(model, config, plan), plan)
    return programs[config, plan]


def decode_function(model: Any, config: GenerationConfig, plan: DecodePlan | None = None) -> Callable:
    """The whole decode, uncompiled: ``run(prompt [B, P], images [B, S, S, 3] | None, seed)`` ->
    ``{"sequences", "scores", "lengths"}``; :func:`generate` compiles it as ``plan`` says, the
    SavedModel export traces it with the default plan (a plain graph, no XLA).
    ``run(..., values=...)``: the settings' :meth:`~GenerationConfig.runtime_values` as an
    input instead of the constants in ``config``."""
    captioner = model if _is_captioner(model) else None
    decoder = decoder_in(model.decoder if captioner is not None else model, config.precision)
    plan = plan or make_plan(decoder, config, 0, jit_compile=False)
    specials = _computes_specials(decoder, config)
    repeats = _repeats(config)

    def loop(prompt: Any, image_kv: Any, seed: Any, prompt_mask: Any, values: Any, prepared: Any) -> dict[str, Any]:
        settings = config if values is None else RuntimeSettings(config, values)
        kernels = DecodeKernels(plan, decoder, prepared, specials)
        decode_model = DecodeModel(decoder, kernels, plan.cache, xla_choice=plan.token_choice == "xla")
        decode_model.set_prompt_mask(prompt_mask, prompt.shape[1] + config.max_new_tokens, repeats)
        if config.num_beams > 1:
            return beam_loop(decode_model, prompt, image_kv, settings, seed)
        return token_loop(decode_model, prompt, image_kv, seed, settings)

    if plan.loop == "xla":
        loop = xla_function(loop)

    def run(prompt: Any, images: Any, seed: Any, prompt_mask: Any = None, values: Any = None) -> dict[str, Any]:
        image_kv = None
        if images is not None:
            image_kv = captioner.encode_images(images, training=False, backbone_precision=config.backbone_precision)
            image_kv = ops.cast(image_kv, decoder.compute_dtype)
        return loop(prompt, image_kv, seed, prompt_mask, values, prepare(plan, decoder, specials))

    return run


def _as_prompt(input_ids: Any, vocab_size: int, max_new_tokens: int, n_positions: int) -> np.ndarray:
    prompt = np.asarray(ops.convert_to_numpy(input_ids) if not isinstance(input_ids, (list, tuple)) else input_ids)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0 or prompt.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] array of token ids, got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"input_ids must hold integers, got dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got values {prompt.min()}..{prompt.max()}")
    if prompt.shape[1] + max_new_tokens > n_positions:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"n_positions ({n_positions})"
        )
    return prompt.astype(np.int32)


def generate(
    model: Any,
    input_ids: Any,
    *,
    images: Any = None,
    attention_mask: Any = None,
    seed: int | None = None,
    return_scores: bool = False,
    use_cache: bool = True,
    compile: bool = True,
    jit_compile: JitSetting = "auto",
    tuning: Tuning | None = None,
    **kwargs: Any,
) -> np.ndarray | GenerationOutput:
    """Continue ``input_ids [B, P]`` (same length per row): ids ``[B * num_return_sequences, P + new]``.

    ``model`` is a plain GPT-2 (:class:`~gpt2_effnet.gpt2.GPT2Decoder`) or a captioner
    (then ``images [B, S, S, 3]`` are required). Keywords are Hugging Face ``generate()``'s:
    ``max_new_tokens, min_new_tokens, num_beams, do_sample, top_k, top_p, temperature,
    length_penalty, no_repeat_ngram_size, repetition_penalty, eos_token_id, pad_token_id,
    num_return_sequences, early_stopping``. As there, rows that ended early are filled with
    ``pad_token_id`` (default: EOS) and the result is cut to the longest sequence.
    Prompts of different lengths go in left-padded, with ``attention_mask`` (1 on tokens,
    0 on the padding) as in Hugging Face: padding is never attended to and positions count
    real tokens only. ``seed`` makes sampling reproducible (None: a fresh random seed). ``return_scores``
    gives a :class:`GenerationOutput` with the scores and lengths. ``use_cache=False``
    recomputes the full prefix at every step (for checks and benchmarks). Opt-in, faster on
    some CPUs and not always float32's tokens (:mod:`.precision`): ``precision="bfloat16"``
    (a bfloat16 decoder), ``"bfloat16-head"`` (the head's table only), and for captioners
    ``backbone_precision="bfloat16"``. How the call is compiled is a :class:`~.plan.DecodePlan`
    (:func:`plan_for` shows it): ``jit_compile`` True makes it one XLA program, False keeps
    XLA out, "auto" lets the machine's tuning decide; ``tuning`` overrides that (:mod:`.tuning`).
    """
    captioner = _is_captioner(model)
    decoder = model.decoder if captioner else model
    if captioner and images is None:
        raise ValueError("a captioner needs images=...; use generate_captions(captioner, images)")
    if not captioner and images is not None:
        raise ValueError("images were given but the model is a plain GPT-2 without cross-attention")
    config = make_config(model, **kwargs)
    if not captioner and config.backbone_precision != "float32":
        raise ValueError("backbone_precision is for a captioner's image backbone; a plain GPT-2 has none")
    prompt = _as_prompt(input_ids, decoder.total_vocab_size, config.max_new_tokens, decoder.gpt2_config.n_positions)
    if images is not None:
        images = ops.convert_to_tensor(np.asarray(ops.convert_to_numpy(images), np.float32))
        if images.shape[0] != prompt.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {prompt.shape[0]} prompts")
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))
    prompt_mask = _as_prompt_mask(attention_mask, prompt.shape)
    program = _program(model, config, _plan(model, config, prompt.shape[0], use_cache, compile, jit_compile, tuning))
    refresh(decoder, config.precision)
    rows = prompt.shape[0] * config.num_return_sequences
    if compile:
        # Pad the batch to a bucket size so a compiled program traced for it serves every
        # batch size up to it (tracing costs seconds; decoding a few rows more, far less).
        # Rows are independent, sampled ones too: a row's random numbers depend on (seed,
        # step, row index) only, so rows appended after the last do not change any draw.
        if prompt_mask is not None:
            prompt_mask, _ = _pad_to_bucket(prompt_mask, None)
        prompt, images = _pad_to_bucket(prompt, images)
    arguments = [ops.convert_to_tensor(prompt), images, ops.convert_to_tensor(np.int32(seed % 2**31))]
    if prompt_mask is not None:
        arguments.append(ops.convert_to_tensor(prompt_mask))
    out = program(*arguments, values=ops.convert_to_tensor(config.runtime_values()))
    sequences = np.asarray(ops.convert_to_numpy(out["sequences"]))[:rows]
    lengths = np.asarray(ops.convert_to_numpy(out["lengths"]))[:rows]
    scores = np.asarray(ops.convert_to_numpy(out["scores"]))[:rows]
    width = prompt.shape[1] + int(lengths.max(initial=0))
    sequences = sequences[:, :width]
    if return_scores:
        return GenerationOutput(sequences=sequences, scores=scores, lengths=lengths, prompt_length=prompt.shape[1])
    return sequences


def decoding_kwargs(
    *,
    beams: int | None = None,
    length_penalty: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """``generate()`` keywords from a command's decoding options (None: not given).

    One place for what caption, export and serve ask for: ``beams`` selects beam search
    (with its ``length_penalty``); any sampling option turns sampling on, and the ones not
    given take Hugging Face's neutral values (top_p 1, top_k 0, temperature 1).
    """
    kwargs: dict[str, Any] = {}
    if beams is not None:
        kwargs.update(num_beams=beams, length_penalty=length_penalty)
    if any(v is not None for v in (top_p, top_k, temperature)):
        kwargs.update(
            do_sample=True,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k is None else top_k,
            temperature=1.0 if temperature is None else temperature,
        )
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return kwargs


def check_generation(kwargs: dict[str, Any]) -> GenerationConfig:
    """The settings ``kwargs`` describe, checked now (ValueError naming the keyword); keywords
    that are not settings (``seed``, ``jit_compile``) are ignored."""
    settings = {f.name for f in dataclasses.fields(GenerationConfig)}
    return GenerationConfig(**{k: v for k, v in kwargs.items() if k in settings})


def _as_prompt_mask(attention_mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """HF's attention_mask for left-padded prompts, checked; None when there is no padding."""
    if attention_mask is None:
        return None
    mask = np.asarray(ops.convert_to_numpy(attention_mask) if not isinstance(attention_mask, (list, tuple)) else attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {mask.shape}, the prompts {tuple(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    if (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError("attention_mask must be left padding: 0s first, then 1s to the end of every row")
    return None if mask.all() else mask.astype(np.int32)


def bucket_size(batch: int) -> int:
    """The batch size a compiled program is traced for: powers of two to 64, then multiples of 64."""
    if batch <= 64:
        return 1 << max(batch - 1, 0).bit_length()
    return -(-batch // 64) * 64


def _pad_to_bucket(prompt: np.ndarray, images: Any) -> tuple[np.ndarray, Any]:
    batch = prompt.shape[0]
    extra = bucket_size(batch) - batch
    if not extra:
        return prompt, images
    prompt = np.concatenate([prompt, np.repeat(prompt[-1:], extra, axis=0)])
    if images is not None:
        images = ops.concatenate([images, ops.repeat(images[-1:], extra, axis=0)], axis=0)
    return prompt, images


def generate_captions(captioner: Any, images: Any, **kwargs: Any) -> np.ndarray | GenerationOutput:
    """Caption ids ``[B * num_return_sequences, new]`` (BOS not included), ``pad`` after EOS.

    Decoding starts from BOS (the first special token, id ``gpt2.vocab_size``). Keywords as
    :func:`generate`; with ``return_scores=True`` the output's ``sequences`` still start with BOS.
    """
    if not _is_captioner(captioner):
        raise TypeError(f"generate_captions needs a Captioner, got {type(captioner).__name__}")
    decoder = captioner.decoder
    if decoder.num_special_tokens < 1:
        raise ValueError("this captioner has no special tokens, so it has no BOS to start from")
    batch = int(np.shape(images)[0]) if not hasattr(images, "shape") else int(images.shape[0])
    bos = decoder.gpt2_config.vocab_size
    prompt = np.full((batch, 1), bos, np.int32)
    out = generate(captioner, prompt, images=images, **kwargs)
    if isinstance(out, GenerationOutput):
        return out
    return out[:, 1:]


def cut_at_eos(ids: Sequence[int] | np.ndarray, eos_token_id: int | None) -> list[int]:
    """Tokens before the first EOS."""
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return ids


def caption_strings(
    captioner: Any, images: Any, tokenizer: Any = None, **kwargs: Any
) -> list[str]:
    """Decoded captions, one per image (``num_return_sequences`` per image, in order)."""
    if tokenizer is None:
        from ..tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer.default()
    if kwargs.pop("return_scores", False):
        raise ValueError("caption_strings returns text; use generate_captions(..., return_scores=True) for scores")
    kwargs.setdefault("eos_token_id", _default_eos(captioner.decoder))
    ids = generate_captions(captioner, images, **kwargs)
    eos = kwargs["eos_token_id"]
    return [tokenizer.decode(cut_at_eos(row, eos)).strip() for row in ids]
