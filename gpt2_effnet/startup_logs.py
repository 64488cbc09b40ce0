"""TensorFlow's C++ start-up logging, kept out of a command's output (``gpt2-effnet --verbose`` keeps it).

What TensorFlow 2.21 writes to stderr on a CPU machine before a command says anything
(measured; tests/test_startup_logs.py checks the outcome):

* at import, whatever ``TF_CPP_MIN_LOG_LEVEL`` says, because it is written before absl's
  logging is initialised (and twice: once per TensorFlow shared library): the line
  "All log messages before absl::InitializeLog() is called are written to STDERR", then
  INFO lines "oneDNN custom operations are on ..." and "Could not find cuda drivers ...";
* at import, below level 1: the INFO line of ``cpu_feature_guard.cc`` ("... rebuild
  TensorFlow with the appropriate compiler flags");
* at the first device query, below level 3: the ERROR line "failed call to cuInit" where
  no GPU driver is installed, which a user reads as a failure;
* at the first XLA compilation, below level 1: INFO lines from XLA's ``service.cc`` and
  "Compiled cluster using XLA!".

So a command runs with ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's INFO and WARNING lines off,
its ERROR and FATAL lines on), and while TensorFlow is imported and lists its devices,
stderr (file descriptor 2, where C++ writes) passes through a small relay process that
drops what level 2 would have hidden had absl been ready (the absl banner, INFO and
WARNING lines) and the cuInit failure on a machine without an NVIDIA driver. Anything
else written in that window is passed on, and everything after it reaches stderr
untouched, so a real error TensorFlow logs later is seen. A user's own
``TF_CPP_MIN_LOG_LEVEL``, or ``--verbose``, leaves TensorFlow's logging as TensorFlow does it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

LEVEL = "2"  # TF_CPP_MIN_LOG_LEVEL for a command's run: INFO and WARNING off
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl's prefix: severity, MMDD, time, thread, file:line ("I0000 00:00:1796563016.155691   29269 port.cc:153] ";
# before absl is initialised the time's seconds are the epoch's).
_PREFIX = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
# ERROR lines that say only that this machine has no NVIDIA driver.
_NO_DRIVER = ("failed call to cuInit",)


def quiet_tensorflow(verbose: bool = False) -> bool:
    """Keep TensorFlow's start-up logging out of this process's stderr, unless asked for it.

    Call before TensorFlow is imported. Returns whether anything was changed: not with
    ``verbose``, nor when the user set ``TF_CPP_MIN_LOG_LEVEL`` (their choice stands).
    """
    if verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = LEVEL
    if "tensorflow" not in sys.modules and not any(isinstance(f, _TensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowFinder())
    return True


def is_startup_chatter(line: str, nvidia_driver: bool | None = None) -> bool:
    """Whether a line written during TensorFlow's start-up is one the quiet console drops."""
    text = line.rstrip("\r\n")
    if text == ABSL_BANNER:
        return True
    match = _PREFIX.match(text)
    if match is None:
        return False
    severity = match.group(1)
    if severity in "IW":
        return True
    if severity == "E" and any(marker in text for marker in _NO_DRIVER):
        return not (_has_nvidia_driver() if nvidia_driver is None else nvidia_driver)
    return False


def _has_nvidia_driver() -> bool:
    """An NVIDIA kernel driver is loaded: then a failed cuInit is a real problem, shown."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """File descriptor 2 goes through :func:`relay` in a child process for the block.

    A child, so that what TensorFlow writes before a fatal error at import (a CPU without
    the instructions it was built for) still reaches the user after this process dies.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-I", __file__], stdin=read_end, stdout=saved, stderr=saved)
    except OSError:  # no relay, no filtering: the logging stays, nothing is lost
        child = None
    os.close(read_end)
    if child is not None:
        os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the relay reads to its end and exits
        os.close(saved)
        if child is not None:
            child.wait()


def relay(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy lines from ``source`` to ``sink``, less TensorFlow's start-up chatter."""
    for line in source:
        text = line.decode("utf-8", "replace")
        if not is_startup_chatter(text):
            sink.write(line)
            sink.flush()


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, with a loader that imports it inside :func:`filtered_stderr`."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; the real finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """The real loader's import and first device query, with stderr filtered; then out of the way."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        with filtered_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the cuInit probe; it initialises no device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


if __name__ == "__main__":  # the relay process of filtered_stderr(): run by path, outside the package
    relay(sys.stdin.buffer, sys.stdout.buffer)
