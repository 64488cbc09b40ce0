"""SavedModel export: export time, size, and captions/s of the loaded SavedModel vs the library.

    python bench/bench_export.py --run demo_run/run --images demo_run/data --n 64 --beams 3

Both sides caption the same files with the same settings in one process, after one warm-up
call each (tracing excluded); the library side is what ``gpt2-effnet caption`` runs
(Pillow decode + compiled decode loop), the SavedModel side decodes inside its graph.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="demo_run/run")
    parser.add_argument("--images", default="demo_run/data")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from bench_train import cpu_name  # this folder is on sys.path when run as a script

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.decoding import caption_strings
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.serving.export import export_saved_model
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    files = sorted(p for p in Path(args.images).rglob("*.png"))[: args.n]
    if len(files) < args.n:
        files = sorted(p for p in Path(args.images).rglob("*.jpg"))[: args.n]
    data = tf.constant([p.read_bytes() for p in files])
    with tempfile.TemporaryDirectory() as tmp:
        info = export_saved_model(args.run, Path(tmp) / "sm", batch_size=args.batch_size, num_beams=args.beams)
        loaded = tf.saved_model.load(info["path"])
        serve = loaded.signatures["serving_default"]
        serve(images=data[: args.batch_size])
        start = time.perf_counter()
        out = serve(images=data)
        saved_s = time.perf_counter() - start
        exported = [c.decode() for c in out["captions"].numpy()]

    model = Captioner.load(args.run)
    tokenizer = GPT2Tokenizer.for_run(args.run, model.decoder.num_special_tokens)
    size = model.captioner_config.model.image_size
    caption_strings(model, np.stack([read_image(p, size) for p in files[: args.batch_size]]), tokenizer=tokenizer,
                    num_beams=args.beams)
    start = time.perf_counter()
    ours = []
    for i in range(0, len(files), args.batch_size):
        pixels = np.stack([read_image(p, size) for p in files[i : i + args.batch_size]])
        ours += caption_strings(model, pixels, tokenizer=tokenizer, num_beams=args.beams)
    library_s = time.perf_counter() - start
    result = {
        "cpu": cpu_name(),
        "images": len(files),
        "beams": args.beams,
        "batch": args.batch_size,
        "export_s": round(info["seconds"], 1),
        "savedmodel_mb": round(info["bytes"] / 1e6, 1),
        "savedmodel_captions_per_s": round(len(files) / saved_s, 1),
        "library_captions_per_s": round(len(files) / library_s, 1),
        "same_captions": sum(a == b for a, b in zip(exported, ours)),
    }
    print(json.dumps(result, indent=1))
    import headline  # this folder is on sys.path when run as a script

    headline.emit(f"export (beam K={args.beams}, batch {args.batch_size})", result["export_s"], "s",
                  f"SavedModel {result['savedmodel_mb']} MB")
    headline.emit(f"loaded SavedModel, beam K={args.beams}, {len(files)} images", result["savedmodel_captions_per_s"],
                  "captions/s", f"{result['savedmodel_captions_per_s'] / result['library_captions_per_s']:.2f}x vs "
                  f"the library ({result['library_captions_per_s']}); {result['same_captions']} of {len(files)} "
                  "captions the same")


if __name__ == "__main__":
    main()
