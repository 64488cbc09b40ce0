"""Machine-dependent decode thresholds, kept as data with the measurement behind each.

An entry (``tuning_table.json`` beside this file, or a local file that ``gpt2-effnet
tune`` writes after measuring the machine at hand) names the machines it applies to by
measured capability (device kind, core count, ISA features), its values (a
:class:`Tuning`) and its provenance (bench command, machine, date, figures). The plan
(:mod:`.plan`) reads one entry; which one is resolved once per process, first found:
the file named by ``GPT2_EFFNET_TUNING``, the local file, the built-in table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..machine import Machine, current_machine

ENV = "GPT2_EFFNET_TUNING"  # a tuning file for the whole process
TABLE = Path(__file__).with_name("tuning_table.json")


@dataclass(frozen=True)
class Tuning:
    """The few numbers the plan takes from the machine (what each means: tuning_table.json)."""

    name: str = "untuned"
    whole_program_xla: bool = False  # jit_compile="auto": the whole call one XLA program
    xla_loop_rows: int = 0  # loops of up to this many rows: their own XLA program
    wide_loop_rows: int = 0  # float32 loops of up to this many rows too
    transposed_head_rows: tuple[int, int] = (0, 0)  # such loops multiply a [W, V] head table copy
    kernel_copies: bool = False  # loops above xla_loop_rows multiply [N, K] kernel copies
    kernel_copies_max_bytes: int = 0  # ... for models whose float32 copies fit in this
    split_one_row: bool = False  # one-row products in XLA as two half-products
    source: str = ""  # the file it was read from

    def __post_init__(self) -> None:
        object.__setattr__(self, "transposed_head_rows", tuple(int(r) for r in self.transposed_head_rows))


def _matches(match: dict[str, Any], machine: Machine) -> bool:
    return (match.get("device", machine.device) == machine.device
            and match.get("cores", machine.cores) == machine.cores
            and set(match.get("features", ())) <= machine.features
            and not set(match.get("without", ())) & machine.features)


def read_entries(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(Path(path).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"tuning file {path}: {err}") from None
    for entry in entries:
        unknown = set(entry.get("tuning", {})) - {f.name for f in dataclasses.fields(Tuning)}
        if unknown or "name" not in entry:
            raise ValueError(f"tuning file {path}: entry {entry.get('name')!r} has no name or unknown keys {sorted(unknown)}")
    return entries


def entry_for(machine: Machine, path: Path) -> dict[str, Any] | None:
    """The first entry of the file at ``path`` whose ``match`` fits ``machine``."""
    return next((entry for entry in read_entries(path) if _matches(entry.get("match", {}), machine)), None)


def local_path() -> Path:
    """Where ``gpt2-effnet tune`` writes this user's measured entry."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gpt2-effnet" / "tuning.json"


def as_tuning(entry: dict[str, Any], source: Path) -> Tuning:
    return Tuning(name=entry["name"], source=str(source), **entry.get("tuning", {}))


def resolve(machine: Machine) -> Tuning:
    """The tuning for ``machine``: from ``$GPT2_EFFNET_TUNING``, else the local file, else the table."""
    override = os.environ.get(ENV)
    if override:
        entry = entry_for(machine, Path(override))
        if entry is None:
            raise ValueError(f"{ENV}={override}: no entry matches this machine ({machine.describe()})")
        return as_tuning(entry, Path(override))
    for path in (local_path(), TABLE):
        entry = entry_for(machine, path) if path.is_file() else None
        if entry is not None:
            return as_tuning(entry, path)
    return Tuning(source="no entry matched")


@functools.lru_cache(maxsize=1)
def current_tuning() -> Tuning:
    """This process's tuning, resolved once (so every plan of the process agrees)."""
    return resolve(current_machine())


def write_local(entry: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``entry`` as the local tuning file (replacing any earlier one)."""
    from ..atomic import atomic_write

    path = Path(path or local_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump({"entries": [entry]}, handle, indent=1)
    return path
