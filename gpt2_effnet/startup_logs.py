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
untouched, so a real error TensorFlow logs later is seen. ``--verbose`` leaves
TensorFlow's logging as TensorFlow does it; so does a user's own ``TF_CPP_MIN_LOG_LEVEL``,
except that the lines written before absl could apply it are dropped as it says.
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

LEVEL = 2  # TF_CPP_MIN_LOG_LEVEL for a command's run: INFO and WARNING off
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl's prefix: severity, MMDD, time, thread, file:line ("I0000 00:00:1796563016.155691   29269 port.cc:153] ";
# before absl is initialised the time's seconds are the epoch's).
_PREFIX = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}  # TF_CPP_MIN_LOG_LEVEL hides those below it (never FATAL)
# ERROR lines that say only that this machine has no NVIDIA driver.
_NO_DRIVER = ("failed call to cuInit",)


def quiet_tensorflow(verbose: bool = False) -> bool:
    """Keep TensorFlow's start-up logging out of this process's stderr, unless asked for it.

    Call before TensorFlow is imported. Returns whether TensorFlow's start-up output will be
    filtered: not with ``verbose``, nor when the user's own ``TF_CPP_MIN_LOG_LEVEL`` is 0.
    A user's level stands as they set it; the lines TensorFlow writes before absl can
    apply it are then dropped as that level says (the cuInit failure only where level 3 says so).
    """
    if verbose:
        return False
    own = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if own is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(LEVEL)
        level, drop_no_driver = LEVEL, True
    else:
        level, drop_no_driver = (int(own) if own.strip() in ("1", "2", "3") else 0), False
        if level == 0:
            return False
    if "tensorflow" not in sys.modules and not any(isinstance(f, _TensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowFinder(level, drop_no_driver))
    return True


def is_startup_chatter(line: str, level: int = LEVEL, drop_no_driver: bool = True,
                       nvidia_driver: bool | None = None) -> bool:
    """Whether a line TensorFlow wrote at start-up is dropped at this ``TF_CPP_MIN_LOG_LEVEL``;
    ``drop_no_driver``: also the cuInit failure of a machine without an NVIDIA driver."""
    text = line.rstrip("\r\n")
    if text == ABSL_BANNER:
        return level >= 1  # a WARNING of absl's
    match = _PREFIX.match(text)
    if match is None:
        return False
    severity = _SEVERITY[match.group(1)]
    if severity < min(level, 3):
        return True
    if drop_no_driver and severity == 2 and any(marker in text for marker in _NO_DRIVER):
        return not (_has_nvidia_driver() if nvidia_driver is None else nvidia_driver)
    return False


def _has_nvidia_driver() -> bool:
    """An NVIDIA kernel driver is loaded: then a failed cuInit is a real problem, shown."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


@contextlib.contextmanager
def filtered_stderr(level: int = LEVEL, drop_no_driver: bool = True) -> Iterator[None]:
    """File descriptor 2 goes through :func:`relay` in a child process for the block.

    A child, so that what TensorFlow writes before a fatal error at import (a CPU without
    the instructions it was built for) still reaches the user after this process dies.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-I", __file__, str(level), str(int(drop_no_driver))],
                                 stdin=read_end, stdout=saved, stderr=saved)
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


def relay(source: BinaryIO, sink: BinaryIO, level: int = LEVEL, drop_no_driver: bool = True) -> None:
    """Copy lines from ``source`` to ``sink``, less TensorFlow's start-up chatter."""
    for line in source:
        text = line.decode("utf-8", "replace")
        if not is_startup_chatter(text, level, drop_no_driver):
            sink.write(line)
            sink.flush()


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, with a loader that imports it inside :func:`filtered_stderr`."""

    def __init__(self, level: int, drop_no_driver: bool) -> None:
        self.filter = (level, drop_no_driver)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; the real finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, *self.filter)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """The real loader's import and first device query, with stderr filtered; then out of the way."""

    def __init__(self, loader: Any, level: int, drop_no_driver: bool) -> None:
        self.loader = loader
        self.filter = (level, drop_no_driver)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        with filtered_stderr(*self.filter):
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # the cuInit probe; it initialises no device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


if __name__ == "__main__":  # the relay process of filtered_stderr(): run by path, outside the package
    relay(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]), sys.argv[2] == "1")
