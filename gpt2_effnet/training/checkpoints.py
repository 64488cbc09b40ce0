"""The run folder: its config, its checkpoints, and the weights a captioning CLI can load.

Layout of ``RUN_DIR``::

    config.yaml              the CaptionerConfig the run uses (Captioner.load reads it)
    run.json                 what the data came from (paths, columns, loader)
    captioner.weights.h5     the latest weights, rewritten at every checkpoint
    best/                    config.yaml + weights of the lowest validation loss (if validating)
    checkpoints/ckpt-STEP.*  tf.train checkpoints: model, optimizer, step, epoch, batch in epoch
    logs/train, logs/val     TensorBoard scalars
    metrics.jsonl            one JSON line per logged step (and per validation)

A rerun of the same command finds ``config.yaml`` and the checkpoints and resumes from the
newest checkpoint that restores (a deleted or corrupt newer one is named and skipped); a
rerun with a different config stops with the differing keys named, unless told to
override. A folder that holds a trained run's files but no checkpoint that restores is
never silently trained over from step 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf
import yaml

from ..atomic import atomic_write
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


class CheckpointUnusable(ValueError):
    """The run folder holds checkpoints, but none of them restores into this model."""


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints whose index file is in ``directory``, newest first.

    Read from the files, not from TensorFlow's state file: a user who deletes the newest
    checkpoint's files to go back one leaves the state file naming it.
    """
    steps = []
    for index in Path(directory).glob(f"{CHECKPOINT_PREFIX}-*.index"):
        number = index.name[len(CHECKPOINT_PREFIX) + 1 : -len(".index")]
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps, reverse=True)


def _state_file(directory: Path) -> Path:
    return directory / "checkpoint"


def _steps_in_state(directory: Path) -> tuple[list[int], bool]:
    """Steps TensorFlow's state file names, and whether the file reads as one (absent: ``[], True``)."""
    path = _state_file(directory)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return [], True
    except (OSError, UnicodeDecodeError):
        return [], False
    lines = [line for line in text.splitlines() if line.strip()]
    readable = all(re.fullmatch(r"\s*\w+\s*:\s*\S.*", line) for line in lines)
    named = {int(m) for m in re.findall(rf"{CHECKPOINT_PREFIX}-(\d+)\"", text)}
    return sorted(named, reverse=True), readable


def _write_state(directory: Path, steps: list[int]) -> None:
    """TensorFlow's state file for these checkpoints (oldest first), as its CheckpointManager writes it."""
    lines = []
    if steps:
        lines.append(f'model_checkpoint_path: "{CHECKPOINT_PREFIX}-{steps[-1]}"')
    lines += [f'all_model_checkpoint_paths: "{CHECKPOINT_PREFIX}-{step}"' for step in steps]
    lines += [
        f"all_model_checkpoint_timestamps: {(directory / f'{CHECKPOINT_PREFIX}-{step}.index').stat().st_mtime}"
        for step in steps
    ]
    lines.append("last_preserved_timestamp: 0.0")
    _write_atomic(_state_file(directory), "\n".join(lines) + "\n")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


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
    checkpoints = run_dir / CHECKPOINT_DIR
    has_checkpoints = bool(checkpoint_steps(checkpoints))
    if not has_checkpoints:
        _refuse_fresh_start(run_dir)
    if has_checkpoints and not config_path.is_file():
        if not override:
            raise RunConfigMismatch(
                f"{run_dir} holds checkpoints but no {CONFIG_FILE}, so this config cannot be checked against "
                f"the run's; put the run's {CONFIG_FILE} back, or use --override to resume with this config"
            )
        notes.append(f"--override: {run_dir} has no {CONFIG_FILE} to compare with; resuming with this config")
    if config_path.is_file():
        saved = _read_mapping(config_path, yaml.safe_load, "YAML")
        diffs = differences(saved, config.to_dict())
        saved_info = _read_mapping(info_path, json.loads, "JSON") if info_path.is_file() else {}
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


def _refuse_fresh_start(run_dir: Path) -> None:
    """A trained run's files without a checkpoint: starting at step 0 would overwrite them."""
    checkpoints = run_dir / CHECKPOINT_DIR
    named, _ = _steps_in_state(checkpoints)
    left = [name for name, present in ((WEIGHTS_FILE, (run_dir / WEIGHTS_FILE).is_file()),
                                       (f"{CHECKPOINT_DIR}/checkpoint naming {', '.join(f'{CHECKPOINT_PREFIX}-{s}' for s in named)}",
                                        bool(named))) if present]
    if left:
        raise CheckpointUnusable(
            f"{run_dir} holds a trained run ({' and '.join(left)}) but no checkpoint files to resume from; "
            "a new run there would overwrite it: train into another --out, or move those files away to start over"
        )


def _read_mapping(path: Path, parse: Any, kind: str) -> dict[str, Any]:
    """A run file's mapping (``parse``: yaml.safe_load or json.loads); RunConfigMismatch naming it otherwise."""
    try:
        data = parse(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        raise RunConfigMismatch(f"{path}: not readable {kind} ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise RunConfigMismatch(f"{path}: expected a {kind} mapping, got {type(data).__name__}")
    return data


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
    with atomic_write(path) as handle:
        handle.write(text)


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
        self.keep = keep
        self.notes: list[str] = []  # what restore_latest() skipped, and why
        self.skipped_newer = False
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
        """Restore the newest checkpoint that restores; return its path (None: the folder has none).

        Newer checkpoints that are gone (deleted files TensorFlow's state file still names)
        or do not restore (cut, zeroed, another model's shape) are skipped, each named with
        its reason in :attr:`notes`; the state file is then rewritten to the checkpoints
        kept, so the next saves go on from the one restored. Raises
        :class:`CheckpointUnusable` when checkpoints exist but none restores.
        """
        self.notes, self.skipped_newer = [], False
        steps = checkpoint_steps(self.directory)
        named, readable = _steps_in_state(self.directory)
        if not readable:
            self.notes.append(f"{_state_file(self.directory)} is not a checkpoint list; read the checkpoints from their files")
        gone = [step for step in named if step not in steps]
        failures: list[str] = []
        for step in steps:
            path = str(self.directory / f"{CHECKPOINT_PREFIX}-{step}")
            try:
                # Everything saved must find its object: a silent partial restore would resume garbage.
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as err:  # a cut or zeroed file, or another model's shape: try the one before
                failures.append(f"{CHECKPOINT_PREFIX}-{step} does not restore ({_first_line(err)})")
                continue
            newer_gone = [f"{CHECKPOINT_PREFIX}-{g} has no files (deleted?)" for g in gone if g > step]
            skipped = newer_gone + failures
            if skipped:
                self.skipped_newer = True
                self.notes.append(f"skipped newer checkpoint(s): {'; '.join(skipped)}")
            if self.is_chief and (skipped or gone or not readable):
                _write_state(self.directory, sorted(s for s in steps if s <= step))
                self._reopen_managers()
            return path
        if failures:
            raise CheckpointUnusable(
                f"{self.directory} holds {len(steps)} checkpoint(s) but none restores into this model: "
                f"{'; '.join(failures)}. Nothing was overwritten; train into another --out to start afresh"
            )
        return None

    def _reopen_managers(self) -> None:
        """Managers re-read the state file: their list of checkpoints to keep starts from the one restored."""
        self._read_manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=self.keep, checkpoint_name=CHECKPOINT_PREFIX
        )
        if self._scratch is None:
            self._write_manager = self._read_manager

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
        """Re-export the weights if they are missing, older than the newest checkpoint (a save cut
        short), or from a newer checkpoint that :meth:`restore_latest` skipped."""
        latest = self.latest
        weights = self.run_dir / WEIGHTS_FILE
        if not self.is_chief or latest is None:
            return False
        stamp = Path(latest + ".index").stat().st_mtime
        if weights.is_file() and weights.stat().st_mtime >= stamp and not self.skipped_newer:
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
