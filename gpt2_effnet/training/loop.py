"""The one training loop, for every data pipeline and every ``tf.distribute`` strategy.

A pipeline comes in as a :class:`~.data_source.DataSource`; the loop owns the rest: model
and optimizer (built inside the strategy's scope, under the precision policy), the
compiled steps (:mod:`.steps`), checkpoints and resume (:mod:`.checkpoints`), what people
see (:mod:`.reporting`) and Ctrl-C. Read :meth:`Trainer.fit` for the whole story.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import keras
import tensorflow as tf

from ..captioner import CONFIG_FILE, WEIGHTS_FILE, Captioner
from ..config import CaptionerConfig
from ..tokenizer import RUN_TOKENIZER_DIR
from . import distribute
from .checkpoints import (
    CHECKPOINT_DIR,
    RUN_FILE,
    CheckpointUnusable,
    Checkpointer,
    RunState,
    checkpoint_steps,
    clean_leftovers,
    prepare_run_dir,
    write_run_files,
)
from .data_source import DataRequest, DataSource, resolve_output_vocabulary
from .optim import build_optimizer
from .precision import resolve_precision
from .reporting import MetricWindow, Reporter
from .run_lock import RunLock
from .steps import build_eval_step, build_train_step


class TrainingStopped(RuntimeError):
    """The run cannot go on (NaN loss, no full batch, too many bad samples); the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    interrupted: str | None  # "SIGINT"/"SIGTERM" when stopped by a signal
    history: list[dict[str, Any]]  # the logged metrics of this invocation
    last_checkpoint: str | None
    resumed_from: int | None  # step of the checkpoint this invocation started from

    @property
    def exit_code(self) -> int:
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.interrupted or "", 0)


class Trainer:
    """Build (or restore) a run and train it: ``Trainer(cfg, run_dir, data).fit()``.

    Constructing the trainer prepares the run folder (writes or checks ``config.yaml``),
    builds model and optimizer inside the strategy's scope and restores the latest
    checkpoint if the folder has one; :meth:`fit` then trains until ``train.steps`` or
    ``train.epochs`` is reached, or a SIGINT/SIGTERM arrives (then it saves and returns).
    It seeds Python, NumPy, TensorFlow and Keras with ``train.seed`` first, so a run's
    initial weights and data order are reproducible (and equal on every worker).
    """

    def __init__(
        self,
        config: CaptionerConfig,
        run_dir: str | Path,
        data: DataSource,
        *,
        validation: DataSource | None = None,
        gpt2: str | Path | None = None,
        strategy: tf.distribute.Strategy | str | None = None,
        override: bool = False,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if config.train.steps is None and config.train.epochs is None:
            raise ValueError("nothing to do: set train.steps or train.epochs (--steps N / --epochs N)")
        if isinstance(strategy, str):
            strategy = distribute.make_strategy(strategy)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.worker = distribute.worker_info(self.strategy)
        self.is_chief = self.worker.is_chief
        self.run_dir = Path(run_dir)
        self.reporter = Reporter(self.run_dir, is_chief=self.is_chief, show_progress=show_progress, log=log)
        self.data = data
        self.validation = validation
        # One writer per run folder: the chief holds the lock from here to the end of fit().
        self.lock = RunLock(self.run_dir).acquire() if self.is_chief else None
        try:
            self._set_up(config, gpt2, override)
        except BaseException:
            self.close()
            raise

    def _set_up(self, config: CaptionerConfig, gpt2: str | Path | None, override: bool) -> None:
        data, validation = self.data, self.validation
        if self.is_chief:
            for path in clean_leftovers(self.run_dir):
                self.say(f"removed {path} (left by a save that was cut short)")
        config = resolve_output_vocabulary(config, data)
        self.run_info = {"train": dict(data.description)}
        if validation is not None:
            self.run_info["validation"] = dict(validation.description)
        # Checked now, written only with the first checkpoint (_start_run_files): a run that
        # stops before it leaves no config behind to refuse the corrected rerun.
        self.config, notes = prepare_run_dir(self.run_dir, config, self.run_info, override=override, write=False)
        self._run_files_written = False
        for note in notes:
            self.say(note)
        cfg = self.config.train

        replicas = self.strategy.num_replicas_in_sync
        if cfg.batch_size % replicas:
            raise ValueError(
                f"train.batch_size ({cfg.batch_size}) is the global batch and must be divisible by "
                f"the {replicas} replicas in sync"
            )
        self.per_replica_batch = cfg.batch_size // replicas
        if self.per_replica_batch % cfg.grad_accum_steps:
            raise ValueError(
                f"each replica's batch ({self.per_replica_batch} = {cfg.batch_size} / {replicas} replicas) "
                f"must be divisible by train.grad_accum_steps ({cfg.grad_accum_steps})"
            )
        self.steps_per_epoch = data.num_examples // cfg.batch_size if data.num_examples else None
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {data.num_examples} examples, fewer than one global batch ({cfg.batch_size})"
            )
        self.total_steps = cfg.steps
        if self.total_steps is None and self.steps_per_epoch is not None:
            self.total_steps = cfg.epochs * self.steps_per_epoch

        # The config may say "auto"; this is what this machine computes in.
        self.precision = resolve_precision(cfg.precision)
        self.state = RunState()
        fresh = not checkpoint_steps(self.run_dir / CHECKPOINT_DIR)
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.model = self._build_model(gpt2 if fresh else None, pretrained_backbone=fresh)
            self.optimizer = build_optimizer(self.config.optim, self.total_steps, self.precision)
            self.optimizer.build(self.model.trainable_variables)
        self.checkpointer = Checkpointer(
            self.run_dir,
            self.model,
            self.optimizer,
            self.state,
            keep=cfg.keep_checkpoints,
            is_chief=self.is_chief,
            worker_index=self.worker.index,
        )
        self.resumed_from: int | None = None
        try:
            restored = self.checkpointer.restore_latest()
        except CheckpointUnusable as err:
            if any(note.startswith("--override") for note in notes):
                raise CheckpointUnusable(
                    f"{err} (--override cannot change what the weights' shapes depend on, e.g. gpt2.*)"
                ) from None
            raise
        for note in self.checkpointer.notes:
            self.say(note)
        if restored is not None and self.checkpointer.refresh_weights():
            self.say(f"re-exported {WEIGHTS_FILE} from {restored}, the checkpoint resumed from")
        if restored is not None:
            self.resumed_from = int(self.state.step.numpy())
            self.say(
                f"resuming from {restored} (step {self.resumed_from}, epoch {int(self.state.epoch.numpy())}, "
                f"batch {int(self.state.batch_in_epoch.numpy())} of that epoch)"
            )
        self.step = int(self.state.step.numpy())
        self.epoch = int(self.state.epoch.numpy())
        self.batch_in_epoch = int(self.state.batch_in_epoch.numpy())
        # The compiled steps (see .steps); benchmarks call them too.
        self.train_step = build_train_step(self.model, self.optimizer, self.strategy, cfg, self.config.optim)
        self.eval_step = build_eval_step(self.model, self.strategy, cfg.jit_compile)
        self._stop: str | None = None
        self._signal_vote = 0  # the signal this worker received (0: none), voted on at each step
        self._pending_vote: Any = None  # the agreed vote of the last step, read one step later
        self._best_val = float(self.state.best_val_loss.numpy())
        self._last_saved: int | None = self.resumed_from
        self._last_path: str | None = self.checkpointer.latest
        self._window = MetricWindow()
        self._named_skips: set[str] = set()

    def close(self) -> None:
        """Give the run folder back (fit() does this when it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _start_run_files(self) -> None:
        """The vocabulary, run.json and config.yaml, with the run's first checkpoint.

        Before it the folder holds nothing to resume, so a rerun with corrected data or
        config starts afresh: a vocabulary left by such a stopped start is replaced, and
        if the first checkpoint cannot be written these files go again.
        """
        if self._run_files_written:
            return
        self._run_files_written = True
        if not self.is_chief:
            return
        tokenizer_dir = self.run_dir / RUN_TOKENIZER_DIR
        if self.data.tokenizer is not None and self.resumed_from is None and tokenizer_dir.is_dir():
            shutil.rmtree(tokenizer_dir)
        try:
            if self.data.tokenizer is not None and not tokenizer_dir.exists():
                self.data.tokenizer.save(tokenizer_dir)
            write_run_files(self.run_dir, self.config, self.run_info)
        except BaseException:
            self._undo_run_files()
            raise

    def _undo_run_files(self) -> None:
        """A fresh run whose first checkpoint failed: its run files would describe nothing."""
        self._run_files_written = False
        if not self.is_chief or self.resumed_from is not None or checkpoint_steps(self.run_dir / CHECKPOINT_DIR):
            return
        shutil.rmtree(self.run_dir / RUN_TOKENIZER_DIR, ignore_errors=True)
        for name in (CONFIG_FILE, RUN_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    # -- set-up --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line from the chief; printed above the progress bar while one is showing."""
        self.reporter.say(text)

    def _build_model(self, gpt2: str | Path | None, pretrained_backbone: bool) -> Captioner:
        """The captioner under the run's precision policy; on resume skip pretrained downloads."""
        build_cfg = self.config
        if not pretrained_backbone and build_cfg.model.backbone_weights is not None:
            build_cfg = build_cfg.replace(model={"backbone_weights": None})  # the checkpoint has them
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)
        try:
            return Captioner.create(build_cfg, gpt2=gpt2)
        finally:
            keras.config.set_dtype_policy(previous)

    @property
    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the end (or to a signal); save; return what happened.

        Raises :class:`TrainingStopped` (a NaN loss, an epoch with no full batch, too many
        unreadable samples) and :class:`~.checkpoints.OutOfSpace` without saving over the
        last good checkpoint.
        """
        cfg = self.config.train
        restore_signals = self._install_signal_handlers()
        self.reporter.open_progress(self.total_steps, self.step)
        history: list[dict[str, Any]] = []
        window = self._window
        self.say(
            f"training {self.run_dir}: {distribute.describe(self.strategy)}, {self.precision}, global batch {cfg.batch_size} "
            f"({self.per_replica_batch} per replica, {cfg.grad_accum_steps} micro-batch(es)), "
            f"steps per epoch {self.steps_per_epoch or 'unknown'}, total steps {self.total_steps or 'unknown'}"
        )
        try:
            # On a fresh start, lines of an earlier one that stopped before its first checkpoint go too.
            unreadable = self.reporter.forget_metrics_after(self.step if self.resumed_from is not None else 0)
            if unreadable:
                self.say(f"dropped {unreadable} unreadable line(s) from {self.run_dir / 'metrics.jsonl'}")
            if self.resumed_from is not None:
                self.reporter.append_metrics({"event": "resume", "step": self.step, "epoch": self.epoch})
            while not self._finished() and self._stop is None:
                if self._train_epoch(window, history):
                    self._end_epoch()
                    self._save_if_due()
            if window.steps:
                history.append(self._log_window(window))
            trained = self.step != (self.resumed_from or 0)
            validated_now = cfg.validate_every and self.step % cfg.validate_every == 0
            if trained and self._stop is None and self.validation is not None and not validated_now:
                history.append(self.validate())
            if self._last_saved != self.step or self._stop is not None:
                self._check_finite(window)
                self.save()
            if self._stop is not None:
                self.say(f"{self._stop}: saved {self._last_path} at step {self.step}; rerun the same command to resume")
        finally:
            self.reporter.close()
            restore_signals()
            self.close()
        return TrainResult(self.run_dir, self.step, self.epoch, self._stop, history, self._last_path, self.resumed_from)

    def _train_epoch(self, window: MetricWindow, history: list[dict[str, Any]]) -> bool:
        """Step through the rest of the current epoch; True if it ended, False if the run did (or was stopped)."""
        cfg = self.config.train
        # The epoch's input starts at its next unread batch: a resumed run reads nothing twice.
        batches = iter(self._distributed_dataset(self.data, self.epoch, self.batch_in_epoch, shuffle=True))
        steps_before = self.step
        while not self._finished() and self._stop is None:
            if self._epoch_full():
                break
            waiting = time.perf_counter()
            optional = batches.get_next_as_optional()
            has_value = bool(optional.has_value())
            waited = time.perf_counter() - waiting
            if not has_value:
                break
            outputs = self.train_step(optional.get_value(), self._signal_vote)
            window.add(outputs, waited)
            self._agree_to_stop(outputs[3])
            self.step += 1
            self.batch_in_epoch += 1
            self.reporter.step_done()
            if self.step % cfg.log_every == 0:
                history.append(self._log_window(window))
            if cfg.validate_every and self.step % cfg.validate_every == 0 and self.validation:
                history.append(self.validate())
            if self._epoch_full():
                break  # saved (if due) after the epoch's bookkeeping, so a resume starts the next epoch
            self._save_if_due()
        else:
            return False
        if self.step == steps_before and self.batch_in_epoch == 0:
            self._no_full_batch()
        return True

    def _no_full_batch(self) -> None:
        """An epoch ended without one full batch: stop, instead of starting empty epochs forever."""
        counter = self.data.skip_counter() if self.data.skip_counter is not None else None
        readable = "" if counter is None else (
            f", {counter.attempted - counter.unreadable} of them readable ({counter.unreadable} unreadable, "
            f"{counter.missing} missing)"
        )
        raise TrainingStopped(
            f"epoch {self.epoch + 1} gave no full batch: the data lists {self.data.num_examples} example(s){readable}, "
            f"and a step needs {self.config.train.batch_size}; add data, fix the unreadable files or lower train.batch_size"
        )

    def _epoch_full(self) -> bool:
        return self.steps_per_epoch is not None and self.batch_in_epoch >= self.steps_per_epoch

    def _finished(self) -> bool:
        cfg = self.config.train
        if cfg.steps is not None and self.step >= cfg.steps:
            return True
        return cfg.epochs is not None and self.epoch >= cfg.epochs

    def _end_epoch(self) -> None:
        skips = self._skip_status()
        if skips is not None:
            self._check_skip_rate(skips)
        if self.data.skipped is not None:
            skipped = self.data.skipped()
            where = f" on worker {self.worker.index}" if self.worker.num_workers > 1 else ""
            self.reporter.emit(
                f"epoch {self.epoch + 1} done at step {self.step}: {skipped} sample(s) skipped{where} (unreadable or missing)"
            )
        else:
            self.say(f"epoch {self.epoch + 1} done at step {self.step}")
        self.epoch += 1
        self.batch_in_epoch = 0

    def _save_if_due(self) -> None:
        if self.step % self.config.train.checkpoint_every == 0 and self._last_saved != self.step:
            self._check_finite(self._window)  # never save over a good checkpoint with NaN weights
            self.save()

    def _check_finite(self, window: MetricWindow) -> None:
        loss, _, tokens = window.totals()
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"the loss became {loss} between steps {self.step - window.steps + 1} and {self.step}; "
                f"nothing was saved after step {self._last_saved or 0} (the last good checkpoint: "
                f"{self._last_path or 'none'}); lower optim.learning_rate or set optim.global_clipnorm, then rerun"
            )

    def save(self) -> str:
        """Checkpoint now (every worker must call this together under multi-worker)."""
        self.state.step.assign(self.step)
        self.state.epoch.assign(self.epoch)
        self.state.batch_in_epoch.assign(self.batch_in_epoch)
        self.state.best_val_loss.assign(self._best_val)
        self._start_run_files()
        try:
            self._last_path = self.checkpointer.save(self.step)
        except BaseException:
            self._undo_run_files()
            raise
        self._last_saved = self.step
        return self._last_path

    def validate(self) -> dict[str, Any]:
        """Loss and accuracy over ``train.validation_batches`` global batches of the validation data."""
        if self.validation is None:
            raise ValueError("no validation data was given")
        batches = iter(self._distributed_dataset(self.validation, 0, 0, shuffle=False))
        loss = correct = tokens = 0.0
        for _ in range(self.config.train.validation_batches):
            optional = batches.get_next_as_optional()
            if not bool(optional.has_value()):
                break
            a, b, c = self.eval_step(optional.get_value())
            loss, correct, tokens = loss + float(a), correct + float(b), tokens + float(c)
        record = self.reporter.validation(step=self.step, loss=loss, correct=correct, tokens=tokens)
        if self.is_chief and record["val_loss"] < self._best_val and tokens:
            self._best_val = record["val_loss"]
            self.checkpointer.export_best(self.config)
        return record

    def _log_window(self, window: MetricWindow) -> dict[str, Any]:
        self._check_finite(window)
        skips = self._skip_status()
        record = self.reporter.training_window(
            window, step=self.step, epoch=self.epoch, learning_rate=self.learning_rate,
            batch_size=self.config.train.batch_size, skips=skips,
        )
        if skips is not None:
            self._check_skip_rate(skips)
        return record

    def _skip_status(self) -> dict[str, Any] | None:
        """Skips of the epoch being read so far: counts, rate, and files not yet named in a line."""
        counter = self.data.skip_counter() if self.data.skip_counter is not None else None
        if counter is None:
            return None
        seen = counter.attempted + counter.missing
        status = {"skipped": counter.skipped, "seen": seen, "rate": counter.skipped / seen if seen else 0.0}
        for kind, names in (("unreadable image(s)", counter.unreadable_samples(10)),
                            ("sample(s)", counter.missing_samples(10))):
            new = [f for f in names if f not in self._named_skips][: max(0, 20 - len(self._named_skips))]
            if new:
                self._named_skips.update(new)
                self.reporter.emit(f"skipping {kind}: {', '.join(new)}")
        return status

    def _check_skip_rate(self, skips: Mapping[str, Any]) -> None:
        """Stop a run whose data is mostly unusable: more than ``train.max_skip_rate`` of the
        samples read skipped, once 200 were read (or a whole epoch of a smaller set), or
        sooner when the count is already three standard deviations over the limit (a set
        that is mostly broken stops at its first log line, before anything is saved)."""
        limit = self.config.train.max_skip_rate
        enough = min(200, self.data.num_examples or 200)
        seen, skipped = skips["seen"], skips["skipped"]
        clear = seen >= 32 and skipped > limit * seen + 3 * math.sqrt(seen * limit * (1 - limit))
        if (seen >= enough or clear) and skips["rate"] > limit:
            raise TrainingStopped(
                f"{skips['skipped']} of the {skips['seen']} samples read so far were unreadable or missing "
                f"({skips['rate']:.0%} > train.max_skip_rate {limit:.0%}); check the image folder and paths "
                f"(first unreadable: {', '.join(sorted(self._named_skips)[:3]) or 'none'}), or raise the limit"
            )

    # -- data ------------------------------------------------------------------------------
    def _distributed_dataset(self, source: DataSource, epoch: int, start_batch: int, shuffle: bool) -> Any:
        """One input pipeline per replica, each reading its own share from ``start_batch`` on.

        Every worker builds one pipeline per local replica (with DALI each decodes on its own
        replica's GPU; with tf.data they share the process's cores) and deals their batches
        out in turn, which is the order ``tf.distribute`` hands a worker's batches to its
        replicas: replica r trains on pipeline r. (``InputReplicationMode.PER_REPLICA`` would
        say the same, but only MirroredStrategy has it.) Batches reach their device as uint8.
        """
        global_batch = self.config.train.batch_size
        seed = self.config.train.seed + epoch
        local = max(1, self.strategy.num_replicas_in_sync // self.worker.num_workers)

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            pipelines = []
            for replica in range(local):
                request = DataRequest(
                    epoch=epoch,
                    batch_size=context.get_per_replica_batch_size(global_batch),
                    num_shards=context.num_input_pipelines * local,
                    shard_index=context.input_pipeline_id * local + replica,
                    seed=seed,
                    shuffle=shuffle,
                    start_batch=start_batch,
                    device_index=replica,
                    pipelines_here=local,
                )
                pipelines.append(source.make_dataset(request))
            if local == 1:
                return pipelines[0]
            turns = tf.data.Dataset.range(local).repeat()
            return tf.data.Dataset.choose_from_datasets(pipelines, turns, stop_on_empty_dataset=True)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return self.strategy.distribute_datasets_from_function(dataset_fn, options)

    def _agree_to_stop(self, vote: Any) -> None:
        """Stop at a step every worker agrees on (a SIGTERM to any one of them stops them all).

        One worker alone: its own signal decides (the handler set ``_stop``). Several: each
        step all-reduces the workers' votes; the loop reads the result of the step *before*
        the one just queued (reading the newest would make the host wait for the device each
        step), so every worker stops after the same step and the checkpoint save, a
        collective, finds all of them there.
        """
        if self.worker.num_workers == 1:
            return
        previous, self._pending_vote = self._pending_vote, vote
        if previous is not None:
            sigint, sigterm = (float(v) for v in previous.numpy())
            if (sigint or sigterm) and self._stop is None:
                self._stop = "SIGTERM" if sigterm else "SIGINT"
                if not self._signal_vote:
                    self.reporter.emit(f"worker {self.worker.index}: another worker was stopped by {self._stop}; "
                                       "saving a checkpoint with the others")

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop is not None or self._signal_vote:  # a second Ctrl-C: stop now, without saving
                raise KeyboardInterrupt
            self._signal_vote = int(signum)
            if self.worker.num_workers == 1:
                self._stop = name
            print(f"\n{name}: saving a checkpoint after this step (again to quit at once)", file=sys.stderr, flush=True)

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore


def train(
    config: CaptionerConfig | str | Path,
    run_dir: str | Path,
    data: DataSource,
    **kwargs: Any,
) -> TrainResult:
    """Train (or resume) a run; keyword arguments as :class:`Trainer`. Returns a :class:`TrainResult`."""
    if not isinstance(config, CaptionerConfig):
        config = CaptionerConfig.load(config)
    return Trainer(config, run_dir, data, **kwargs).fit()
