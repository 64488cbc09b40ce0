"""Finding, checking and loading GPT-2 weights in any supported format.

``load_gpt2(path)`` builds a plain GPT-2 from a folder or file; ``load_into(decoder, path)``
fills the pretrained part of an existing decoder (e.g. a captioner's), touching only the
variables in ``decoder.named_weights()``. Both check the whole file first and assign
nothing unless everything fits (strict), or load what fits and report the rest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..config import ConfigError, GPT2Config
from .common import (
    LoadPlan,
    LoadReport,
    WeightLoadError,
    WeightReader,
    expected_shapes,
    logger,
    num_parameters,
    plan_load,
    raise_for_plan,
    read_canonical,
)
from .hf_h5 import HFH5Reader
from .hf_safetensors import INDEX_SUFFIX, SafetensorsReader
from .native import CONFIG_FILE, WEIGHTS_FILE, NativeReader
from .openai_ckpt import OpenAICheckpointReader, find_checkpoint_prefix

if TYPE_CHECKING:
    from ..gpt2 import GPT2Decoder

FORMATS: tuple[str, ...] = ("native", "hf_safetensors", "hf_h5", "openai_ckpt")

# Files whose only reader is pickle (arbitrary code on load): named, refused, never opened.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CKPT_SHARD = re.compile(r"\.data-\d+-of-\d+$")

_PICKLE_ADVICE = (
    "it is a pickle file, and loading it would run whatever code it contains, so this "
    "loader never opens it. Convert it to safetensors first, where you trust the file, e.g. "
    "python -c \"from transformers import GPT2LMHeadModel as M; "
    "M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\" "
    "(or download model.safetensors instead)"
)


class WeightFormatError(WeightLoadError):
    """No supported GPT-2 weights at a path (or only a refused format such as pickle)."""


def _resolve_folder(folder: Path, fmt: str | None) -> tuple[str, Path]:
    candidates: dict[str, Path | None] = {
        "native": folder / WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else None,
        "hf_safetensors": next(
            (p for p in (folder / "model.safetensors", folder / f"model{INDEX_SUFFIX}") if p.is_file()), None
        ),
        "hf_h5": folder / "tf_model.h5" if (folder / "tf_model.h5").is_file() else None,
        "openai_ckpt": find_checkpoint_prefix(folder),
    }
    if fmt is not None:
        found = candidates[fmt]
        if found is None:
            raise WeightFormatError(f"{folder}: no {fmt} weights found in this folder")
        return fmt, found
    # Hub folders often hold several formats of the same weights; the first found wins.
    for name in FORMATS:
        found = candidates[name]
        if found is not None:
            return name, found
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise WeightFormatError(f"{folder}: the only weights here are {pickles}; {_PICKLE_ADVICE}")
    raise WeightFormatError(
        f"{folder}: no GPT-2 weights found; looked for {WEIGHTS_FILE} (native), model.safetensors or "
        f"model{INDEX_SUFFIX} (Hugging Face), tf_model.h5 (Hugging Face TF), and checkpoint / "
        "model.ckpt.index (OpenAI)"
    )


def _resolve_file(path: Path, fmt: str | None) -> tuple[str, Path]:
    name = path.name
    if not path.exists():
        if Path(f"{path}.index").is_file():
            return fmt or "openai_ckpt", path
        raise FileNotFoundError(f"{path}: no such file, folder or checkpoint prefix")
    if fmt is not None:
        if fmt == "openai_ckpt" and name.endswith(".index"):
            return fmt, path.with_name(name[: -len(".index")])
        return fmt, path
    if name.endswith((".safetensors", INDEX_SUFFIX)):
        return "hf_safetensors", path
    if name.endswith(".weights.h5"):
        return "native", path
    if name.endswith(".h5"):
        return "hf_h5", path
    for suffix_re in (re.compile(r"\.index$"), re.compile(r"\.meta$"), _CKPT_SHARD):
        prefix = suffix_re.sub("", name)
        if prefix != name and path.with_name(f"{prefix}.index").is_file():
            return "openai_ckpt", path.with_name(prefix)
    if name.endswith(_PICKLE_SUFFIXES):
        raise WeightFormatError(f"{path}: {_PICKLE_ADVICE}")
    raise WeightFormatError(
        f"{path}: unknown weight file type; expected .safetensors, .h5 (tf_model.h5 or our "
        ".weights.h5), or an OpenAI checkpoint prefix such as model.ckpt"
    )


def resolve(path: str | os.PathLike, format: str | None = None) -> tuple[str, Path]:
    """``(format, weights path)`` for a folder, a weights file or a checkpoint prefix."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown weights format {format!r}; choose one of {FORMATS}")
    path = Path(path)
    if path.is_dir():
        return _resolve_folder(path, format)
    return _resolve_file(path, format)


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the files present (no data is read)."""
    return resolve(path)[0]


def _config_dir(path: str | os.PathLike, weights: Path) -> Path:
    return Path(path) if Path(path).is_dir() else weights.parent


def _read_config(fmt: str, folder: Path) -> tuple[GPT2Config | None, Path | None]:
    """The folder's GPT-2 shape, from the file the format comes with."""
    hf_config = folder / CONFIG_FILE
    hparams = folder / "hparams.json"
    order = (hparams, hf_config) if fmt == "openai_ckpt" else (hf_config,)
    for candidate in order:
        if candidate.is_file():
            if candidate.name == "hparams.json":
                return GPT2Config.from_openai_hparams(candidate), candidate
            return GPT2Config.from_hf_json(candidate), candidate
    return None, None


def open_reader(
    path: str | os.PathLike,
    format: str | None = None,
    config: "GPT2Config | str | Mapping[str, Any] | None" = None,
) -> WeightReader:
    """A reader for the weights at ``path``; ``config`` overrides the folder's config file."""
    fmt, weights = resolve(path, format)
    file_config, config_file = _read_config(fmt, _config_dir(path, weights))
    cfg = GPT2Config.from_any(config) if config is not None else file_config
    hf_config_file = config_file if config is None and config_file is not None and config_file.name == CONFIG_FILE else None
    if fmt == "native":
        return NativeReader(weights, cfg)
    if fmt == "hf_safetensors":
        return SafetensorsReader(weights, cfg, hf_config_file)
    if fmt == "hf_h5":
        return HFH5Reader(weights, cfg, hf_config_file)
    return OpenAICheckpointReader(weights, cfg)


def _require_config(reader: WeightReader) -> GPT2Config:
    if reader.config is None:
        raise ConfigError(
            f"{reader.path}: no config.json or hparams.json next to these weights, and n_head cannot be "
            "read from tensor shapes; pass config= (a GPT2Config, a preset name such as '124M', or a folder)"
        )
    return reader.config


def _report(reader: WeightReader, plan: LoadPlan, shapes: Mapping[str, tuple[int, ...]]) -> LoadReport:
    return LoadReport(
        format=reader.format,
        source=str(reader.path),
        loaded=list(plan.found),
        num_parameters=num_parameters(shapes[c] for c in plan.found),
        skipped=list(plan.skipped),
        missing=list(plan.missing),
        unexpected=list(plan.unexpected),
        mismatched=list(plan.mismatched),
        other=list(plan.other),
    )


def _log(report: LoadReport) -> None:
    if report.complete:
        logger.info("%s", report)
    else:
        logger.warning("%s", report)


def read_weights(
    path: str | os.PathLike,
    strict: bool = True,
    format: str | None = None,
    config: "GPT2Config | str | Mapping[str, Any] | None" = None,
) -> tuple[dict[str, np.ndarray], GPT2Config, LoadReport]:
    """All GPT-2 tensors of a file as ``{canonical name: array}``, with the config they fit."""
    with open_reader(path, format, config) as reader:
        cfg = _require_config(reader)
        shapes = expected_shapes(cfg)
        plan = plan_load(reader, shapes)
        if strict:
            raise_for_plan(reader, plan)
        arrays = {c: read_canonical(reader, c, name) for c, name in plan.found.items()}
        report = _report(reader, plan, shapes)
    _log(report)
    return arrays, cfg, report


def _assign(decoder: "GPT2Decoder", reader: WeightReader, strict: bool) -> LoadReport:
    from tqdm.auto import tqdm

    targets = decoder.named_weights()
    shapes = {name: tuple(int(d) for d in var.shape) for name, var in targets.items()}
    if reader.config is None:
        logger.warning(
            "%s: no config file; n_head and layer_norm_epsilon of the weights cannot be checked", reader.path
        )
    plan = plan_load(reader, shapes, decoder.gpt2_config)
    if strict:
        raise_for_plan(reader, plan)
    for canonical, name in tqdm(plan.found.items(), desc="loading GPT-2 weights", unit="tensor", disable=None):
        variable = targets[canonical]
        variable.assign(np.asarray(read_canonical(reader, canonical, name), dtype=variable.dtype))
    report = _report(reader, plan, shapes)
    _log(report)
    return report


def load_into(
    decoder: "GPT2Decoder",
    path: str | os.PathLike,
    strict: bool = True,
    format: str | None = None,
    config: "GPT2Config | str | Mapping[str, Any] | None" = None,
) -> LoadReport:
    """Load pretrained GPT-2 weights into ``decoder.named_weights()``; nothing else is touched.

    Strict: any missing, unexpected or mis-shaped tensor, or a config that differs from
    the decoder's, raises :class:`WeightLoadError` before a single variable changes.
    """
    with open_reader(path, format, config) as reader:
        return _assign(decoder, reader, strict)


def load_gpt2(
    path: str | os.PathLike,
    strict: bool = True,
    format: str | None = None,
    config: "GPT2Config | str | Mapping[str, Any] | None" = None,
) -> "GPT2Decoder":
    """A plain GPT-2 (token ids ``[B, T]`` -> logits ``[B, T, V]``) from any supported weights.

    ``path`` is a folder (format detected from its files) or a ``.safetensors`` /
    ``.h5`` file or an OpenAI checkpoint prefix. The load summary is logged and kept as
    ``model.load_report``.
    """
    from ..gpt2 import GPT2Decoder

    with open_reader(path, format, config) as reader:
        decoder = GPT2Decoder(_require_config(reader))
        report = _assign(decoder, reader, strict)
    decoder.load_report = report
    return decoder
