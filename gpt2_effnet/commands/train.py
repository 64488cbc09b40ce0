"""``gpt2-effnet train``: train (or resume) a captioner from a CSV, a COCO file or shards.

    gpt2-effnet train --config configs/model1.yaml --csv captions.csv --images imgs/ --out runs/a --steps 1000
    gpt2-effnet train --config X.yaml --shards 'cc3m-{000000..000331}.tar' --loader dali --out runs/b --epochs 2

Rerunning the same command resumes from the run's latest checkpoint. Ctrl-C saves a
checkpoint and exits (exit status 130). See ``gpt2_effnet/training/distribute.py`` for
multi-node launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..training.distribute import STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="captioner YAML (sections gpt2, model, trainable, optim, train)")
    parser.add_argument("--out", required=True, help="run folder: config, checkpoints, logs, exported weights")
    data = parser.add_argument_group("training data (one of --csv, --coco, --shards)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV with one row per caption")
    source.add_argument("--coco", help="COCO captions JSON (captions_train2017.json layout)")
    source.add_argument("--shards", help="webdataset shards: a pattern ('cc3m-{000000..000331}.tar'), URLs "
                        "(http(s)://, s3://, gs://, 'pipe:CMD'), or a list/index file (gpt2-effnet shards index)")
    data.add_argument("--images", help="image folder for --csv/--coco (default: the caption file's folder)")
    data.add_argument("--image-column", default="image", help="CSV column with image paths (default: image)")
    data.add_argument("--caption-column", default="caption", help="CSV column with captions (default: caption)")
    data.add_argument("--loader", choices=("dali", "tfdata"), default="tfdata",
                      help="who decodes shard images: tfdata (Pillow on the CPU, default) or dali (on each GPU)")
    val = parser.add_argument_group("validation data (optional; same kind as the training data)")
    val.add_argument("--val-csv", help="validation CSV")
    val.add_argument("--val-coco", help="validation COCO captions JSON")
    val.add_argument("--val-shards", help="validation webdataset shards")
    val.add_argument("--val-images", help="image folder for --val-csv/--val-coco (default: the file's folder)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="train until this many optimizer steps (overrides train.steps)")
    length.add_argument("--epochs", type=int, help="train for this many epochs (overrides train.epochs)")
    parser.add_argument("--batch-size", type=int, help="global batch size (overrides train.batch_size)")
    parser.add_argument("--gpt2", help="pretrained GPT-2 weights (folder or file) for a fresh run")
    parser.add_argument("--tokenizer", help="folder with GPT-2 tokenizer files (default: --gpt2 if it has them, else bundled)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="default", help="tf.distribute strategy")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. --set train.precision=mixed_bfloat16; repeatable",
    )
    parser.add_argument(
        "--override",
        action="store_true",
        help="resume even though the config or data differ from the run's (the differing keys are printed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.steps=5", "optim.schedule=cosine"]`` -> ``{"train": {"steps": 5}, "optim": {...}}``."""
    import yaml

    sections: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.precision=mixed_bfloat16")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def build_config(args: argparse.Namespace) -> Any:
    from ..config import CaptionerConfig, ConfigError

    config = CaptionerConfig.load(args.config)
    changes = parse_overrides(args.set)
    train = changes.setdefault("train", {})
    if args.steps is not None:
        train.update(steps=args.steps, epochs=None)
    if args.epochs is not None:
        train.update(epochs=args.epochs, steps=None)
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    for section in changes:
        if section not in ("gpt2", "model", "trainable", "optim", "train"):
            raise ConfigError(f"--set: unknown config section {section!r}")
    if "gpt2" in changes:
        raise ConfigError("--set gpt2.*: change the GPT-2 shape in the config file, not on the command line")
    return config.replace(**{k: v for k, v in changes.items() if v})


def _tokenizer_dir(args: argparse.Namespace) -> str | None:
    if args.tokenizer:
        return args.tokenizer
    if args.gpt2 and Path(args.gpt2).is_dir():
        folder = Path(args.gpt2)
        if any((folder / name).is_file() for name in ("encoder.json", "vocab.json")):
            return str(folder)
    return None


def build_trainer(args: argparse.Namespace) -> Any:
    """Everything ``main`` does short of training: the strategy, data, model, restored state."""
    from ..training import distribute

    if args.shards and args.loader == "dali":
        # DALI allocates GPU memory of its own beside TensorFlow's: TensorFlow must not take it all up front.
        distribute.grow_gpu_memory()
    # The strategy first: MultiWorkerMirroredStrategy must set up collectives before any other TF work.
    strategy = distribute.make_strategy(args.strategy)
    from ..training.loop import Trainer
    from ..training.sources import caption_source, make_tokenizer, shard_source

    config = build_config(args)
    tokenizer = make_tokenizer(config, _tokenizer_dir(args))
    if args.shards:
        data = shard_source(config, tokenizer, args.shards, args.loader)
    else:
        data = caption_source(
            config, tokenizer, csv=args.csv, coco=args.coco, images=args.images,
            image_column=args.image_column, caption_column=args.caption_column,
        )
    validation = None
    if args.val_shards:
        validation = shard_source(config, tokenizer, args.val_shards, args.loader, training=False)
    elif args.val_csv or args.val_coco:
        validation = caption_source(
            config, tokenizer, csv=args.val_csv, coco=args.val_coco, images=args.val_images,
            image_column=args.image_column, caption_column=args.caption_column, training=False,
        )
    return Trainer(
        config,
        args.out,
        data,
        validation=validation,
        gpt2=args.gpt2,
        strategy=strategy,
        override=args.override,
        show_progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..data.captions import CaptionFileError
    from ..training.checkpoints import OutOfSpace, RunConfigMismatch
    from ..training.loop import TrainingStopped
    from ..training.run_lock import RunLocked
    from ..weights import WeightLoadError

    if Path(args.config).is_dir():
        print(f"gpt2-effnet train: --config {args.config} is a folder; give the YAML file", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"gpt2-effnet train: --out {args.out} is a file, not a folder: the run folder goes there", file=sys.stderr)
        return 2
    try:
        trainer = build_trainer(args)
    except RunLocked as err:
        print(f"gpt2-effnet train: {err}", file=sys.stderr)
        return 1
    except (ConfigError, CaptionFileError, RunConfigMismatch, WeightLoadError, FileNotFoundError, ValueError) as err:
        print(f"gpt2-effnet train: {err}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    except (TrainingStopped, OutOfSpace) as err:
        print(f"gpt2-effnet train: stopped: {err}", file=sys.stderr)
        return 1
    if result.interrupted is None:
        trainer.say(f"done: step {result.step}, weights in {Path(args.out) / 'captioner.weights.h5'}")
    return result.exit_code
