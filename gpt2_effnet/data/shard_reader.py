"""Bytes of one pipeline's samples, in the order :mod:`.sample_order` gives, from any store.

Each piece of a shard being read has its own thread that opens the shard (a local file, an
object store, a pipe), finds its first sample (one seek through the ``.idx`` beside the tar
when there is one, else by reading past the samples before it without keeping them) and
queues samples ahead of use; the group after the current one is opened early, so a slow
store's first-byte latency hides behind the current group. Only image and caption members
are kept in memory.

Nothing here raises for bad data: a shard that cannot be opened, a tar that ends early or
is corrupt, a sample with no image or no caption each become :class:`RawSample` records
with ``problem`` set, counted and named in the pipeline's skip counter, and the positions
they held stay filled, so every later sample keeps its position.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import locations
from .pipeline import SkipCounter
from .sample_order import EpochOrder, GroupStart, round_robin
from .shard_index import ShardSet
from .tars import BLOCK, MemberReader, TarFormatError, parse_index, samples, split_name

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
TEXT_EXT = "txt"
QUEUE_SAMPLES = 64  # samples a piece reads ahead
CHUNK = 64  # samples per step of the Python generator feeding tf.data


@dataclass
class RawSample:
    position: int
    name: str  # shard:key, for messages (no credentials)
    image: bytes | None
    text: bytes | None
    problem: str | None  # why the sample cannot be used (then image/text may be None)


class PieceReader:
    """Samples ``[offset, stop)`` of one shard on a background thread, ``next()`` in order."""

    def __init__(self, url: str, offset: int, stop: int, image_exts: Sequence[str]) -> None:
        self.url, self.offset, self.stop = url, offset, stop
        self.image_exts = tuple(image_exts)
        self.shown = locations.redact(url)
        self._queue: queue.Queue = queue.Queue(QUEUE_SAMPLES)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shard-reader {self.shown}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._halt.set()
        try:  # unblock a reader waiting on a full queue
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def next(self) -> tuple[str, bytes | None, bytes | None, str | None]:
        """(key or label, image, text, problem) of the next sample."""
        return self._queue.get()

    def _put(self, item: tuple) -> bool:
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _open(self):
        """(stream, member reader, samples still to pass before ``offset``)."""
        if self.offset > 0:
            located = self._seek_by_index()
            if located is not None:
                return located
        stream = locations.open_stream(self.url)
        return stream, MemberReader(stream), self.offset

    def _seek_by_index(self):
        """Open at sample ``offset`` using the ``.idx`` beside the tar; None when that is not possible."""
        idx = locations.sibling(self.url, ".idx")
        if idx is None:
            return None
        try:
            found = parse_index(locations.read_bytes(idx).decode("utf-8"), idx)
        except Exception:  # no index, or not a usable one: read from the start instead
            return None
        if self.offset >= len(found):
            return None
        header = min(c[1] for c in found[self.offset]) - BLOCK
        stream = None
        try:
            stream = locations.open_stream(self.url, seekable=True)
            stream.seek(header)
            if len(stream.read(BLOCK)) < BLOCK:  # a lazy seek fails only at the first read
                raise OSError("short read after seeking")
            stream.seek(header)
        except Exception:  # a store without ranges: read from the start instead
            if stream is not None:
                stream.close()
            return None
        reader = MemberReader(stream, header)
        self._expect = split_name(found[self.offset][0][3])[0] if found[self.offset][0][3] else None
        return stream, reader, 0

    _expect: str | None = None

    def _run(self) -> None:
        want_exts = set(self.image_exts) | {TEXT_EXT}
        produced = self.offset
        stream = None
        try:
            try:
                stream, reader, to_pass = self._open()
            except Exception as err:  # missing, forbidden, unreachable: every sample of the piece is lost
                self._fill(produced, f"shard {self.shown} could not be opened ({_reason(err)})")
                return
            iterator = samples(reader, want=_keep_after(to_pass, want_exts))
            try:
                for sample in iterator:
                    if to_pass > 0:  # read past without its bytes
                        to_pass -= 1
                        continue
                    if self._expect is not None and sample.key != self._expect:
                        raise TarFormatError(f"its .idx does not match the tar (expected {self._expect}, found {sample.key})")
                    self._expect = None
                    image = next((sample.parts[e] for e in sample.parts if e in self.image_exts), None)
                    text = sample.parts.get(TEXT_EXT)
                    problem = None
                    if image is None:
                        problem = "no image"
                    elif text is None:
                        problem = "no caption"
                    if not self._put((sample.key, image, text, problem)):
                        return
                    produced += 1
                    if produced >= self.stop:
                        return
            except Exception as err:  # a corrupt or cut tar, a dropped connection: the rest is lost
                self._fill(produced, f"shard {self.shown} ended early after sample {produced} of {self.stop} ({_reason(err)})")
                return
            if produced < self.stop:
                self._fill(produced, f"shard {self.shown} ended early: {produced} of {self.stop} samples")
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # a pipe's command failing on close: already reported above when it mattered
                    pass

    def _fill(self, produced: int, problem: str) -> None:
        for k in range(produced, self.stop):
            if not self._put((f"#{k}", None, None, problem)):
                return


def _keep_after(to_pass: int, exts: set[str]):
    """A member filter for :func:`.tars.samples`: nothing of the first ``to_pass`` samples, then
    only members with these extensions. Decided per member, before the sample is complete."""
    state = {"key": None, "index": -1}

    def want(name: str) -> bool:
        key, ext = split_name(name)
        if not key or key.endswith("/") or name.rsplit("/", 1)[-1].startswith("."):
            return False
        if key != state["key"]:
            state["key"], state["index"] = key, state["index"] + 1
        return state["index"] >= to_pass and ext in exts

    return want


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return locations.redact(f"{type(err).__name__}: {text}"[:300])


class GroupReader:
    """The pieces of one group, read together; samples come out in round-robin order."""

    def __init__(self, shards: ShardSet, group: GroupStart, image_exts: Sequence[str]) -> None:
        self.group = group
        self.readers = [PieceReader(shards.urls[p.shard], off, p.stop, image_exts) for p, off in zip(group.pieces, group.offsets)]

    def samples(self) -> Iterator[tuple[int, tuple[str, bytes | None, bytes | None, str | None]]]:
        lengths = [p.length for p in self.group.pieces]
        for j in round_robin(lengths, self.group.round, self.group.within):
            yield j, self.readers[j].next()

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def read_samples(
    shards: ShardSet,
    order: EpochOrder,
    start: int,
    stop: int | None,
    skips: SkipCounter,
    image_exts: Sequence[str] = IMAGE_EXTS,
) -> Iterator[RawSample]:
    """Samples at positions ``[start, stop)`` of ``order`` (``stop`` None: to the end), block-shuffled.

    Reading begins at the block holding ``start``; samples of that block before ``start``
    are read (their bytes only) and dropped. Problems are counted in ``skips`` as they are
    emitted, so the count follows what training consumes, not what was read ahead.
    """
    block = order.block
    first_block = start - start % block
    groups = order.groups(first_block)
    current: GroupReader | None = None
    upcoming: GroupReader | None = None

    def advance() -> GroupReader | None:
        nonlocal upcoming
        reader = upcoming
        if reader is None:
            group = next(groups, None)
            reader = None if group is None else GroupReader(shards, group, image_exts)
        following = next(groups, None)
        upcoming = None if following is None else GroupReader(shards, following, image_exts)
        return reader

    def slots() -> Iterator[RawSample]:
        nonlocal current
        position = first_block
        while True:
            current = advance()
            if current is None:
                return
            shown = [reader.shown for reader in current.readers]
            try:
                for j, (key, image, text, problem) in current.samples():
                    yield RawSample(position, f"{shown[j]}:{key}", image, text, problem)
                    position += 1
            finally:
                current.close()

    stream = slots()
    out = first_block
    try:
        for block_index in range(first_block // block, 1 << 62):
            chunk = list(itertools.islice(stream, block))
            if not chunk:
                return
            for k in order.block_permutation(block_index, len(chunk)):
                if out >= start:
                    if stop is not None and out >= stop:
                        return
                    sample = chunk[k]
                    sample.position = out
                    if sample.problem is not None:
                        skips.add_missing(f"{sample.name} ({sample.problem})")
                    yield sample
                out += 1
    finally:
        stream.close()
        for reader in (current, upcoming):
            if reader is not None:
                reader.close()


def chunks(samples_iter: Iterator[RawSample], size: int = CHUNK) -> Iterator[tuple[np.ndarray, ...]]:
    """Pack samples for a tf.data generator: (positions, one byte string, [n, 6] spans, usable flags).

    Spans hold (offset, length) of the image, the caption and the name in the byte string;
    one Python step per chunk keeps the generator's per-call cost out of the per-sample path.
    """
    while True:
        batch = list(itertools.islice(samples_iter, size))
        if not batch:
            return
        parts: list[bytes] = []
        spans = np.zeros((len(batch), 6), np.int32)
        positions = np.zeros(len(batch), np.int64)
        usable = np.zeros(len(batch), np.int32)
        pos = 0
        for row, sample in enumerate(batch):
            positions[row] = sample.position
            usable[row] = sample.problem is None
            for col, data in enumerate((sample.image or b"", sample.text or b"", sample.name.encode("utf-8"))):
                parts.append(data)
                spans[row, 2 * col], spans[row, 2 * col + 1] = pos, len(data)
                pos += len(data)
        yield positions, b"".join(parts), spans, usable
