"""Subprocess entry point for tests/test_training_distributed.py (not a test module itself).

    python tests/training_worker.py mirrored OUT   # one process, two logical CPUs:
                                                   #   default strategy vs MirroredStrategy (+ grad accumulation)
    python tests/training_worker.py worker OUT     # one MultiWorkerMirroredStrategy worker (TF_CONFIG set)
    python tests/training_worker.py single OUT     # one device, the reference for the workers
    python tests/training_worker.py replicas OUT SHARDS  # two logical CPUs, one shard pipeline per replica

Each run trains a tiny captioner for a few steps on the same in-memory data and seed and
writes the per-step losses to OUT/<name>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

STEPS = 4
GLOBAL_BATCH = 8


def toy_batch(count: int, seed: int = 0, length: int = 10, vocab: int = 64) -> dict[str, np.ndarray]:
    """Solid-colour images whose captions (of several lengths) name the colour class."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, count)
    colours = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 220, 40]], np.float32)
    images = np.broadcast_to(colours[classes][:, None, None, :], (count, 32, 32, 3)).copy()
    images += rng.normal(0, 8, images.shape).astype(np.float32)
    token_ids = np.full((count, length), vocab - 1, np.int32)
    mask = np.zeros((count, length), np.int32)
    for i, c in enumerate(classes):
        words = [10 + c, 20 + c] + [30 + c] * int(rng.integers(0, 5))
        row = [vocab] + words + [vocab - 1]  # BOS = vocab (first special), EOS = vocab - 1
        token_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"images": np.clip(images, 0, 255), "token_ids": token_ids, "mask": mask}


def tiny_config(**train: object):
    from conftest import tiny_config_dict  # this script's folder (tests/) is on sys.path

    from gpt2_effnet.config import CaptionerConfig

    return CaptionerConfig.from_dict(tiny_config_dict(
        gpt2={"vocab_size": 64, "n_positions": 16},
        model={"max_caption_length": 10},
        trainable={"gpt2_embeddings": True},
        # epsilon ~ gradient size makes Adam's step scale with the gradient, and tight clips
        # are active: a gradient summed twice, or clipped per replica, changes the losses.
        optim={"learning_rate": 0.05, "epsilon": 0.01, "clipvalue": 0.02, "global_clipnorm": 0.5},
        # float32 (the kit's): the replicas' losses are compared to the single device's within 2e-5.
        train={"batch_size": GLOBAL_BATCH, "steps": STEPS, "log_every": 1, "checkpoint_every": 1000, "seed": 7, **train},
    ))


def run(name: str, out: Path, strategy: object, run_dir: str | None = None, **train: object) -> list[float]:
    from gpt2_effnet.training import DataSource, Trainer

    data = DataSource.from_tensors(toy_batch(40))
    trainer = Trainer(tiny_config(**train), out / (run_dir or name), data, strategy=strategy, show_progress=False)
    result = trainer.fit()
    losses = [h["loss"] for h in result.history if "loss" in h]
    (out / f"{name}.json").write_text(json.dumps({"losses": losses, "replicas": strategy.num_replicas_in_sync}))
    return losses


def replicas(out: Path, shards: str) -> None:
    """One epoch on shards under MirroredStrategy; which samples each replica trained on."""
    from gpt2_effnet.training import Trainer
    from gpt2_effnet.training.distribute import make_strategy
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    from conftest import make_tiny_config

    config = make_tiny_config(real_vocabulary=True, train={"batch_size": 8, "epochs": 1, "log_every": 2,
                                                           "checkpoint_every": 1000, "shuffle_buffer": 0})
    strategy = make_strategy("mirrored")
    tokenizer = make_tokenizer(config)
    trainer = Trainer(config, out / "replicas-run", shard_source(config, tokenizer, shards), strategy=strategy,
                      show_progress=False)
    per_replica: list[list[list[int]]] = [[], []]
    inner = trainer.train_step

    def step(batch, vote=0):
        for replica, part in enumerate(strategy.experimental_local_results(batch["token_ids"])):
            texts = [tokenizer.decode([int(t) for t in row if t < tokenizer.eos_token_id]) for row in np.asarray(part)]
            per_replica[replica].append([int(t.split()[-1]) for t in texts])
        return inner(batch, vote)

    trainer.train_step = step
    result = trainer.fit()
    waits = [h.get("data_wait") for h in result.history if "loss" in h]
    (out / "replicas.json").write_text(json.dumps({"per_replica": per_replica, "data_wait": waits[-1] if waits else None}))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    # Grappler's rewrites of the big train-step graph cost seconds per process and matter
    # nothing for a four-step comparison run by every process the same way.
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    if mode in ("mirrored", "replicas"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from gpt2_effnet.training.distribute import make_strategy, worker_info

    if mode == "worker":
        strategy = make_strategy("multiworker")
        run(f"worker{worker_info(strategy).index}", out, strategy, run_dir="multiworker")
    elif mode == "single":
        run("single", out, make_strategy("default"))
    elif mode == "replicas":
        replicas(out, sys.argv[3])
    elif mode == "mirrored":
        mirrored = make_strategy("mirrored")
        run("single", out, make_strategy("default"))
        # Two replicas of 4 examples, each cut into 2 micro-batches of 2.
        run("mirrored", out, mirrored, grad_accum_steps=2)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
