"""Choosing a ``tf.distribute`` strategy and describing the worker this process is.

Launching on N machines (``--strategy multiworker``): run the *same* ``gpt2-effnet train``
command on every node, each with its own ``TF_CONFIG``, for example on node ``i`` of 2::

    TF_CONFIG='{"cluster": {"worker": ["node0:12345", "node1:12345"]},
                "task": {"type": "worker", "index": i}}' gpt2-effnet train ... --strategy multiworker

Worker 0 is the chief: it writes checkpoints, TensorBoard logs, the progress bar and the
exported weights. ``--out`` must name a folder every worker can read (a shared file
system), because every worker restores from the chief's checkpoints on resume. Each
worker reads its own shard of the data (``num_shards``/``shard_index`` = workers/index),
and ``train.batch_size`` stays the *global* batch: each of the ``R`` replicas in the cluster
gets ``batch_size / R`` examples per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default`` (one device), ``mirrored`` (all local GPUs, or the given logical devices), ``multiworker``.

    Create it before any other TensorFlow work: ``MultiWorkerMirroredStrategy`` must
    configure the runtime's collectives before devices are initialised.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        cpus = tf.config.list_logical_devices("CPU")
        devices = [d.name for d in gpus] if gpus else [d.name for d in cpus]
        # Without GPUs, MirroredStrategy() would take only the first CPU; naming the logical
        # CPUs lets a machine split into several (tests do) mirror over all of them.
        if gpus:
            return tf.distribute.MirroredStrategy(devices)
        return tf.distribute.MirroredStrategy(
            devices, cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0])
        )
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "--strategy multiworker needs TF_CONFIG (cluster and this task's index); see "
                "gpt2_effnet/training/distribute.py for the format"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")


def grow_gpu_memory() -> None:
    """Let TensorFlow take GPU memory as it needs it instead of nearly all of it at start.

    DALI decodes on the same GPUs with memory of its own; with TensorFlow's default it would
    find none left. Must run before TensorFlow touches a GPU (so: before the strategy).
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by the caller: its choice stands
            pass


@dataclass(frozen=True)
class WorkerInfo:
    num_workers: int
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
    """How many workers the cluster has and which one this process is (worker 0 = chief)."""
    import tensorflow as tf

    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerInfo(1, 0)
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    if resolver.task_type == "chief":
        return WorkerInfo(max(workers, 1), 0)
    offset = len(spec.get("chief", []))
    return WorkerInfo(max(workers, 1), int(resolver.task_id) + offset)


def describe(strategy: tf.distribute.Strategy) -> str:
    import tensorflow as tf

    info = worker_info(strategy)
    kind = type(strategy).__name__
    if not tf.distribute.has_strategy() and kind.startswith("_Default"):
        kind = "one device (default strategy)"
    elif isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        kind = "MultiWorkerMirroredStrategy"
    text = f"{kind}: {strategy.num_replicas_in_sync} replica(s) in sync"
    if info.num_workers > 1:
        text += f", worker {info.index} of {info.num_workers}"
    return text
