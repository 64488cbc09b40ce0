"""Where shards live: local paths, ``http(s)://``, ``s3://``, ``gs://`` and ``pipe:CMD``.

Byte streams come from the field's libraries: fsspec (with s3fs / gcsfs installed for
``s3://`` / ``gs://``) for files and object stores, webdataset's ``gopen`` for ``pipe:``
commands (the convention open_clip's users write as ``pipe:aws s3 cp s3://b/x.tar -``).
Endpoints and credentials come from where users already set them: the AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), ``GOOGLE_APPLICATION_CREDENTIALS``,
and fsspec's own ``FSSPEC_<PROTOCOL>_<OPTION>`` variables. Nothing here holds a secret:
:func:`redact` strips them from anything printed or stored in a run folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import IO

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
PIPE = "pipe:"


class ShardSpecError(ValueError):
    """A ``--shards`` value names nothing usable; the message says what and where."""


def scheme(url: str) -> str:
    """``file``, ``pipe`` or the URL's scheme (``s3``, ``http``, ...)."""
    if url.startswith(PIPE):
        return "pipe"
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else "file"


def is_local(url: str) -> bool:
    return scheme(url) == "file"


_SECRET_WORDS = r"(?:secret|token|password|passwd|signature|sig|credential|key|auth)"


def redact(text: str) -> str:
    """``text`` with credentials removed: URL user info, signed-URL query values, ``NAME=VALUE``
    settings whose name sounds secret (as a ``pipe:`` command might carry)."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    text = re.sub(rf"([?&][^=&\s]*{_SECRET_WORDS}[^=&\s]*=)[^&\s]+", r"\1***", text, flags=re.IGNORECASE)
    return re.sub(rf"(\b[A-Za-z_]*{_SECRET_WORDS}[A-Za-z_]*=)[^\s&]+", r"\1***", text, flags=re.IGNORECASE)


def join(base: str, name: str) -> str:
    """``name`` relative to the folder that holds ``base`` (a list file), unless absolute or a URL."""
    if scheme(name) != "file" or os.path.isabs(name):
        return name
    if scheme(base) == "file":
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), name))
    return base.rsplit("/", 1)[0] + "/" + name


def sibling(url: str, new_suffix: str) -> str | None:
    """The file beside ``url`` with ``.tar`` replaced by ``new_suffix`` (``.idx``, ``_stats.json``); None for pipes."""
    if scheme(url) == "pipe":
        return None
    stem = url[:-4] if url.endswith(".tar") else url
    return stem + new_suffix


def open_stream(url: str, seekable: bool = False) -> IO[bytes]:
    """A binary stream of ``url`` read from its start.

    ``seekable``: a random-access file (byte ranges on remote stores) instead of a plain
    sequential stream; HTTP servers without range support can only give the latter.
    """
    kind = scheme(url)
    if kind == "file":
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    if kind == "pipe":
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    import fsspec

    options = {} if seekable or kind not in ("http", "https") else {"block_size": 0}
    return fsspec.open(url, "rb", **options).open()


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The whole small file at ``url`` (a list, an index, a ``.idx``), or its first ``limit`` bytes."""
    with open_stream(url) as stream:
        return stream.read() if limit is None else stream.read(limit)


def exists(url: str) -> bool:
    if scheme(url) == "file":
        return os.path.isfile(url)
    if scheme(url) == "pipe":
        return True
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(url)
    try:
        return bool(filesystem.exists(path))
    except Exception:  # a store that refuses HEAD/LIST answers as absent; opening will say why
        return False


def expand(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from brace patterns (``x-{000000..000331}.tar``), several of them, or list files.

    A list file is any local file that is not a ``.tar``: one shard (or pattern) per line,
    ``#`` comments and blank lines ignored; lines may carry tab-separated counts (a shard
    index, see :mod:`.shard_index`), which this function drops. Relative lines are relative
    to the list file.
    """
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in map(str, specs):
        if is_list_file(item):
            for line in list_lines(item):
                urls += [join(item, u) for u in braceexpand(line.split("\t", 1)[0])]
        else:
            urls += list(braceexpand(item)) if not item.startswith(PIPE) else [item]
    if not urls:
        raise ShardSpecError("no shard given")
    return urls


def is_list_file(item: str) -> bool:
    return scheme(item) == "file" and not item.endswith(".tar") and os.path.isfile(item)


def list_lines(path: str) -> list[str]:
    """The meaningful lines of a list or index file."""
    try:
        text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise ShardSpecError(f"{path}: not a text file of shard names (is it a tar without the .tar suffix?)") from None
    lines = [line.rstrip("\r\n") for line in text.splitlines()]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
