"""Pictures people look at: the training-loss curve and a grid of captioned images.

matplotlib with the file-only Agg backend, so this works on machines without a screen.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The run's ``metrics.jsonl``: one JSON record per logging window."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def loss_curve(metrics_file: str | os.PathLike, out: str | os.PathLike, title: str = "training") -> Path:
    """Training (and, where logged, validation) loss against step."""
    plt = _pyplot()
    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("masked next-token cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def caption_grid(
    images: Sequence[np.ndarray],
    predictions: Sequence[str],
    references: Sequence[str] | None,
    out: str | os.PathLike,
    columns: int = 4,
) -> Path:
    """Images with their predicted caption (and one reference, in grey) underneath."""
    plt = _pyplot()
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, text) in enumerate(zip(images, predictions)):
        ax = axes.flat[i]
        ax.imshow(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
        label = "\n".join(textwrap.wrap(text, 30))
        if references is not None:
            label += "\n" + "\n".join(textwrap.wrap(f"ref: {references[i]}", 30))
        ax.set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
