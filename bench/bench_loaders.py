"""Shard loaders side by side, one run, same shards and cores: ours (tf.data, DALI on the CPU)
against what open_clip users run (webdataset + Pillow in a PyTorch DataLoader).

Data: photo-like JPEGs (1/f^1.55 amplitude spectrum, 300-640 px a side, ~45 KB each; not
pre-resized) with one caption each, written into shards by ``gpt2-effnet shards``.

- ours: exactly the path training takes: ``shard_source(config, ...).make_dataset(request)``
  for one replica, 224 px, batch 32, shuffled, tokenised captions, uint8 images.
- open_clip-style: ``wds.WebDataset`` (shard shuffle, sample shuffle buffer, split by
  worker), Pillow decode, open_clip's training transform (RandomResizedCrop 224 with scale
  0.9-1.0, bicubic; to a float tensor; CLIP's mean/std normalisation; written with Pillow,
  NumPy and torch because torchvision does not install beside the CPU torch here), GPT-2
  BPE tokens per caption, batched in the workers, ``DataLoader(num_workers=2)``.

Each loader runs in a fresh process per round (no loader's threads linger into another's
timing), rounds alternating; a round warms up, then times ``--batches`` batches. Kept: the
best round's images/s and the lowest CPU ms an image (all processes: the loader's and its
DataLoader workers').

    python bench/bench_loaders.py [--images 4000] [--rounds 3] [--batches 60] [--data DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import headline  # this folder is on sys.path when run as a script

SIZE = 224
BATCH = 32


def photo(rng: np.random.Generator, width: int, height: int, quality: int = 88) -> bytes:
    """A JPEG with a natural image's spectrum (amplitude ~ 1/f^1.55) and correlated colour channels."""
    from PIL import Image

    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amplitude = 1.0 / f**1.55
    fields = [np.fft.irfft2(amplitude * np.exp(1j * rng.uniform(0, 2 * np.pi, f.shape)), s=(height, width)) for _ in range(2)]
    mix = rng.normal(size=(3, 2))
    channels = []
    for c in range(3):
        x = mix[c, 0] * fields[0] + mix[c, 1] * fields[1]
        channels.append((x - x.mean()) / (x.std() + 1e-9))
    pixels = np.stack(channels, -1) * 45 + rng.uniform(60, 190, 3) + rng.normal(0, 1.5, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_shards(root: Path, count: int) -> str:
    """``count`` photo-like JPEGs in 8 shards (written by the shards command's writer); returns the pattern."""
    from gpt2_effnet.data.shards import write_shards

    shards = root / "shards"
    if (shards / "index.tsv").is_file():
        return str(shards / "index.tsv")
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "the", "red", "green", "dog", "cat", "on", "grass", "street", "beach", "at", "night"]
    pairs = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(300, 641, 2))
        path = images / f"{i:06d}.jpg"
        path.write_bytes(photo(rng, width, height))
        pairs.append((str(path), " ".join(rng.choice(words, int(rng.integers(5, 12))))))
    result = write_shards(pairs, shards, samples_per_shard=max(1, count // 8), prefix="photo", progress=False)
    lines = [f"{t.name}\t{sum(1 for _ in open(i)) - 1}" for t, i in zip(result.tars, result.indexes)]
    (shards / "index.tsv").write_text("\n".join(lines) + "\n")
    return str(shards / "index.tsv")


def worker_cpu(iterator) -> float:
    """CPU seconds used so far by a DataLoader iterator's worker processes (0 for in-process loaders)."""
    total = 0.0
    for worker in getattr(iterator, "_workers", []):
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def measure(make, warmup: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms an image over this process and its DataLoader workers) during the timed window."""
    iterator = make()
    for _ in range(warmup):
        next(iterator)
    wall, cpu, workers = time.perf_counter(), time.process_time(), worker_cpu(iterator)
    for _ in range(batches):
        next(iterator)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu + worker_cpu(iterator) - workers
    images = batches * BATCH
    return images / wall, cpu / images * 1e3


def ours(index: str, loader: str):
    from gpt2_effnet.config import CaptionerConfig
    from gpt2_effnet.training.data_source import DataRequest
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    config = CaptionerConfig.from_dict({"model": {"image_size": SIZE, "max_caption_length": 40},
                                        "train": {"batch_size": BATCH, "shuffle_buffer": 2048}})
    source = shard_source(config, make_tokenizer(config), index, loader)
    epoch = [0]

    def make():
        epoch[0] += 1
        request = DataRequest(epoch=epoch[0], batch_size=BATCH, num_shards=1, shard_index=0, seed=epoch[0], shuffle=True)
        return iter(source.make_dataset(request).repeat())

    return make


def open_clip_style(index: str, workers: int):
    import torch
    import webdataset as wds
    from PIL import Image

    from gpt2_effnet.tokenizer import GPT2Tokenizer

    folder = Path(index).parent
    urls = [str(folder / line.split("\t")[0]) for line in Path(index).read_text().splitlines() if line.strip()]
    tokenizer = GPT2Tokenizer.default()
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]

    def random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision's RandomResizedCrop(224, scale=(0.9, 1.0)) for PIL images, as open_clip trains."""
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(0.9, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return image.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)

    def preprocess(image: Image.Image) -> "torch.Tensor":
        rng = np.random.default_rng()
        pixels = np.asarray(random_resized_crop(image.convert("RGB"), rng), np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((pixels - mean) / std)

    def tokens(text: str) -> "torch.Tensor":
        ids, _ = tokenizer.batch_encode([text], 40)
        return torch.from_numpy(ids[0])

    pipeline = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, workersplitter=wds.split_by_worker,
                       empty_check=False)
        .repeat()
        .shuffle(2048, initial=1000)
        .decode("pilrgb")
        .rename(image="jpg;png;jpeg;webp", text="txt")
        .map_dict(image=preprocess, text=tokens)
        .to_tuple("image", "text")
        .batched(BATCH, partial=False)
    )

    def make():
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False)
        return iter(loader)

    return make


LOADERS = {
    "tfdata": "ours, tf.data (Pillow decode)",
    "dali": "ours, DALI (CPU decode)",
    "torch": "webdataset + Pillow, DataLoader(2 workers)",
}


def one(name: str, index: str, warmup: int, batches: int, workers: int) -> None:
    """Measure one loader in this (fresh) process and print ``RESULT rate cpu_ms``."""
    if name == "torch":
        make = open_clip_style(index, workers)
    else:
        if name == "dali":
            from gpt2_effnet.data.dali import dali_available

            if not dali_available():
                print("RESULT nan nan")
                return
        make = ours(index, name)
    rate, cpu_ms = measure(make, warmup, batches)
    print(f"RESULT {rate} {cpu_ms}", flush=True)
    os._exit(0)  # no waiting for pipeline threads at interpreter exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (open_clip-style)")
    parser.add_argument("--data", help="folder for the shards (default: a temporary folder; reused when given)")
    parser.add_argument("--skip", action="append", default=[], choices=tuple(LOADERS))
    parser.add_argument("--one", choices=tuple(LOADERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warmup = max(5, args.batches // 4)
    if args.one:
        one(args.one, str(Path(args.data) / "shards" / "index.tsv"), warmup, args.batches, args.workers)
        return 0

    import platform
    import subprocess

    tmp = None if args.data else tempfile.TemporaryDirectory()
    root = Path(args.data or tmp.name)
    make_shards(root, args.images)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0))
    sizes = [p.stat().st_size for p in (root / "images").glob("*.jpg")]
    print(f"{cpu}, {cores} cores; {args.images} photo-like JPEGs ({np.mean(sizes) / 1e3:.1f} KB mean) in 8 shards; "
          f"batch {BATCH} at {SIZE} px; each loader in a fresh process per round, rounds alternating")
    names = [n for n in LOADERS if n not in args.skip]
    best = {n: (0.0, float("inf")) for n in names}
    for _ in range(args.rounds):
        for name in names:
            command = [sys.executable, __file__, "--one", name, "--data", str(root), "--batches", str(args.batches),
                       "--workers", str(args.workers)]
            out = subprocess.run(command, capture_output=True, text=True, timeout=900)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
            if line is None:
                raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            rate, cpu_ms = (float(v) for v in line.split()[1:])
            best[name] = (max(best[name][0], rate), min(best[name][1], cpu_ms))
            print(f"  ... {LOADERS[name]}: {rate:,.0f} images/s, {cpu_ms:.2f} CPU ms an image", file=sys.stderr, flush=True)
    reference = best.get("torch", (0.0, 0.0))[0]
    print(f"\n  {'loader':46s} {'images/s':>9s} {'CPU ms/image':>13s} {'vs open_clip-style':>19s}")
    for name in names:
        rate, cpu_ms = best[name]
        ratio = f"{rate / reference:.2f}x" if reference else "-"
        print(f"  {LOADERS[name]:46s} {rate:9,.0f} {cpu_ms:13.2f} {ratio:>19s}")
    for name in names:  # headline lines for bench/run_all.py
        if name != "torch" and best[name][0] > 0:
            rate, cpu_ms = best[name]
            vs = f"{rate / reference:.2f}x vs webdataset + DataLoader ({reference:,.0f}); {cpu_ms:.2f} CPU ms/image"
            headline.emit(f"shard loader, {LOADERS[name][len('ours, '):]}, 224 px, batch {BATCH}", round(rate),
                          "images/s", vs if reference else f"{cpu_ms:.2f} CPU ms/image")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
