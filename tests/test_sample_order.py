"""The reading order of a shard pipeline (data/sample_order.py) against brute-force bookkeeping:
every sample once per epoch, pipelines disjoint, and any resume position giving exactly the
tail of the uninterrupted order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpt2_effnet.data.sample_order import EpochOrder, Piece, pipeline_pieces, round_robin, round_robin_state


def _simulate(lengths: list[int]) -> list[int]:
    """Round robin by hand: each round, every piece with samples left gives one."""
    left = list(lengths)
    out = []
    while any(left):
        for j, n in enumerate(left):
            if n:
                out.append(j)
                left[j] -= 1
    return out


@pytest.mark.parametrize("lengths", [[5], [3, 3], [1, 4, 2], [7, 1, 1, 3], [2, 9, 9, 4]])
def test_round_robin_state_matches_a_simulation_at_every_position(lengths) -> None:
    order = _simulate(lengths)
    assert list(round_robin(lengths)) == order
    for q in range(len(order) + 1):
        taken, round_, within = round_robin_state(lengths, q)
        assert taken == [order[:q].count(j) for j in range(len(lengths))]
        assert list(round_robin(lengths, round_, within)) == order[q:]


def test_pipelines_partition_the_samples() -> None:
    counts = [5, 0, 7, 3, 11]
    for pipelines in (1, 2, 3, 7):
        seen = []
        for i in range(pipelines):
            for piece in pipeline_pieces(counts, pipelines, i):
                seen += [(piece.shard, k) for k in range(piece.first, piece.stop)]
        assert sorted(seen) == [(s, k) for s, n in enumerate(counts) for k in range(n)]
        assert len(seen) == len(set(seen))


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_reads_every_sample_once_and_resumes_exactly(shuffle) -> None:
    counts = [9, 4, 13, 2, 8, 6, 1]
    pieces = pipeline_pieces(counts, 2, 1)
    order = EpochOrder(pieces, seed=11, pipeline=1, shuffle=shuffle, block=5)
    full = [(slot.piece.shard, slot.offset) for _, slot in order.positions()]
    expected = sorted((p.shard, k) for p in pieces for k in range(p.first, p.stop))
    assert sorted(full) == expected and len(full) == order.length
    if shuffle:
        assert full != sorted(full, key=lambda x: (x[0], x[1]))
    for start in range(order.length + 1):
        fresh = EpochOrder(pieces, seed=11, pipeline=1, shuffle=shuffle, block=5)
        assert [(s.piece.shard, s.offset) for _, s in fresh.positions(start)] == full[start:]


def test_seeds_and_pipelines_give_different_orders() -> None:
    pieces = [Piece(0, 0, 30), Piece(1, 0, 30), Piece(2, 0, 30)]
    a = [(s.piece.shard, s.offset) for _, s in EpochOrder(pieces, seed=1, pipeline=0, shuffle=True, block=8).positions()]
    b = [(s.piece.shard, s.offset) for _, s in EpochOrder(pieces, seed=2, pipeline=0, shuffle=True, block=8).positions()]
    again = [(s.piece.shard, s.offset) for _, s in EpochOrder(pieces, seed=1, pipeline=0, shuffle=True, block=8).positions()]
    assert a == again and a != b


def test_resampling_draws_whole_shards_with_replacement_and_fresh_after_a_restart() -> None:
    counts = [3, 0, 5, 2]
    order = EpochOrder(None, seed=4, pipeline=0, shuffle=True, block=4, counts=counts, resampled=True)
    assert order.length is None
    drawn = [(s.piece.shard, s.offset) for _, s in itertools.islice(order.positions(), 400)]
    shards = {shard for shard, _ in drawn}
    assert shards == {0, 2, 3}  # never the empty shard
    per_shard = {s: sorted({k for t, k in drawn if t == s}) for s in shards}
    assert per_shard == {0: [0, 1, 2], 2: [0, 1, 2, 3, 4], 3: [0, 1]}
    # With replacement: some shard's sample appears more often than once in 400 draws.
    assert max(drawn.count(x) for x in set(drawn)) > 1
    restarted = [(s.piece.shard, s.offset) for _, s in itertools.islice(order.positions(200), 40)]
    assert restarted != drawn[200:240]
    assert np.all([shard in (0, 2, 3) for shard, _ in restarted])
