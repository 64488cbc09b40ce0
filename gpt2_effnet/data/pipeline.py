"""tf.data pipeline over (image path, caption) pairs, producing the training batch dict.

    {"images": float32 [B, S, S, 3] in 0..255, "token_ids": int32 [B, L], "mask": int32 [B, L]}

Design points:
- Captions are tokenised once, up front, with `tokenizer.batch_encode`; each sample then only
  carries its row index into a compact id table (uint16 when the ids fit) and its length.
- Files are read and decoded in parallel (AUTOTUNE); output order is deterministic only when
  shuffling is off, because strict ordering stalls on slow files.
- Unreadable images never crash a run: decode errors drop the sample (`ignore_errors`), and a
  `SkipCounter` counts exactly which samples were dropped, so the loop can print it per epoch.
- Per-worker sharding happens on the pair list before anything is read.
- A small set (see `ImageCache`) is decoded once and served from memory in later epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gpt2_effnet.data.captions import CaptionSet, Pair, find_missing

if TYPE_CHECKING:
    import tensorflow as tf


class Tokenizer(Protocol):
    eos_token_id: int

    def batch_encode(self, texts: Sequence[str], max_length: int, add_bos: bool = True, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


def _counter_key() -> "tf.Tensor":
    import tensorflow as tf

    return tf.zeros([1], tf.int64)


class SkipCounter:
    """Samples one worker's pipeline dropped: `missing` (file absent, known up front) and
    `unreadable` (decode failed). Read it at the end of an epoch.

    Bad files fail every epoch, so once every sample has been through the pipeline once,
    `skipped` is also the per-epoch count. Unreadable samples are tracked by index in two
    hash tables (attempted, decoded), which makes the count exact even with parallel,
    out-of-order decoding; only during the very first pass can samples still in flight be
    counted (they leave the count as soon as they are decoded).
    """

    def __init__(self) -> None:
        self.missing = 0
        self.num_samples = 0  # samples this worker tries to read per epoch (missing excluded)
        self._attempted = None
        self._decoded = None
        self._dropped = None
        self._describe: Callable[[int], str] = str

    def bind(self, num_samples: int, missing: int, describe: Callable[[int], str] | None = None) -> None:
        """Attach to one pipeline: it reads `num_samples` samples (index 0..n-1), `missing` were dropped up front.

        `describe(index)` names a sample in reports (a path, or tar:member).
        """
        import tensorflow as tf

        if self._attempted is not None:
            raise RuntimeError("a SkipCounter belongs to one pipeline; create a new one for each")
        self.num_samples = num_samples
        self.missing = missing
        if describe is not None:
            self._describe = describe
        # Hash tables, not variables: a tf.distribute strategy scope would mirror a variable.
        with tf.device("/cpu:0"):
            self._attempted = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)
            self._decoded = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)
            # Samples dropped where no index is known (DALI's over-limit images): one counter, key 0.
            self._dropped = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)

    def _mark(self, table: "tf.lookup.experimental.MutableHashTable", index: "tf.Tensor") -> "tf.Operation":
        import tensorflow as tf

        key = tf.reshape(tf.cast(index, tf.int64), [1])
        return table.insert(key, tf.ones([1], tf.int64))

    def track(self, index: "tf.Tensor", decode: Callable[[], "tf.Tensor"]) -> "tf.Tensor":
        """Graph code: ``decode()`` for sample `index`, counted as attempted before and decoded after.

        A sample whose decode raises (and is then dropped by ``ignore_errors``) stays
        attempted but not decoded: that difference is the unreadable count.
        """
        import tensorflow as tf

        if self._attempted is None:
            raise RuntimeError("bind() the SkipCounter to its pipeline first")
        with tf.control_dependencies([self._mark(self._attempted, index)]):
            image = decode()
        with tf.control_dependencies([image]):  # marked decoded only if decoding succeeded
            done = self._mark(self._decoded, index)
        with tf.control_dependencies([done]):
            return tf.identity(image)

    def add_unreadable(self, count: "tf.Tensor") -> "tf.Operation":
        """Graph code: count ``count`` more unreadable samples that have no index (not named in reports)."""
        import tensorflow as tf

        key = tf.zeros([1], tf.int64)
        total = self._dropped.lookup(key) + tf.reshape(tf.cast(count, tf.int64), [1])
        return self._dropped.insert(key, total)

    @property
    def unreadable(self) -> int:
        if self._attempted is None:
            return 0
        dropped = int(self._dropped.lookup(_counter_key())[0])
        return int(self._attempted.size()) - int(self._decoded.size()) + dropped

    @property
    def attempted(self) -> int:
        """Distinct samples read at least once (== num_samples after the first full pass)."""
        return 0 if self._attempted is None else int(self._attempted.size())

    @property
    def skipped(self) -> int:
        return self.missing + self.unreadable

    def unreadable_samples(self, limit: int = 10) -> list[str]:
        """Up to `limit` samples (file paths, or tar:member) that failed to decode."""
        if self._attempted is None:
            return []
        attempted = set(self._attempted.export()[0].numpy().tolist())
        decoded = set(self._decoded.export()[0].numpy().tolist())
        return [self._describe(i) for i in sorted(attempted - decoded)[:limit]]

    def summary(self) -> str:
        text = f"skipped {self.skipped} of {self.num_samples + self.missing} samples ({self.missing} missing, {self.unreadable} unreadable)"
        bad = self.unreadable_samples(3) if self.unreadable else []
        if bad:
            text += "; unreadable: " + ", ".join(bad) + (", ..." if self.unreadable > len(bad) else "")
        return text


@dataclass(frozen=True)
class PipelineSpec:
    """What the training loop asks of any pipeline (CSV/COCO, shards via tf.data, shards via DALI).

    Worker `shard_index` of `num_shards` reads its own share. With `repeat` the stream is
    endless and reshuffles every epoch (same seed, same sequence); without it one epoch is
    yielded. `deterministic` (default: only when not shuffling) keeps the shuffled order
    exactly reproducible from the seed, at some cost in throughput when read times vary.
    `shuffle_buffer` applies to shard readers (a CSV's rows are shuffled whole).
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

    def __post_init__(self) -> None:
        for name in ("image_size", "max_length", "batch_size", "shuffle_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        worker_slice(0, self.num_shards, self.shard_index)  # checks the shard numbers

    @property
    def ordered(self) -> bool:
        """Whether output order must follow input order exactly."""
        return (not self.shuffle) if self.deterministic is None else bool(self.deterministic)

    def where(self) -> str:
        return f" (worker {self.shard_index} of {self.num_shards})" if self.num_shards > 1 else ""


def pipeline_options(deterministic: bool) -> "tf.data.Options":
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = deterministic
    # tf.data's autotuner is off. Its optimisation thread sleeps between rounds for a period
    # that doubles up to a minute, and deleting an iterator waits for that thread to wake:
    # measured with TF 2.21, an iterator that lived 50 s took 31.9 s to delete (a stall at
    # every epoch end and before validation; 44 s in one demo run). Off, AUTOTUNE still
    # means min(16, cores) parallel calls and a self-sizing prefetch buffer; decoding the
    # demo's JPEGs ran as fast (2 cores: 2370-2520 vs 2040-2420 images/s).
    options.autotune.enabled = False
    # We shard per worker ourselves (shard_index/num_shards); auto-sharding would shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # The skip tables and tokeniser calls are external state; let iterator checkpoints ignore them.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return options


def worker_slice(n: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Contiguous [start, stop) share of `n` samples, the same split DALI's readers use."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}")
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


def compact_ids(token_ids: np.ndarray) -> np.ndarray:
    """uint16 when every id fits (GPT-2: 50258 ids), halving the table a pipeline carries."""
    return token_ids.astype(np.uint16) if token_ids.size == 0 or token_ids.max() < 2**16 else token_ids.astype(np.int32)


def to_batch(images: "tf.Tensor", ids: "tf.Tensor", lengths: "tf.Tensor", max_length: int) -> dict[str, "tf.Tensor"]:
    """Rebuild the training batch dict from compact ids and lengths (mask = 1 on the first `length` places)."""
    import tensorflow as tf

    return {
        "images": images,
        "token_ids": tf.cast(ids, tf.int32),
        "mask": tf.cast(tf.sequence_mask(lengths, max_length), tf.int32),
    }


def caption_dataset(
    pairs: Sequence[Pair] | CaptionSet,
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    cache: "ImageCache | None" = None,
) -> "tf.data.Dataset":
    """Batches of {"images", "token_ids", "mask"} for this worker's share of `pairs`.

    Worker `shard_index` reads a contiguous 1/num_shards of the rows. Pass a `SkipCounter`
    as `skips` to read how many samples were dropped, and which; an `ImageCache` that
    lives across epochs to decode a small set only once.
    """
    import tensorflow as tf

    from gpt2_effnet.data.images import decode_and_resize

    if isinstance(pairs, CaptionSet):
        all_pairs, missing = list(pairs.pairs), pairs.missing
    else:
        all_pairs = [(str(p), str(c)) for p, c in pairs]
        missing = find_missing([p for p, _ in all_pairs])
    start, stop = worker_slice(len(all_pairs), spec.num_shards, spec.shard_index)
    share = all_pairs[start:stop]
    present = [p for p in share if p[0] not in missing]
    if not present:
        raise ValueError(f"no readable samples{spec.where()}: {len(share)} rows, all of their image files are missing")
    skips = skips if skips is not None else SkipCounter()
    skips.bind(len(present), len(share) - len(present), describe=lambda i: present[i][0])

    paths = [p for p, _ in present]
    token_ids, mask = tokenizer.batch_encode([c for _, c in present], spec.max_length)
    lengths = mask.sum(axis=1).astype(np.int32)
    ids = compact_ids(token_ids)
    cached = cache.images(paths, spec) if cache is not None else None
    sources = np.array(paths, dtype=object) if cached is None else cached.rows

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(present), dtype=np.int64), sources, ids, lengths))
    if spec.shuffle:
        ds = ds.shuffle(len(present), seed=spec.seed, reshuffle_each_iteration=True)
    if spec.repeat:
        ds = ds.repeat()

    if cached is None:
        def load(index: tf.Tensor, path: tf.Tensor, row: tf.Tensor, length: tf.Tensor):
            image = skips.track(
                index, lambda: decode_and_resize(tf.io.read_file(path), spec.image_size, spec.max_image_pixels)
            )
            return image, row, length

        gather = to_batch
    else:
        readable = tf.constant(cached.readable)
        stored = cached.tensor

        def load(index: tf.Tensor, image: tf.Tensor, row: tf.Tensor, length: tf.Tensor):
            def check() -> tf.Tensor:  # raises for an image that did not decode: dropped and counted as before
                ok = tf.debugging.assert_equal(tf.gather(readable, image), True, message="unreadable image")
                with tf.control_dependencies([ok]):
                    return tf.identity(image)

            return skips.track(index, check), row, length

        def gather(images: tf.Tensor, rows: tf.Tensor, lengths: tf.Tensor, max_length: int) -> dict[str, tf.Tensor]:
            return to_batch(tf.gather(stored, images), rows, lengths, max_length)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.ordered)
    ds = ds.ignore_errors()  # which files failed: skips.unreadable_samples()
    ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder)
    ds = ds.map(lambda im, row, n: gather(im, row, n, spec.max_length), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(pipeline_options(deterministic=spec.ordered))


@dataclass(frozen=True)
class CachedImages:
    """One worker's decoded images: ``tensor [N, S, S, 3]`` float32, which decoded, and each row's image."""

    tensor: "tf.Tensor"
    readable: np.ndarray  # bool [N]
    rows: np.ndarray  # int32 [rows]: the index into `tensor` of each row's image


class ImageCache:
    """Decoded images of a caption set, kept across epochs when they fit a memory budget.

    A small set is read again every epoch (the demo: 5400 images, 11 epochs), and on a
    2-core machine decoding 32 JPEGs costs ~26 ms of CPU per batch, taken from the train
    step running beside it. Decoded once (the same `decode_and_resize`, so the same
    pixels), the epochs after the first read memory. A set over the budget (COCO at
    224 px: ~18 GB as float32) is streamed from disk as before. Unreadable images are
    found in the first pass, and their rows are still dropped and counted as they come up.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: dict[tuple, tuple["tf.Tensor", np.ndarray]] = {}  # key -> (images, readable)

    def images(self, paths: Sequence[str], spec: PipelineSpec) -> CachedImages | None:
        """The decoded images behind ``paths`` (one per row), or None when over the budget."""
        unique = sorted(set(paths))
        size = spec.image_size
        if len(unique) * size * size * 3 * 4 > self.budget_bytes:
            return None
        key = (tuple(unique), size, spec.max_image_pixels)
        if key not in self._kept:
            self._kept.clear()  # one set at a time: another worker share or size replaces it
            self._kept[key] = self._decode(unique, size, spec.max_image_pixels)
        tensor, readable = self._kept[key]
        position = {path: i for i, path in enumerate(unique)}
        return CachedImages(tensor, readable, np.array([position[p] for p in paths], np.int32))

    @staticmethod
    def _decode(paths: list[str], size: int, max_pixels: int | None) -> tuple["tf.Tensor", np.ndarray]:
        import sys
        import time

        import tensorflow as tf
        from tqdm import tqdm

        from gpt2_effnet.data.images import decode_and_resize

        start = time.perf_counter()
        images = np.zeros((len(paths), size, size, 3), np.float32)
        readable = np.zeros(len(paths), bool)
        ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), np.array(paths, dtype=object)))
        ds = ds.map(lambda i, path: (i, decode_and_resize(tf.io.read_file(path), size, max_pixels)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        for index, batch in ds.ignore_errors().batch(256).as_numpy_iterator():
            images[index] = batch
            readable[index] = True
        tensor = tf.constant(images)
        # tqdm.write: the training loop's progress bar is usually on screen by now.
        tqdm.write(f"decoded {int(readable.sum())} of {len(paths)} images into memory "
                   f"({images.nbytes / 2**20:.0f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stdout)
        return tensor, readable


def text_tokenizer_fn(tokenizer: Tokenizer, max_length: int) -> Callable[["tf.Tensor"], tuple["tf.Tensor", "tf.Tensor"]]:
    """Graph function: a batch of caption strings (or NUL-padded uint8 rows, as DALI hands them
    over) -> (token_ids, mask). One Python call per *batch*: tokenising costs ~5-10 us per caption,
    and the per-call overhead of a py-function is paid once per batch instead of per sample."""
    import tensorflow as tf

    def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if texts.dtype == np.uint8:
            rows = [bytes(r).rstrip(b"\0") for r in texts]
        else:
            rows = list(texts)
        captions = [r.decode("utf-8", errors="replace").strip() for r in rows]
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
