"""Training on shards at scale, on two cores: exact resume without re-reading (tf.data and DALI),
resampled epochs, one input pipeline per replica, a data-wait figure in the logs, and a SIGTERM
to one of two workers stopping both at one checkpoint that the rerun continues from."""

from __future__ import annotations

import io
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
from PIL import Image

from gpt2_effnet.config import CaptionerConfig

WORKER = Path(__file__).with_name("training_worker.py")
SAMPLES = 30


def _numbered_shards(folder: Path, samples: int = SAMPLES, per_shard: int = 7) -> str:
    """Shards whose captions name their sample ("sample 17"), so a batch tells which samples it holds."""
    from gpt2_effnet.data.shards import write_shards

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(samples):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        pairs.append((str(path), f"sample {i}"))
    result = write_shards(pairs, folder / "shards", samples_per_shard=per_shard, prefix="n", progress=False)
    return str(folder / "shards" / f"n-{{000000..{len(result.tars) - 1:06d}}}.tar")


def _config(tiny_config, **train) -> CaptionerConfig:
    return tiny_config(real_vocabulary=True, train={"batch_size": 4, "shuffle_buffer": 8, "log_every": 2,
                                                    "checkpoint_every": 1000, **train})


def _samples_of(tokenizer, token_ids: np.ndarray) -> list[int]:
    out = []
    for row in token_ids:
        text = tokenizer.decode([int(t) for t in row if t < tokenizer.eos_token_id])
        out.append(int(text.split()[-1]))
    return out


def _recorded(trainer) -> list[list[int]]:
    """Wrap the trainer's step: the samples (by caption number) of every batch it trains on."""
    seen: list[list[int]] = []
    inner, tokenizer = trainer.train_step, trainer.data.tokenizer

    def step(batch, vote=0):
        for part in trainer.strategy.experimental_local_results(batch["token_ids"]):
            seen.append(_samples_of(tokenizer, np.asarray(part)))
        return inner(batch, vote)

    trainer.train_step = step
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tfdata", "dali"])
def test_a_run_stopped_at_60_percent_of_an_epoch_resumes_on_exactly_the_same_samples(loader, tiny_config, tmp_path, monkeypatch) -> None:
    from gpt2_effnet.data.dali import dali_available

    if loader == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI or its TensorFlow plugin does not import here")
    import gpt2_effnet.image_input as image_input
    from gpt2_effnet.training.loop import Trainer
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    shards = _numbered_shards(tmp_path / "data")
    per_epoch = SAMPLES // 4  # 7 steps
    full_config = _config(tiny_config, steps=10)

    def trainer(run: str, steps: int):
        config = full_config.replace(train={"steps": steps})
        data = shard_source(config, make_tokenizer(config), shards, loader)
        return Trainer(config, tmp_path / run, data, show_progress=False, log=lambda _: None)

    straight = trainer("straight", 10)
    expected = _recorded(straight)
    straight.fit()
    assert len(expected) == 10 and sorted(sum(expected[:per_epoch], [])) == sorted(set(sum(expected[:per_epoch], [])))

    first = trainer("stopped", 4)  # 4 of 7 steps: about 60 % of the epoch
    part_one = _recorded(first)
    first.fit()
    decoded = []
    original = image_input.decode_rgb
    monkeypatch.setattr(image_input, "decode_rgb", lambda *a, **k: decoded.append(1) or original(*a, **k))
    resumed = trainer("stopped", 10)
    assert resumed.resumed_from == 4 and resumed.batch_in_epoch == 4
    part_two = _recorded(resumed)
    resumed.fit()
    assert part_one + part_two == expected
    if loader == "tfdata":  # what was consumed is not decoded again (DALI decodes outside Python)
        assert len(decoded) <= SAMPLES - 16 + SAMPLES


@pytest.mark.slow
def test_resampled_epochs_draw_shards_with_replacement_and_restart_fresh(tiny_config, tmp_path) -> None:
    from gpt2_effnet.training.loop import Trainer
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    shards = _numbered_shards(tmp_path / "data")
    config = _config(tiny_config, steps=6, resampled=True, samples_per_epoch=12)

    def run(steps: int) -> tuple[Trainer, list[list[int]]]:
        cfg = config.replace(train={"steps": steps})
        trainer = Trainer(cfg, tmp_path / "run", shard_source(cfg, make_tokenizer(cfg), shards), show_progress=False, log=lambda _: None)
        return trainer, _recorded(trainer)

    first, seen = run(6)
    assert first.steps_per_epoch == 3
    first.fit()
    again, seen_again = run(10)
    assert again.resumed_from == 6 and again.epoch == 2
    again.fit()
    drawn = sum(seen + seen_again, [])
    assert len(drawn) == 40 and set(drawn) <= set(range(SAMPLES))
    assert len(set(drawn)) < len(drawn)  # with replacement: samples come back


@pytest.mark.slow
def test_one_pipeline_per_replica_reads_its_own_share(tmp_path) -> None:
    """MirroredStrategy over two logical CPUs: each replica's batches come from its own pipeline,
    and an epoch trains on every sample exactly once."""
    shards = _numbered_shards(tmp_path / "data", samples=32, per_shard=5)
    proc = subprocess.run([sys.executable, str(WORKER), "replicas", str(tmp_path), shards], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "replicas.json").read_text())
    per_replica = result["per_replica"]  # [replica][step] -> sample numbers
    assert len(per_replica) == 2 and all(len(steps) == 4 for steps in per_replica)
    epoch = [s for replica in per_replica for step in replica for s in step]
    assert sorted(epoch) == list(range(32))
    halves = [set(s for step in replica for s in step) for replica in per_replica]
    assert halves[0] == set(range(16)) and halves[1] == set(range(16, 32))  # each its contiguous share
    assert result["data_wait"] is not None and 0.0 <= result["data_wait"] <= 1.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_one_checkpoint_and_the_rerun_finishes(tiny_config_data, tmp_path) -> None:
    from gpt2_effnet.data.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "data", n_images=40, image_size=32, seed=2, captions_per_image=2,
                           val_fraction=0.0, progress=False)
    config = tmp_path / "tiny.yaml"
    steps = 400
    config.write_text(yaml.safe_dump(tiny_config_data(real_vocabulary=True, train={
        "batch_size": 8, "log_every": 1, "checkpoint_every": 1000, "steps": steps})))
    run = tmp_path / "run"

    def start(tag: str) -> list[subprocess.Popen]:
        cluster = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
        procs = []
        for index in range(2):
            tf_config = json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}})
            log = open(tmp_path / f"{tag}{index}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gpt2_effnet.cli", "train", "--config", str(config), "--csv", str(data.train_csv),
                 "--out", str(run), "--strategy", "multiworker", "--no-progress"],
                env=_env(TF_CONFIG=tf_config), stdout=log, stderr=subprocess.STDOUT))
        return procs

    def logs(tag: str) -> str:
        return "\n".join(f"--- {tag}{i}\n" + (tmp_path / f"{tag}{i}.log").read_text()[-2500:] for i in range(2))

    procs = start("a")
    deadline = time.monotonic() + 420
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:  # until a few steps have run
        if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 3:
            break
        if any(p.poll() is not None for p in procs):
            pytest.fail("a worker exited early:\n" + logs("a"))
        time.sleep(0.5)
    else:
        for p in procs:
            p.kill()
        pytest.fail("training did not start:\n" + logs("a"))
    procs[1].send_signal(signal.SIGTERM)  # the non-chief worker only
    stopped = time.monotonic()
    codes = [p.wait(timeout=120) for p in procs]
    assert time.monotonic() - stopped < 60, logs("a")
    assert codes == [143, 143], logs("a")
    import tensorflow as tf

    checkpoint = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert checkpoint is not None, logs("a")
    saved = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= saved < steps
    assert len(list((run / "checkpoints").glob("ckpt-*.index"))) == 1
    assert "another worker was stopped by SIGTERM" in (tmp_path / "a0.log").read_text()

    procs = start("b")
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], logs("b")
    assert f"(step {saved}," in (tmp_path / "b0.log").read_text()
    assert int(tf.train.latest_checkpoint(str(run / "checkpoints")).rsplit("-", 1)[1]) == steps
