"""Shared test set-up: quiet TensorFlow, a seeded generator, and the tiny-config kit.

The kit is one captioner config small enough to train in seconds on two cores; a test
changes only what it is about (``tiny_config(model={"cross_attention": "gated"})``).
Test functions get the builder as the ``tiny_config`` fixture; scripts run as
subprocesses (tests/training_worker.py) import ``tiny_config_dict`` from here.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

GPT2_VOCAB = 50257
TINY: dict[str, dict[str, Any]] = {
    # A GPT-2 shape with a small vocabulary; real_vocabulary=True swaps in GPT-2's 50257
    # tokens for tests that tokenise or decode text.
    "gpt2": {"vocab_size": 97, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2},
    # Ungated, like the demo: a model trained from scratch learns faster without the gates.
    "model": {"backbone": "efficientnetb0", "image_size": 32, "encoder_layers": 1, "encoder_heads": 2,
              "cross_attention": "ungated", "max_caption_length": 20},
    "trainable": {},
    "optim": {"learning_rate": 0.01},
    # float32: tests compare a trained model's logits with a reloaded one's to 1e-5, which
    # bfloat16 compute (the default where the CPU has it) would not meet.
    "train": {"batch_size": 8, "log_every": 4, "checkpoint_every": 1000, "seed": 1, "precision": "float32"},
}


def tiny_config_dict(real_vocabulary: bool = False, **sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The tiny config as plain data (for YAML files and subprocesses), each given section updated."""
    config = copy.deepcopy(TINY)
    if real_vocabulary:
        config["gpt2"]["vocab_size"] = GPT2_VOCAB
    for name, values in sections.items():
        if name not in config:
            raise KeyError(f"no config section {name!r}; sections: {sorted(config)}")
        config[name].update(values)
    return config


def make_tiny_config(real_vocabulary: bool = False, **sections: Mapping[str, Any]) -> Any:
    from gpt2_effnet.config import CaptionerConfig

    return CaptionerConfig.from_dict(tiny_config_dict(real_vocabulary, **sections))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Any]:
    """``tiny_config(real_vocabulary=False, gpt2={...}, model={...}, train={...})`` -> CaptionerConfig."""
    return make_tiny_config


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_config_data() -> Callable[..., dict[str, dict[str, Any]]]:
    """The same as plain data, for tests that write YAML files: ``tiny_config_data(train={...})``."""
    return tiny_config_dict
