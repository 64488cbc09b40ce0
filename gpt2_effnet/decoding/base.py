"""What every sampler shares: the settings, the result, and the model-agnostic step function.

A sampler never calls a model directly. It sees a :class:`DecodeModel`, which turns "the
tokens so far" into "logits for the next token" either through the static KV cache or,
for checking and benchmarking, by a full forward over the whole prefix. The same sampler
code therefore drives the plain GPT-2 (checked token for token against Hugging Face) and
the image-conditioned captioner (whose cross-attention K/V are an extra, fixed input).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from keras import ops

from ..layers import KVCache
from .precision import check_backbone_precision, check_precision

NEG_INF = float("-inf")
# Hugging Face's beam search uses this finite "impossible" score; keeping the same value
# keeps tie-breaking among impossible candidates identical.
IMPOSSIBLE = -1.0e9

# Logits are divided by the temperature in float32: at 1e-45 (a float32 denormal) they became
# inf and the captions ",,,,"; at 1e-6 any logit gap over 1e-5 is already a greedy choice.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; names and meanings follow Hugging Face ``generate()``.

    Frozen and hashable because it is part of the key under which a compiled decode
    program is cached (the seed is not: it is a runtime input, so new seeds never recompile).
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    top_k: int = 0  # 0 = off (Hugging Face's default of 50 is not copied: off is the honest default)
    top_p: float = 1.0
    temperature: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_return_sequences: int = 1
    early_stopping: bool | str = False
    # Logit columns >= this id are never generated (the captioner's BOS and other specials).
    suppress_from: int | None = None
    # "bfloat16": decode with the decoder's bfloat16 twin; "bfloat16-head": with a bfloat16
    # copy of the output head's table only (both opt-in; see precision.py).
    precision: str = "float32"
    # "bfloat16": a captioner's image backbone in bfloat16 (opt-in; encoder.ImageEncoder.call).
    backbone_precision: str = "float32"

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))

        positive_int("max_new_tokens", 1)
        positive_int("min_new_tokens", 0)
        positive_int("num_beams", 1)
        positive_int("top_k", 0)
        positive_int("no_repeat_ngram_size", 0)
        positive_int("num_return_sequences", 1)
        for name in ("top_p", "temperature", "length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not self.temperature >= MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE:g} (a smaller one divides the logits out of float32's "
                f"range; at that size sampling is greedy already), got {self.temperature:g}"
            )
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check_precision(self.precision)
        check_backbone_precision(self.backbone_precision)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ValueError("greedy search returns one sequence per input; use num_beams or do_sample")
        if self.min_new_tokens > 0 and self.eos_token_id is None:
            raise ValueError("min_new_tokens needs eos_token_id (it only blocks EOS)")
        for name in ("eos_token_id", "pad_token_id", "suppress_from"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
                object.__setattr__(self, name, int(value))

    @property
    def pad(self) -> int:
        """Filler after a sequence ends: pad, else EOS, else 0 (Hugging Face's choice order)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id if self.eos_token_id is not None else 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    # Which branches the decode program has: each runtime value's stand-in keeps these.
    @property
    def uses_temperature(self) -> bool:
        return self.temperature != 1.0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def rewards_length(self) -> bool:
        return self.length_penalty > 0.0

    def program_key(self) -> "GenerationConfig":
        """The settings with every :data:`RUNTIME_VALUES` entry replaced by a stand-in that
        keeps its branch (top-p and the repetition penalty on or off, the sign of the
        length penalty), and the sampling settings cleared when not sampling (unused then).

        A compiled program takes those values as an input (:meth:`runtime_values`), so
        settings that differ only there share it: a new temperature or top-p from a
        request costs a call, not a trace (seconds). Sampling always divides by the
        temperature (by 1.0 it is exact), so turning it on needs no new program either;
        top-p and the penalty stay switches, as they cost passes over the vocabulary.
        """
        sampling = self.do_sample
        return self.replace(
            temperature=0.5 if sampling else 1.0,
            top_p=0.5 if sampling and self.uses_top_p else 1.0,
            top_k=self.top_k if sampling else 0,
            repetition_penalty=2.0 if self.uses_repetition_penalty else 1.0,
            length_penalty=1.0 if self.rewards_length else 0.0,
        )

    def runtime_values(self) -> np.ndarray:
        """The :data:`RUNTIME_VALUES`, in order, as the float32 input of a compiled program."""
        return np.array([getattr(self, name) for name in RUNTIME_VALUES], np.float32)


# Settings a compiled decode program reads at run time (see GenerationConfig.program_key).
RUNTIME_VALUES = ("temperature", "top_p", "repetition_penalty", "length_penalty")


class RuntimeSettings:
    """A :class:`GenerationConfig` whose :data:`RUNTIME_VALUES` read from ``values`` (a
    ``[len(RUNTIME_VALUES)]`` float32 tensor, a program input); everything else, the
    ``uses_*`` branch flags included, from the config the program was traced with. The
    loops and processors take it where their hints say GenerationConfig (duck-typed: the
    same attributes, tensors for those values)."""

    def __init__(self, config: GenerationConfig, values: Any) -> None:
        self._config = config
        self._values = {name: values[i] for i, name in enumerate(RUNTIME_VALUES)}

    def __getattr__(self, name: str) -> Any:
        if name in RUNTIME_VALUES:
            return self.__dict__["_values"][name]
        return getattr(self.__dict__["_config"], name)


@dataclass
class GenerationOutput:
    """``sequences`` [B*n, prompt + new] (filled with ``pad`` after each end), one ``score``
    and the count of new tokens (EOS included) per sequence.

    ``scores``: for beam search the length-penalised sum of processed log-probabilities
    (Hugging Face's ``sequences_scores``); for greedy/sampling the plain sum of the model's
    log-probabilities of the chosen tokens (before any processor or temperature).
    """

    sequences: np.ndarray
    scores: np.ndarray
    lengths: np.ndarray
    prompt_length: int

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length :]


@dataclass
class DecodeState:
    """What decoding keeps with a model: its compiled programs by (settings, plan), its
    bfloat16 twins and the programs that refresh them (precision.py). One plain attribute,
    not tracked by Keras: these hold programs and a twin, not the model's weights."""

    programs: dict = field(default_factory=dict)
    twins: dict = field(default_factory=dict)
    refreshers: dict = field(default_factory=dict)


def decode_state(model: Any) -> DecodeState:
    state = model.__dict__.get("_gpt2_effnet_decoding")
    if state is None:
        state = model.__dict__["_gpt2_effnet_decoding"] = DecodeState()
    return state


class DecodeModel:
    """The step function + cache interface the samplers drive.

    ``decoder`` is a :class:`~gpt2_effnet.gpt2.GPT2Decoder`, ``kernels`` the plan's
    (:mod:`.kernels`); ``image_kv`` (given to each call, never stored) is the captioner's
    per-image cross-attention K/V, computed once and never repeated for the beams or
    return sequences (image-major rows share it). With ``use_cache=False`` every step
    recomputes the whole prefix: slow, but an independent path for tests and the
    benchmark's "no cache" baseline. ``xla_choice``: the token choice runs as its own XLA
    program (a graph loop's, where it is faster: GPT-2 124M nucleus at 32 rows 34 -> 20 ms).
    """

    def __init__(self, decoder: Any, kernels: Any = None, use_cache: bool = True, xla_choice: bool = False) -> None:
        if kernels is None:  # the plain ones
            from .kernels import DecodeKernels
            from .plan import DecodePlan

            kernels = DecodeKernels(DecodePlan(rows=0), decoder, (None, None))
        self.decoder, self.kernels, self.use_cache = decoder, kernels, use_cache
        self.choose: Callable[[Callable], Callable] = lambda select: select
        if xla_choice:
            from .plan import xla_function

            self.choose = xla_function
        self.key_ok: Any = None  # [rows, total] bool: False on left padding (set_prompt_mask)
        self.pads: Any = None  # [rows] int32: left padding per row, subtracted from positions

    def set_prompt_mask(self, prompt_mask: Any | None, total: int, repeats: int) -> None:
        """Left-padded prompts: ``prompt_mask [B, P]`` is 1 on tokens, 0 on padding (HF's attention_mask).

        Padding is never attended to, and positions count real tokens only, as in Hugging
        Face's generate(), so a padded row decodes as it would alone. None: no padding.
        """
        if prompt_mask is None:
            self.key_ok = self.pads = None
            return
        mask = ops.cast(prompt_mask, "bool")
        rows, prompt_length = mask.shape
        generated = ops.ones((rows, total - prompt_length), "bool")
        key_ok = ops.concatenate([mask, generated], axis=1)
        pads = prompt_length - ops.sum(ops.cast(mask, "int32"), axis=1)
        if repeats > 1:
            key_ok, pads = ops.repeat(key_ok, repeats, axis=0), ops.repeat(pads, repeats, axis=0)
        self.key_ok, self.pads = key_ok, pads

    def _positions(self, start: Any, length: int, pads: Any = None) -> Any | None:
        """Position ids ``[rows, length]`` from absolute index ``start``, minus each row's padding."""
        pads = self.pads if pads is None else pads
        if pads is None:
            return None
        index = ops.arange(length, dtype="int32")[None, :] + ops.cast(start, "int32")
        return ops.maximum(index - ops.cast(pads, "int32")[:, None], 0)

    @property
    def vocab_size(self) -> int:
        """Width of the logits: the vocabulary, plus the special tokens unless left out."""
        return int(self.decoder.total_vocab_size if self.kernels.specials else self.decoder.gpt2_config.vocab_size)

    def prefill(self, prompt: Any, max_length: int, image_kv: Any | None, repeats: int) -> Any:
        """Cache buffers holding all prompt tokens but the last (which the first step feeds).

        Runs on the B distinct prompts and then repeats rows ``repeats`` times (beams /
        return sequences), so the prompt is processed once per input, not once per beam.
        """
        if not self.use_cache:
            return ops.zeros((1,), "float32")  # placeholder loop variable
        batch, prompt_length = prompt.shape
        cache = self.decoder.init_cache(batch, max_length, self.kernels)
        if prompt_length > 1:
            key_ok = positions = None
            if self.key_ok is not None:  # the distinct prompts: every repeats-th row
                key_ok = self.key_ok[:: max(self.key_ok.shape[0] // batch, 1)]
                positions = self._positions(0, prompt_length - 1, self.pads[:: max(self.pads.shape[0] // batch, 1)])
            _, cache = self.decoder.call_with_cache(prompt[:, :-1], cache, image_kv, key_ok, positions, self.kernels)
        buffers = cache.buffers
        if repeats > 1:
            buffers = tuple(tuple(ops.repeat(buffer, repeats, axis=0) for buffer in pair) for pair in buffers)
        return buffers

    def step(
        self,
        tokens: Any,
        length: Any,
        cache: Any,
        image_kv: Any | None,
        parents: Any | None = None,
        select: Callable[..., Any] | None = None,
        select_args: tuple = (),
    ) -> tuple[Any, Any]:
        """Logits ``[N, V]`` for position ``length`` given ``tokens[:, :length]`` (``[N, L]`` buffer).

        ``parents [N]`` (beam search): row ``i`` continues the cache row ``parents[i]``,
        gathered by the cache write itself (gathered apart, eight buffers a step cost
        ~0.7 ms of a ~9 ms beam step at the seed's configuration).

        ``select`` (the sampler's token choice): ``select(logits, *select_args)`` is returned
        instead of the logits, computed in the same compiled program as the model, so a
        one-row step does not hand 50k logits to a dozen graph ops (seed configuration,
        nucleus: 6.1 -> 5.4 ms for step and choice, called alone).
        """
        rows = tokens.shape[0]
        if not self.use_cache:
            prefix = ops.slice(tokens, [0, 0], [rows, length])
            key_ok = None if self.key_ok is None else ops.slice(self.key_ok, [0, 0], [rows, length])
            hidden = self.decoder.hidden_states(prefix, image_kv, key_ok, self._positions(0, length), training=False)
            logits = self.decoder.head(hidden, kernels=self.kernels)[:, -1]
        else:
            last = ops.slice(tokens, [0, length - 1], [rows, 1])
            step_cache = KVCache(cache, length - 1, parents, owned=True)  # the loop hands it to this step only
            logits, step_cache = self.decoder.call_with_cache(last, step_cache, image_kv, self.key_ok,
                                                              self._positions(length - 1, 1), self.kernels)
            logits, cache = logits[:, 0], step_cache.buffers
        return (logits if select is None else self.choose(select)(logits, *select_args)), cache


def run_loop(cond: Any, body: Any, state: tuple, max_steps: int, unroll: bool) -> tuple:
    """``while cond(*state): state = body(*state)`` with ``state[0]`` the step counter.

    ``unroll=True`` (used without the KV cache) writes the steps out with Python ints, so
    each step's growing prefix has a static length and the loop still compiles; a step
    whose condition is false leaves the state untouched, so the result is the same.
    """
    if not unroll:
        return tuple(ops.while_loop(cond, body, state))
    rest = tuple(state[1:])
    for step in range(max_steps):
        go = cond(step, *rest)
        rest = tuple(ops.cond(go, lambda: tuple(body(step, *rest)[1:]), lambda: rest))
    return (max_steps,) + rest


def gather_rows(x: Any, index: Any) -> Any:
    """``x [B, K, ...]``, ``index [B, M]`` (values < K) -> ``[B, M, ...]``, per batch row."""
    batch, width = x.shape[0], x.shape[1]
    flat = ops.reshape(x, (batch * width,) + tuple(x.shape[2:]))
    offsets = ops.expand_dims(ops.arange(batch, dtype="int32") * width, 1)
    picked = ops.take(flat, ops.reshape(ops.cast(index, "int32") + offsets, (-1,)), axis=0)
    return ops.reshape(picked, (batch, index.shape[1]) + tuple(x.shape[2:]))
