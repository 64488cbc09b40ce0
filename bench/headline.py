"""The line a headline benchmark prints for ``bench/run_all.py`` to put in BENCHMARKS.md's top table.

One JSON object a line after ``HEADLINE ``: ``name`` (what was measured), ``figure`` (a number),
``unit``, and ``vs`` (what the figure was compared with in the same run, or empty). A script
prints its own tables as before; these lines are the few figures a reader looks for first.
"""

from __future__ import annotations

import json

PREFIX = "HEADLINE "


def emit(name: str, figure: float, unit: str, vs: str = "") -> None:
    print(PREFIX + json.dumps({"name": name, "figure": figure, "unit": unit, "vs": vs}), flush=True)
