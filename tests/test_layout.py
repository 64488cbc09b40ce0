"""The package's shape: no import cycle between its parts, and the commands on top of everything.

Imports are read from the source (no module is executed), including the ones inside
functions, which is where a cycle hides when a package imports a CLI that imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2_effnet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every gpt2_effnet module ``path`` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gpt2_effnet")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("gpt2_effnet"):
                continue
            if node.module is None:  # from . import x: x is a module
                found |= {f"{target}.{alias.name}" for alias in node.names}
            else:
                found.add(target)
    return found


def _part(module: str) -> str:
    """``gpt2_effnet.training.loop`` -> ``gpt2_effnet.training``: the unit a cycle is counted between."""
    return ".".join(module.split(".")[:2])


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _part(_module_name(path))
        graph.setdefault(source, set()).update(_part(m) for m in _imports(path))
    for source, targets in graph.items():
        targets.discard(source)
        targets.discard("gpt2_effnet")  # the top-level lazy re-exports
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_no_import_cycle_between_the_packages_parts() -> None:
    graph = _graph()
    assert "gpt2_effnet.decoding" in graph and "gpt2_effnet.captioner" in graph
    cycles = sorted(part for part in graph if part in _reachable(graph, part))
    assert not cycles, f"import cycles through: {cycles}"


def test_only_the_cli_imports_the_commands() -> None:
    graph = _graph()
    importers = sorted(part for part, targets in graph.items() if "gpt2_effnet.commands" in targets)
    assert importers == [], importers  # cli.py imports them by name, through importlib
    cli = (PACKAGE / "cli.py").read_text()
    assert "gpt2_effnet.commands." in cli
