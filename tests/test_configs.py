"""Every shipped config builds and runs, so none can rot (random weights, small images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.captioner import Captioner
from gpt2_effnet.config import CaptionerConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"model1.yaml", "model2.yaml", "demo.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_and_runs(path: Path) -> None:
    config = CaptionerConfig.load(path)
    # Full GPT-2 and backbone shapes; only the image shrinks and no ImageNet download.
    small = config.replace(model={"image_size": 64, "backbone_weights": None})
    model = Captioner(small)
    ids = np.array([[small.gpt2.vocab_size, 11, 12, 13]])
    logits = model({"images": np.zeros((1, 64, 64, 3), np.float32), "token_ids": ids})
    assert logits.shape == (1, 4, small.gpt2.vocab_size + small.model.num_special_tokens)
    assert np.isfinite(np.asarray(logits)).all()
