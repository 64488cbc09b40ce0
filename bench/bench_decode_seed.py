"""Captioning speed at the seed's configuration, this checkout against another, side by side.

    python bench/bench_decode_seed.py --against ../base --rounds 2

The shape is the seed's: EfficientNetV2-B0 at 224 px, 2 encoder blocks, GPT-2 4 x 256 with
the full 50257+1 vocabulary, random weights (speed does not depend on them). The two
settings the seed's own samplers had, encoder included, 20 new tokens, no early stop:

* beam: 4 images at once, K = 3;
* nucleus: 1 image, top-k 8, top-p 0.9.

Each checkout runs in its own process (imported through ``PYTHONPATH``) through its public
``Captioner.generate``; the first call (tracing) is timed apart, then the best of
``--reps`` calls is kept, and rounds alternate between checkouts so that a shared
machine's swings hit both sides alike. A checksum of each side's tokens says whether
both decoded the same.

``--changes`` then times, in the same warm process, the first call after a change a
compiled program could serve (what a caption service sees when a request brings new
settings): nucleus with a new top-p and temperature, beam with a new length penalty,
beam and nucleus on 3 images after 4 (nucleus 4 is traced first, apart); last, a new
top-k, which no traced program serves (the cost of a new program in a warm process).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import headline  # this folder is on sys.path when run as a script
from bench_train import cpu_name, run_worker

HERE = Path(__file__).resolve()

SETTINGS = {
    "beam": {"images": 4, "kwargs": {"num_beams": 3}},
    "nucleus": {"images": 1, "kwargs": {"do_sample": True, "top_k": 8, "top_p": 0.9, "seed": 1}},
}


def worker(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import keras

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.config import CaptionerConfig

    if spec.get("policy"):
        keras.mixed_precision.set_global_policy(spec["policy"])

    config = CaptionerConfig.from_dict({
        "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": 256, "n_layer": 4, "n_head": 4},
        "model": {"backbone": "efficientnetv2-b0", "image_size": 224, "encoder_layers": 2, "encoder_heads": 4,
                  "max_caption_length": 32},
    })
    keras.utils.set_random_seed(0)  # the same weights on both sides, so their tokens compare
    model = Captioner.create(config)
    rng = np.random.default_rng(0)
    out = {}
    for name, setting in SETTINGS.items():
        if spec.get("only", name) != name:
            continue
        images = rng.uniform(0, 255, (setting["images"], 224, 224, 3)).astype(np.float32)
        kwargs = dict(setting["kwargs"], max_new_tokens=spec["tokens"], eos_token_id=None)
        if spec.get("precision"):
            kwargs["precision"] = spec["precision"]
        if spec.get("backbone_precision"):
            kwargs["backbone_precision"] = spec["backbone_precision"]
        start = time.perf_counter()
        ids = np.asarray(model.generate(images, **kwargs))
        first = time.perf_counter() - start
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            ids = np.asarray(model.generate(images, **kwargs))
            times.append(time.perf_counter() - start)
        assert ids.shape[-1] == spec["tokens"], ids.shape
        out[name] = {"per_image_s": min(times) / setting["images"], "first_s": first,
                     "checksum": int(ids.astype(np.int64).sum())}
    if spec.get("changes"):
        out["changes"] = changed_settings(model, rng, spec["tokens"])
    return out


def changed_settings(model, rng, tokens: int) -> dict:
    """Seconds of the first call after each change, in order, in a process where
    SETTINGS already ran (so each change is measured against warm programs)."""
    import numpy as np

    nucleus, beam = SETTINGS["nucleus"]["kwargs"], SETTINGS["beam"]["kwargs"]
    one = rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    four = rng.uniform(0, 255, (4, 224, 224, 3)).astype(np.float32)
    common = {"max_new_tokens": tokens, "eos_token_id": None}
    changes = [
        ("nucleus top_p 0.8", one, dict(nucleus, top_p=0.8)),
        ("nucleus top_p 0.8, temperature 0.7", one, dict(nucleus, top_p=0.8, temperature=0.7)),
        ("nucleus temperature 1.3", one, dict(nucleus, top_p=0.8, temperature=1.3)),
        ("beam length_penalty 0.6", four, dict(beam, length_penalty=0.6)),
        ("beam 3 images", four[:3], dict(beam)),
        ("(nucleus 4 images: traced apart)", four, dict(nucleus)),
        ("nucleus 3 images", four[:3], dict(nucleus)),
        ("nucleus top_k 16 (a new program)", one, dict(nucleus, top_k=16)),
    ]
    out = {}
    for name, images, kwargs in changes:
        start = time.perf_counter()
        np.asarray(model.generate(images, **kwargs, **common))
        out[name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=None, help="another checkout, measured in the same run")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policy", default=None,
                        help="Keras dtype policy for this checkout's model (e.g. mixed_bfloat16); default: as built")
    parser.add_argument("--precision", default=None,
                        help="decode this checkout with generate(precision=...), e.g. bfloat16-head (opt-in)")
    parser.add_argument("--backbone-precision", default=None,
                        help="this checkout's generate(backbone_precision=...): bfloat16 runs the image backbone in it (opt-in)")
    parser.add_argument("--against-precision", default=None,
                        help="the same for --against (it must know the value): low precision on both sides")
    parser.add_argument("--changes", action="store_true",
                        help="also time the first call after each changed setting (see the module docstring)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    spec = {"tokens": args.tokens, "reps": args.reps, "changes": args.changes}
    sides = [("this", None, {**spec, "policy": args.policy, "precision": args.precision,
                             "backbone_precision": args.backbone_precision})]
    if args.against:
        sides.append(("against", args.against, {**spec, "precision": args.against_precision}))
    print(f"CPU: {cpu_name()}")
    best: dict[str, dict] = {}
    changes: dict[str, dict[str, list[float]]] = {}
    sums: dict[str, set] = {}  # each setting's token checksums, over sides and rounds
    for round_ in range(args.rounds):
        for side, checkout, side_spec in sides:
            result = run_worker(HERE, side_spec, checkout)
            for name, seconds in result.pop("changes", {}).items():
                changes.setdefault(name, {}).setdefault(side, []).append(seconds)
                print(f"  round {round_ + 1}: {side}: first call after {name}: {seconds:.2f} s", flush=True)
            for name, r in result.items():
                sums.setdefault(name, set()).add(r.pop("checksum", None))
                key = f"{side}: {name}"
                kept = best.get(key)
                if kept is None or r["per_image_s"] < kept["per_image_s"]:
                    best[key] = {**r, "first_s": min(r["first_s"], (kept or r)["first_s"])}
                print(f"  round {round_ + 1}: {key:18s} {r['per_image_s']:.4f} s/image  first call {r['first_s']:.2f} s",
                      flush=True)
    print("\n| side | setting | s / image | first call s |" + (" speed vs against |" if args.against else ""))
    print("|---|---|---:|---:|" + ("---:|" if args.against else ""))
    for key, r in best.items():
        side, name = key.split(": ")
        row = f"| {side} | {name} | {r['per_image_s']:.4f} | {r['first_s']:.2f} |"
        if args.against:
            row += f" {best[f'against: {name}']['per_image_s'] / r['per_image_s']:.2f}x |"
        print(row)
    if args.against:
        print("\n" + ", ".join(f"{name}: {'same tokens' if len(found) == 1 else 'DIFFERENT tokens'} on both sides"
                                for name, found in sums.items()))
    if changes:
        names = [side for side, _, _ in sides]
        print("\n| first call after | " + " | ".join(f"{n} s (per round)" for n in names) + " |")
        print("|---|" + "---:|" * len(names))
        for name, per_side in changes.items():
            cells = [" / ".join(f"{t:.2f}" for t in per_side.get(n, [])) for n in names]
            print(f"| {name} | " + " | ".join(cells) + " |")
    for key, r in best.items():  # headline lines for bench/run_all.py
        side, name = key.split(": ")
        if side == "this":
            other = best.get(f"against: {name}")
            vs = f"{other['per_image_s'] / r['per_image_s']:.2f}x vs {args.against}" if other else ""
            label = {"beam": "beam K=3", "nucleus": "nucleus (top-k 8, top-p 0.9)"}[name]
            headline.emit(f"captioning, seed config, {label}, {SETTINGS[name]['images']} image(s) a call",
                          round(r["per_image_s"], 4), "s/image", vs)
    if args.json:
        args.json.write_text(json.dumps({"best": best, "changes": changes}, indent=1))


if __name__ == "__main__":
    main()
