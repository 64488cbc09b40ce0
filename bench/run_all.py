"""Run the headline benchmarks and rewrite the table at the top of BENCHMARKS.md.

    python bench/run_all.py                      # all of them (about 6 minutes on 2 cores)
    python bench/run_all.py --only train serve   # these; the other rows keep their own date
    python bench/run_all.py --run demo_run/run   # the trained run export and serve load

Each benchmark prints its usual tables and a few ``HEADLINE {json}`` lines (bench/headline.py);
this script collects those lines into one table between the two BLOCK markers, with the date,
the commit and the machine of the run that measured each row. Everything outside the block is
hand-written and kept as it is. A benchmark that fails, or prints no headline, shows as one
failed row (with the reason), so a stale figure never passes for a fresh one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- headline:begin (written by bench/run_all.py; edit below the end marker, not inside) -->"
END = "<!-- headline:end -->"
DATA = "<!-- headline:data "
PREFIX = "HEADLINE "  # as bench/headline.py prints it


@dataclass(frozen=True)
class Bench:
    area: str
    command: tuple[str, ...]  # {run} and {images}: the trained run's folder and its images
    needs_run: bool = False


# The headline set: each of these finishes in 3 minutes or less on 2 cores.
BENCHES: dict[str, Bench] = {
    "train": Bench("training", ("bench/bench_train.py", "--variants", "default,float32", "--steps", "8", "--rounds", "2")),
    "decode": Bench("decoding", ("bench/bench_generate.py", "--configs", "124M", "--threads", "2", "--reps", "2",
                                 "--no-captioner", "--batches", "1", "32", "--modes", "greedy", "beam3", "nucleus",
                                 "--large-batch-modes", "greedy", "beam3", "nucleus")),
    "seed": Bench("decoding", ("bench/bench_decode_seed.py", "--rounds", "2", "--reps", "3")),
    "tokenizer": Bench("data", ("bench/bench_tokenizer.py", "--captions", "100000", "--uncached-captions", "10000")),
    "loaders": Bench("data", ("bench/bench_loaders.py", "--images", "2000", "--rounds", "2", "--batches", "40")),
    "shard_plan": Bench("data", ("bench/bench_shard_plan.py",)),
    "resume": Bench("data", ("bench/bench_resume.py",)),
    "export": Bench("export", ("bench/bench_export.py", "--run", "{run}", "--images", "{images}", "--n", "32"),
                    needs_run=True),
    "serve": Bench("serve", ("bench/bench_serve.py", "--run", "{run}", "--images", "{images}", "--seconds", "10"),
                   needs_run=True),
}


# ----------------------------------------------------------------------------- the machine


def machine() -> str:
    """CPU, cores and GPU in words; the CPU's family, model and the ISA features that pick kernels,
    because some CPUs' ``model name`` says only the maker (``AMD EPYC``)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    import platform

    name = info.get("model name") or platform.processor() or "unknown CPU"
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in info.get("flags", "").split()]
    detail = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info else []
    detail.append(", ".join(features) or "no AVX-512")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({'; '.join(detail)}), {cores} cores, GPU: {gpu_name()}"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return ", ".join(out.stdout.split("\n")).strip(", ") or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def commit() -> str:
    """The short commit, with ``+changes`` when tracked files (other than BENCHMARKS.md) differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!BENCHMARKS.md"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


# ----------------------------------------------------------------------------- rows and the block


def rows_from_output(bench: str, returncode: int, stdout: str, stderr: str = "") -> list[dict]:
    """The headline rows a benchmark's run gave, or one failed row saying why."""
    rows, bad = [], []
    for line in stdout.splitlines():
        if not line.startswith(PREFIX):
            continue
        try:
            item = json.loads(line[len(PREFIX):])
            rows.append({"bench": bench, "name": str(item["name"]), "figure": float(item["figure"]),
                         "unit": str(item["unit"]), "vs": str(item.get("vs") or "")})
        except (ValueError, KeyError, TypeError):
            bad.append(line.strip())
    if returncode != 0 or bad or not rows:
        if returncode != 0:
            last = (stderr.strip().splitlines() or stdout.strip().splitlines() or [""])[-1]
            why = f"exit {returncode}: {last[:160]}"
        elif bad:
            why = f"unreadable headline line: {bad[0][:160]}"
        else:
            why = "printed no headline line"
        return [{"bench": bench, "name": bench, "failed": why}]
    return rows


def read_block(text: str) -> list[dict]:
    """The rows stored in the block of an existing BENCHMARKS.md (none if it has no block)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return []
    for line in text[start:end].splitlines():
        if line.startswith(DATA):
            return json.loads(line[len(DATA):].rsplit("-->", 1)[0])
    return []


def merge(old: list[dict], new: dict[str, list[dict]]) -> list[dict]:
    """Rows of the benchmarks just run replace all of that benchmark's old rows; the others stay.
    Order: the order of BENCHES, then any old benchmark no longer listed."""
    by_bench: dict[str, list[dict]] = {}
    for row in old:
        by_bench.setdefault(row["bench"], []).append(row)
    by_bench.update(new)
    order = list(BENCHES) + [b for b in by_bench if b not in BENCHES]
    return [row for bench in order for row in by_bench.get(bench, [])]


def _number(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def render(rows: list[dict]) -> str:
    machines = list(dict.fromkeys(row["machine"] for row in rows))
    letter = {m: chr(ord("A") + i) for i, m in enumerate(machines)}
    lines = [
        BEGIN,
        "## Current figures",
        "",
        f"Written by `make bench` (`python bench/run_all.py`; `--only NAME` reruns one benchmark's rows, NAME in "
        f"{', '.join(BENCHES)}). Each row "
        "is the latest run of its benchmark, on the machine its letter names. \"N.NNx vs X\": X's time over ours "
        "(above 1: ours is faster), measured in the same run. Method and history: the sections below.",
        "",
        "| area | measure | figure | compared in the same run | date | commit | machine |",
        "|---|---|---:|---|---|---|---|",
    ]
    for row in rows:
        area = BENCHES[row["bench"]].area if row["bench"] in BENCHES else "?"
        if "failed" in row:
            cells = [area, f"**FAILED**: `{row['bench']}`", "—", row["failed"].replace("|", "/")]
        else:
            figure = f"{row['figure']:.2f}x" if row["unit"] == "x" else f"{_number(row['figure'])} {row['unit']}"
            cells = [area, row["name"], figure, row["vs"] or "—"]
        lines.append("| " + " | ".join(cells + [row["date"], f"`{row['commit']}`", letter[row["machine"]]]) + " |")
    lines += ["", "Machines: " + "; ".join(f"**{letter[m]}** = {m}" for m in machines) + ".", "",
              DATA + json.dumps(rows) + " -->", END]
    return "\n".join(lines) + "\n"


def rewrite(text: str, new: dict[str, list[dict]]) -> str:
    """``text`` (BENCHMARKS.md) with its block rebuilt from its stored rows and ``new``; the text
    outside the block is kept byte for byte (a file without a block gets one at the top)."""
    block = render(merge(read_block(text), new))
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return block + "\n" + text
    tail = text[end + len(END):]
    return text[:start] + block + tail.removeprefix("\n")


# ----------------------------------------------------------------------------- running


def run_bench(name: str, bench: Bench, run: Path, timeout: float) -> tuple[int, str, str]:
    if bench.needs_run and not (run / "config.yaml").is_file():
        return 2, "", f"no trained run at {run}: run `make demo` first, or pass --run"
    images = run.parent / "data" / "images"
    command = [part.format(run=run, images=images) for part in bench.command]
    print(f"== {name}: python {' '.join(command)}", flush=True)
    try:
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, out, f"took over {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--run", type=Path, default=ROOT / "demo_run" / "run",
                        help="a trained run for export and serve (its images: RUN/../data/images)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed each benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)

    stamp = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine()}
    print(f"{stamp['date']}, commit {stamp['commit']}, {stamp['machine']}", flush=True)
    new: dict[str, list[dict]] = {}
    total = time.perf_counter()
    for name in args.only:
        started = time.perf_counter()
        code, stdout, stderr = run_bench(name, BENCHES[name], args.run.resolve(), args.timeout)
        rows = rows_from_output(name, code, stdout, stderr)
        new[name] = [{**row, **stamp} for row in rows]
        print(stdout[-3000:], flush=True)
        if code:
            print(stderr[-3000:], file=sys.stderr, flush=True)
        print(f"-- {name}: {len(rows)} row(s), {time.perf_counter() - started:.0f} s", flush=True)
    text = args.out.read_text() if args.out.is_file() else ""
    args.out.write_text(rewrite(text, new))
    print(f"wrote {args.out} ({time.perf_counter() - total:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
