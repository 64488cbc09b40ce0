"""bench/run_all.py's rewrite of BENCHMARKS.md's top table, fed made-up benchmark output (no benchmark runs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run_all = _load("run_all")

HAND_WRITTEN_TOP = "# Benchmarks\n\nA hand-written line above the block.\n\n"
HAND_WRITTEN_REST = "\n## Training\n\nMethod, figures | with a pipe, and `code`.\n<!-- an unrelated comment -->\n"


def _headline(name: str, figure: float, unit: str, vs: str = "") -> str:
    return "HEADLINE " + json.dumps({"name": name, "figure": figure, "unit": unit, "vs": vs})


def _stamped(rows: list[dict], date: str, commit: str = "abc1234", machine: str = "CPU X, 2 cores, GPU: none"):
    return [{**row, "date": date, "commit": commit, "machine": machine} for row in rows]


def _table_rows(text: str) -> list[str]:
    block = text[text.index(run_all.BEGIN):text.index(run_all.END)]
    return [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| area")]


def test_rows_from_output_reads_headlines_and_ignores_other_lines():
    out = "\n".join(["a table | 1 | 2", _headline("train step", 165.2, "ms", "1.40x vs float32"),
                     "HEADLINES are not this", _headline("images/s", 48.4, "images/s")])
    rows = run_all.rows_from_output("train", 0, out)
    assert [(r["name"], r["figure"], r["unit"], r["vs"]) for r in rows] == [
        ("train step", 165.2, "ms", "1.40x vs float32"), ("images/s", 48.4, "images/s", "")]


@pytest.mark.parametrize("code, out, err, why", [
    (1, _headline("x", 1, "s"), "Traceback ...\nRuntimeError: boom", "exit 1: RuntimeError: boom"),
    (0, "a table without headline lines", "", "printed no headline line"),
    (0, "HEADLINE {not json", "", "unreadable headline line"),
    (0, _headline("x", "fast", "s"), "", "unreadable headline line"),
])
def test_a_failed_benchmark_is_one_failed_row(code, out, err, why):
    rows = run_all.rows_from_output("serve", code, out, err)
    assert len(rows) == 1 and rows[0]["bench"] == "serve"
    assert rows[0]["failed"].startswith(why)


def test_rewrite_replaces_the_block_and_keeps_the_text_around_it():
    first = {"train": _stamped(run_all.rows_from_output("train", 0, _headline("train step", 165.2, "ms")), "2026-01-01"),
             "serve": _stamped(run_all.rows_from_output("serve", 0, _headline("goodput", 180.7, "requests/s")),
                               "2026-01-01")}
    text = run_all.rewrite(HAND_WRITTEN_TOP + HAND_WRITTEN_REST, first)
    assert text.startswith(run_all.BEGIN)  # a file without a block gets it at the top
    assert text.endswith(HAND_WRITTEN_TOP + HAND_WRITTEN_REST)

    # The block moved under the title by hand stays there; the next run rewrites it in place.
    block = text[:text.index(run_all.END) + len(run_all.END)]
    doc = HAND_WRITTEN_TOP + block + "\n" + HAND_WRITTEN_REST
    second = {"train": _stamped(run_all.rows_from_output("train", 0, _headline("train step", 150.0, "ms", "2.00x vs main")),
                                "2026-02-02", commit="def5678")}
    again = run_all.rewrite(doc, second)
    assert again.startswith(HAND_WRITTEN_TOP + run_all.BEGIN)
    assert again.endswith(run_all.END + "\n" + HAND_WRITTEN_REST)
    assert again.count(run_all.BEGIN) == 1 and again.count(run_all.END) == 1

    rows = _table_rows(again)
    assert len(rows) == 2
    assert "150 ms" in rows[0] and "2.00x vs main" in rows[0] and "2026-02-02" in rows[0] and "def5678" in rows[0]
    assert "165" not in again  # the replaced figure is gone, from the table and from the stored rows
    # --only train: serve's row keeps its own figure, date and commit.
    assert "181 requests/s" in rows[1] and "2026-01-01" in rows[1] and "abc1234" in rows[1]
    assert "CPU X, 2 cores, GPU: none" in again


def test_a_failed_run_replaces_that_benchmarks_old_figures():
    old = run_all.rewrite("", {"export": _stamped(run_all.rows_from_output(
        "export", 0, _headline("export", 4.8, "s") + "\n" + _headline("captions/s", 78.2, "captions/s")), "2026-01-01")})
    failed = {"export": _stamped(run_all.rows_from_output("export", 2, "", "no trained run at /x: run `make demo` first"),
                                 "2026-02-02")}
    rows = _table_rows(run_all.rewrite(old, failed))
    assert len(rows) == 1
    assert "**FAILED**" in rows[0] and "no trained run" in rows[0] and "2026-02-02" in rows[0]
    assert "78.2" not in rows[0]


def test_rows_from_two_machines_are_told_apart():
    text = run_all.rewrite("", {"train": _stamped([{"bench": "train", "name": "a", "figure": 1.0, "unit": "s", "vs": ""}],
                                                  "2026-01-01", machine="Machine one")})
    text = run_all.rewrite(text, {"seed": _stamped([{"bench": "seed", "name": "b", "figure": 2.0, "unit": "s", "vs": ""}],
                                                   "2026-01-02", machine="Machine two")})
    rows = _table_rows(text)
    assert rows[0].endswith("| A |") and rows[1].endswith("| B |")
    assert "**A** = Machine one" in text and "**B** = Machine two" in text


def test_only_accepts_listed_benchmarks(tmp_path):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no-such-bench", "--out", str(tmp_path / "B.md")])
    assert not (tmp_path / "B.md").exists()


def test_every_headline_benchmark_prints_headline_lines():
    for name, bench in run_all.BENCHES.items():
        script = ROOT / bench.command[0]
        assert script.is_file(), name
        assert "headline.emit(" in script.read_text(), f"{script.name} prints no HEADLINE line"


def test_machine_names_the_cores_and_the_gpu():
    text = run_all.machine()
    assert " cores, GPU: " in text
