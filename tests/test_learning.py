"""Regression guard: a short training run must learn to *see*, not just to speak.

A captioner can learn the captions' grammar and their most frequent words while staying
blind to the image (the demo once scored BLEU-4 0.39 that way, naming colours at chance).
This trains the demo's image path (configs/demo.yaml's model section: backbone, feature
stride, cross-attention) with a tiny decoder for a few seconds on small synthetic images
and asks the held-out captions to name the colour that was drawn, far above chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.config import CaptionerConfig

REPO = Path(__file__).resolve().parent.parent
CHANCE_COLOUR = 1 / 6


@pytest.mark.slow
def test_a_short_run_names_the_colour_it_sees(tmp_path: Path) -> None:
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.data.synthetic import attribute_accuracy, read_metadata, write_synthetic
    from gpt2_effnet.decoding import caption_strings
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.training.loop import train
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    size = 32
    paths = write_synthetic(tmp_path / "data", n_images=600, image_size=size, seed=5, captions_per_image=2,
                            val_fraction=0.2, progress=False)
    demo = CaptionerConfig.load(REPO / "configs" / "demo.yaml")
    config = demo.replace(
        gpt2={"n_embd": 64, "n_layer": 1, "n_head": 2},
        model={"image_size": size, "encoder_layers": 1, "encoder_heads": 2},
        optim={"warmup_steps": 10},
        train={"steps": 150, "batch_size": 16, "checkpoint_every": 1000, "log_every": 50, "seed": 0},
    )
    tokenizer = make_tokenizer(config)
    source = caption_source(config, tokenizer, csv=paths.train_csv, images=paths.root)
    result = train(config, tmp_path / "run", source, show_progress=False, log=lambda _: None)
    assert result.step == 150

    truth = read_metadata(paths.metadata)
    names = sorted(name for name, item in truth.items() if item["split"] == "val")
    images = np.stack([read_image(paths.root / name, size) for name in names])
    model = Captioner.load(tmp_path / "run")
    captions = caption_strings(model, images, tokenizer=tokenizer, max_new_tokens=16)
    accuracy = attribute_accuracy(dict(zip(names, captions)), truth)
    # A blind model that has learned the grammar names *a* colour in every caption, right
    # about one time in six (main's demo image path: 0.19 here); one that sees names
    # nearly all of them (0.93 and more in our runs). Other attributes need longer runs
    # than a test affords, and vary between runs of this size: only colour is asserted.
    assert accuracy["colour"] >= 0.6, (accuracy, captions[:5])
