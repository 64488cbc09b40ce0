"""Pure tf.data reader of webdataset shards, for machines without DALI.

It reads the same samples as the DALI pipeline, in the same order when shuffling is off, and
gives each worker the same share: samples lacking an image or a caption are dropped first
(DALI's missing_component_behavior="skip"), then worker i of k takes the contiguous slice
[n*i//k, n*(i+1)//k) of what is left, exactly as DALI's readers split a data set.

Tar members are located through the index files (or one scan of the tar when there is none),
so each worker seeks straight to its own samples. Bytes come out of a small Python generator
per tar; decoding runs in parallel in tf.data, and captions are tokenised once per batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, Tokenizer, pipeline_options, text_tokenizer_fn, worker_slice
from gpt2_effnet.data.shards import IMAGE_EXTS, Component, expand_shards, pick_components, tar_samples


@dataclass(frozen=True)
class ShardPlan:
    """Which samples of which tars one worker reads."""

    paths: tuple[str, ...]  # every tar, in order
    complete: tuple[int, ...]  # samples with an image and a caption, per tar
    incomplete: int  # samples (all tars) dropped for a missing component
    start: int  # this worker's [start, stop) in the concatenated complete samples
    stop: int
    slices: tuple[tuple[str, int, int, int], ...]  # (tar, first, last, index of first in worker order)

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@functools.lru_cache(maxsize=4096)
def _cached_samples(tar_path: str, stamp: tuple[int, int], image_exts: tuple[str, ...]) -> tuple[tuple[tuple[Component, Component], ...], int]:
    samples = tar_samples(tar_path)
    picked = (pick_components(s, image_exts) for s in samples)
    return tuple(p for p in picked if p is not None), len(samples)


def _samples(tar_path: str, image_exts: tuple[str, ...]) -> tuple[tuple[tuple[Component, Component], ...], int]:
    """(complete samples, number of all samples) of a tar, parsed once per file version."""
    st = os.stat(tar_path)
    return _cached_samples(tar_path, (st.st_mtime_ns, st.st_size), image_exts)


def plan_shards(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    num_shards: int = 1,
    shard_index: int = 0,
    image_exts: Sequence[str] = IMAGE_EXTS,
) -> ShardPlan:
    paths = expand_shards(shards)
    exts = tuple(image_exts)
    parsed = [_samples(p, exts) for p in paths]
    complete = [len(c) for c, _ in parsed]
    incomplete = sum(n for _, n in parsed) - sum(complete)
    total = sum(complete)
    if total == 0:
        raise ValueError(f"no sample in {len(paths)} shard(s) has both an image ({'/'.join(exts)}) and a txt caption")
    start, stop = worker_slice(total, num_shards, shard_index)
    slices = []
    offset = 0  # first global sample of the current tar
    for path, n in zip(paths, complete):
        first, last = max(start - offset, 0), min(stop - offset, n)
        if first < last:
            slices.append((path, first, last, offset + first - start))
        offset += n
    return ShardPlan(tuple(paths), tuple(complete), incomplete, start, stop, tuple(slices))


def _describe(plan: ShardPlan, exts: tuple[str, ...], index: int) -> str:
    """`tar:member` of a worker-order sample index, for messages about bad samples."""
    for tar, first, last, base in plan.slices:
        if base <= index < base + last - first:
            (ext, offset, _, name), _ = _samples(tar, exts)[0][first + index - base]
            return f"{tar}:{name or f'@{offset}.{ext}'}"
    return f"sample {index}"


CHUNK = 64  # samples per generator step: Python runs once per chunk, tf.data splits it


def _read_chunks(tar_path: bytes, first: int, last: int, base: int, image_exts: Sequence[bytes]):
    """Samples [first, last) of one tar as chunks: (worker-order indices, one byte string holding
    the chunk's images and captions back to back, image offsets, image sizes, caption offsets,
    caption sizes). Chunking keeps the per-sample cost of a Python generator out of the loop."""
    path = tar_path.decode() if isinstance(tar_path, bytes) else str(tar_path)
    exts = tuple(e.decode() if isinstance(e, bytes) else str(e) for e in image_exts)
    samples, _ = _samples(path, exts)
    first, last, base = int(first), int(last), int(base)
    with open(path, "rb") as f:
        for c0 in range(first, last, CHUNK):
            c1 = min(c0 + CHUNK, last)
            parts: list[bytes] = []
            spans = np.zeros((c1 - c0, 4), np.int32)  # image offset, image size, text offset, text size
            pos = 0
            for row, ((_, img_off, img_size, _), (_, txt_off, txt_size, _)) in enumerate(samples[c0:c1]):
                for col, (offset, size) in enumerate(((img_off, img_size), (txt_off, txt_size))):
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise OSError(f"{path}: truncated tar (component at byte {offset} wants {size} bytes)")
                    parts.append(data)
                    spans[row, 2 * col], spans[row, 2 * col + 1] = pos, size
                    pos += size
            indices = np.arange(base + c0 - first, base + c1 - first, dtype=np.int64)
            yield indices, b"".join(parts), spans[:, 0], spans[:, 1], spans[:, 2], spans[:, 3]


def wds_dataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    image_exts: Sequence[str] = IMAGE_EXTS,
) -> "tf.data.Dataset":  # noqa: F821
    """Batches of {"images", "token_ids", "mask"} from webdataset shards (brace patterns allowed).

    Shuffling visits this worker's tar slices in a fresh random order each epoch, reads up to
    four of them interleaved, and shuffles samples in `spec.shuffle_buffer`. Unreadable images
    are skipped and counted in `skips`; samples lacking a component count as `skips.missing`.
    """
    import tensorflow as tf

    from gpt2_effnet.data.images import decode_and_resize

    exts = tuple(image_exts)
    plan = plan_shards(shards, spec.num_shards, spec.shard_index, exts)
    if plan.num_samples == 0:
        raise ValueError(f"worker {spec.shard_index} of {spec.num_shards} gets no samples: only {plan.stop} in the shards")
    skips = skips if skips is not None else SkipCounter()
    skips.bind(plan.num_samples, plan.incomplete, describe=lambda i: _describe(plan, exts, i))
    ordered = spec.ordered

    tars, firsts, lasts, bases = (list(c) for c in zip(*plan.slices))
    slices = tf.data.Dataset.from_tensor_slices((tars, np.array(firsts, np.int64), np.array(lasts, np.int64), np.array(bases, np.int64)))
    if spec.shuffle:
        slices = slices.shuffle(len(tars), seed=spec.seed, reshuffle_each_iteration=True)
    if spec.repeat:
        slices = slices.repeat()
    vector = tf.TensorSpec([None], tf.int32)
    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec((), tf.string), vector, vector, vector, vector)

    def split(indices, blob, img_pos, img_len, txt_pos, txt_len):
        return indices, tf.strings.substr(blob, img_pos, img_len), tf.strings.substr(blob, txt_pos, txt_len)

    def open_slice(tar, first, last, base):
        chunks = tf.data.Dataset.from_generator(_read_chunks, args=(tar, first, last, base, list(exts)), output_signature=signature)
        return chunks.map(split).unbatch()

    # Shuffle on: read several tars at once for mixing. Off: strictly one tar after the other.
    if spec.shuffle:
        ds = slices.interleave(open_slice, cycle_length=min(4, len(tars)), block_length=1,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    else:
        ds = slices.interleave(open_slice, cycle_length=1, block_length=1)
    if spec.shuffle:
        ds = ds.shuffle(spec.shuffle_buffer, seed=spec.seed, reshuffle_each_iteration=True)

    def decode(index: tf.Tensor, data: tf.Tensor, text: tf.Tensor):
        return skips.track(index, lambda: decode_and_resize(tf.identity(data), spec.image_size, spec.max_image_pixels)), text

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    ds = ds.ignore_errors()  # which samples failed: skips.unreadable_samples()
    ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)
    tokenize = text_tokenizer_fn(tokenizer, spec.max_length)

    def to_dict(images: tf.Tensor, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        token_ids, mask = tokenize(texts)
        return {"images": images, "token_ids": token_ids, "mask": mask}

    ds = ds.map(to_dict, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(pipeline_options(deterministic=ordered))
