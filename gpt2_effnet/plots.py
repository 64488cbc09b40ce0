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


def attention_figure(image: np.ndarray, words: Sequence[str], maps: np.ndarray, out: str | os.PathLike) -> Path:
    """The image, then one panel per word with its attention map (upsampled, bilinear) over it.

    ``image`` is ``[S, S, 3]`` in 0..255, ``maps`` ``[n_words, h, w]``.
    """
    from PIL import Image

    plt = _pyplot()
    panels = len(words) + 1
    columns = min(panels, 6)
    rows = (panels + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    picture = np.clip(image, 0, 255).astype(np.uint8)
    size = picture.shape[:2]
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title(textwrap.shorten(" ".join(words), 40), fontsize=8)
    for index, (word, grid) in enumerate(zip(words, maps), start=1):
        ax = axes.ravel()[index]
        heat = Image.fromarray(np.asarray(grid, np.float32)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        heat = np.asarray(heat)
        ax.imshow(picture)
        ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0.0, vmax=max(float(heat.max()), 1e-6))
        ax.set_title(word, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
