"""The GPT-2 downloader against a local HTTP server that can be told to misbehave.

Nothing here leaves 127.0.0.1: the server serves random bytes under the real file names
and URL layouts, logs every request (method, Range header, bytes sent), and for chosen
requests ignores Range, closes early, or resets the connection mid-body.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2_effnet import cli
from gpt2_effnet import download as dl

REPO_ROOT = Path(__file__).resolve().parents[1]

# File lists and URL layouts as published by Hugging Face and by OpenAI's download script.
HF_NAMES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
OPENAI_NAMES = [
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
]
HF_PREFIX = "/gpt2/resolve/main/"
OPENAI_PREFIX = "/gpt-2/models/124M/"
BIG = 200_000  # size of the weight file, the one the resume tests cut


@dataclass
class Hit:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    # path -> behaviours for its next GETs: "ignore_range", "short", "cut"
    plans: dict[str, list[str]] = field(default_factory=dict)
    log: list[Hit] = field(default_factory=list)
    url: str = ""

    def gets(self, path: str) -> list[Hit]:
        return [h for h in self.log if h.method == "GET" and h.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        method = "HEAD" if head else "GET"
        rng = self.headers.get("Range")
        hit = Hit(method, self.path, rng, 0)
        hub.log.append(hit)
        self.close_connection = True
        if self.path in hub.redirects:
            hit.status = 302
            self.send_response(302)
            self.send_header("Location", hub.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = hub.files.get(self.path)
        if body is None:
            hit.status = 404
            self.send_error(404)
            return
        plan = hub.plans.get(self.path)
        behaviour = plan.pop(0) if plan and not head else "ok"
        start, status = 0, 200
        if rng and behaviour != "ignore_range":
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                hit.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if head:
            return
        if behaviour in ("short", "cut"):
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)
        hit.sent = len(payload)
        if behaviour == "cut":
            time.sleep(0.2)  # let the client take the bytes, then reset (RST, not a clean close)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # the "cut" handler closes its own socket
        pass


def _fill(hub: FakeHub, prefix: str, names: list[str], seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    contents = {}
    for i, name in enumerate(names):
        size = BIG if name.startswith("model.") and ("safetensors" in name or "data" in name) else 500 + 97 * i
        contents[name] = rng.randbytes(size)
        hub.files[prefix + name] = contents[name]
    return contents


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)
    monkeypatch.delenv(dl.HF_ENDPOINT_ENV, raising=False)
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    server = _Server(("127.0.0.1", 0), _Handler)
    fake = FakeHub(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.hub = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def _get(hub: FakeHub, tmp_path: Path, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout", 5.0)
    return dl.download("124M", "hf", tmp_path, hub.url, **kwargs)


# -- addresses ---------------------------------------------------------------------------
def test_default_urls_follow_the_published_layouts() -> None:
    hf = dl.file_urls("1558M", "hf", None)
    assert hf["model.safetensors"] == "https://huggingface.co/gpt2-xl/resolve/main/model.safetensors"
    assert list(hf) == HF_NAMES
    assert dl.file_urls("355M", "hf")["config.json"] == "https://huggingface.co/gpt2-medium/resolve/main/config.json"
    assert dl.file_urls("774M", "hf")["vocab.json"] == "https://huggingface.co/gpt2-large/resolve/main/vocab.json"
    oa = dl.file_urls("124M", "openai")
    assert list(oa) == OPENAI_NAMES
    assert oa["hparams.json"] == "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/hparams.json"


def test_base_url_from_environment(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    contents = _fill(hub, OPENAI_PREFIX, OPENAI_NAMES, seed=3)
    monkeypatch.setenv(dl.BASE_URL_ENV, hub.url + "/")
    paths = dl.download("124M", "openai", tmp_path, progress=False, timeout=5.0)
    assert [p.read_bytes() for p in paths] == [contents[n] for n in OPENAI_NAMES]
    assert dl.file_urls("124M", "hf", "http://x.test")["config.json"] == "http://x.test/gpt2/resolve/main/config.json"


def test_unknown_model_or_source_is_named() -> None:
    with pytest.raises(ValueError, match="'125M'.*124M, 355M, 774M, 1558M"):
        dl.file_urls("125M", "hf")
    with pytest.raises(ValueError, match="'tf'"):
        dl.file_urls("124M", "tf")


# -- happy paths -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source,prefix,names", [("hf", HF_PREFIX, HF_NAMES), ("openai", OPENAI_PREFIX, OPENAI_NAMES)]
)
def test_full_download_is_byte_equal(hub: FakeHub, tmp_path: Path, source: str, prefix: str, names: list[str]) -> None:
    contents = _fill(hub, prefix, names, seed=1)
    paths = dl.download("124M", source, tmp_path / "w", hub.url, progress=True, timeout=5.0)
    assert paths == [tmp_path / "w" / n for n in names]
    for name in names:
        assert (tmp_path / "w" / name).read_bytes() == contents[name]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(names)  # no .part left behind


def test_rerun_skips_complete_files_with_head_only(hub: FakeHub, tmp_path: Path) -> None:
    _fill(hub, HF_PREFIX, HF_NAMES, seed=2)
    _get(hub, tmp_path)
    hub.log.clear()
    _get(hub, tmp_path)
    assert [h.method for h in hub.log] == ["HEAD"] * len(HF_NAMES)


def test_complete_file_with_wrong_size_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=4)
    _get(hub, tmp_path)
    (tmp_path / "vocab.json").write_bytes(b"stale")
    hub.log.clear()
    _get(hub, tmp_path)
    assert (tmp_path / "vocab.json").read_bytes() == contents["vocab.json"]
    assert [h.path for h in hub.log if h.method == "GET"] == [HF_PREFIX + "vocab.json"]


def test_redirect_keeps_head_and_range(hub: FakeHub, tmp_path: Path) -> None:
    """Hugging Face answers resolve/ URLs with a redirect to its CDN."""
    contents = _fill(hub, "/cdn/", HF_NAMES, seed=5)
    for name in HF_NAMES:
        hub.redirects[HF_PREFIX + name] = "/cdn/" + name
    (tmp_path / "model.safetensors.part").write_bytes(contents["model.safetensors"][:1234])
    _get(hub, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == contents["model.safetensors"]
    cdn_gets = hub.gets("/cdn/model.safetensors")
    assert [(h.range, h.status) for h in cdn_gets] == [("bytes=1234-", 206)]
    hub.log.clear()
    _get(hub, tmp_path)
    assert {h.method for h in hub.log} == {"HEAD"}
    assert sum(h.path.startswith("/cdn/") for h in hub.log) == len(HF_NAMES)


# -- resuming ----------------------------------------------------------------------------
def test_resume_sends_range_and_gets_only_the_rest(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=6)
    have = 77_777
    (tmp_path / "model.safetensors.part").write_bytes(contents["model.safetensors"][:have])
    _get(hub, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == contents["model.safetensors"]
    [hit] = hub.gets(HF_PREFIX + "model.safetensors")
    assert (hit.range, hit.status, hit.sent) == (f"bytes={have}-", 206, BIG - have)


def test_server_ignoring_range_restarts_from_zero(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=7)
    # junk in the .part proves it was overwritten rather than appended to
    (tmp_path / "model.safetensors.part").write_bytes(b"\0" * 5000)
    hub.plans[HF_PREFIX + "model.safetensors"] = ["ignore_range"]
    _get(hub, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == contents["model.safetensors"]
    [hit] = hub.gets(HF_PREFIX + "model.safetensors")
    assert (hit.range, hit.status, hit.sent) == ("bytes=5000-", 200, BIG)


def test_part_already_complete_is_just_renamed(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=8)
    (tmp_path / "model.safetensors.part").write_bytes(contents["model.safetensors"])
    _get(hub, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == contents["model.safetensors"]
    assert [(h.status, h.sent) for h in hub.gets(HF_PREFIX + "model.safetensors")] == [(416, 0)]


def test_part_longer_than_remote_starts_over(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=9)
    (tmp_path / "config.json.part").write_bytes(b"x" * 100_000)
    _get(hub, tmp_path)
    assert (tmp_path / "config.json").read_bytes() == contents["config.json"]
    assert [h.status for h in hub.gets(HF_PREFIX + "config.json")] == [416, 200]


def test_cut_connection_leaves_part_that_a_rerun_completes(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=10)
    path = HF_PREFIX + "model.safetensors"
    hub.plans[path] = ["cut"]
    with pytest.raises(dl.DownloadError, match=r"model\.safetensors.*run again to resume"):
        _get(hub, tmp_path, retries=0)
    part = tmp_path / "model.safetensors.part"
    assert not (tmp_path / "model.safetensors").exists()
    have = part.stat().st_size
    assert 0 < have < BIG
    assert part.read_bytes() == contents["model.safetensors"][:have]

    hub.log.clear()
    _get(hub, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == contents["model.safetensors"]
    [hit] = hub.gets(path)
    assert (hit.range, hit.sent) == (f"bytes={have}-", BIG - have)
    assert not part.exists()


def test_cut_is_retried_within_one_call(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, OPENAI_PREFIX, OPENAI_NAMES, seed=11)
    path = OPENAI_PREFIX + "model.ckpt.data-00000-of-00001"
    hub.plans[path] = ["cut", "short"]
    dl.download("124M", "openai", tmp_path, hub.url, progress=False, timeout=5.0, retries=2)
    assert (tmp_path / "model.ckpt.data-00000-of-00001").read_bytes() == contents["model.ckpt.data-00000-of-00001"]
    hits = hub.gets(path)
    assert len(hits) == 3
    assert hits[0].range is None
    assert sum(h.sent for h in hits) == BIG  # every byte crossed the wire once


def test_short_body_is_a_size_mismatch(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=12)
    hub.plans[HF_PREFIX + "model.safetensors"] = ["short"]
    with pytest.raises(dl.DownloadError) as info:
        _get(hub, tmp_path, retries=0)
    message = str(info.value)
    assert "model.safetensors" in message and "size mismatch" in message
    assert f"expected {BIG} bytes, got {BIG // 2}" in message
    part = tmp_path / "model.safetensors.part"
    assert part.read_bytes() == contents["model.safetensors"][: BIG // 2]
    assert not (tmp_path / "model.safetensors").exists()


# -- errors ------------------------------------------------------------------------------
def test_404_names_the_url_and_is_not_retried(hub: FakeHub, tmp_path: Path) -> None:
    _fill(hub, HF_PREFIX, HF_NAMES, seed=13)
    del hub.files[HF_PREFIX + "vocab.json"]
    with pytest.raises(dl.DownloadError, match=re.escape("HTTP 404") + ".*" + re.escape(f"{hub.url}{HF_PREFIX}vocab.json")):
        _get(hub, tmp_path, retries=3)
    assert len(hub.gets(HF_PREFIX + "vocab.json")) == 1
    assert not (tmp_path / "vocab.json.part").exists()


def test_unreachable_server_names_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(dl.DownloadError, match=re.escape(f"{url}/gpt2/resolve/main/config.json")):
        dl.download("124M", "hf", tmp_path, url, progress=False, timeout=2.0, retries=1)


# -- command line --------------------------------------------------------------------------
def test_cli_download(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    contents = _fill(hub, OPENAI_PREFIX, OPENAI_NAMES, seed=14)
    out = tmp_path / "ckpt"
    argv = ["download", "124M", "--source", "openai", "--dir", str(out), "--base-url", hub.url, "--timeout", "5"]
    assert cli.main(argv) == 0
    for name in OPENAI_NAMES:
        assert (out / name).read_bytes() == contents[name]

    del hub.files[OPENAI_PREFIX + "vocab.bpe"]
    (out / "vocab.bpe").unlink()
    assert cli.main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and f"{hub.url}{OPENAI_PREFIX}vocab.bpe" in err


def test_tools_script(hub: FakeHub, tmp_path: Path) -> None:
    contents = _fill(hub, HF_PREFIX, HF_NAMES, seed=15)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), dl.BASE_URL_ENV: hub.url}
    env.pop(dl.HF_ENDPOINT_ENV, None)
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "download_gpt2.py"), "124M", "--dir", str(tmp_path), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / n).read_bytes() == contents[n] for n in HF_NAMES)
