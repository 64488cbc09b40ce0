"""What a run tells people: the progress bar, printed lines, metrics.jsonl and TensorBoard logs.

Only the chief writes (other workers get a disabled bar and no-op summary writers), so a
multi-worker run leaves one set of logs. metrics.jsonl holds one JSON object per log
line (training window, validation, resume events); TensorBoard scalars go through
``tf.summary`` into ``RUN_DIR/logs/{train,val}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from ..atomic import atomic_write, naming

METRICS_FILE = "metrics.jsonl"


class MetricWindow:
    """Token-weighted sums between two log lines, and the time spent waiting for input.

    Step outputs stay tensors until the log line: reading them every step would make the
    host wait for the device after each step instead of queueing the next one. ``data_wait``
    is the time the loop spent blocked on the input pipeline: near 0 when the device is
    the bottleneck, near the whole window when the loader is.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[tuple[Any, ...]] = []
        self.start = time.perf_counter()
        self.data_wait = 0.0

    @property
    def steps(self) -> int:
        return len(self.pending)

    def add(self, outputs: tuple[Any, ...], data_wait: float = 0.0) -> None:
        self.pending.append(tuple(outputs[:3]))
        self.data_wait += data_wait

    def totals(self) -> tuple[float, float, float]:
        """(cross-entropy sum, correct tokens, tokens) over the window; waits for its last step."""
        if not self.pending:
            return 0.0, 0.0, 0.0
        values = np.asarray([[float(x) for x in step] for step in self.pending], dtype=np.float64)
        loss, correct, tokens = values.sum(axis=0)
        return float(loss), float(correct), float(tokens)


def print_line(text: str) -> None:
    print(text, flush=True)


class Reporter:
    """One run's outputs for people: lines, a progress bar, metrics.jsonl and TensorBoard."""

    def __init__(
        self, run_dir: Path, *, is_chief: bool, show_progress: bool, log: Callable[[str], None] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.is_chief = is_chief
        self.show_progress = show_progress
        self._log = log or print_line
        self._bar: Any = None
        self._writers: dict[str, Any] = {}

    # -- lines ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line from the chief; printed above the progress bar while one is showing."""
        if self.is_chief:
            self.emit(text)

    def emit(self, text: str) -> None:
        """A line from any worker (e.g. its own skip count)."""
        if self._bar is not None and not self._bar.disable and self._log is print_line:
            self._bar.write(text, file=sys.stdout)
        else:
            self._log(text)

    # -- progress bar --------------------------------------------------------------------
    def open_progress(self, total: int | None, initial: int) -> Any:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            desc="train",
            disable=not (self.show_progress and self.is_chief),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        return self._bar

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for writer in self._writers.values():
            writer.flush()

    # -- metrics -------------------------------------------------------------------------
    def training_window(
        self,
        window: MetricWindow,
        *,
        step: int,
        epoch: int,
        learning_rate: float,
        batch_size: int,
        skips: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Close a window of training steps: one metrics line, TensorBoard scalars, the bar's postfix.

        ``skips`` (samples skipped so far this epoch, and their share) joins all three.
        """
        loss, correct, tokens = window.totals()
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss / max(tokens, 1.0),
            "accuracy": correct / max(tokens, 1.0),
            "learning_rate": learning_rate,
            "images_per_sec": window.steps * batch_size / elapsed,
            "tokens": tokens,
            # The share of the window the loop waited for input: a loader-bound run shows it.
            "data_wait": min(window.data_wait / elapsed, 1.0),
        }
        scalar_keys = ["loss", "accuracy", "learning_rate", "images_per_sec", "data_wait"]
        postfix = {"loss": f"{record['loss']:.4f}", "acc": f"{record['accuracy']:.3f}",
                   "img_s": f"{record['images_per_sec']:.1f}", "wait": f"{record['data_wait']:.0%}"}
        if skips is not None:
            record.update(skipped=skips["skipped"], skip_rate=skips["rate"])
            scalar_keys += ["skipped", "skip_rate"]
            if skips["skipped"]:
                postfix["skipped"] = f"{skips['skipped']} ({skips['rate']:.1%})"
        self.scalars("train", step, {k: record[k] for k in scalar_keys})
        if self._bar is not None:
            self._bar.set_postfix(postfix)
        self.append_metrics(record)
        window.reset()
        return record

    def validation(self, *, step: int, loss: float, correct: float, tokens: float) -> dict[str, Any]:
        record = {
            "step": step,
            "val_loss": loss / max(tokens, 1.0),
            "val_accuracy": correct / max(tokens, 1.0),
            "val_tokens": tokens,
        }
        self.scalars("val", step, {"loss": record["val_loss"], "accuracy": record["val_accuracy"]})
        self._writer("val").flush()
        self.append_metrics(record)
        self.say(f"step {step}: validation loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.3f}")
        return record

    def scalars(self, name: str, step: int, values: Mapping[str, float]) -> None:
        writer = self._writer(name)
        with writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def _writer(self, name: str) -> Any:
        if name not in self._writers:
            if self.is_chief:
                self._writers[name] = tf.summary.create_file_writer(str(self.run_dir / "logs" / name))
            else:
                self._writers[name] = tf.summary.create_noop_writer()
        return self._writers[name]

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        if self.is_chief:
            with naming(self.run_dir / METRICS_FILE), open(self.run_dir / METRICS_FILE, "a") as handle:
                # Wall-clock time: a pause between two lines shows where a run waited.
                handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def forget_metrics_after(self, step: int) -> int:
        """Drop log lines of steps a killed run took after its last checkpoint: they are replayed now.

        Lines that are not a JSON object with a numeric step (cut short by a kill, edited)
        are dropped too; returns how many of those there were.
        """
        path = self.run_dir / METRICS_FILE
        if not self.is_chief or not path.is_file():
            return 0
        kept, unreadable = [], 0
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                at = record.get("step", 0) if isinstance(record, dict) else None
            except json.JSONDecodeError:
                at = None
            if not isinstance(at, (int, float)) or isinstance(at, bool):
                unreadable += bool(line.strip())
            elif at <= step:
                kept.append(line)
        with atomic_write(path, "w", encoding="utf-8") as handle:  # a full disk leaves the old file
            handle.write("".join(line + "\n" for line in kept))
        return unreadable
