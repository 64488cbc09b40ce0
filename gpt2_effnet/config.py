"""Configuration: GPT-2 shapes and the captioner's YAML config.

Both are plain frozen dataclasses so they can be compared, hashed, written next to a
run and read back; every reader validates eagerly and names the offending key, because
a typo in a YAML file should fail in the first second, not after an hour of training.
"""

from __future__ import annotations

import dataclasses
import math
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or mapping has a bad key or value; the message names it."""


MEANING = "meaning"  # the field metadata key of a key's one-line meaning (docs/CONFIG.md)


def key(default: Any, meaning: str) -> Any:
    """A config key with its default and its one line of meaning, which ``docs/CONFIG.md``
    is generated from (:mod:`gpt2_effnet.config_reference`), so the two cannot drift."""
    return field(default=default, metadata={MEANING: meaning})


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's shape: a preset name, a folder with ``config.json`` / ``hparams.json``, or these keys."""

    vocab_size: int = key(50257, "tokens in GPT-2's vocabulary; the special tokens (BOS first) take the ids after it")
    n_positions: int = key(1024, "positions the position embedding covers: the longest token sequence")
    n_embd: int = key(768, "width of the hidden states (and of the image tokens the encoder hands over)")
    n_layer: int = key(12, "GPT-2 blocks, each with self-attention, cross-attention and an MLP")
    n_head: int = key(12, "attention heads per block; must divide n_embd")
    layer_norm_epsilon: float = key(1e-5, "epsilon of every LayerNorm (GPT-2's own: 1e-5)")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # -- readers -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read a Hugging Face ``config.json`` (keys vocab_size, n_positions, n_embd, ...)."""
        data = _read_json_object(path)
        try:
            return cls(
                vocab_size=int(data["vocab_size"]),
                n_positions=int(data["n_positions"]),
                n_embd=int(data["n_embd"]),
                n_layer=int(data["n_layer"]),
                n_head=int(data["n_head"]),
                layer_norm_epsilon=float(data.get("layer_norm_epsilon", 1e-5)),
            )
        except KeyError as err:
            raise ConfigError(f"{path}: missing key {err.args[0]!r} in Hugging Face config.json") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_openai_hparams(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read OpenAI's ``hparams.json`` (keys n_vocab, n_ctx, n_embd, n_head, n_layer)."""
        data = _read_json_object(path)
        try:
            return cls(
                vocab_size=int(data["n_vocab"]),
                n_positions=int(data["n_ctx"]),
                n_embd=int(data["n_embd"]),
                n_layer=int(data["n_layer"]),
                n_head=int(data["n_head"]),
            )
        except KeyError as err:
            raise ConfigError(f"{path}: missing key {err.args[0]!r} in OpenAI hparams.json") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "GPT2Config":
        """Find the shape of a GPT-2 folder: HF ``config.json`` first, else ``hparams.json``."""
        path = Path(path)
        if (path / "config.json").is_file():
            return cls.from_hf_json(path / "config.json")
        if (path / "hparams.json").is_file():
            return cls.from_openai_hparams(path / "hparams.json")
        raise ConfigError(f"{path}: no config.json (Hugging Face) or hparams.json (OpenAI) found")

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt2", **dataclasses.asdict(self)}

    @classmethod
    def from_any(cls, spec: "str | Mapping[str, Any] | GPT2Config") -> "GPT2Config":
        """A preset name, a folder with a config file, a mapping of fields, or a config."""
        if isinstance(spec, GPT2Config):
            return spec
        if isinstance(spec, Mapping):
            return _from_mapping(cls, spec, "gpt2")
        if isinstance(spec, str) and spec in PRESETS:
            return PRESETS[spec]
        if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
            return cls.from_dir(spec)
        raise ConfigError(
            f"gpt2: {spec!r} is neither a preset ({sorted(PRESETS)}), a folder with "
            "config.json/hparams.json, nor a mapping of GPT2Config fields"
        )


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a file; ConfigError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


PRESETS: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "355M": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "774M": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "1558M": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}


# ---------------------------------------------------------------------------------
# Captioner config (YAML)
# ---------------------------------------------------------------------------------

CROSS_ATTENTION_KINDS = ("gated", "ungated")


@dataclass(frozen=True)
class ModelConfig:
    """The image encoder and how it joins GPT-2."""

    backbone: str = key("efficientnetb0", "the image backbone: efficientnetb0..b7, efficientnetv2-b0..b3, -s, -m or -l")
    backbone_weights: str | None = key(None, "the backbone's starting weights: imagenet, a file path, or null (random)")
    image_size: int = key(224, "side of the square the images are resized to, in pixels")
    encoder_layers: int = key(2, "bidirectional transformer blocks over the image tokens, after the backbone")
    encoder_heads: int = key(8, "attention heads of those blocks")
    # Gated (tanh(0) = 0 at init): a captioner built on a pretrained GPT-2 starts as exactly that
    # GPT-2 and opens the gates as it learns. configs/demo.yaml trains from scratch and uses
    # "ungated", which learned faster there (BENCHMARKS.md, "Demo").
    cross_attention: str = key("gated", "gated (tanh(g) starts at 0: the model starts as its GPT-2) or ungated")
    num_special_tokens: int = key(1, "extra trainable embeddings after the vocabulary (the first is BOS)")
    max_caption_length: int = key(40, "caption tokens trained on and generated by default (at most gpt2.n_positions)")
    dropout: float = key(0.0, "dropout rate in the encoder blocks and the decoder")
    # A backbone trained from scratch for a few hundred steps needs a lower value (e.g. 0.9),
    # or its moving statistics still describe the untrained network when it is evaluated.
    backbone_bn_momentum: float | None = key(None, "BatchNorm momentum inside the backbone; null keeps Keras' 0.99")
    # 32: the usual top map; 16 or 8: an earlier stage's, a finer grid from fewer layers, for
    # small images. A 64-px image gives a 2x2 grid at 32 and 4x4 at 16.
    feature_stride: int = key(32, "the backbone feature map that becomes the image tokens: its stride, 8, 16 or 32")
    # It regularises long ImageNet runs and slows short ones.
    backbone_drop_path: float | None = key(
        None, "drop-path (stochastic depth) rate of the backbone's residual blocks; null keeps Keras' 0.2")
    # "captions" is resolved when training starts to the ids in the training captions, plus
    # EOS (config.yaml then holds the list); special tokens are always kept. A domain's
    # captions use a few thousand of GPT-2's 50257 tokens; the head, its softmax and every
    # decode step then cost that much, and no sampler can emit a token outside the list.
    output_vocabulary: str | list | None = key(
        None, "token ids the output head may produce: null (all), captions (those in the training captions) or a list")

    def __post_init__(self) -> None:
        if self.cross_attention not in CROSS_ATTENTION_KINDS:
            raise ConfigError(
                f"model.cross_attention: {self.cross_attention!r} is not one of {CROSS_ATTENTION_KINDS}"
            )
        for name in ("image_size", "encoder_heads", "max_caption_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("encoder_layers", "num_special_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.backbone_bn_momentum is not None and not 0.0 <= self.backbone_bn_momentum < 1.0:
            raise ConfigError(f"model.backbone_bn_momentum must be in [0, 1), got {self.backbone_bn_momentum!r}")
        vocab = self.output_vocabulary
        if isinstance(vocab, str) and vocab != "captions":
            raise ConfigError(f"model.output_vocabulary must be null, 'captions' or a list of token ids, got {vocab!r}")
        if isinstance(vocab, list):
            if not vocab or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab):
                raise ConfigError("model.output_vocabulary: expected a non-empty list of token ids (integers >= 0)")
            if len(set(vocab)) != len(vocab):
                raise ConfigError("model.output_vocabulary: the list repeats token ids")
        if self.feature_stride not in (8, 16, 32):
            raise ConfigError(f"model.feature_stride must be 8, 16 or 32, got {self.feature_stride!r}")
        if self.backbone_drop_path is not None and not 0.0 <= self.backbone_drop_path < 1.0:
            raise ConfigError(f"model.backbone_drop_path must be in [0, 1) or null, got {self.backbone_drop_path!r}")


@dataclass(frozen=True)
class TrainableConfig:
    """Which parts learn. The cross-attention and the image encoder's head always do."""

    backbone: bool = key(False, "train the image backbone (false: frozen, as loaded)")
    gpt2_embeddings: bool = key(False, "train GPT-2's token and position embeddings (and so the tied output head)")
    gpt2_blocks: bool = key(True, "train GPT-2's blocks (self-attention, MLP, LayerNorms)")


@dataclass(frozen=True)
class OptimConfig:
    """Adam, its schedule and gradient clipping."""

    # The seed's Adam settings. Both clips apply (value first, then global norm), as in the
    # seed; Keras 3 accepts only one, so the training loop clips itself.
    learning_rate: float = key(6.25e-5, "Adam's learning rate (the peak, with a schedule)")
    beta_1: float = key(0.9, "Adam's first-moment decay")
    beta_2: float = key(0.999, "Adam's second-moment decay")
    epsilon: float = key(1e-8, "Adam's epsilon")
    clipvalue: float | None = key(1.0, "clip each gradient value to [-clipvalue, clipvalue] first; null: no clip")
    global_clipnorm: float | None = key(1.0, "then scale the gradients to at most this global norm; null: no clip")
    schedule: str = key("constant", "constant, or cosine (decay after a linear warmup)")
    warmup_steps: int = key(0, "steps of linear warmup from 0 to learning_rate")
    decay_steps: int | None = key(None, "length of the cosine, in steps; null: the run's total steps")
    min_learning_rate_ratio: float = key(0.0, "where the cosine ends, as a share of learning_rate")
    weight_decay: float = key(0.0, "decoupled weight decay (AdamW); 0: none")
    loss_scale: float = key(2.0**15, "initial dynamic loss scale with train.precision mixed_float16")

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule: {self.schedule!r} is not one of ('constant', 'cosine')")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        for name in ("beta_1", "beta_2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("epsilon", "loss_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("clipvalue", "global_clipnorm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"optim.{name} must be > 0 or null (no clipping), got {value!r}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(
                f"optim.decay_steps ({self.decay_steps}) must be greater than optim.warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.min_learning_rate_ratio <= 1.0:
            raise ConfigError(f"optim.min_learning_rate_ratio must be in [0, 1], got {self.min_learning_rate_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The training run: batches, length, precision, checkpoints, logs and data checks."""

    # Each replica's share of the global batch is split into grad_accum_steps micro-batches.
    batch_size: int = key(32, "samples in one optimizer step, over all replicas and workers")
    steps: int | None = key(None, "optimizer steps to train for (this or epochs is needed)")
    epochs: int | None = key(None, "passes over the training data to train for (this or steps is needed)")
    # training/precision.py says which devices compute bfloat16 natively.
    precision: str = key(
        "auto", "auto (mixed_bfloat16 where the device computes bfloat16 natively, else float32), float32, "
        "mixed_bfloat16 or mixed_float16")
    jit_compile: bool = key(False, "compile the train and eval steps with XLA")
    grad_accum_steps: int = key(1, "micro-batches per optimizer step (must divide each replica's batch)")
    checkpoint_every: int = key(500, "steps between checkpoints (one is also written at the end and on SIGINT/SIGTERM)")
    keep_checkpoints: int = key(3, "newest checkpoints kept; older ones are deleted")
    validate_every: int = key(0, "steps between validation passes; 0: only at the end (with validation data)")
    validation_batches: int = key(10, "global batches of validation data per validation pass")
    log_every: int = key(10, "steps between log lines (progress, metrics.jsonl, TensorBoard)")
    seed: int = key(0, "seed of the weights' initialisation and the data order")
    shuffle_buffer: int = key(2048, "samples in the shuffle buffer; 0: the data's own order")
    # Checked at log lines once 200 samples were read: a wrong image folder should not train
    # for days on what is left.
    max_skip_rate: float = key(0.1, "stop when more than this share of the samples read were unreadable or missing")
    # Checked from the image's header, before any decoding: Pillow's own decompression-bomb
    # limit by default.
    max_image_pixels: int = key(89_478_485, "images with more pixels are skipped (counted) unread")
    image_cache_mb: int = key(
        1024, "a CSV/COCO set whose decoded images fit in this many MB is decoded once, kept in memory; 0: never")
    # Like open_clip's --dataset-resampled: a restart draws afresh instead of finding its place.
    resampled: bool = key(False, "shards only: draw whole shards with replacement instead of reading each sample "
                                 "once an epoch")
    samples_per_epoch: int | None = key(None, "with resampled: samples that make an epoch (needed then)")

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "float32", "mixed_bfloat16", "mixed_float16"):
            raise ConfigError(
                f"train.precision: {self.precision!r} is not one of "
                "('auto', 'float32', 'mixed_bfloat16', 'mixed_float16')"
            )
        for name in (
            "batch_size",
            "grad_accum_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "validation_batches",
            "max_image_pixels",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name} must be positive or null, got {value!r}")
        for name in ("validate_every", "shuffle_buffer", "seed", "image_cache_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.grad_accum_steps ({self.grad_accum_steps})"
            )
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ConfigError(f"train.max_skip_rate must be in [0, 1], got {self.max_skip_rate!r}")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ConfigError(f"train.samples_per_epoch must be positive or null, got {self.samples_per_epoch!r}")
        if self.resampled and self.samples_per_epoch is None:
            raise ConfigError("train.resampled: true needs train.samples_per_epoch (how many samples make an epoch)")


@dataclass(frozen=True)
class CaptionerConfig:
    """A captioner's YAML config: one section per dataclass above."""

    gpt2: GPT2Config = field(default_factory=GPT2Config)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for section in ("gpt2", "model", "trainable", "optim", "train"):
            for item in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), item.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section}.{item.name} must be a finite number, got {value!r}")
        if self.model.max_caption_length > self.gpt2.n_positions:
            raise ConfigError(
                f"model.max_caption_length ({self.model.max_caption_length}) must be <= gpt2.n_positions "
                f"({self.gpt2.n_positions}): GPT-2 has no position embedding beyond that"
            )
        vocab = self.model.output_vocabulary
        if isinstance(vocab, list) and max(vocab) >= self.gpt2.vocab_size:
            raise ConfigError(
                f"model.output_vocabulary: token id {max(vocab)} is outside GPT-2's vocabulary of {self.gpt2.vocab_size}"
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CaptionerConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text (UTF-8) YAML file: byte {err.start} is 0x{err.object[err.start]:02x}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if data is None:
            # Every default (GPT-2 124M, 224-px images, ...) is rarely what an empty file meant.
            raise ConfigError(f"{path}: the config is empty; give at least one section (e.g. train: {{steps: 100}})")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaptionerConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"the top level must be a mapping, got {type(data).__name__}")
        data = dict(data)
        gpt2 = GPT2Config.from_any(data.pop("gpt2", "124M"))
        rest = _from_mapping(cls, {k: v for k, v in data.items()}, "", skip=("gpt2",))
        return dataclasses.replace(rest, gpt2=gpt2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **sections: Any) -> "CaptionerConfig":
        """Override fields per section: ``cfg.replace(model={"image_size": 64})``."""
        updated = {}
        for name, changes in sections.items():
            current = getattr(self, name)
            merged = {**dataclasses.asdict(current), **changes}
            updated[name] = _from_mapping(type(current), merged, name)
        return dataclasses.replace(self, **updated)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a dataclass annotation, coercing int -> float."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-8" (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_mapping(cls: type, data: Mapping[str, Any], prefix: str, skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {where!r}; known keys here: {sorted(known - set(skip))}")
    kwargs = {}
    for f in fields(cls):
        if f.name in skip or f.name not in data:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_mapping(hint, data[f.name] or {}, where)
        else:
            kwargs[f.name] = _check_type(data[f.name], hint, where)
    return cls(**kwargs)
