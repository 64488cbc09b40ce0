"""The order one input pipeline reads its samples in: a pure function of (seed, epoch, position).

Every pipeline (one per replica) owns a contiguous share of the shard set's samples, cut
into *pieces* (one per shard it touches). An epoch reads the pieces in a seeded order,
``CYCLE`` at a time, one sample from each in turn (round robin), and shuffles each run of
``block`` consecutive samples with its own seeded permutation. Because nothing depends on
what was read before, the sample at any position can be computed, and a resumed run starts
reading at the block that holds its position instead of reading the epoch again: exact
resume costs at most one block of bytes, never a decode of what was consumed.

In resampled mode (open_clip's ``--dataset-resampled``) a pipeline instead draws whole
shards with replacement, seeded by the pipeline and the position it starts from, so a
restart simply draws afresh.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

CYCLE = 4  # pieces read at once, one sample from each in turn


@dataclass(frozen=True)
class Piece:
    """Samples ``[first, stop)`` of shard number ``shard``."""

    shard: int
    first: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.first


def worker_slice(n: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Contiguous [start, stop) share of `n` samples: pipeline i of k gets [n*i//k, n*(i+1)//k)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}")
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


def pipeline_pieces(counts: Sequence[int], num_pipelines: int, index: int) -> list[Piece]:
    """The pieces of pipeline ``index``'s share, in shard order (O(shards), no sample lists)."""
    start, stop = worker_slice(sum(counts), num_pipelines, index)
    pieces = []
    offset = 0
    for shard, count in enumerate(counts):
        first, last = max(start - offset, 0), min(stop - offset, count)
        if first < last:
            pieces.append(Piece(shard, first, last))
        offset += count
        if offset >= stop:
            break
    return pieces


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def round_robin_state(lengths: Sequence[int], q: int) -> tuple[list[int], int, int]:
    """Where a round-robin over pieces of these lengths is after ``q`` samples.

    Returns (samples taken from each piece, the round, how many active pieces of that round
    already gave their sample). Round k takes one sample from every piece longer than k.
    """
    if not 0 <= q <= sum(lengths):
        raise ValueError(f"position {q} outside a group of {sum(lengths)} samples")
    emitted = 0
    level = 0  # the round at which the current stretch of constant active pieces starts
    for bound in sorted(set(lengths)):
        active = sum(1 for n in lengths if n > level)
        stretch = (bound - level) * active
        if emitted + stretch > q:
            rounds, within = divmod(q - emitted, active)
            level += rounds
            break
        emitted += stretch
        level = bound
    else:
        return list(lengths), level, 0
    taken = [min(n, level) for n in lengths]
    live = [j for j, n in enumerate(lengths) if n > level]
    for j in live[:within]:
        taken[j] += 1
    return taken, level, within


def round_robin(lengths: Sequence[int], round_: int = 0, within: int = 0) -> Iterator[int]:
    """Piece numbers in round-robin order from the given state (see :func:`round_robin_state`)."""
    longest = max(lengths, default=0)
    for k in range(round_, longest):
        live = [j for j, n in enumerate(lengths) if n > k]
        yield from live[within if k == round_ else 0 :]


@dataclass(frozen=True)
class GroupStart:
    """A group of pieces read together, from ``offsets`` (per piece, within its shard) on;
    ``round``/``within`` say where the round robin resumes, ``position`` is the stream
    position of its first sample."""

    pieces: tuple[Piece, ...]
    offsets: tuple[int, ...]
    round: int
    within: int
    position: int


@dataclass(frozen=True)
class Slot:
    """The stream position ``position`` is sample ``offset`` of ``piece``."""

    position: int
    piece: Piece
    offset: int  # within the shard


class EpochOrder:
    """One pipeline's sample order for one epoch (or, resampled, for one endless draw)."""

    def __init__(
        self,
        pieces: Sequence[Piece] | None,
        *,
        seed: int,
        pipeline: int,
        shuffle: bool,
        block: int,
        counts: Sequence[int] | None = None,
        resampled: bool = False,
    ) -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self.seed, self.pipeline, self.shuffle, self.block = seed, pipeline, shuffle, block
        self.resampled = resampled
        self.counts = counts
        if resampled:
            if not counts or not sum(counts):
                raise ValueError("resampling needs shards with samples")
            self.pieces: list[Piece] = []
        else:
            order = list(pieces or [])
            if shuffle:
                order = [order[i] for i in _rng(seed, pipeline, 1).permutation(len(order))]
            self.pieces = order

    @property
    def length(self) -> int | None:
        """Samples in this epoch; None when resampling (endless)."""
        return None if self.resampled else sum(p.length for p in self.pieces)

    def _groups(self, draw_seed: int) -> Iterator[list[Piece]]:
        if not self.resampled:
            cycle = CYCLE if self.shuffle else 1  # unshuffled: one tar after the other, in order
            for g in range(0, len(self.pieces), cycle):
                yield self.pieces[g : g + cycle]
            return
        counts = np.asarray(self.counts, np.int64)
        nonempty = np.flatnonzero(counts)
        rng = _rng(self.seed, self.pipeline, draw_seed, 2)
        while True:
            picks = nonempty[rng.integers(0, len(nonempty), CYCLE)]
            yield [Piece(int(s), 0, int(counts[s])) for s in picks]

    def groups(self, start: int = 0) -> Iterator[GroupStart]:
        """The groups read from ``start`` (a block boundary) on, each with where reading resumes.

        Resampled orders restart their draws from ``start`` instead of replaying what came
        before it, so a resumed run skips nothing and reads fresh shards.
        """
        if start % self.block:
            raise ValueError(f"reading starts at a block boundary, not {start}")
        skip = 0 if self.resampled else start
        position = start
        for group in self._groups(start):
            lengths = [p.length for p in group]
            size = sum(lengths)
            if skip >= size:
                skip -= size
                continue
            taken, round_, within = round_robin_state(lengths, skip)
            yield GroupStart(tuple(group), tuple(p.first + t for p, t in zip(group, taken)), round_, within, position)
            position += size - skip
            skip = 0

    def slots(self, start: int = 0) -> Iterator[Slot]:
        """Positions from ``start`` in reading order, before the block shuffle."""
        for group in self.groups(start):
            cursor = list(group.offsets)
            position = group.position
            for j in round_robin([p.length for p in group.pieces], group.round, group.within):
                yield Slot(position, group.pieces[j], cursor[j])
                cursor[j] += 1
                position += 1

    def block_permutation(self, block_index: int, size: int) -> np.ndarray:
        """The order within one block of ``size`` samples (identity when not shuffling)."""
        if not self.shuffle or size <= 1:
            return np.arange(size)
        return _rng(self.seed, self.pipeline, block_index, 3).permutation(size)

    def positions(self, start: int = 0, limit: int | None = None) -> Iterator[tuple[int, Slot]]:
        """(output index, slot) from ``start`` on, after the block shuffle: what a reader emits.

        Pure bookkeeping (no bytes): tests use it as the specification of the reader.
        """
        first_block = start - start % self.block
        slots = self.slots(first_block)
        out = first_block
        for block_index in itertools.count(first_block // self.block):
            chunk = list(itertools.islice(slots, self.block))
            if not chunk:
                return
            for k in self.block_permutation(block_index, len(chunk)):
                if out >= start:
                    yield out, chunk[k]
                out += 1
                if limit is not None and out >= start + limit:
                    return
