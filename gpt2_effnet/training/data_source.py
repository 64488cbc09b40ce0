"""The contract between the data pipelines and the training loop.

The loop asks a :class:`DataSource` for one epoch at a time with a :class:`DataRequest`
(shard, per-replica batch, seed); the source answers with a finite ``tf.data.Dataset`` of
batch dicts ``{"images", "token_ids", "mask"}``. The adapters in :mod:`.sources` build
sources for the CSV/COCO and shard pipelines; tests and benchmarks use
:meth:`DataSource.from_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from ..config import CaptionerConfig

BATCH_KEYS = ("images", "token_ids", "mask")


@dataclass(frozen=True)
class DataRequest:
    """What one input pipeline (one worker) must produce for one pass over the data."""

    epoch: int
    batch_size: int  # examples per dataset element = per-replica batch
    num_shards: int  # input pipelines in the cluster (one per replica)
    shard_index: int  # this pipeline's index
    seed: int  # train.seed + epoch: a fresh, reproducible order every epoch
    shuffle: bool  # False for validation
    start_batch: int = 0  # batches of this epoch already trained on (a resumed run): skip them unread
    device_index: int = 0  # this pipeline's replica among the ones of this process (its GPU)
    pipelines_here: int = 1  # pipelines in this process, sharing its cores


@dataclass
class DataSource:
    """A pipeline: ``make_dataset(request)`` -> a finite ``tf.data.Dataset`` of batch dicts.

    ``num_examples`` (over all shards), when known, fixes the steps per epoch, so every
    worker stops an epoch at the same step. ``skipped()`` returns how many samples the
    most recently made dataset (this epoch's, on this worker) dropped as missing or
    unreadable; the loop prints it at each epoch's end. ``description`` is stored in the
    run folder so a resume with other data is caught. ``vocabulary()``, where the source
    can list its captions, gives the token ids they use; ``tokenizer``, when given, is
    saved in the run folder so captioning decodes with the same vocabulary.
    """

    make_dataset: Callable[[DataRequest], tf.data.Dataset]
    num_examples: int | None = None
    skipped: Callable[[], int] | None = None
    description: Mapping[str, Any] = field(default_factory=dict)
    # The token ids the captions use (for model.output_vocabulary: "captions"), when known.
    vocabulary: Callable[[], set[int]] | None = None
    # The tokenizer that made token_ids; training keeps a copy in the run folder for captioning.
    tokenizer: Any = None
    # The live skip counter of the epoch being read (gpt2_effnet.data.pipeline.SkipCounter),
    # for running counts in the logs; None where the source cannot tell.
    skip_counter: Callable[[], Any] | None = None

    @classmethod
    def from_tensors(
        cls, batch: Mapping[str, Any], shuffle: bool = True, description: Mapping[str, Any] | None = None
    ) -> "DataSource":
        """An in-memory source over arrays ``images [N,S,S,3]``, ``token_ids``/``mask [N,L]``.

        Rows are shuffled (seeded by the request) *before* being dealt round-robin to the
        shards, so the union of the shards' k-th batches is the single-device k-th batch.
        """
        arrays = {key: np.asarray(batch[key]) for key in BATCH_KEYS}
        count = len(arrays["token_ids"])
        if any(len(value) != count for value in arrays.values()):
            raise ValueError(f"images, token_ids and mask must have the same length, got { {k: len(v) for k, v in arrays.items()} }")

        def make(request: DataRequest) -> tf.data.Dataset:
            order = np.arange(count)
            if request.shuffle and shuffle:
                order = np.random.default_rng(request.seed).permutation(count)
            order = order[request.shard_index :: request.num_shards]
            data = {key: value[order] for key, value in arrays.items()}
            return tf.data.Dataset.from_tensor_slices(data).batch(request.batch_size).skip(request.start_batch)

        return cls(make, num_examples=count, description=dict(description or {"source": "in-memory", "rows": count}))


def resolve_output_vocabulary(config: CaptionerConfig, data: DataSource) -> CaptionerConfig:
    """``model.output_vocabulary: captions`` -> the sorted ids of the training captions (EOS included).

    Resolved before the run folder is written, so config.yaml (and every model loaded
    from it) holds the explicit list, and a resume on the same data resolves the same.
    """
    if config.model.output_vocabulary != "captions":
        return config
    if data.vocabulary is None:
        raise ValueError(
            "model.output_vocabulary 'captions' needs captions it can read up front (a CSV or COCO source); "
            "for shards give the list of token ids"
        )
    vocab = config.gpt2.vocab_size
    ids = sorted(i for i in data.vocabulary() if i < vocab)
    return config.replace(model={"output_vocabulary": ids})
