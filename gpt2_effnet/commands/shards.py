"""``gpt2-effnet shards``: write webdataset shards, index shards made elsewhere, time the loaders on them.

    gpt2-effnet shards --csv captions.csv --out shards/            # write (img2dataset layout) + index
    gpt2-effnet shards index 's3://b/cc12m/{00000..01242}.tar' --out cc12m.index
    gpt2-effnet shards bench 's3://b/cc12m/{00000..00009}.tar'     # the loaders alone, on your shards
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODES = ("index", "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # `shards index ...` / `shards bench ...` are told apart in main(): argparse cannot have an
    # optional subcommand beside the writer's options, and the writer form must stay as it was.
    parser.add_argument("mode_or_nothing", nargs="*", metavar="[index|bench] SHARDS",
                        help="'index SHARDS...' or 'bench SHARDS...'; nothing: write shards from --csv/--coco")
    writer = parser.add_argument_group("writing shards (no mode)")
    source = writer.add_mutually_exclusive_group()
    source.add_argument("--csv", help="caption CSV (one row per caption)")
    source.add_argument("--coco", help="COCO captions JSON (captions_train2017.json layout)")
    writer.add_argument("--images", help="image folder (default: the caption file's folder)")
    writer.add_argument("--image-column", default="image")
    writer.add_argument("--caption-column", default="caption")
    writer.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    writer.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--out", help="write: the output folder; index: the index file (default: index.tsv "
                                      "beside local shards)")
    index = parser.add_argument_group("index")
    index.add_argument("--no-idx", action="store_true", help="do not write DALI .idx files beside tars that get read")
    bench = parser.add_argument_group("bench")
    bench.add_argument("--loader", action="append", choices=("tfdata", "dali"), help="loader(s) to time (default: both where DALI imports)")
    bench.add_argument("--image-size", type=int, default=224)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--batches", type=int, default=50, help="batches to time, after a warm-up of a fifth as many")


def main(args: argparse.Namespace) -> int:
    words = list(args.mode_or_nothing)
    if words and words[0] in MODES:
        mode, shards = words[0], words[1:]
        if not shards:
            print(f"gpt2-effnet shards {mode}: name the shards (patterns, URLs or list files)", file=sys.stderr)
            return 2
        return index_main(shards, args) if mode == "index" else bench_main(shards, args)
    if words:
        print(f"gpt2-effnet shards: unknown mode {words[0]!r} (index, bench, or none to write shards)", file=sys.stderr)
        return 2
    if not (args.csv or args.coco) or not args.out:
        print("gpt2-effnet shards: writing shards needs --csv or --coco, and --out", file=sys.stderr)
        return 2
    return write_main(args)


def write_main(args: argparse.Namespace) -> int:
    from ..data.captions import read_captions
    from ..data.shard_index import IndexedShard, format_index_file
    from ..data.shards import write_shards

    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"gpt2-effnet shards: --out {args.out} is a file; give a folder", file=sys.stderr)
        return 2

    try:
        captions = read_captions(args.csv, args.coco, args.images, args.image_column, args.caption_column)
        print(captions.summary())
        result = write_shards(captions, args.out, args.per_shard, args.prefix)
    except ValueError as err:  # CaptionFileError is one; so is "no samples written"
        print(f"gpt2-effnet shards: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    index = Path(args.out) / "index.tsv"
    counts = [sum(1 for _ in open(i)) - 1 for i in result.indexes]
    index.write_text(format_index_file([IndexedShard(str(t), n, "read", True) for t, n in zip(result.tars, counts)], str(index)))
    print(f"train with: --shards {index}")
    return 0


def index_main(shards: list[str], args: argparse.Namespace) -> int:
    """Count every shard's samples (in parallel), write .idx files for tars read, and the index file."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from ..data import locations
    from ..data.shard_index import format_index_file, index_one

    try:
        urls = locations.expand(shards)
    except (locations.ShardSpecError, ValueError) as err:
        print(f"gpt2-effnet shards index: {err}", file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        if not locations.is_local(urls[0]):
            print("gpt2-effnet shards index: remote shards need --out FILE for the index", file=sys.stderr)
            return 2
        out = str(Path(urls[0]).resolve().parent / "index.tsv")
    failures: list[str] = []

    def one(url: str):
        try:
            return index_one(url, write_idx=not args.no_idx)
        except Exception as err:  # named below; the other shards are still indexed
            failures.append(f"{locations.redact(url)}: {type(err).__name__}: {locations.redact(str(err))[:200]}")
            return None

    with ThreadPoolExecutor(min(16, len(urls))) as pool:
        found = list(tqdm(pool.map(one, urls), total=len(urls), desc="indexing", unit="shard", file=sys.stderr))
    for failure in failures:
        print(f"could not index {failure}", file=sys.stderr)
    indexed = [f for f in found if f is not None]
    if not indexed:
        print("gpt2-effnet shards index: no shard could be read", file=sys.stderr)
        return 1
    from ..atomic import atomic_write

    with atomic_write(out) as handle:
        handle.write(format_index_file(indexed, out))
    sources = {kind: sum(1 for f in indexed if f.source == kind) for kind in ("idx", "stats", "read")}
    wrote = sum(f.wrote_idx for f in indexed)
    print(f"indexed {len(indexed)} shards, {sum(f.samples for f in indexed)} samples "
          f"({sources['idx']} from .idx, {sources['stats']} from _stats.json, {sources['read']} read; "
          f"{wrote} .idx written){'; ' + str(len(failures)) + ' failed' if failures else ''}")
    print(f"wrote {out}; train with: --shards {out}")
    return 1 if failures else 0


def bench_main(shards: list[str], args: argparse.Namespace) -> int:
    """The loaders alone on the user's shards: images/s and per core, as training reads them."""
    import os
    import time

    from ..data.dali import dali_available
    from ..data.pipeline import PipelineSpec, SkipCounter
    from ..data.shard_index import resolve
    from ..data.wds import wds_dataset
    from ..tokenizer import GPT2Tokenizer

    loaders = args.loader or (["tfdata", "dali"] if dali_available() else ["tfdata"])
    shard_set = resolve(shards)
    tokenizer = GPT2Tokenizer.default()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spec = PipelineSpec(args.image_size, 40, args.batch_size, shuffle=True, seed=0, repeat=True, drop_remainder=True)
    print(f"{len(shard_set.urls)} shards, {shard_set.total} samples; {cores} cores; "
          f"batches of {args.batch_size} at {args.image_size} px")
    for loader in loaders:
        if loader == "dali" and not dali_available():
            print("dali: not installed here")
            continue
        skips = SkipCounter()
        if loader == "dali":
            from ..data.dali import dali_dataset

            dataset = dali_dataset(shard_set, tokenizer, spec, skips=skips)
        else:
            dataset = wds_dataset(shard_set, tokenizer, spec, skips=skips)
        iterator = iter(dataset)
        for _ in range(max(1, args.batches // 5)):
            next(iterator)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            next(iterator)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        images = args.batches * args.batch_size
        print(f"{loader}: {images / wall:,.0f} images/s, {images / max(cpu, 1e-9):,.0f} images/s per core "
              f"({cpu / images * 1e3:.2f} ms of CPU an image), {skips.skipped} skipped")
        del iterator
    return 0
