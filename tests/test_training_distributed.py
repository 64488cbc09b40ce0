"""tf.distribute: MirroredStrategy (two logical CPUs) and MultiWorkerMirroredStrategy (two
processes on 127.0.0.1) must give the same per-step losses as one device for the same global
batch and seed. The runs use tight clipping and a large Adam epsilon so that gradients summed
twice, clipped per replica, or averaged per replica would change the losses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("training_worker.py")
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _losses(path: Path) -> list[float]:
    return json.loads(path.read_text())["losses"]


@pytest.mark.slow
def test_mirrored_and_multiworker_match_one_device(tmp_path: Path) -> None:
    # All three processes at once: the mirrored one (which also trains the one-device
    # reference) and the two workers; they share the machine's two cores.
    procs = {
        "mirrored": subprocess.Popen(
            [sys.executable, str(WORKER), "mirrored", str(tmp_path)], env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    }
    cluster = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    for index in range(2):
        config = json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}})
        procs[f"worker{index}"] = subprocess.Popen(
            [sys.executable, str(WORKER), "worker", str(tmp_path)], env=_env(TF_CONFIG=config),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    logs = {}
    try:
        for name, proc in procs.items():
            logs[name], _ = proc.communicate(timeout=TIMEOUT)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name in ("single", "mirrored", "worker0", "worker1"):
        assert (tmp_path / f"{name}.json").is_file(), f"{name} wrote no losses; logs:\n" + "\n".join(
            f"--- {k}\n{v[-3000:]}" for k, v in logs.items()
        )
    single = _losses(tmp_path / "single.json")
    assert len(single) == 4 and single[-1] < single[0]
    assert json.loads((tmp_path / "mirrored.json").read_text())["replicas"] == 2
    assert json.loads((tmp_path / "worker0.json").read_text())["replicas"] == 2
    for name in ("mirrored", "worker0", "worker1"):
        np.testing.assert_allclose(_losses(tmp_path / f"{name}.json"), single, rtol=2e-5, err_msg=name)
    # Only the chief writes the run folder; both workers trained the same run.
    assert (tmp_path / "multiworker" / "config.yaml").is_file()
    assert (tmp_path / "multiworker" / "captioner.weights.h5").is_file()
    assert not any(p.name.startswith(".worker-") for p in (tmp_path / "multiworker").iterdir())
