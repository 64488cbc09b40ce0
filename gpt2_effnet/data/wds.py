"""The tf.data pipeline over webdataset shards (local, http(s), s3, gs, pipe:).

Bytes come from :mod:`.shard_reader` in the order :mod:`.sample_order` defines (both
loaders read exactly the same samples at the same positions); images decode in parallel
tf.data calls to uint8; captions are tokenised once per batch. Batches hold every position
of the order, unusable samples masked (see :mod:`.pipeline`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from .pipeline import PipelineSpec, SkipCounter, Tokenizer, batch_dict, decode_parallelism, pipeline_options, text_tokenizer_fn
from .sample_order import EpochOrder, pipeline_pieces
from .shard_index import ShardSet, resolve
from .shard_reader import IMAGE_EXTS, chunks, read_samples

ShardsArg = ShardSet | str | os.PathLike | Sequence[str | os.PathLike]


def shard_set(shards: ShardsArg) -> ShardSet:
    return shards if isinstance(shards, ShardSet) else resolve(shards)


def epoch_order(shards: ShardSet, spec: PipelineSpec, epoch_offset: int = 0) -> EpochOrder:
    """This pipeline's order for the spec's epoch (plus ``epoch_offset`` when repeating)."""
    seed = (0 if spec.seed is None else int(spec.seed)) + epoch_offset
    block = spec.shuffle_buffer if spec.shuffle else 1
    if spec.resampled:
        return EpochOrder(None, seed=seed, pipeline=spec.shard_index, shuffle=True, block=block,
                          counts=shards.counts, resampled=True)
    pieces = pipeline_pieces(shards.counts, spec.num_shards, spec.shard_index)
    return EpochOrder(pieces, seed=seed, pipeline=spec.shard_index, shuffle=spec.shuffle, block=block)


def sample_stream(shards: ShardSet, spec: PipelineSpec, skips: SkipCounter, image_exts: Sequence[str]) -> Iterator:
    """Raw samples from the spec's start position: one epoch, or endless with ``repeat``."""
    start = spec.start_position
    for k in range(1 << 62 if spec.repeat else 1):
        order = epoch_order(shards, spec, k)
        yield from read_samples(shards, order, start if k == 0 else 0, None, skips, image_exts)
        if order.length is None:
            return  # resampled: endless already


def wds_dataset(
    shards: ShardsArg,
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    image_exts: Sequence[str] = IMAGE_EXTS,
) -> "tf.data.Dataset":  # noqa: F821
    """Batches of {"images", "token_ids", "mask"} from webdataset shards (any ``--shards`` value)."""
    import tensorflow as tf

    from .images import decode_images

    shards = shard_set(shards)
    order = epoch_order(shards, spec)
    if order.length == 0:
        raise ValueError(f"pipeline {spec.shard_index} of {spec.num_shards} gets no samples: "
                         f"only {shards.total} in the shards")
    skips = skips if skips is not None else SkipCounter()
    skips.bind(order.length or 0)
    exts = tuple(image_exts)

    def generate() -> Iterator[tuple[np.ndarray, ...]]:
        yield from chunks(sample_stream(shards, spec, skips, exts))

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec((), tf.string),
                 tf.TensorSpec([None, 6], tf.int32), tf.TensorSpec([None], tf.int32))
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)

    def split(positions, blob, spans, usable):
        def part(col: int) -> tf.Tensor:
            return tf.strings.substr(blob, spans[:, 2 * col], spans[:, 2 * col + 1])

        return positions, part(0), part(1), part(2), usable

    ds = ds.map(split).unbatch()
    size, limit = spec.image_size, spec.max_image_pixels

    def decode(position, image, text, name, usable):
        pixels, ok = decode_images(image, name, size, limit, skips, usable=usable)
        return pixels, text, ok

    ds = ds.map(decode, num_parallel_calls=decode_parallelism(spec), deterministic=spec.ordered)
    ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)
    tokenize = text_tokenizer_fn(tokenizer, spec.max_length)

    def to_dict(images: tf.Tensor, texts: tf.Tensor, ok: tf.Tensor) -> dict[str, tf.Tensor]:
        token_ids, mask = tokenize(texts)
        return batch_dict(images, token_ids, mask, ok)

    ds = ds.map(to_dict)
    ds = ds.prefetch(2)
    return ds.with_options(pipeline_options(deterministic=spec.ordered))
