"""How many samples each shard holds, so a run plans its epochs without opening a tar.

A training process needs one number per shard: with it, it splits the samples among the
input pipelines, knows the steps in an epoch and can jump to any sample position. The
numbers come from, in order:

1. a shard index file (``gpt2-effnet shards index`` writes it): a text file with one line
   per shard, ``URL<TAB>SAMPLES``, which is also a valid ``--shards`` list file;
2. the first line of DALI's ``.idx`` beside the tar (``gpt2-effnet shards`` writes one);
3. img2dataset's ``NNNNN_stats.json`` beside the tar (its ``successes``);
4. reading the tar itself (the slow way: what ``shards index`` does once, so runs need not).

A "sample" is one key's run of members, complete or not; samples that lack an image or a
caption are found while reading and counted as skipped, like unreadable images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import locations
from .tars import MemberReader, format_index, index_count, samples, scan

INDEX_HEADER = "# gpt2-effnet shard index v1: URL<TAB>SAMPLES per line; a --shards list file"
LOOKUP_THREADS = 32  # small remote reads in flight at once while counting


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs and their sample counts, in order; what every worker plans from."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    unopenable: tuple[tuple[str, str], ...] = ()  # (url, reason) left out because nothing could read them

    def __post_init__(self) -> None:
        if len(self.urls) != len(self.counts):
            raise ValueError("one count per shard")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def describe(self) -> dict[str, object]:
        """What run.json records: enough to notice other data on resume, no credentials."""
        return {
            "kind": "shards",
            "tars": len(self.urls),
            "samples": self.total,
            "first": locations.redact(self.urls[0]) if self.urls else None,
            "last": locations.redact(self.urls[-1]) if self.urls else None,
        }


def parse_index_lines(path: str) -> list[tuple[str, int | None]]:
    """(url, count or None) for each line of a list or index file."""
    from braceexpand import braceexpand

    entries: list[tuple[str, int | None]] = []
    for lineno, line in enumerate(locations.list_lines(path), 1):
        url, _, rest = line.partition("\t")
        count = None
        if rest.strip():
            field = rest.split("\t", 1)[0].strip()
            if not field.isdigit():
                raise locations.ShardSpecError(f"{path}:{lineno}: the sample count {field!r} is not a whole number")
            count = int(field)
        urls = [locations.join(path, u) for u in braceexpand(url.strip())]
        if count is not None and len(urls) != 1:
            raise locations.ShardSpecError(f"{path}:{lineno}: a line with a count names one shard, not a pattern")
        entries += [(u, count) for u in urls]
    return entries


def _entries(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, int | None]]:
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    entries: list[tuple[str, int | None]] = []
    for item in map(str, specs):
        if locations.is_list_file(item):
            entries += parse_index_lines(item)
        else:
            entries += [(u, None) for u in locations.expand(item)]
    if not entries:
        raise locations.ShardSpecError("no shard given")
    return entries


def count_from_neighbours(url: str) -> int | None:
    """The sample count from a ``.idx`` or ``_stats.json`` beside the tar, None if neither is there."""
    idx = locations.sibling(url, ".idx")
    if idx is not None:
        try:
            head = locations.read_bytes(idx, limit=64).decode("ascii", "replace").splitlines()
            count = index_count(head[0]) if head else None
            if count is not None:
                return count
        except (OSError, ValueError, FileNotFoundError):
            pass
    stats = locations.sibling(url, "_stats.json")
    if stats is not None:
        try:
            return int(json.loads(locations.read_bytes(stats))["successes"])
        except (OSError, ValueError, KeyError, TypeError, FileNotFoundError):
            pass
    return None


def count_by_reading(url: str) -> int:
    """Read the whole tar (headers only where the stream can seek) and count its samples."""
    with locations.open_stream(url) as stream:
        return sum(1 for _ in samples(MemberReader(stream), want=lambda _: False))


def resolve(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    say: Callable[[str], None] = print,
) -> ShardSet:
    """The shard set behind a ``--shards`` value, with every shard's sample count.

    Shards without a count from an index file are looked up beside the tars (many at once);
    local tars with none are read, remote ones too but with a line saying how to avoid it.
    A shard nothing can open is left out, named in a line, and listed in ``unopenable``.
    """
    entries = _entries(spec)
    unknown = [i for i, (_, count) in enumerate(entries) if count is None]
    counts: dict[int, int | None] = {i: c for i, (_, c) in enumerate(entries) if c is not None}
    if unknown:
        with ThreadPoolExecutor(min(LOOKUP_THREADS, len(unknown))) as pool:
            for i, count in zip(unknown, pool.map(lambda i: count_from_neighbours(entries[i][0]), unknown)):
                counts[i] = count
    to_read = [i for i in unknown if counts[i] is None]
    problems: list[tuple[str, str]] = []
    if to_read:
        remote = sum(not locations.is_local(entries[i][0]) for i in to_read)
        if remote:
            say(f"counting the samples of {len(to_read)} shard(s) by reading them ({remote} remote); "
                "run `gpt2-effnet shards index` once to write an index and skip this")

        def read(i: int) -> int | None:
            try:
                return count_by_reading(entries[i][0])
            except Exception as err:  # any failure to open or parse leaves the shard out, named
                problems.append((entries[i][0], f"{type(err).__name__}: {err}"))
                return None

        with ThreadPoolExecutor(min(8, len(to_read))) as pool:
            for i, count in zip(to_read, pool.map(read, to_read)):
                counts[i] = count
        for url, reason in problems:
            say(f"skipping shard {locations.redact(url)}: {locations.redact(reason)}")
    kept = [i for i in range(len(entries)) if counts[i] is not None]
    reasons = dict(problems)
    left_out = tuple((entries[i][0], locations.redact(reasons.get(entries[i][0], "could not be opened")))
                     for i in range(len(entries)) if counts[i] is None)
    return ShardSet(tuple(entries[i][0] for i in kept), tuple(int(counts[i]) for i in kept), left_out)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- writing indexes


@dataclass(frozen=True)
class IndexedShard:
    url: str
    samples: int
    source: str  # "idx", "stats" or "read"
    wrote_idx: bool


def index_one(url: str, write_idx: bool = True) -> IndexedShard:
    """Count one shard's samples: from its ``.idx`` or ``_stats.json`` when there is one, else by
    reading it, then writing its ``.idx`` beside it (where the store lets us) for fast seeks."""
    count = count_from_neighbours(url)
    idx = locations.sibling(url, ".idx")
    if count is not None:  # its .idx or img2dataset's _stats.json knows: the tar stays unread
        source = "idx" if idx is not None and locations.exists(idx) else "stats"
        return IndexedShard(url, count, source, False)
    with locations.open_stream(url) as stream:
        found = scan(stream)
    wrote = False
    if write_idx and idx is not None:
        try:
            _write_text(idx, format_index(found))
            wrote = True
        except (OSError, NotImplementedError, PermissionError):
            wrote = False  # a read-only store: the count is still right
    return IndexedShard(url, len(found), "read", wrote)


def _write_text(url: str, text: str) -> None:
    if locations.is_local(url):
        from ..atomic import atomic_write

        with atomic_write(url) as handle:
            handle.write(text)
        return
    import fsspec

    with fsspec.open(url, "w") as handle:
        handle.write(text)


def format_index_file(shards: Sequence[IndexedShard], relative_to: str | None = None) -> str:
    """The index file's text; URLs of local shards under ``relative_to`` are written relative to it."""
    lines = [INDEX_HEADER]
    for shard in shards:
        url = shard.url
        if relative_to is not None and locations.is_local(url):
            url = os.path.relpath(os.path.abspath(url), os.path.dirname(os.path.abspath(relative_to)))
        lines.append(f"{url}\t{shard.samples}")
    return "\n".join(lines) + "\n"
