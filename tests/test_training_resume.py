"""Surviving interruption: Ctrl-C saves a checkpoint; after SIGKILL the same command resumes
at the last saved step with exactly the saved optimizer state (compared tensor by tensor
against the checkpoint file) and the learning rate the schedule had there."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

# The kit's tiny config with GPT-2's vocabulary; a cosine schedule, so the learning rate
# differs at every step and must be resumed too; the default precision (bfloat16 where the
# CPU has it), as a user's run would have.
RESUME = {
    "real_vocabulary": True,
    "trainable": {"gpt2_embeddings": True},
    "optim": {"learning_rate": 0.005, "schedule": "cosine", "warmup_steps": 3},
    "train": {"batch_size": 4, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 2, "seed": 5,
              "precision": "auto"},
}
STEPS = 2000  # far more than the test lets any run reach
START_TIMEOUT = 300  # tracing the first step takes a while on a loaded two-core machine


def _latest_step(run: Path) -> int:
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run / "checkpoints"))
    return -1 if path is None else int(path.rsplit("-", 1)[1])


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "gpt2_effnet.cli", *argv], stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, at_least: int, log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        step = _latest_step(run)
        if step >= at_least:
            return step
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no checkpoint at step >= {at_least} within {START_TIMEOUT}s:\n{log.read_text()[-4000:]}")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigint_saves_and_sigkill_resumes_with_the_saved_optimizer_state(tiny_config_data, tmp_path: Path) -> None:
    from gpt2_effnet.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "data", n_images=24, image_size=32, seed=4, captions_per_image=2,
                           val_fraction=0.0, progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_data(**RESUME)))
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--csv", str(data.train_csv), "--out", str(run),
            "--steps", str(STEPS), "--no-progress"]

    # 1. Ctrl-C after the second checkpoint: the run saves where it is and exits with 130.
    log_a = tmp_path / "a.log"
    proc = _start(argv, log_a)
    _wait_for_checkpoint(proc, run, 6, log_a)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log_a.read_text()[-3000:]
    saved_a = _latest_step(run)
    logged_a = max(m["step"] for m in _metrics(run) if "loss" in m)
    assert saved_a == logged_a >= 6  # the checkpoint is the step it stopped at, not the last periodic one
    assert "SIGINT: saved" in log_a.read_text()

    # 2. The same command resumes from there; SIGKILL it after a few more checkpoints.
    log_b = tmp_path / "b.log"
    proc = _start(argv, log_b)
    _wait_for_checkpoint(proc, run, saved_a + 6, log_b)
    proc.kill()
    proc.wait(timeout=60)
    assert f"(step {saved_a}," in log_b.read_text()
    records = _metrics(run)
    resume = next(i for i, m in enumerate(records) if m.get("event") == "resume")
    assert records[resume]["step"] == saved_a and records[resume + 1]["step"] == saved_a + 1
    assert all(m["step"] <= saved_a for m in records[:resume])

    # 3. The same command once more, in this process: it restores the newest checkpoint left
    #    by the killed run, with every optimizer tensor as saved.
    import keras
    import tensorflow as tf

    from gpt2_effnet.commands import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    saved_b = _latest_step(run)
    assert saved_b >= saved_a + 6
    checkpoint = tf.train.latest_checkpoint(str(run / "checkpoints"))
    trainer = cli.build_trainer(parser.parse_args(argv[1:]))
    assert trainer.resumed_from == trainer.step == saved_b

    reader = tf.train.load_checkpoint(checkpoint)
    optimizer = trainer.optimizer
    iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
    assert iterations == saved_b == reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    # Adam's first and second moments, one pair per trainable variable, each saved under its
    # index in the optimizer's variable list (the iteration count has its own key).
    moments = [(i, v) for i, v in enumerate(optimizer.variables) if v.path.endswith(("_momentum", "_velocity"))]
    assert len(moments) == 2 * len(trainer.model.trainable_variables)
    for i, variable in moments:
        saved = reader.get_tensor(f"optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), saved, err_msg=variable.path)
    assert any(np.abs(keras.ops.convert_to_numpy(v)).max() > 0 for _, v in moments)
    # Model weights too: each trainable variable equals a tensor stored in the checkpoint.
    stored = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith(("model/", "optimizer/_trainable"))]
    for variable in trainer.model.trainable_variables:
        value = keras.ops.convert_to_numpy(variable)
        assert any(s.shape == value.shape and np.array_equal(s, value) for s in stored), variable.path
    # The learning rate is the one the killed run logged after that step.
    logged = [m for m in _metrics(run) if m.get("step") == saved_b and "learning_rate" in m][-1]
    assert trainer.learning_rate == pytest.approx(logged["learning_rate"], rel=1e-6)
    assert trainer.epoch * (len(_rows(data.train_csv)) // 4) + trainer.batch_in_epoch == saved_b


def _rows(csv_path: Path) -> list[str]:
    return csv_path.read_text().splitlines()[1:]
