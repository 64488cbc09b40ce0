"""One writer per run folder.

Two ``train`` processes on one ``--out`` would overwrite each other's checkpoints and
interleave their metrics. The chief takes ``RUN_DIR/.lock`` (created exclusively, holding
its pid, host and start time) before touching the folder; a second run fails at once
naming the holder. A lock left by a process that died (same host, pid gone) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process is training into this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``release()``; also a context manager."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise RunLocked(
                    f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
                    f"(since {holder.get('started')}); wait for it to finish or train into another --out"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunLocked(f"{self.path}: could not take the lock (another process keeps re-creating it)")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # gone, or cut short by a kill while being written

    @staticmethod
    def _stale(holder: dict) -> bool:
        """Held by a dead process on this host, or by this very process (an abandoned trainer)."""
        if holder.get("host") != socket.gethostname():
            return False  # a process on another machine: cannot tell, so respect it
        pid = int(holder.get("pid", -1))
        return pid == os.getpid() or not _alive(pid)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
