"""The ``gpt2-effnet`` command: one subcommand per job, each in its own module of :mod:`.commands`.

Only the chosen subcommand's module is imported, so ``gpt2-effnet download`` starts
in a fraction of a second instead of paying for TensorFlow's import. TensorFlow's own
start-up logging is kept out of every command's output unless ``--verbose`` asks for it
(:mod:`.startup_logs`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from .startup_logs import quiet_tensorflow

# name -> (module, one-line help). Each module defines add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("gpt2_effnet.commands.convert", "convert GPT-2 weights (HF safetensors/h5, OpenAI ckpt) to ours"),
    "download": ("gpt2_effnet.commands.download", "download GPT-2 weights from Hugging Face or OpenAI"),
    "shards": ("gpt2_effnet.commands.shards", "write webdataset shards (img2dataset layout) from a CSV/COCO set"),
    "synthetic": ("gpt2_effnet.commands.synthetic", "write the synthetic captioned-shapes data set"),
    "train": ("gpt2_effnet.commands.train", "train a captioner"),
    "caption": ("gpt2_effnet.commands.caption", "caption images with a trained captioner"),
    "evaluate": ("gpt2_effnet.commands.evaluate", "score captions with BLEU, ROUGE-L and CIDEr-D"),
    "export": ("gpt2_effnet.commands.export", "write a TensorFlow SavedModel that captions encoded images"),
    "serve": ("gpt2_effnet.commands.serve", "an HTTP captioning service with a page (batched requests)"),
    "demo": ("gpt2_effnet.commands.demo", "train and evaluate a small captioner on the synthetic set"),
    "tune": ("gpt2_effnet.commands.tune", "measure this machine's decode thresholds into a local tuning file"),
}


VERBOSE_HELP = ("also show TensorFlow's own logging: its start-up lines and INFO/WARNING messages "
                "(kept out by default; where TF_CPP_MIN_LOG_LEVEL is set, it decides)")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gpt2-effnet [--verbose] COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'gpt2-effnet COMMAND --help' for a command's options; --verbose: " + VERBOSE_HELP + "."]
    return "\n".join(lines)


def build_parser(name: str, **kwargs: Any) -> tuple[Any, argparse.ArgumentParser]:
    """A subcommand's module and its parser: the module's options plus ``--verbose``."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"gpt2-effnet {name}", description=help_, **kwargs)
    module.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return module, parser


def _asks_verbose(words: list[str]) -> bool:
    """``--verbose`` among the options (as argparse reads them: not after ``--``)."""
    return "--verbose" in (words[: words.index("--")] if "--" in words else words)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] == "--verbose"
    if verbose:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gpt2-effnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Before the command's module is imported: TensorFlow may come with it.
    quiet_tensorflow(verbose or _asks_verbose(rest))
    module, parser = build_parser(name)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except OSError as err:  # the file system said no (read-only, full, a file where a folder goes): one line
        print(f"gpt2-effnet {name}: {describe_os_error(err)}", file=sys.stderr)
        return 2


def describe_os_error(err: OSError) -> str:
    """``PATH: reason`` for an OSError, however it was raised."""
    if err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{where}: {err.strerror}" if where else err.strerror
    text = str(err).strip()  # (commands.first_line's rule; cli imports no command module statically)
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
