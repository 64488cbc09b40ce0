"""docs/CONFIG.md is config.py's keys, each with its type, default and meaning, and up to date."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt2_effnet import config_reference
from gpt2_effnet.config import CaptionerConfig, key

ROOT = Path(__file__).resolve().parent.parent


def _yaml_keys() -> set[str]:
    """Every section.key a YAML config can hold, read from a default config's own dict."""
    return {f"{section}.{name}" for section, values in CaptionerConfig().to_dict().items() for name in values}


def test_every_key_has_a_meaning() -> None:
    assert config_reference.undocumented_keys() == []
    # New keys are covered: the sections are read from CaptionerConfig, not listed here.
    assert {"train.resampled", "train.samples_per_epoch", "gpt2.n_embd", "trainable.backbone"} <= _yaml_keys()
    assert len(_yaml_keys()) == sum(len(dataclasses.fields(c)) for c in config_reference.sections().values())


def test_a_key_added_without_its_line_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Extra:
        """A section with one documented and one bare key."""

        documented: int = key(1, "has its line")
        bare: int = 2

    sections = {**config_reference.sections(), "extra": Extra}
    assert config_reference.undocumented_keys(sections) == ["extra.bare"]
    with pytest.raises(ValueError, match="extra.bare"):
        config_reference.render(sections)


def test_the_reference_lists_every_key_with_its_default() -> None:
    text = config_reference.render()
    defaults = CaptionerConfig().to_dict()
    for section, values in defaults.items():
        body = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        for name, value in values.items():
            row = next((line for line in body.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{section}.{name} has no row"
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == 4 and cells[3], row
            assert yaml.safe_load(cells[2].strip("`")) == value, (section, name, cells[2], value)


def test_docs_config_md_is_up_to_date(tmp_path) -> None:
    assert (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8") == config_reference.render(), (
        "docs/CONFIG.md is stale: run `make config-docs`")
    # The command's --check says the same, and fails on a stale copy.
    stale = tmp_path / "CONFIG.md"
    stale.write_text(config_reference.render().replace("| `n_head` |", "| `n_heads` |"))
    check = [sys.executable, "-m", "gpt2_effnet.config_reference", "--check", "--out"]
    assert subprocess.run([*check, str(ROOT / "docs" / "CONFIG.md")], cwd=ROOT).returncode == 0
    failed = subprocess.run([*check, str(stale)], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 1 and "make config-docs" in failed.stderr
