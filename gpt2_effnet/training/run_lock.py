"""One writer per run folder.

Two ``train`` processes on one ``--out`` would overwrite each other's checkpoints and
interleave their metrics. The chief takes ``RUN_DIR/.lock`` before touching the folder: an
exclusive kernel lock (``flock``) on the file, held until the run ends, plus the holder's
pid, host and start time written into it for the message a second run fails with. The
kernel lock is what decides: it is taken or refused in one step (two runs started
together cannot both win, as they could when an empty, not-yet-written lock file read as
stale) and the kernel drops it when its process dies, however it dies. A file that names
a live process on this host, or any process on another host, without that process
holding the kernel lock (a writer that does not take it) is still respected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..atomic import naming

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


def _record(text: str) -> dict[str, Any] | None:
    """The holder a lock file names, or None when it names none (empty, cut short, not ours)."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


class RunLock:
    """``RunLock(run_dir).acquire()`` ... ``release()``; also a context manager."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLocked(self._in_use(self._holder(), starting=True)) from None
            if not self._is_current(fd):  # the holder before us removed it as we opened it
                os.close(fd)
                continue
            holder = _record(self._read(fd))
            if holder is not None and not self._stale(holder):
                os.close(fd)
                raise RunLocked(self._in_use(holder))
            try:
                with naming(self.path):
                    self._write(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return self
        raise RunLocked(f"{self.path}: could not take the lock (another process keeps re-creating it)")

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", errors="replace")

    @staticmethod
    def _write(fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        if os.write(fd, data) != len(data):
            raise OSError(f"{fd}: short write")
        os.fsync(fd)

    def _holder(self) -> dict[str, Any] | None:
        try:
            return _record(self.path.read_bytes().decode("utf-8", errors="replace"))
        except OSError:
            return None

    def _in_use(self, holder: dict[str, Any] | None, starting: bool = False) -> str:
        if holder is None:
            who = "another process (it is starting)" if starting else "another process"
            return f"{self.path.parent} is in use by {who}; wait for it to finish or train into another --out"
        return (
            f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"(since {holder.get('started')}); wait for it to finish or train into another --out"
        )

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        """Named by a dead process on this host, or by this very process (an abandoned trainer)."""
        if holder.get("host") != socket.gethostname():
            return False  # a process on another machine: cannot tell, so respect it
        pid = int(holder["pid"])
        return pid == os.getpid() or not _alive(pid)

    def release(self) -> None:
        if self.held and self._fd is not None:
            if self._is_current(self._fd):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # before closing: nobody can take a lock on a removed file and keep it
            os.close(self._fd)
        self._fd, self.held = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
