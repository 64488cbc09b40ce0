"""Files that appear whole or not at all.

Every output a command writes goes to a temporary file beside its destination and is
renamed over it only when complete: a crash, a Ctrl-C or a full disk leaves the previous
file (or nothing) in place, never a truncated one. Temporary names start with ``.`` and
end with ``.partial`` so a later run can recognise and remove leftovers of killed ones.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: object) -> Iterator[IO]:
    """``with atomic_write("out.jsonl") as f: ...``: ``out.jsonl`` is replaced only if the block succeeds."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{target}: the folder {folder} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give a file name")
    if "w" not in mode:
        raise ValueError(f"atomic_write writes a whole new file (mode 'w' or 'wb'), got {mode!r}")
    # A fresh name opened exclusively ('x'), so the file gets the permissions a plain open()
    # would give (mkstemp's are 0600, which would make run files unreadable to other users).
    temporary = folder / f".{target.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
    with naming(target):
        stream = open(temporary, mode.replace("w", "x", 1), **open_kwargs)  # type: ignore[call-overload]
    try:
        with naming(target), stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, exists_message: str = "exists already") -> Iterator[Path]:
    """``with atomic_folder("out") as tmp: ...`` (write into ``tmp``): ``out`` appears, whole,
    only if the block succeeds; a failure or a kill leaves no half of it. ``out`` must not exist."""
    target = Path(path)
    partial = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
    if target.exists():  # before any work, and again before the rename
        raise FileExistsError(f"{target} {exists_message}")
    if partial.exists():  # a killed writer's leftover
        shutil.rmtree(partial)
    try:
        yield partial
        if target.exists():
            raise FileExistsError(f"{target} {exists_message}")
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError from writing (a full disk says only "No space left on device") names ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Fail now, before any work, if ``path`` cannot be written as an output file."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{what} {target}: is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"{what} {target}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {target}: the folder {folder} is not writable")
    return target


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete ``*.partial`` leftovers of killed writers directly inside ``folder``; returns what was removed."""
    removed = []
    for path in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed
