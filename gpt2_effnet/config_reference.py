"""``docs/CONFIG.md``: every config key with its type, default and meaning, from :mod:`.config`.

The meanings live beside the fields (``config.key(default, meaning)``), so the reference
is regenerated, never edited: ``make config-docs`` (or ``python -m
gpt2_effnet.config_reference``) writes it, ``--check`` fails when it is stale, and a key
without a meaning is refused here and by tests/test_config_reference.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from .config import MEANING, PRESETS, CaptionerConfig

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"

HEADER = """\
# Configuration reference

A run's config is one YAML file with up to five sections (`gpt2`, `model`, `trainable`,
`optim`, `train`); a key left out takes its default, and an unknown key or a value of the
wrong type stops the run at once, naming the key. `configs/` holds worked examples;
`gpt2-effnet train --set SECTION.KEY=VALUE` overrides a key for one run (any section but
`gpt2`).

This page is generated from `gpt2_effnet/config.py` by `make config-docs`; edit the
meanings there, next to the fields.
"""


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in the order of :class:`CaptionerConfig`."""
    hints = typing.get_type_hints(CaptionerConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(CaptionerConfig)}


def undocumented_keys(of: Mapping[str, type] | None = None) -> list[str]:
    """``section.key`` of every field without a one-line meaning (an empty list when all have one)."""
    missing = []
    for section, cls in (sections() if of is None else of).items():
        for item in dataclasses.fields(cls):
            meaning = item.metadata.get(MEANING, "")
            if not meaning.strip() or "\n" in meaning or "|" in meaning:  # one line, one table cell
                missing.append(f"{section}.{item.name}")
    return missing


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


# Python annotations -> the YAML words a config's author knows.
_TYPE_WORDS = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "list": "list", "None": "null"}


def _type(annotation: str) -> str:
    return " or ".join(_TYPE_WORDS[part.strip()] for part in annotation.split("|"))


def render(of: Mapping[str, type] | None = None) -> str:
    """The reference as Markdown; raises ValueError naming any key without a meaning."""
    of = sections() if of is None else of
    missing = undocumented_keys(of)
    if missing:
        raise ValueError(f"config keys without a one-line meaning in config.py: {', '.join(missing)}")
    parts = [HEADER]
    for section, cls in of.items():
        parts.append(f"\n## `{section}`\n\n")
        parts.append((cls.__doc__ or "").strip().replace("``", "`"))
        if section == "gpt2":
            names = ", ".join(f"`{name}`" for name in PRESETS)
            parts.append(f" Presets: {names}; a config without `gpt2` gets `124M` (the defaults below).")
        parts.append("\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for item in dataclasses.fields(cls):
            default = _yaml_value(item.default)
            parts.append(f"| `{item.name}` | {_type(str(item.type))} | `{default}` | {item.metadata[MEANING]} |\n")
    return "".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_effnet.config_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="where to write it (default: docs/CONFIG.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run `make config-docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
