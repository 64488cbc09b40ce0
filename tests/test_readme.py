"""The README's commands must stay true: each `gpt2-effnet ...` line parses with today's CLI,
and the Makefile targets it names exist. (Each command is run for real by the test of its
module or by `make demo`.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gpt2_effnet.cli import COMMANDS, build_parser

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
    _, parser = build_parser(name, exit_on_error=False)  # the command's parser, as cli.main builds it
    try:
        parser.parse_args(words[2:])
    except SystemExit as err:  # argparse exits on errors it cannot raise
        pytest.fail(f"README command does not parse: {command} (exit {err.code})")


def test_readme_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_parity_tolerance_is_the_tested_one() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity", ROOT / "tests" / "test_parity.py")
    source = (ROOT / "tests" / "test_parity.py").read_text()
    tolerance = re.search(r"^TOLERANCE = (\S+)$", source, flags=re.M).group(1)
    assert spec is not None
    claimed = re.search(r"the tests assert ≤ (\S+?)\)", _readme().replace("\n", " "))
    assert claimed and float(claimed.group(1)) == float(tolerance), (claimed, tolerance)


def test_readme_default_cross_attention_is_the_configs() -> None:
    from gpt2_effnet.config import ModelConfig

    assert "gated cross-attention (the default)" in _readme().replace("\n", " ")
    assert ModelConfig().cross_attention == "gated"


def test_readme_claims_only_tested_backends() -> None:
    """A Keras backend the README says the model runs on must be one a test runs it on."""
    tests = " ".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    tested = set(re.findall(r'"KERAS_BACKEND": "(\w+)"', tests)) | {"tensorflow"}
    claims = re.findall(r"`KERAS_BACKEND=(\w+)`", _readme())
    assert claims and set(claims) <= tested, (claims, tested)
    assert not re.search(r"runs? on [^.]*JAX", _readme()) or "jax" in tested


def test_readme_package_map_names_real_modules() -> None:
    text = _readme()
    start = text.index("Package map")
    end = text.find("\n## ", start)  # the next section, or the end of the file
    section = text[start: end if end != -1 else None]
    names = set(re.findall(r"`([a-z0-9_/]+(?:\.py|/))`", section))
    assert names, "no module names found in the package map"
    package = ROOT / "gpt2_effnet"
    for name in names:
        if name in ("gpt2_effnet/", "tools/", "trainers/", "samplers/"):
            assert (ROOT / name).is_dir(), name
            continue
        assert (package / name).exists() or any(package.rglob(name.rstrip("/"))), f"README names {name}, which does not exist"
    modules = {p.name for p in package.iterdir() if p.suffix == ".py" and not p.name.startswith("_")}
    packages = {p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules | packages <= names, f"modules missing from the README's package map: {sorted((modules | packages) - names)}"


def test_run_folder_tokenizer_claim_matches_training() -> None:
    from gpt2_effnet.tokenizer import RUN_TOKENIZER_DIR

    assert f"(`{RUN_TOKENIZER_DIR}/`)" in _readme()
