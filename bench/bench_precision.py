"""bfloat16 vs float32 training on the demo's data: loss curves side by side, and time.

    python bench/bench_precision.py [--steps 300] [--out bench_precision]

Trains configs/demo.yaml (shortened to --steps) twice on the same synthetic set, seed and
data order: once with ``train.precision: float32`` and once with ``mixed_bfloat16``, one
after the other on this machine. Prints each run's training time and its loss at a few
steps, the largest gap between the two curves, and writes both curves into one PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-images", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("bench_precision"))
    args = parser.parse_args()

    from gpt2_effnet.config import CaptionerConfig
    from gpt2_effnet.data.synthetic import write_synthetic
    from gpt2_effnet.plots import _pyplot, read_metrics
    from gpt2_effnet.training.loop import train
    from gpt2_effnet.training.precision import cpu_has_bfloat16
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    config = CaptionerConfig.load(ROOT / "configs" / "demo.yaml").replace(
        train={"steps": args.steps, "checkpoint_every": 10**6}
    )
    data = args.out / "data"
    if not (data / "train.csv").is_file():
        write_synthetic(data, n_images=args.n_images, image_size=config.model.image_size, seed=0,
                        captions_per_image=6, val_fraction=0.1, progress=False)
    print(f"CPU bfloat16 support (AVX-512 BF16 / AMX): {cpu_has_bfloat16()}")
    curves = {}
    for precision in ("float32", "mixed_bfloat16"):
        run_config = config.replace(train={"precision": precision})
        tokenizer = make_tokenizer(run_config)
        source = caption_source(run_config, tokenizer, csv=data / "train.csv", images=data)
        run = args.out / precision
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        train(run_config, run, source, show_progress=False, log=lambda _: None)
        seconds = time.perf_counter() - started
        records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        curves[precision] = {r["step"]: r["loss"] for r in records}
        marks = [records[i] for i in sorted({0, len(records) // 4, len(records) // 2, len(records) - 1})]
        print(f"{precision:15s} {seconds:6.1f} s  loss " + ", ".join(f"step {r['step']}: {r['loss']:.3f}" for r in marks))
    steps = sorted(set(curves["float32"]) & set(curves["mixed_bfloat16"]))
    late = [s for s in steps if s > steps[len(steps) // 4]]
    gap = max(abs(curves["float32"][s] - curves["mixed_bfloat16"][s]) for s in late)
    print(f"largest |loss(bf16) - loss(fp32)| after the first quarter of the run: {gap:.3f}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for precision, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), label=precision)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step windows)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("demo config: float32 vs mixed bfloat16")
    fig.tight_layout()
    fig.savefig(args.out / "precision_curves.png")
    (args.out / "precision_curves.json").write_text(json.dumps(curves))
    print(f"wrote {args.out / 'precision_curves.png'}")


if __name__ == "__main__":
    main()
