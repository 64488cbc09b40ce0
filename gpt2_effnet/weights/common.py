"""What every GPT-2 weight reader shares: canonical names, the strict check, the report.

Each file format gets a reader that only translates its own tensor names to the decoder's
canonical names (Hugging Face names without ``transformer.``) through an explicit table.
Everything that decides whether a load is acceptable lives here, once, so all formats
fail the same way: before any variable is touched, with every problem named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

from ..config import GPT2Config
from ..gpt2 import BLOCK_PARAMETERS, GLOBAL_PARAMETERS, parameter_shapes

logger = logging.getLogger("gpt2_effnet.weights")

# The canonical names, from the decoder's one list of its pretrained parameters.
BLOCK_PARAMS: tuple[str, ...] = tuple(BLOCK_PARAMETERS)
GLOBAL_PARAMS: tuple[str, ...] = tuple(GLOBAL_PARAMETERS)

_BLOCK_NAME = re.compile(r"^h\.(\d+)\.(.+)$")

# At most this many names per category in an error message; the rest are counted.
_MAX_LISTED = 25


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor of a plain GPT-2 with this config."""
    return parameter_shapes(config)


def split_block_name(canonical: str) -> tuple[int | None, str]:
    """``"h.3.ln_1.weight"`` -> ``(3, "ln_1.weight")``; global names -> ``(None, name)``."""
    match = _BLOCK_NAME.match(canonical)
    if match:
        return int(match.group(1)), match.group(2)
    return None, canonical


def translate(
    name: str,
    block_pattern: re.Pattern[str],
    global_table: Mapping[str, str],
    block_table: Mapping[str, str],
) -> str | None:
    """Look ``name`` up in a format's explicit tables; None if it is not a GPT-2 weight there.

    ``block_pattern`` must capture the layer index and the rest of the name; the rest is
    then looked up verbatim in ``block_table`` (no partial or fuzzy matches).
    """
    if name in global_table:
        return global_table[name]
    match = block_pattern.match(name)
    if match and match.group(2) in block_table:
        return f"h.{int(match.group(1))}.{block_table[match.group(2)]}"
    return None


def inverse_block_table(block_table: Mapping[str, str]) -> dict[str, str]:
    inverse: dict[str, str] = {}
    for file_suffix, canonical_suffix in block_table.items():
        inverse.setdefault(canonical_suffix, file_suffix)
    return inverse


class WeightLoadError(ValueError):
    """A weight file does not fit the model; the message names every offending tensor."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list["ShapeMismatch"] | None = None,
        other: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []
        self.other = other or []


@dataclass(frozen=True)
class ShapeMismatch:
    canonical: str
    file_name: str
    expected: tuple[int, ...]
    got: tuple[int, ...]  # as stored in the file

    def __str__(self) -> str:
        return f"{self.canonical} (in file: {self.file_name!r}): expected {self.expected}, got {self.got}"


@dataclass
class LoadReport:
    """What a load did; ``str(report)`` is the one-paragraph summary that gets logged."""

    format: str
    source: str
    loaded: list[str] = field(default_factory=list)
    num_parameters: int = 0
    skipped: list[str] = field(default_factory=list)  # known non-weights (buffers, tied copies)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # config mismatches, untied lm_head, ...

    @property
    def num_tensors(self) -> int:
        return len(self.loaded)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.other)

    def problems(self) -> str:
        return _describe_problems(self.missing, self.unexpected, self.mismatched, self.other)

    def __str__(self) -> str:
        text = (
            f"loaded {self.num_tensors} tensors ({self.num_parameters:,} parameters) "
            f"from {self.format} weights at {self.source}"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} non-weight entries ({_short_list(self.skipped, 4)})"
        if not self.complete:
            text += "; NOT loaded:\n" + self.problems()
        return text


def _short_list(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _describe_problems(
    missing: list[str], unexpected: list[str], mismatched: list[ShapeMismatch], other: list[str]
) -> str:
    lines: list[str] = []

    def section(title: str, entries: list[str]) -> None:
        if not entries:
            return
        lines.append(f"  {title} ({len(entries)}):")
        lines.extend(f"    {entry}" for entry in entries[:_MAX_LISTED])
        if len(entries) > _MAX_LISTED:
            lines.append(f"    ... and {len(entries) - _MAX_LISTED} more")

    section("missing from the file", missing)
    section("unexpected in the file", unexpected)
    section("shape mismatch", [str(m) for m in mismatched])
    section("other problems", other)
    return "\n".join(lines)


class WeightReader:
    """One weight file (or set of shards) seen through its format's explicit name table.

    Subclasses implement the file-level methods; names are the file's own names.
    Readers hold files open: use them as context managers.
    """

    format: ClassVar[str] = ""

    def __init__(self, path: Path, config: GPT2Config | None) -> None:
        self.path = Path(path)
        self.config = config
        # Problems found in the config file itself (e.g. an unsupported activation).
        self.config_problems: list[str] = []

    # -- file level ------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor in the file, by file name, with its stored shape (no data read)."""
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    # -- name tables -----------------------------------------------------------------
    def to_canonical(self, name: str) -> str | None:
        raise NotImplementedError

    def file_name(self, canonical: str) -> str:
        """The name a canonical tensor would have in this file (for messages)."""
        raise NotImplementedError

    def is_ignored(self, name: str) -> bool:
        """Entries the format is known to carry that are not weights (buffers, optimizer slots)."""
        return False

    # -- per-tensor layout differences ---------------------------------------------------
    def canonical_shape(self, canonical: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def canonical_array(self, canonical: str, array: np.ndarray) -> np.ndarray:
        return array

    def extra_problems(self, found: Mapping[str, str]) -> list[str]:
        """Format-specific checks on the mapped tensors (e.g. an untied ``lm_head``)."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



@dataclass
class LoadPlan:
    """The outcome of matching a file against the expected tensors, before reading data."""

    found: dict[str, str]  # canonical -> file name, shapes OK
    missing: list[str]
    unexpected: list[str]
    mismatched: list[ShapeMismatch]
    skipped: list[str]
    other: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.other)


def drop_leading_one(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[1, ...]`` -> ``[...]``: TF GPT-2 formats store some tensors with an extra unit axis."""
    return tuple(shape[1:]) if len(shape) >= 2 and shape[0] == 1 else tuple(shape)


def plan_load(
    reader: WeightReader,
    expected: Mapping[str, tuple[int, ...]],
    target_config: GPT2Config | None = None,
) -> LoadPlan:
    """Match every tensor of the file to an expected canonical name, checking shapes.

    ``target_config`` (the decoder's) is compared with the file's config: fields that
    change no tensor shape (``n_head``, ``layer_norm_epsilon``) would otherwise load
    silently into a model that is not the one the weights were trained as.
    """
    file_shapes = reader.shapes()
    found_any: dict[str, str] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    other: list[str] = list(reader.config_problems)
    for name in file_shapes:
        if reader.is_ignored(name):
            skipped.append(name)
            continue
        canonical = reader.to_canonical(name)
        if canonical is None or canonical not in expected:
            suffix = f" (would be {canonical}, which this model does not have)" if canonical else ""
            unexpected.append(f"{name!r}{suffix}")
            continue
        if canonical in found_any:
            other.append(f"{canonical} is stored twice: as {found_any[canonical]!r} and as {name!r}")
            continue
        found_any[canonical] = name
    missing = [f"{c} (in file: {reader.file_name(c)!r})" for c in expected if c not in found_any]
    mismatched: list[ShapeMismatch] = []
    found: dict[str, str] = {}
    for canonical, name in found_any.items():
        shape = reader.canonical_shape(canonical, tuple(file_shapes[name]))
        if tuple(shape) != tuple(expected[canonical]):
            mismatched.append(ShapeMismatch(canonical, name, tuple(expected[canonical]), tuple(file_shapes[name])))
        else:
            found[canonical] = name
    if target_config is not None and reader.config is not None and reader.config != target_config:
        for key, file_value in dataclasses.asdict(reader.config).items():
            model_value = getattr(target_config, key)
            if file_value != model_value:
                other.append(f"config {key}: the file's config says {file_value!r}, the model has {model_value!r}")
    other += reader.extra_problems(found)
    return LoadPlan(found, missing, unexpected, mismatched, skipped, other)


def raise_for_plan(reader: WeightReader, plan: LoadPlan) -> None:
    if plan.ok:
        return
    details = _describe_problems(plan.missing, plan.unexpected, plan.mismatched, plan.other)
    message = (
        f"cannot load GPT-2 weights from {reader.path} (format {reader.format}):\n{details}\n"
        "Nothing was loaded. Pass strict=False (convert: --no-strict) to load the tensors that match."
    )
    raise WeightLoadError(message, plan.missing, plan.unexpected, plan.mismatched, plan.other)


def read_canonical(reader: WeightReader, canonical: str, name: str) -> np.ndarray:
    array = np.asarray(reader.read(name))
    return reader.canonical_array(canonical, array)


def num_parameters(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes)


# -- Hugging Face config.json sanity ------------------------------------------------------

# Both names denote GPT-2's tanh-approximate GELU, the one our blocks compute.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def hf_config_problems(path: Path) -> list[str]:
    """Architecture switches in a HF ``config.json`` that our GPT-2 blocks do not implement.

    They change the numbers without changing any tensor shape, so the strict shape check
    alone would let such a model load and silently compute something else.
    """
    data = json.loads(Path(path).read_text())
    problems: list[str] = []
    model_type = data.get("model_type", "gpt2")
    if model_type != "gpt2":
        problems.append(f"{path}: model_type is {model_type!r}, not 'gpt2'")
    activation = data.get("activation_function", "gelu_new")
    if activation not in _TANH_GELUS:
        problems.append(f"{path}: activation_function {activation!r} is not GPT-2's tanh GELU {_TANH_GELUS}")
    n_inner = data.get("n_inner")
    if n_inner is not None and "n_embd" in data and int(n_inner) != 4 * int(data["n_embd"]):
        problems.append(f"{path}: n_inner {n_inner} differs from 4 * n_embd; only the standard MLP width is supported")
    if not data.get("scale_attn_weights", True):
        problems.append(f"{path}: scale_attn_weights is false; GPT-2 scales attention by 1/sqrt(head_dim)")
    if data.get("scale_attn_by_inverse_layer_idx", False):
        problems.append(f"{path}: scale_attn_by_inverse_layer_idx is true; not supported")
    if data.get("tie_word_embeddings", True) is False:
        problems.append(f"{path}: tie_word_embeddings is false; this decoder's LM head is tied to wte")
    return problems
