"""``gpt2-effnet export``: a SavedModel that captions encoded images with TensorFlow alone.

    gpt2-effnet export runs/coco --out exported/coco --beams 3
    saved_model_cli show --dir exported/coco --all      # the serving_default signature

TensorFlow Serving loads the folder as one version of a model (put it under
``MODEL_BASE/1/``); see the README. The decoding settings are fixed at export time.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..decoding.precision import BACKBONE_PRECISIONS
from . import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_DIR", help="a trained run folder (config.yaml + captioner.weights.h5)")
    parser.add_argument("--out", required=True, help="folder to create for the SavedModel (must not exist)")
    search = parser.add_argument_group("decoding, fixed in the export (default: greedy)")
    search.add_argument("--beams", type=int, default=None, metavar="K", help="beam search with K beams")
    search.add_argument("--length-penalty", type=float, default=1.0)
    search.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    search.add_argument("--top-k", type=int, default=None, metavar="K", help="top-k sampling")
    search.add_argument("--temperature", type=float, default=None, metavar="T")
    search.add_argument("--seed", type=int, default=0, help="the sampling seed baked into the export")
    search.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_length")
    search.add_argument("--backbone-precision", default="float32", choices=BACKBONE_PRECISIONS,
                        help="opt-in: the image backbone's convolutions in bfloat16 in the export (as "
                             "`caption --backbone-precision`)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images decoded per call of the compiled loop (requests of any size are split)")


def main(args: argparse.Namespace) -> int:
    from ..captioner import CONFIG_FILE, WEIGHTS_FILE
    from ..decoding import check_generation, decoding_kwargs

    def fail(message: str) -> int:
        print(f"gpt2-effnet export: {message}", file=sys.stderr)
        return 2

    run, out = Path(args.checkpoint), Path(args.out)
    if not (run / CONFIG_FILE).is_file() or not (run / WEIGHTS_FILE).is_file():
        return fail(f"{run}: not a trained run folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    if out.exists():
        return fail(f"--out {out} exists already; remove it or export elsewhere")
    if not out.parent.is_dir():
        return fail(f"--out {out}: the folder {out.parent} does not exist")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.beams is not None and any(v is not None for v in (args.top_p, args.top_k, args.temperature)):
        return fail("--beams cannot be combined with --top-p/--top-k/--temperature")
    kwargs = decoding_kwargs(beams=args.beams, length_penalty=args.length_penalty, top_p=args.top_p, top_k=args.top_k,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.backbone_precision != "float32":
        kwargs["backbone_precision"] = args.backbone_precision
    try:
        check_generation(kwargs)
    except (ValueError, NotImplementedError) as err:
        return fail(str(err))
    import tensorflow as tf

    from ..serving.export import export_saved_model

    try:
        info = export_saved_model(run, out, batch_size=args.batch_size, seed=args.seed, **kwargs)
    except tf.errors.OpError as err:  # TensorFlow writing the SavedModel: a full or read-only disk
        message = re.sub(r"\{\{[^}]*\}\}\s*", "", err.message).strip()  # TensorFlow's function-node prefix
        reason = message.splitlines()[0].rsplit("; ", 1)[-1] if message else type(err).__name__
        return fail(f"writing {out} failed ({reason}); nothing was left behind")
    except (OSError, ValueError) as err:  # the run's config, weights or vocabulary
        first = first_line(err)
        return fail(f"cannot export {run}: {first}")
    print(f"exported {run} -> {info['path']} in {info['seconds']:.1f} s ({info['bytes'] / 1e6:.1f} MB)", file=sys.stderr)
    return 0
