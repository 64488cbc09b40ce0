"""The one training loop, for every data pipeline and every ``tf.distribute`` strategy.

A pipeline is handed in as a :class:`DataSource`: a function that builds one epoch's
``tf.data.Dataset`` of batches ``{"images", "token_ids", "mask"}`` for a given shard,
per-replica batch size and seed. The loop owns everything else: the model and optimizer
(built inside the strategy's scope, under the precision policy), the train step, the
checkpoints, resuming, logging and Ctrl-C.

Gradients are exact whatever the split: each replica sums cross-entropy over its tokens
and divides by the number of real tokens in the *global* batch, micro-batches
(``grad_accum_steps``) add their gradients, and the replicas' sums are all-reduced once,
then clipped and applied. One device with batch B, R replicas with B/R each, or W workers
all compute the same update for the same examples.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from ..captioner import Captioner
from ..config import CaptionerConfig
from . import distribute
from .checkpoints import CHECKPOINT_DIR, Checkpointer, RunState, prepare_run_dir
from .loss import masked_correct_sum, masked_cross_entropy_sum, next_token_split
from .optim import build_optimizer, clip_gradients
from .precision import resolve_precision

BATCH_KEYS = ("images", "token_ids", "mask")


# ---------------------------------------------------------------------------------------
# Data as the loop sees it
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRequest:
    """What one input pipeline (one worker) must produce for one pass over the data."""

    epoch: int
    batch_size: int  # examples per dataset element = per-replica batch
    num_shards: int  # input pipelines in the cluster (workers)
    shard_index: int  # this pipeline's index
    seed: int  # train.seed + epoch: a fresh, reproducible order every epoch
    shuffle: bool  # False for validation


@dataclass
class DataSource:
    """A pipeline: ``make_dataset(request)`` -> a finite ``tf.data.Dataset`` of batch dicts.

    ``num_examples`` (over all shards), when known, fixes the steps per epoch, so every
    worker stops an epoch at the same step. ``skipped()`` returns how many samples the
    most recently made dataset (this epoch's, on this worker) dropped as missing or
    unreadable; the loop prints it at each epoch's end. ``description`` is stored in the
    run folder so a resume with other data is caught. ``vocabulary()``, where the source
    can list its captions, gives the token ids they use.
    """

    make_dataset: Callable[[DataRequest], tf.data.Dataset]
    num_examples: int | None = None
    skipped: Callable[[], int] | None = None
    description: Mapping[str, Any] = field(default_factory=dict)
    # The token ids the captions use (for model.output_vocabulary: "captions"), when known.
    vocabulary: Callable[[], set[int]] | None = None

    @classmethod
    def from_tensors(
        cls, batch: Mapping[str, Any], shuffle: bool = True, description: Mapping[str, Any] | None = None
    ) -> "DataSource":
        """An in-memory source over arrays ``images [N,S,S,3]``, ``token_ids``/``mask [N,L]``.

        Rows are shuffled (seeded by the request) *before* being dealt round-robin to the
        shards, so the union of the shards' k-th batches is the single-device k-th batch.
        """
        arrays = {key: np.asarray(batch[key]) for key in BATCH_KEYS}
        count = len(arrays["token_ids"])
        if any(len(value) != count for value in arrays.values()):
            raise ValueError(f"images, token_ids and mask must have the same length, got { {k: len(v) for k, v in arrays.items()} }")

        def make(request: DataRequest) -> tf.data.Dataset:
            order = np.arange(count)
            if request.shuffle and shuffle:
                order = np.random.default_rng(request.seed).permutation(count)
            order = order[request.shard_index :: request.num_shards]
            data = {key: value[order] for key, value in arrays.items()}
            return tf.data.Dataset.from_tensor_slices(data).batch(request.batch_size)

        return cls(make, num_examples=count, description=dict(description or {"source": "in-memory", "rows": count}))


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


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


class _Window:
    """Token-weighted sums between two log lines.

    Step outputs stay tensors until the log line: reading them every step would make the
    host wait for the device after each step instead of queueing the next one.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: list[tuple[Any, Any, Any]] = []
        self.start = time.perf_counter()

    @property
    def steps(self) -> int:
        return len(self.pending)

    def add(self, outputs: tuple[Any, Any, Any]) -> None:
        self.pending.append(outputs)

    def totals(self) -> tuple[float, float, float]:
        """(cross-entropy sum, correct tokens, tokens) over the window."""
        if not self.pending:
            return 0.0, 0.0, 0.0
        values = np.asarray([[float(x) for x in step] for step in self.pending], dtype=np.float64)
        loss, correct, tokens = values.sum(axis=0)
        return float(loss), float(correct), float(tokens)


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


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
        self._log = log or _print_line
        self.run_dir = Path(run_dir)
        self.data = data
        self.validation = validation
        self.show_progress = show_progress
        config = resolve_output_vocabulary(config, data)
        run_info = {"train": dict(data.description)}
        if validation is not None:
            run_info["validation"] = dict(validation.description)
        self.config, notes = prepare_run_dir(self.run_dir, config, run_info, override=override, write=self.is_chief)
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
        latest = tf.train.latest_checkpoint(str(self.run_dir / CHECKPOINT_DIR))
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.model = self._build_model(gpt2 if latest is None else None, pretrained_backbone=latest is None)
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
        restored = self.checkpointer.restore_latest()
        if restored is not None:
            self.resumed_from = int(self.state.step.numpy())
            self.say(
                f"resuming from {restored} (step {self.resumed_from}, epoch {int(self.state.epoch.numpy())}, "
                f"batch {int(self.state.batch_in_epoch.numpy())} of that epoch)"
            )
        self.step = int(self.state.step.numpy())
        self.epoch = int(self.state.epoch.numpy())
        self.batch_in_epoch = int(self.state.batch_in_epoch.numpy())
        # The compiled steps: one optimizer update / one evaluation of a distributed batch,
        # each returning (cross-entropy sum, correct tokens, tokens). Benchmarks call them.
        self.train_step = self._make_train_function()
        self.eval_step = self._make_eval_function()
        self._stop: str | None = None
        self._best_val = float(self.state.best_val_loss.numpy())

    # -- set-up --------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line from the chief; printed above the progress bar while one is showing."""
        if self.is_chief:
            self._emit(text)

    def _emit(self, text: str) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable and self._log is _print_line:
            bar.write(text, file=sys.stdout)
        else:
            self._log(text)

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

    # -- the step ------------------------------------------------------------------------
    def _make_train_function(self) -> Callable[[Any], tuple[Any, Any, Any]]:
        model, optimizer, strategy = self.model, self.optimizer, self.strategy
        cfg, optim = self.config.train, self.config.optim
        accum = cfg.grad_accum_steps
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        variables = list(model.trainable_variables)
        watched = [v.value for v in variables]  # the tf.Variables behind Keras' variables
        replicas = strategy.num_replicas_in_sync
        # XLA needs static shapes, so under jit_compile the head runs on every position.
        gather_targets = not cfg.jit_compile

        def micro_gradients(images: Any, token_ids: Any, mask: Any, denominator: Any) -> tuple[list[Any], Any, Any]:
            inputs, targets, weights = next_token_split(token_ids, mask)
            # Watch only what trains: frozen Keras layers keep tf.Variable(trainable=True)
            # underneath, so an auto-watching tape would backpropagate through the whole
            # frozen backbone for nothing.
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(watched)
                if gather_targets:
                    logits, targets, weights = logits_at_targets(model, images, inputs, targets, weights)
                else:
                    logits = model({"images": images, "token_ids": inputs}, training=True)
                loss_sum, _ = masked_cross_entropy_sum(logits, targets, weights)
                loss = loss_sum / denominator
                if loss_scaled:
                    loss = optimizer.scale_loss(loss)
            grads = tape.gradient(loss, watched)
            grads = [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
            correct, _ = masked_correct_sum(tf.stop_gradient(logits), targets, weights)
            return grads, loss_sum, correct

        def gradients(batch: Mapping[str, Any], denominator: Any) -> tuple[list[Any], Any, Any]:
            images, token_ids, mask = batch["images"], batch["token_ids"], batch["mask"]
            if accum == 1:
                return micro_gradients(images, token_ids, mask, denominator)
            parts = [_split_micro(t, accum) for t in (images, token_ids, mask)]
            zero = tf.constant(0.0)
            acc = [tf.zeros(v.shape, v.dtype) for v in variables]
            loss_sum, correct = zero, zero
            for i in tf.range(accum):
                grads, micro_loss, micro_correct = micro_gradients(*(tf.gather(p, i) for p in parts), denominator)
                acc = [a + tf.cast(g, a.dtype) for a, g in zip(acc, grads)]
                loss_sum += micro_loss
                correct += micro_correct
            return acc, loss_sum, correct

        # Keras layers need no AutoGraph (they run on backends that have none), and converting
        # every layer's Python while tracing costs seconds; only the accumulation loop uses it.
        compute = tf.function(gradients, jit_compile=cfg.jit_compile, reduce_retracing=True, autograph=accum > 1)

        def replica_step(batch: Mapping[str, Any]) -> tuple[Any, Any, Any]:
            context = tf.distribute.get_replica_context()
            tokens = tf.reduce_sum(tf.cast(batch["mask"][:, 1:], tf.float32))
            if replicas > 1:
                tokens = context.all_reduce(tf.distribute.ReduceOp.SUM, tokens)
            grads, loss_sum, correct = compute(batch, tf.maximum(tokens, 1.0))
            if replicas > 1:
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                loss_sum, correct = context.all_reduce(tf.distribute.ReduceOp.SUM, [loss_sum, correct])
            scale = optimizer.dynamic_scale if loss_scaled else 1.0
            grads = clip_gradients(grads, optim.clipvalue, optim.global_clipnorm, scale=scale)
            optimizer.apply(grads, variables)
            return loss_sum, correct, tokens

        @tf.function(autograph=False)
        def train_step(distributed_batch: Any) -> tuple[Any, Any, Any]:
            outputs = strategy.run(replica_step, args=(distributed_batch,))
            return tuple(strategy.experimental_local_results(x)[0] for x in outputs)

        return train_step

    def _make_eval_function(self) -> Callable[[Any], tuple[Any, Any, Any]]:
        model, strategy = self.model, self.strategy
        replicas = strategy.num_replicas_in_sync

        def forward(batch: Mapping[str, Any]) -> tuple[Any, Any, Any]:
            inputs, targets, weights = next_token_split(batch["token_ids"], batch["mask"])
            logits = model({"images": batch["images"], "token_ids": inputs}, training=False)
            loss_sum, tokens = masked_cross_entropy_sum(logits, targets, weights)
            correct, _ = masked_correct_sum(logits, targets, weights)
            return loss_sum, correct, tokens

        compute = tf.function(forward, jit_compile=self.config.train.jit_compile, reduce_retracing=True, autograph=False)

        def replica_eval(batch: Mapping[str, Any]) -> tuple[Any, Any, Any]:
            values = compute(batch)
            if replicas > 1:
                values = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, list(values))
            return tuple(values)

        @tf.function(autograph=False)
        def eval_step(distributed_batch: Any) -> tuple[Any, Any, Any]:
            outputs = strategy.run(replica_eval, args=(distributed_batch,))
            return tuple(strategy.experimental_local_results(x)[0] for x in outputs)

        return eval_step

    # -- data ------------------------------------------------------------------------------
    def _distributed_dataset(self, source: DataSource, epoch: int, skip_steps: int, shuffle: bool) -> Any:
        global_batch = self.config.train.batch_size
        seed = self.config.train.seed + epoch

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            request = DataRequest(
                epoch=epoch,
                batch_size=context.get_per_replica_batch_size(global_batch),
                num_shards=context.num_input_pipelines,
                shard_index=context.input_pipeline_id,
                seed=seed,
                shuffle=shuffle,
            )
            dataset = source.make_dataset(request)
            if skip_steps:
                # Each step takes one batch per local replica from this pipeline.
                per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
                dataset = dataset.skip(skip_steps * per_pipeline)
            return dataset

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return self.strategy.distribute_datasets_from_function(dataset_fn, options)

    # -- signals ---------------------------------------------------------------------------
    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop is not None:  # a second Ctrl-C: stop now, without saving
                raise KeyboardInterrupt
            self._stop = name
            print(f"\n{name}: saving a checkpoint after this step (again to quit at once)", file=sys.stderr, flush=True)

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.config.train
        restore_signals = self._install_signal_handlers()
        writer = self._writer("train")
        history: list[dict[str, Any]] = []
        last_saved: int | None = self.resumed_from
        last_path: str | None = self.checkpointer.latest
        progress = self._bar = self._progress()
        window = _Window()
        self.say(
            f"training {self.run_dir}: {distribute.describe(self.strategy)}, {self.precision}, global batch {cfg.batch_size} "
            f"({self.per_replica_batch} per replica, {cfg.grad_accum_steps} micro-batch(es)), "
            f"steps per epoch {self.steps_per_epoch or 'unknown'}, total steps {self.total_steps or 'unknown'}"
        )
        if self.resumed_from is not None:
            self._forget_metrics_after(self.step)
            self._append_metrics({"event": "resume", "step": self.step, "epoch": self.epoch})
        try:
            while not self._finished() and self._stop is None:
                iterator = iter(self._distributed_dataset(self.data, self.epoch, self.batch_in_epoch, shuffle=True))
                epoch_done = False
                while not self._finished() and self._stop is None:
                    if self.steps_per_epoch is not None and self.batch_in_epoch >= self.steps_per_epoch:
                        epoch_done = True
                        break
                    optional = iterator.get_next_as_optional()
                    if not bool(optional.has_value()):
                        epoch_done = True
                        break
                    window.add(self.train_step(optional.get_value()))
                    self.step += 1
                    self.batch_in_epoch += 1
                    progress.update(1)
                    if self.steps_per_epoch is not None and self.batch_in_epoch >= self.steps_per_epoch:
                        epoch_done = True
                    if self.step % cfg.log_every == 0:
                        history.append(self._log_window(window, writer, progress))
                    if cfg.validate_every and self.step % cfg.validate_every == 0 and self.validation:
                        history.append(self.validate())
                    if epoch_done:
                        break
                    if self.step % cfg.checkpoint_every == 0:
                        last_path, last_saved = self.save(), self.step
                if epoch_done:
                    _drain(iterator)
                    self._end_epoch()
                    if self.step % cfg.checkpoint_every == 0 and last_saved != self.step:
                        last_path, last_saved = self.save(), self.step
            if window.steps:
                history.append(self._log_window(window, writer, progress))
            trained = self.step != (self.resumed_from or 0)
            if trained and self._stop is None and self.validation is not None and (
                not cfg.validate_every or self.step % cfg.validate_every
            ):
                history.append(self.validate())
            if last_saved != self.step or self._stop is not None:
                last_path, last_saved = self.save(), self.step
            if self._stop is not None:
                self.say(f"{self._stop}: saved {last_path} at step {self.step}; rerun the same command to resume")
        finally:
            progress.close()
            self._bar = None
            restore_signals()
            writer.flush()
        return TrainResult(self.run_dir, self.step, self.epoch, self._stop, history, last_path, self.resumed_from)

    def _finished(self) -> bool:
        cfg = self.config.train
        if cfg.steps is not None and self.step >= cfg.steps:
            return True
        return cfg.epochs is not None and self.epoch >= cfg.epochs

    def _end_epoch(self) -> None:
        if self.data.skipped is not None:
            skipped = self.data.skipped()
            where = f" on worker {self.worker.index}" if self.worker.num_workers > 1 else ""
            self._emit(f"epoch {self.epoch + 1} done at step {self.step}: {skipped} sample(s) skipped{where} (unreadable or missing)")
        else:
            self.say(f"epoch {self.epoch + 1} done at step {self.step}")
        self.epoch += 1
        self.batch_in_epoch = 0

    def save(self) -> str:
        """Checkpoint now (every worker must call this together under multi-worker)."""
        self.state.step.assign(self.step)
        self.state.epoch.assign(self.epoch)
        self.state.batch_in_epoch.assign(self.batch_in_epoch)
        self.state.best_val_loss.assign(self._best_val)
        return self.checkpointer.save(self.step)

    def validate(self) -> dict[str, Any]:
        """Loss and accuracy over ``train.validation_batches`` global batches of the validation data."""
        if self.validation is None:
            raise ValueError("no validation data was given")
        iterator = iter(self._distributed_dataset(self.validation, 0, 0, shuffle=False))
        loss = correct = tokens = 0.0
        for _ in range(self.config.train.validation_batches):
            optional = iterator.get_next_as_optional()
            if not bool(optional.has_value()):
                break
            a, b, c = self.eval_step(optional.get_value())
            loss, correct, tokens = loss + float(a), correct + float(b), tokens + float(c)
        record = {
            "step": self.step,
            "val_loss": loss / max(tokens, 1.0),
            "val_accuracy": correct / max(tokens, 1.0),
            "val_tokens": tokens,
        }
        writer = self._writer("val")
        with writer.as_default(step=self.step):
            write_scalar("loss", record["val_loss"])
            write_scalar("accuracy", record["val_accuracy"])
        writer.flush()
        self._append_metrics(record)
        self.say(f"step {self.step}: validation loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.3f}")
        if self.is_chief and record["val_loss"] < self._best_val and tokens:
            self._best_val = record["val_loss"]
            self.checkpointer.export_best(self.config)
        return record

    # -- reporting -------------------------------------------------------------------------
    def _progress(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            desc="train",
            disable=not (self.show_progress and self.is_chief),
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _writer(self, name: str) -> Any:
        if not hasattr(self, "_writers"):
            self._writers: dict[str, Any] = {}
        if name not in self._writers:
            if self.is_chief:
                self._writers[name] = tf.summary.create_file_writer(str(self.run_dir / "logs" / name))
            else:
                self._writers[name] = tf.summary.create_noop_writer()
        return self._writers[name]

    def _log_window(self, window: _Window, writer: Any, progress: Any) -> dict[str, Any]:
        loss, correct, tokens = window.totals()  # waits for the window's last step
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss / max(tokens, 1.0),
            "accuracy": correct / max(tokens, 1.0),
            "learning_rate": self.learning_rate,
            "images_per_sec": window.steps * self.config.train.batch_size / elapsed,
            "tokens": tokens,
        }
        with writer.as_default(step=self.step):
            for key in ("loss", "accuracy", "learning_rate", "images_per_sec"):
                write_scalar(key, record[key])
        progress.set_postfix(
            loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}", img_s=f"{record['images_per_sec']:.1f}"
        )
        self._append_metrics(record)
        window.reset()
        return record

    def _forget_metrics_after(self, step: int) -> None:
        """Drop log lines of steps a killed run took after its last checkpoint: they are replayed now."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_chief or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        partial = path.with_name(".metrics.jsonl.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(path)

    def _append_metrics(self, record: Mapping[str, Any]) -> None:
        if self.is_chief:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(dict(record)) + "\n")


def resolve_output_vocabulary(config: CaptionerConfig, data: DataSource) -> CaptionerConfig:
    """``model.output_vocabulary: captions`` -> the sorted ids of the training captions (EOS included).

    Resolved before the run folder is written, so config.yaml (and every model loaded
    from it) holds the explicit list, and a resume on the same data resolves the same.
    """
    if config.model.output_vocabulary != "captions":
        return config
    if data.vocabulary is None:
        raise ValueError(
            "model.output_vocabulary 'captions' needs captions it can read up front (a CSV or COCO source); "
            "for shards give the list of token ids"
        )
    vocab = config.gpt2.vocab_size
    ids = sorted(i for i in data.vocabulary() if i < vocab)
    return config.replace(model={"output_vocabulary": ids})


def logits_at_targets(model: Captioner, images: Any, inputs: Any, targets: Any, weights: Any) -> tuple[Any, Any, Any]:
    """Logits ``[N, V]`` for the N positions that have a target, with their targets and weights.

    The LM head over GPT-2's 50k-token vocabulary is the largest matmul of a small captioner,
    and padding positions (often half of a batch of captions) need none of it: the hidden
    states are gathered first, so the head, the softmax and their gradients cover only
    the real tokens. Same loss and gradients as the full head, less work. With a
    restricted output vocabulary the logits stay compact and the targets are mapped to
    their columns (the loss is the same as over all V, where excluded ids add exp(-1e9) = 0).
    """
    hidden = model.hidden_states({"images": images, "token_ids": inputs}, training=True)
    where = tf.where(weights > 0)
    logits = model.decoder.head(tf.gather_nd(hidden, where)[tf.newaxis], compact=True)[0]
    targets = model.decoder.compact_targets(tf.gather_nd(targets, where))
    return logits, targets, tf.gather_nd(weights, where)


def _drain(iterator: Any, limit: int = 64) -> None:
    """Read what is left of an epoch (less than a global batch) so skip counts are final.

    Pipelines read ahead; stopping at the last full step could leave samples in flight,
    which a skip counter cannot yet tell from unreadable ones. Under multi-worker every
    worker drains together: ``has_value`` is agreed across workers.
    """
    for _ in range(limit):
        if not bool(iterator.get_next_as_optional().has_value()):
            return


def _print_line(text: str) -> None:
    print(text, flush=True)


def write_scalar(tag: str, value: float) -> None:
    """A TensorBoard scalar at the default writer's step, without importing TensorBoard.

    ``tf.summary.scalar`` lives in the tensorboard package, which TensorFlow no longer
    installs; the event written here (a float32 scalar tagged for the "scalars" plugin) is
    the one it would write, so TensorBoard shows it when installed to view the logs.
    """
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)


def _split_micro(tensor: Any, parts: int) -> Any:
    """``[B, ...]`` -> ``[parts, B/parts, ...]``, zero-padding B up to a multiple of ``parts``.

    Padded rows have mask 0, so they add nothing to loss or gradients; they only appear
    when a final batch is short.
    """
    batch = tf.shape(tensor)[0]
    static = tensor.shape[0]
    if static is None or static % parts:
        pad = (-batch) % parts
        paddings = tf.concat(
            [tf.reshape(tf.stack([0, pad]), [1, 2]), tf.zeros([tf.rank(tensor) - 1, 2], tf.int32)], axis=0
        )
        tensor = tf.pad(tensor, paddings)
        batch = batch + pad
    rest = tf.shape(tensor)[1:]
    return tf.reshape(tensor, tf.concat([[parts, batch // parts], rest], axis=0))


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

