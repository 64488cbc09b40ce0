"""What every input pipeline shares, and the tf.data pipeline over (image path, caption) pairs.

Every pipeline yields the training batch dict

    {"images": uint8 [B, S, S, 3], "token_ids": int32 [B, L], "mask": int32 [B, L]}

Images stay uint8 until the model (a quarter of float32's bytes from the loader to the
device); the encoder casts them. Design points:

- A batch takes exactly B positions of the pipeline's sample order. A sample that cannot
  be used (its image missing, unreadable or over the pixel limit, its caption absent) still
  fills its row, with an all-zero mask, so it adds nothing to loss or gradients, and is
  counted in a :class:`SkipCounter` under its name. Positions never shift, so a resumed run
  starts at ``start_batch * B`` without reading or decoding what was already trained on.
- Images decode with :func:`gpt2_effnet.image_input.decode_rgb` (Pillow) in parallel
  tf.data calls: the pixels every other reader gives, one set of formats everywhere.
- Captions are tokenised once, up front, for a caption file; shard pipelines tokenise
  once per batch.
- A small set (see :class:`ImageCache`) is decoded once and served from memory in later epochs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gpt2_effnet.data.captions import CaptionSet, Pair, find_missing
from gpt2_effnet.data.sample_order import worker_slice

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "PipelineSpec",
    "SkipCounter",
    "Tokenizer",
    "caption_dataset",
    "decode_parallelism",
    "pipeline_options",
    "text_tokenizer_fn",
    "worker_slice",
]


class Tokenizer(Protocol):
    eos_token_id: int

    def batch_encode(self, texts: Sequence[str], max_length: int, add_bos: bool = True, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


class SkipCounter:
    """Samples one pipeline could not use, by kind, with the first few named.

    ``missing``: no image file, no image or caption in a shard sample, a shard that could not
    be opened or ended early. ``unreadable``: the image did not decode or its header
    announced more pixels than allowed. ``attempted`` counts images tried. Pipelines call it
    from their reading and decoding threads (it locks); the loop reads it at log lines.
    """

    KEEP_NAMES = 10

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.num_samples = 0  # positions this pipeline reads per epoch (when known)
        self.missing = 0
        self.unreadable = 0
        self.attempted = 0
        self._names: list[str] = []
        self._missing_names: list[str] = []

    def bind(self, num_samples: int, missing: int = 0) -> None:
        """Attach to one pipeline: it reads ``num_samples`` positions; ``missing`` are known bad up front."""
        with self._lock:
            self.num_samples = num_samples
            self.missing += missing

    def add_missing(self, name: str, count: int = 1) -> None:
        with self._lock:
            self.missing += count
            if len(self._missing_names) < self.KEEP_NAMES:
                self._missing_names.append(name)

    def add_decoded(self) -> None:
        with self._lock:
            self.attempted += 1

    def add_unreadable(self, name: str) -> None:
        with self._lock:
            self.attempted += 1
            self.unreadable += 1
            if len(self._names) < self.KEEP_NAMES:
                self._names.append(name)

    @property
    def skipped(self) -> int:
        return self.missing + self.unreadable

    @classmethod
    def combined(cls, counters: Sequence["SkipCounter"]) -> "SkipCounter":
        """A snapshot summing several pipelines' counters (names: the first few of each)."""
        total = cls()
        for counter in counters:
            with counter._lock:
                total.num_samples += counter.num_samples
                total.missing += counter.missing
                total.unreadable += counter.unreadable
                total.attempted += counter.attempted
                total._names += counter._names
                total._missing_names += counter._missing_names
        return total

    def unreadable_samples(self, limit: int = 10) -> list[str]:
        """Up to ``limit`` samples (file paths, or shard:key with the reason) that failed to decode."""
        with self._lock:
            return list(self._names[:limit])

    def missing_samples(self, limit: int = 10) -> list[str]:
        with self._lock:
            return list(self._missing_names[:limit])

    def summary(self) -> str:
        text = (f"skipped {self.skipped} of {self.attempted + self.missing} samples "
                f"({self.missing} missing, {self.unreadable} unreadable)")
        bad = self.unreadable_samples(3)
        if bad:
            text += "; unreadable: " + ", ".join(bad) + (", ..." if self.unreadable > len(bad) else "")
        return text


@dataclass(frozen=True)
class PipelineSpec:
    """What the training loop asks of any pipeline (CSV/COCO, shards via tf.data, shards via DALI).

    Pipeline ``shard_index`` of ``num_shards`` (one per replica in the cluster) reads its own
    share. Without ``repeat`` one epoch is yielded, from batch ``start_batch`` on (a resumed
    run); with it the stream is endless (each epoch reshuffled). ``shuffle_buffer`` is the
    block of samples shuffled together by shard readers (a caption file's rows are shuffled
    whole). ``epoch`` seeds shard readers' orders with ``seed``. ``resampled``: shard
    readers draw shards with replacement (endless; see :mod:`.sample_order`).
    """

    image_size: int
    max_length: int
    batch_size: int
    shuffle: bool = True
    seed: int | None = 0
    num_shards: int = 1
    shard_index: int = 0
    repeat: bool = False
    drop_remainder: bool = False
    shuffle_buffer: int = 1024
    deterministic: bool | None = None
    # Images whose header announces more pixels are skipped (counted) before decoding;
    # None: no limit. Training passes train.max_image_pixels.
    max_image_pixels: int | None = None
    start_batch: int = 0
    epoch: int = 0
    resampled: bool = False
    # Decoding calls in flight; None: this machine's cores shared by the pipelines in this process.
    parallelism: int | None = None
    pipelines_here: int = 1

    def __post_init__(self) -> None:
        for name in ("image_size", "max_length", "batch_size", "shuffle_buffer", "pipelines_here"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {self.start_batch}")
        worker_slice(0, self.num_shards, self.shard_index)  # checks the shard numbers

    @property
    def ordered(self) -> bool:
        """Whether output order follows the sample order exactly (default: always; resume needs it)."""
        return True if self.deterministic is None else bool(self.deterministic)

    @property
    def start_position(self) -> int:
        return self.start_batch * self.batch_size

    def where(self) -> str:
        return f" (pipeline {self.shard_index} of {self.num_shards})" if self.num_shards > 1 else ""


def decode_parallelism(spec: PipelineSpec) -> int:
    """Decoding calls in flight: every core, shared by this process's pipelines (one per local replica)."""
    if spec.parallelism is not None:
        return max(1, spec.parallelism)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // spec.pipelines_here)


def pipeline_options(deterministic: bool) -> "tf.data.Options":
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = deterministic
    # tf.data's autotuner is off. Its optimisation thread sleeps between rounds for a period
    # that doubles up to a minute, and deleting an iterator waits for that thread to wake:
    # measured with TF 2.21, an iterator that lived 50 s took 31.9 s to delete (a stall at
    # every epoch end and before validation). Parallelism is set explicitly instead.
    options.autotune.enabled = False
    # We shard per pipeline ourselves (shard_index/num_shards); auto-sharding would shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return options


def compact_ids(token_ids: np.ndarray) -> np.ndarray:
    """uint16 when every id fits (GPT-2: 50258 ids), halving the table a pipeline carries."""
    return token_ids.astype(np.uint16) if token_ids.size == 0 or token_ids.max() < 2**16 else token_ids.astype(np.int32)


def batch_dict(images: "tf.Tensor", token_ids: "tf.Tensor", mask: "tf.Tensor", ok: "tf.Tensor") -> dict[str, "tf.Tensor"]:
    """The training batch: rows whose sample was unusable keep their place with an all-zero mask."""
    import tensorflow as tf

    return {
        "images": images,
        "token_ids": tf.cast(token_ids, tf.int32),
        "mask": tf.cast(mask, tf.int32) * tf.cast(ok, tf.int32)[:, None],
    }


def caption_dataset(
    pairs: Sequence[Pair] | CaptionSet,
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    cache: "ImageCache | None" = None,
) -> "tf.data.Dataset":
    """Batches of {"images", "token_ids", "mask"} for this pipeline's share of ``pairs``.

    Pipeline ``shard_index`` reads a contiguous 1/num_shards of the rows whose image file
    exists (rows with a missing file are counted in ``skips`` once, up front). Shuffling
    permutes the share with a generator seeded by ``spec.seed``, so a resumed epoch skips its
    first ``start_batch`` batches before anything is read.
    """
    import tensorflow as tf

    from gpt2_effnet.data.images import decode_images

    if isinstance(pairs, CaptionSet):
        all_pairs, missing = list(pairs.pairs), pairs.missing
    else:
        all_pairs = [(str(p), str(c)) for p, c in pairs]
        missing = find_missing([p for p, _ in all_pairs])
    present = [p for p in all_pairs if p[0] not in missing]
    start, stop = worker_slice(len(present), spec.num_shards, spec.shard_index)
    share = present[start:stop]
    if not share:
        raise ValueError(f"no readable samples{spec.where()}: {len(all_pairs)} rows, {len(all_pairs) - len(present)} "
                         "of their image files missing")
    skips = skips if skips is not None else SkipCounter()
    # Missing rows count once, against the pipeline that would have read them.
    missing_here = len(all_pairs) - len(present) if spec.shard_index == 0 else 0
    skips.bind(len(share), missing_here)

    paths = [p for p, _ in share]
    token_ids, mask = tokenizer.batch_encode([c for _, c in share], spec.max_length)
    lengths = mask.sum(axis=1).astype(np.int32)
    ids = compact_ids(token_ids)
    cached = cache.images(paths, spec) if cache is not None else None
    sources = np.array(paths, dtype=object) if cached is None else cached.rows

    def epoch_order(epoch: int) -> np.ndarray:
        if not spec.shuffle:
            return np.arange(len(share), dtype=np.int64)
        seed = 0 if spec.seed is None else int(spec.seed)
        return np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(len(share)).astype(np.int64)

    if spec.repeat:
        rows = tf.data.Dataset.range(1 << 62).map(
            lambda e: tf.numpy_function(lambda x: epoch_order(int(x)), [e], tf.int64, stateful=False)
        ).unbatch()
    else:
        rows = tf.data.Dataset.from_tensor_slices(epoch_order(0))
    rows = rows.skip(spec.start_position)

    def lookup(row: tf.Tensor):
        return row, tf.gather(sources, row), tf.gather(ids, row), tf.gather(lengths, row)

    ds = rows.map(lookup)
    size = spec.image_size
    if cached is None:
        def load(row: tf.Tensor, path: tf.Tensor, token_row: tf.Tensor, length: tf.Tensor):
            image, ok = decode_images(path, path, size, spec.max_image_pixels, skips, from_path=True)
            return image, token_row, length, ok

        ds = ds.map(load, num_parallel_calls=decode_parallelism(spec), deterministic=spec.ordered)
        gather = None
    else:
        stored = cached.tensor
        names = np.array(paths, dtype=object)

        def count(row: np.ndarray, image: np.ndarray) -> np.ndarray:
            ok = bool(cached.readable[int(image)])
            if ok:
                skips.add_decoded()
            else:
                skips.add_unreadable(str(names[int(row)]))
            return np.int32(ok)

        def load(row: tf.Tensor, image: tf.Tensor, token_row: tf.Tensor, length: tf.Tensor):
            ok = tf.numpy_function(count, [row, image], tf.int32, stateful=True)
            ok.set_shape([])
            return image, token_row, length, ok

        ds = ds.map(load)
        gather = stored

    ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)

    def assemble(images: tf.Tensor, token_rows: tf.Tensor, row_lengths: tf.Tensor, ok: tf.Tensor) -> dict[str, tf.Tensor]:
        if gather is not None:
            images = tf.gather(gather, images)
        return batch_dict(images, token_rows, tf.sequence_mask(row_lengths, spec.max_length), ok)

    ds = ds.map(assemble)
    ds = ds.prefetch(2)
    return ds.with_options(pipeline_options(deterministic=spec.ordered))


@dataclass(frozen=True)
class CachedImages:
    """One pipeline's decoded images: ``tensor [N, S, S, 3]`` uint8, which decoded, and each row's image."""

    tensor: "tf.Tensor"
    readable: np.ndarray  # bool [N]
    rows: np.ndarray  # int32 [rows]: the index into `tensor` of each row's image


class ImageCache:
    """Decoded images of a caption set, kept across epochs when they fit a memory budget.

    A small set is read again every epoch (the demo: 5400 images, 11 epochs), and on a
    2-core machine decoding takes CPU from the train step running beside it. Decoded once
    (the same :func:`~gpt2_effnet.image_input.decode_rgb`, so the same pixels), the epochs
    after the first read memory. A set over the budget (COCO at 224 px: ~18 GB as uint8)
    is streamed from disk as before. Unreadable images are found in the first pass; their
    rows are still masked and counted as they come up.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: dict[tuple, tuple["tf.Tensor", np.ndarray]] = {}  # key -> (images, readable)

    def images(self, paths: Sequence[str], spec: PipelineSpec) -> CachedImages | None:
        """The decoded images behind ``paths`` (one per row), or None when over the budget."""
        unique = sorted(set(paths))
        size = spec.image_size
        if len(unique) * size * size * 3 > self.budget_bytes:
            return None
        key = (tuple(unique), size, spec.max_image_pixels)
        if key not in self._kept:
            self._kept.clear()  # one set at a time: another share or size replaces it
            self._kept[key] = self._decode(unique, size, spec.max_image_pixels, decode_parallelism(spec))
        tensor, readable = self._kept[key]
        position = {path: i for i, path in enumerate(unique)}
        return CachedImages(tensor, readable, np.array([position[p] for p in paths], np.int32))

    @staticmethod
    def _decode(paths: list[str], size: int, max_pixels: int | None, threads: int) -> tuple["tf.Tensor", np.ndarray]:
        import sys
        import time
        from concurrent.futures import ThreadPoolExecutor

        import tensorflow as tf
        from tqdm import tqdm

        from gpt2_effnet.image_input import decode_rgb

        start = time.perf_counter()
        images = np.zeros((len(paths), size, size, 3), np.uint8)
        readable = np.zeros(len(paths), bool)

        def one(i: int) -> None:
            try:
                images[i] = decode_rgb(paths[i], size, max_pixels)
                readable[i] = True
            except Exception:  # found again, counted and named, when its rows come up
                pass

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(paths))))
        tensor = tf.constant(images)
        # tqdm.write: the training loop's progress bar is usually on screen by now.
        tqdm.write(f"decoded {int(readable.sum())} of {len(paths)} images into memory "
                   f"({images.nbytes / 2**20:.0f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stdout)
        return tensor, readable


def text_tokenizer_fn(tokenizer: Tokenizer, max_length: int) -> Callable[["tf.Tensor"], tuple["tf.Tensor", "tf.Tensor"]]:
    """Graph function: a batch of caption strings -> (token_ids, mask). One Python call per *batch*:
    tokenising costs ~5-10 us per caption, and a py-function's call overhead is paid once per batch."""
    import tensorflow as tf

    def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        captions = [t.decode("utf-8", errors="replace").strip() for t in texts]
        if not captions:
            empty = np.zeros((0, max_length), np.int32)
            return empty, empty
        return tokenizer.batch_encode(captions, max_length)

    def fn(texts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        token_ids, mask = tf.numpy_function(encode, [texts], [tf.int32, tf.int32], stateful=False)
        token_ids.set_shape([None, max_length])
        mask.set_shape([None, max_length])
        return token_ids, mask

    return fn
