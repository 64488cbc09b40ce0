"""Training: the one loop (``Trainer``/``train``), data adapters, checkpoints, tf.distribute.

TensorFlow-only (tf.data, tf.distribute, tf.train.Checkpoint); names load lazily so that
``gpt2-effnet train --help`` does not import TensorFlow. Programmatic use::

    from gpt2_effnet.training import Trainer, caption_source, make_tokenizer
    cfg = CaptionerConfig.load("configs/model1.yaml").replace(train={"steps": 1000})
    data = caption_source(cfg, make_tokenizer(cfg), csv="train.csv", images="imgs/")
    result = Trainer(cfg, "runs/a", data).fit()      # rerun: resumes from runs/a
"""

from __future__ import annotations

from gpt2_effnet._lazy import lazy_exports

_EXPORTS = {
    "Trainer": "gpt2_effnet.training.loop",
    "TrainResult": "gpt2_effnet.training.loop",
    "DataSource": "gpt2_effnet.training.data_source",
    "DataRequest": "gpt2_effnet.training.data_source",
    "train": "gpt2_effnet.training.loop",
    "caption_source": "gpt2_effnet.training.sources",
    "shard_source": "gpt2_effnet.training.sources",
    "make_tokenizer": "gpt2_effnet.training.sources",
    "make_strategy": "gpt2_effnet.training.distribute",
    "RunConfigMismatch": "gpt2_effnet.training.checkpoints",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
