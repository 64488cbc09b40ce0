"""The README's commands must stay true: each `gpt2-effnet ...` line parses with today's CLI,
and the Makefile targets it names exist. (Each command is run for real by the test of its
module or by `make demo`.)"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from gpt2_effnet.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip() if not line.strip().startswith("TF_CONFIG") else line.strip()
            match = re.search(r"gpt2-effnet\s.*", line)
            if match:
                commands.append(match.group(0).split("  #", 1)[0].strip())
    return commands


def test_readme_shows_commands() -> None:
    names = {shlex.split(c)[1] for c in readme_commands()}
    assert {"train", "caption", "evaluate", "download", "convert", "shards"} <= names


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    words = shlex.split(command)
    name = words[1]
    assert name in COMMANDS, f"README uses unknown command {name!r}"
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"gpt2-effnet {name}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        parser.parse_args(words[2:])
    except SystemExit as err:  # argparse exits on errors it cannot raise
        pytest.fail(f"README command does not parse: {command} (exit {err.code})")


def test_readme_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
