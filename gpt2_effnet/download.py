"""Fetch pretrained GPT-2 weights from Hugging Face or from OpenAI's original bucket.

Only the standard library talks to the network, so downloading needs no extra dependency
and starts without importing TensorFlow. The 1558M checkpoint is over 6 GB, so every
file streams into ``NAME.part`` and is renamed only once its size matches what the
server announced: an interrupted run leaves a ``.part`` that the next run resumes with
an HTTP Range request instead of starting over, and a truncated file can never be
mistaken for a complete one.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

MODELS: tuple[str, ...] = ("124M", "355M", "774M", "1558M")
SOURCES: tuple[str, ...] = ("hf", "openai")

# Hugging Face repository of each OpenAI model size.
HF_REPOS: dict[str, str] = {
    "124M": "gpt2",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}
HF_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
OPENAI_FILES: tuple[str, ...] = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
DEFAULT_BASE_URLS: dict[str, str] = {
    "hf": "https://huggingface.co",
    "openai": "https://openaipublic.blob.core.windows.net",
}
# Overrides the base URL of either source (a mirror, or a local server in tests).
BASE_URL_ENV = "GPT2_EFFNET_DOWNLOAD_URL"
# The Hugging Face hub's own mirror variable, honoured for source "hf" only.
HF_ENDPOINT_ENV = "HF_ENDPOINT"

USER_AGENT = "gpt2-effnet-downloader/0.1 (python-urllib)"
CHUNK_BYTES = 1 << 20
# Seconds to wait before retry number n is n * RETRY_DELAY_S (tests set it to 0).
RETRY_DELAY_S = 1.0


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL or file and what went wrong."""


class _TransientError(DownloadError):
    """A failure worth retrying (cut connection, timeout, short body, HTTP 5xx)."""


class _KeepMethodRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects without turning HEAD into GET.

    urllib rebuilds a redirected request as a GET, so a size check on a Hugging Face
    ``resolve`` URL (which redirects to a CDN) would start streaming gigabytes.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":
            new.method = "HEAD"
        return new


_OPENER = urllib.request.build_opener(_KeepMethodRedirectHandler)


# -- names and addresses -----------------------------------------------------------------
def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown GPT-2 {what} {value!r}; choose one of {', '.join(choices)}")


def file_names(source: str) -> tuple[str, ...]:
    """The files that make up one model for ``source``."""
    _check_choice("source", source, SOURCES)
    return HF_FILES if source == "hf" else OPENAI_FILES


def resolve_base_url(source: str, base_url: str | None = None) -> str:
    """Pick the server: argument, then $GPT2_EFFNET_DOWNLOAD_URL, then $HF_ENDPOINT (hf), then the default."""
    _check_choice("source", source, SOURCES)
    base = base_url or os.environ.get(BASE_URL_ENV) or ""
    if not base and source == "hf":
        base = os.environ.get(HF_ENDPOINT_ENV, "")
    return (base or DEFAULT_BASE_URLS[source]).rstrip("/")


def file_urls(model: str, source: str = "hf", base_url: str | None = None) -> dict[str, str]:
    """Map each file name of ``model`` to the URL it is fetched from."""
    _check_choice("model size", model, MODELS)
    base = resolve_base_url(source, base_url)
    if source == "hf":
        prefix = f"{base}/{HF_REPOS[model]}/resolve/main"
    else:
        prefix = f"{base}/gpt-2/models/{model}"
    return {name: f"{prefix}/{name}" for name in file_names(source)}


def default_directory(model: str, source: str) -> Path:
    """One folder per model and source, since the two sources' files are different formats."""
    return Path("models") / f"gpt2-{model}-{source}"


# -- HTTP ----------------------------------------------------------------------------------
def _request(url: str, method: str = "GET", start: int = 0) -> urllib.request.Request:
    req = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT})
    if start:
        req.add_header("Range", f"bytes={start}-")
    return req


def _http_error(err: urllib.error.HTTPError, url: str) -> DownloadError:
    message = f"HTTP {err.code} {err.reason} for {url}"
    if err.code >= 500 or err.code in (408, 429):
        return _TransientError(message)
    return DownloadError(message)


def _open(req: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
    """Open ``req``, turning network failures into errors that name the URL (HTTPError passes through)."""
    try:
        return _OPENER.open(req, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as err:
        raise _TransientError(f"cannot reach {req.full_url}: {err.reason}") from err
    except (OSError, http.client.HTTPException) as err:
        raise _TransientError(f"connection to {req.full_url} failed: {err!r}") from err


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """Return (first byte, total size) of a Content-Range header; None where unknown."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def remote_size(url: str, timeout: float = 30.0) -> int | None:
    """Size in bytes the server reports for ``url`` (HEAD), or None when it does not say."""
    try:
        with _open(_request(url, "HEAD"), timeout) as resp:
            return _content_length(resp)
    except urllib.error.HTTPError as err:
        if err.code in (405, 501):  # HEAD not supported: size unknown rather than an error
            return None
        raise _http_error(err, url) from None


# -- one file ------------------------------------------------------------------------------
def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)


def _stream_once(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Bring ``part`` to the full size of ``url`` in one request, resuming from its current size."""
    have = part.stat().st_size if part.exists() else 0
    name = part.name[: -len(".part")]
    try:
        resp = _open(_request(url, start=have), timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            _, total = _parse_content_range(err.headers.get("Content-Range"))
            if total == have:  # the previous run got every byte but stopped before renaming
                return
            part.unlink()
            raise _TransientError(
                f"{name}: server refused to resume at byte {have} (remote size {total}); restarting"
            ) from None
        raise _http_error(err, url) from None

    with resp:
        if resp.status == 206:
            first, total = _parse_content_range(resp.headers.get("Content-Range"))
            if first != have:
                part.unlink()
                raise _TransientError(
                    f"{name}: asked to resume at byte {have}, server answered from byte {first}; restarting"
                )
            mode = "ab"
        else:
            if have:
                _say(progress, f"{name}: server ignored the resume request, restarting from zero")
                have = 0
            total = _content_length(resp)
            mode = "wb"
        with open(part, mode) as out, tqdm(
            total=total,
            initial=have,
            desc=name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            leave=True,
        ) as bar:
            try:
                while True:
                    # read1 hands over whatever has arrived, so bytes received before a cut reach the disk.
                    chunk = resp.read1(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                out.flush()
                raise _TransientError(
                    f"{name}: connection lost after {out.tell()} of {total if total is not None else '?'} "
                    f"bytes from {url} ({err!r})"
                ) from err

    got = part.stat().st_size
    if total is not None and got != total:
        if got > total:
            part.unlink()
            raise DownloadError(f"{name}: size mismatch from {url}: expected {total} bytes, got {got}")
        raise _TransientError(
            f"{name}: size mismatch from {url}: expected {total} bytes, got {got} (download cut short)"
        )


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 3,
) -> bool:
    """Download ``url`` to ``dest`` via ``dest.part``; return False when ``dest`` was already complete.

    A present ``dest`` counts as complete when its size equals the server's (HEAD); if the
    server gives no size it is trusted. Transient failures are retried ``retries`` times,
    each resuming where the last stopped; after that the ``.part`` stays for the next run.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        local = dest.stat().st_size
        remote = remote_size(url, timeout)
        if remote is None or remote == local:
            _say(progress, f"{dest.name}: already complete ({local} bytes), skipped")
            return False
        _say(progress, f"{dest.name}: local size {local} differs from remote {remote}, downloading again")
        dest.unlink()

    attempt = 0
    while True:
        try:
            _stream_once(url, part, progress=progress, timeout=timeout)
            break
        except _TransientError as err:
            attempt += 1
            if attempt > retries:
                kept = f"; partial data kept in {part}, run again to resume" if part.exists() else ""
                raise DownloadError(f"{err}{kept}") from err
            _say(progress, f"{err}; retry {attempt}/{retries}")
            time.sleep(RETRY_DELAY_S * attempt)
    os.replace(part, dest)
    return True


# -- public entry points ---------------------------------------------------------------------
def download(
    model: str,
    source: str = "hf",
    directory: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    *,
    timeout: float = 30.0,
    retries: int = 3,
) -> list[Path]:
    """Fetch every file of GPT-2 ``model`` from ``source`` into ``directory``; return their paths.

    ``directory`` defaults to ``models/gpt2-{model}-{source}``. Files already complete are
    skipped, partial ones resumed, so rerunning after any failure is always safe.
    """
    urls = file_urls(model, source, base_url)
    directory = Path(directory) if directory is not None else default_directory(model, source)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, url in urls.items():
        path = directory / name
        fetch(url, path, progress=progress, timeout=timeout, retries=retries)
        paths.append(path)
    return paths
