"""The run folder: its config, its checkpoints, and the weights a captioning CLI can load.

Layout of ``RUN_DIR``::

    config.yaml              the CaptionerConfig the run uses (Captioner.load reads it)
    run.json                 what the data came from (paths, columns, loader)
    captioner.weights.h5     the latest weights, rewritten at every checkpoint
    best/                    config.yaml + weights of the lowest validation loss (if validating)
    checkpoints/ckpt-STEP.*  tf.train checkpoints: model, optimizer, step, epoch, batch in epoch
    logs/train, logs/val     TensorBoard scalars
    metrics.jsonl            one JSON line per logged step (and per validation)

A rerun of the same command finds ``config.yaml`` and the checkpoints and resumes; a rerun
with a different config stops with the differing keys named, unless told to override.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf
import yaml

from ..captioner import CONFIG_FILE, WEIGHTS_FILE
from ..config import CaptionerConfig

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"
BEST_DIR = "best"

# Keys that only change how long the run goes, how often it reports, or how a step is cut
# into micro-batches (the loop's gradients do not depend on that): changing them on resume
# does not change what the resumed steps compute, so no --override is needed.
RESUME_FREE_KEYS = frozenset(
    {
        "train.steps",
        "train.epochs",
        "train.grad_accum_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.validate_every",
        "train.validation_batches",
    }
)


class RunConfigMismatch(ValueError):
    """A resumed run was given a config (or data) different from the one it started with."""


class OutOfSpace(OSError):
    """The disk cannot hold the next checkpoint; nothing of it was left behind."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs (missing leaves read as None)."""
    a, b = flatten(old), flatten(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def _format(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in diffs.items())


def prepare_run_dir(
    run_dir: str | os.PathLike,
    config: CaptionerConfig,
    run_info: Mapping[str, Any],
    override: bool = False,
    write: bool = True,
) -> tuple[CaptionerConfig, list[str]]:
    """Write the run's config on a fresh run; on a rerun check the new one against it.

    Returns the config to use and human-readable notes about accepted changes. Raises
    :class:`RunConfigMismatch` naming each differing key unless ``override``.
    ``write=False`` (non-chief workers) checks without writing.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    info_path = run_dir / RUN_FILE
    notes: list[str] = []
    if config_path.is_file():
        saved = yaml.safe_load(config_path.read_text()) or {}
        diffs = differences(saved, config.to_dict())
        saved_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        data_diffs = differences({"data": saved_info}, {"data": dict(run_info)}) if saved_info else {}
        free_keys = set(RESUME_FREE_KEYS)
        if saved.get("optim", {}).get("schedule") == "cosine" and saved.get("optim", {}).get("decay_steps") is None:
            free_keys -= {"train.steps", "train.epochs"}  # they set the cosine's length, hence the learning rate
        strict = {k: v for k, v in {**diffs, **data_diffs}.items() if k not in free_keys}
        free = {k: v for k, v in diffs.items() if k in free_keys}
        if strict and not override:
            raise RunConfigMismatch(
                f"{run_dir} already holds a run with a different config or data; differing keys:\n"
                f"{_format(strict)}\n"
                "Use the same config to resume, another --out for a new run, or --override to "
                "resume with the new values."
            )
        if strict:
            notes.append(f"--override: resuming with changed keys:\n{_format(strict)}")
        if free:
            notes.append(f"resuming with changed run-length/reporting keys:\n{_format(free)}")
    if write:
        write_run_files(run_dir, config, run_info)
    return config, notes


def write_run_files(run_dir: str | os.PathLike, config: CaptionerConfig, run_info: Mapping[str, Any]) -> None:
    """config.yaml and run.json; written once a run has really started (after its first step)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    _write_atomic(run_dir / RUN_FILE, json.dumps(dict(run_info), indent=2, sort_keys=True) + "\n")


def clean_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed saves leave: TensorFlow's ``ckpt-N_temp`` folders, half-written weights."""
    run_dir = Path(run_dir)
    found = list((run_dir / CHECKPOINT_DIR).glob(f"{CHECKPOINT_PREFIX}-*_temp*"))
    for folder in (run_dir, run_dir / BEST_DIR):
        found += list(folder.glob("partial-*.h5")) + list(folder.glob(".*.partial"))
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _nbytes(variables: Any) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(str(getattr(v.dtype, "name", v.dtype))).itemsize for v in variables)

def _write_atomic(path: Path, text: str) -> None:
    """Other workers may read the file while the chief writes it; they must never see half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


class RunState(tf.Module):
    """Where the run is: optimizer steps done, current epoch, steps done inside that epoch,
    and the best validation loss so far (so a resumed run keeps ``best/`` honest)."""

    def __init__(self) -> None:
        super().__init__(name="run_state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        self.best_val_loss = tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_val_loss")


class Checkpointer:
    """``tf.train.CheckpointManager`` (keep the last K) plus the exported Keras weights.

    Under ``MultiWorkerMirroredStrategy`` every worker must take part in a save; only the
    chief writes into the run folder, the others into a scratch folder removed right away.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: Any,
        optimizer: Any,
        state: RunState,
        keep: int,
        is_chief: bool = True,
        worker_index: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.model = model
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, state=state)
        self.directory = self.run_dir / CHECKPOINT_DIR
        self._read_manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=keep, checkpoint_name=CHECKPOINT_PREFIX
        )
        if is_chief:
            self._write_manager = self._read_manager
            self._scratch = None
        else:
            self._scratch = self.run_dir / f".worker-{worker_index}-scratch"
            self._write_manager = tf.train.CheckpointManager(
                self.checkpoint, str(self._scratch), max_to_keep=1, checkpoint_name=CHECKPOINT_PREFIX
            )

    @property
    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(str(self.directory))

    def restore_latest(self) -> str | None:
        """Restore the newest checkpoint if there is one; return its path."""
        path = self.latest
        if path is not None:
            # Everything saved must find its object: a silent partial restore would resume garbage.
            self.checkpoint.restore(path).assert_existing_objects_matched()
        return path

    def bytes_needed(self) -> int:
        """What one save writes: the checkpoint (model + optimizer state) and the exported weights."""
        model_bytes = _nbytes(self.model.weights)
        optimizer = self.checkpoint.optimizer
        return 2 * model_bytes + _nbytes(getattr(optimizer, "variables", []))

    def save(self, step: int) -> str:
        """The checkpoint and the exported weights of this step, both or neither.

        The weights are written beside their final name first, the checkpoint next, and
        only then are the weights renamed into place: a failure anywhere leaves the
        previous checkpoint and weights as they were (a kill between the last two steps
        leaves older weights, which the next start re-exports). A save that would not fit
        on the disk is refused before anything is written; one that fails half-way is
        removed. Either way :class:`OutOfSpace` names the folder and the numbers.
        """
        target = self.directory if self._scratch is None else self._scratch
        target.mkdir(parents=True, exist_ok=True)
        needed = int(self.bytes_needed() * 1.05) + (1 << 20)
        free = shutil.disk_usage(target).free
        if free < needed:
            raise OutOfSpace(
                f"not enough disk space in {target} to save step {step}: about {needed / 1e6:.1f} MB needed, "
                f"{free / 1e6:.1f} MB free; the last checkpoint ({self.latest or 'none yet'}) is intact"
            )
        writes_weights = self._scratch is None and self.is_chief
        partial = self.run_dir / ("partial-" + WEIGHTS_FILE)
        try:
            if writes_weights:
                self.model.save_weights(partial)
            path = self._write_manager.save(checkpoint_number=step)
        except (OSError, tf.errors.ResourceExhaustedError, tf.errors.DataLossError) as err:
            clean_leftovers(self.run_dir)
            raise OutOfSpace(
                f"saving step {step} into {target} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                f"the partial files were removed and the last checkpoint ({self.latest or 'none yet'}) is intact"
            ) from None
        if writes_weights:
            final = self.run_dir / WEIGHTS_FILE
            os.replace(partial, final)
            os.utime(final)  # stamped after the checkpoint: refresh_weights() sees them as current
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        return path

    def refresh_weights(self) -> bool:
        """Re-export the weights if they are missing or older than the newest checkpoint (a save cut short)."""
        latest = self.latest
        weights = self.run_dir / WEIGHTS_FILE
        if not self.is_chief or latest is None:
            return False
        stamp = Path(latest + ".index").stat().st_mtime
        if weights.is_file() and weights.stat().st_mtime >= stamp:
            return False
        self.export_weights(self.run_dir)
        return True

    def export_weights(self, directory: str | os.PathLike) -> Path:
        """Write ``captioner.weights.h5`` atomically, so a reader never sees half a file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / ("partial-" + WEIGHTS_FILE)
        try:
            self.model.save_weights(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        final = directory / WEIGHTS_FILE
        os.replace(partial, final)
        return final

    def export_best(self, config: CaptionerConfig) -> Path:
        best = self.run_dir / BEST_DIR
        best.mkdir(parents=True, exist_ok=True)
        config.save(best / CONFIG_FILE)
        return self.export_weights(best)
