"""``gpt2-effnet serve`` against a real server on 127.0.0.1 (tiny model): the API, batching of
concurrent requests, every kind of bad input as a 4xx JSON error, and the page in a real
headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

SIZE = 32
MAX_BYTES = 40_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config) -> Path:
    from gpt2_effnet.captioner import Captioner

    model = Captioner(tiny_config(real_vocabulary=True, gpt2={"n_positions": 16, "n_embd": 16, "n_layer": 1},
                                  model={"image_size": SIZE, "max_caption_length": 6, "feature_stride": 8},
                                  train={"max_image_pixels": 50 * 50}))
    rng = np.random.default_rng(4)
    backbone = {id(v) for v in model.encoder.backbone.weights}
    for variable in model.weights:
        if id(variable) not in backbone:
            variable.assign(rng.normal(0, 0.4, variable.shape).astype("float32"))
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "run")


@contextlib.contextmanager
def _running(app):
    """The app on a free port of 127.0.0.1, in its own event loop thread; yields its URL."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()
    holder: dict = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["port"] = site._server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        yield f"http://127.0.0.1:{holder['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@pytest.fixture(scope="module")
def engine(run_dir):
    from gpt2_effnet.serving.server import load_engine

    return load_engine(str(run_dir), max_batch=4)


@pytest.fixture(scope="module")
def server(engine):
    from gpt2_effnet.serving.server import make_app

    app = make_app(engine, max_batch=4, max_wait_ms=300.0, queue_size=16, max_bytes=MAX_BYTES)
    with _running(app) as url:
        yield url, app


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is only its header: it announces width x height (Pillow refuses 20000 x 20000 as a bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _image(seed: int, size: int = SIZE) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 255, (size, size, 3)))


def _request(url: str, data: bytes | None = None, content_type: str = "application/octet-stream") -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode()
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def _multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_health_and_captions_by_body_and_by_form(server, run_dir) -> None:
    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.decoding import caption_strings
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    url, _ = server
    health = _request(url + "/health")[1]
    assert health["status"] == "ok" and health["precision"] == "float32" and health["backbone_precision"] == "float32"
    from gpt2_effnet.decoding import plan_for  # the plan a plain request's batch of 4 runs

    assert health["decode_plan"] == plan_for(Captioner.load(run_dir), 4, eos_token_id=50256).as_dict()
    image = _image(1)
    status, raw = _request(url + "/caption?beams=2", image)
    assert status == 200, raw
    body, content_type = _multipart(image, {"beams": "2"})
    status, form = _request(url + "/caption", body, content_type)
    assert status == 200, form
    model = Captioner.load(run_dir)
    expected = caption_strings(model, read_image(image, SIZE)[None], tokenizer=GPT2Tokenizer.for_run(run_dir), num_beams=2)
    assert raw["caption"] == form["caption"] == expected[0]
    assert isinstance(raw["score"], float) and raw["tokens"]


def test_attention_comes_back_per_word(server) -> None:
    url, _ = server
    status, body = _request(url + "/caption?attention=1", _image(2))
    assert status == 200, body
    attention = body["attention"]
    assert attention["grid"] == [4, 4]
    assert len(attention["maps"]) == len(attention["words"]) > 0
    assert " ".join(attention["words"]).replace(" ", "") == body["caption"].replace(" ", "")
    for grid in attention["maps"]:
        assert len(grid) == 16 and abs(sum(grid) - 1.0) < 1e-3


def test_concurrent_requests_share_a_decode_call(server) -> None:
    url, app = server
    batcher = app["batcher"]
    before = batcher.batches
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda seed: _request(url + "/caption", _image(10 + seed)), range(8)))
    assert all(status == 200 for status, _ in results), results
    assert batcher.batches - before < 8  # at most 4 per call: at least two requests shared one


@pytest.mark.parametrize("name, data, query, status, named", [
    ("not an image", b"hello, this is text", "", 400, "not a readable image"),
    ("zero bytes", b"", "", 400, "no image"),
    ("truncated", None, "", 400, "not a readable image"),
    ("over the pixel limit", None, "", 413, "over the limit of 2,500"),
    ("over the byte limit", None, "", 413, f"over the limit of {MAX_BYTES:,} bytes"),
    ("beams 0", None, "beams=0", 400, "beams must be"),
    ("top_p 1.5", None, "top_p=1.5", 400, "top_p must be in [0, 1]"),
    ("top_p nan", None, "top_p=nan", 400, "top_p: expected a number"),
    ("unknown setting", None, "colour=red", 400, "unknown setting 'colour'"),
    ("beams with sampling", None, "beams=2&top_p=0.9", 400, "cannot be combined"),
    # issue 33 (7b0ac0c: 500 text/plain; 200 after a 9-beam decode; 400 with Pillow's text)
    ("max_new_tokens past the positions", None, "max_new_tokens=500", 400, "max_new_tokens must be <="),
    ("beams over the ceiling", None, "beams=9", 400, "beams must be <= 8"),
    ("a bomb's header", None, "", 413, "over the limit of"),
])
def test_bad_input_is_a_4xx_json_error_and_the_service_goes_on(server, name, data, query, status, named) -> None:
    url, _ = server
    if data is None:
        data = {
            "truncated": _image(3)[:80],
            "over the pixel limit": _image(3, size=60),
            "over the byte limit": _png(np.random.default_rng(5).integers(0, 255, (200, 200, 3))),
            "a bomb's header": _png_header(20_000, 20_000),
        }.get(name, _image(3))
    got, body = _request(url + "/caption" + (f"?{query}" if query else ""), data)
    assert got == status, (name, body)
    assert isinstance(body, dict) and named in body["error"], (name, body)
    assert _request(url + "/caption", _image(4))[0] == 200


def test_no_path_from_a_request_reaches_the_disk(server) -> None:
    url, _ = server
    for path in ("/config.yaml", "/captioner.weights.h5", "/../config.yaml", "/%2e%2e/config.yaml", "/static/../x"):
        status, _ = _request(url + path)
        assert status == 404, path


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_the_page_in_a_real_browser(server, tmp_path) -> None:
    found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH (make test installs Debian's chromium and chromium-driver "
                    "where apt-get can; it could not here)")
    import os

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,1100"):
        options.add_argument(flag)
    url, _ = server
    picture = tmp_path / "upload.png"
    grey = 128 + np.random.default_rng(7).integers(-20, 20, (SIZE, SIZE, 3))
    picture.write_bytes(_png(grey))  # a plain picture, so the heat-map shows in the screenshot
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url + "/")
        assert "gpt2-effnet" in driver.title
        assert not driver.find_element(By.ID, "stage").is_displayed()  # no broken-image icon before an upload
        driver.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption span"))
        words = driver.find_elements(By.CSS_SELECTOR, "#caption span")
        caption = " ".join(w.text for w in words)
        assert caption.strip() and driver.find_element(By.ID, "error").text == ""
        ActionChains(driver).move_to_element(words[0]).perform()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "heat").get_attribute("data-word"))
        assert driver.find_element(By.ID, "heat").get_attribute("data-word") == words[0].text
        assert "on" in words[0].get_attribute("class")
        painted = driver.execute_script(
            "const c = document.getElementById('heat').getContext('2d');"
            "const d = c.getImageData(0, 0, 320, 320).data; let n = 0;"
            "for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
        assert painted > 320 * 320 // 2, painted  # the heat-map covers the picture
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
        # A request that fails (here: the network) says so instead of "captioning..." for ever.
        driver.execute_script("window.fetch = () => Promise.reject(new Error('network down'));"
                              "document.getElementById('file').value = '';")
        driver.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert "network down" in driver.find_element(By.ID, "error").text
        assert driver.find_element(By.ID, "status").text == ""
    finally:
        driver.quit()


def test_serve_precision_reaches_every_decode(run_dir, monkeypatch, capsys) -> None:
    import aiohttp.web

    from gpt2_effnet import decoding
    from gpt2_effnet.cli import main
    from gpt2_effnet.decoding import caption_strings
    from gpt2_effnet.image_input import read_image
    from gpt2_effnet.serving import server as server_module
    from gpt2_effnet.serving.server import Settings

    # The command line's --precision reaches the engine (the server itself is not started).
    asked: dict = {}

    def fake_engine(run: str, max_batch: int, precision: str = "float32", backbone_precision: str = "float32") -> str:
        asked.update(run=run, precision=precision, backbone=backbone_precision)
        return "engine"

    monkeypatch.setattr(server_module, "load_engine", fake_engine)
    monkeypatch.setattr(server_module, "make_app", lambda engine, **kwargs: f"app of {engine}")
    monkeypatch.setattr(aiohttp.web, "run_app", lambda app, **kwargs: asked.update(app=app))
    assert main(["serve", str(run_dir), "--port", "0", "--precision", "bfloat16-head"]) == 0
    assert asked == {"run": str(run_dir), "precision": "bfloat16-head", "backbone": "float32", "app": "app of engine"}
    assert main(["serve", str(run_dir), "--port", "0", "--backbone-precision", "bfloat16"]) == 0
    assert asked == {"run": str(run_dir), "precision": "float32", "backbone": "bfloat16", "app": "app of engine"}
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["serve", str(run_dir), "--precision", "float16"])
    assert "bfloat16-head" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bfloat16-head"):
        server_module.Engine(None, None, 2, precision="float16")
    with pytest.raises(ValueError, match="backbone_precision"):
        server_module.Engine(None, None, 2, backbone_precision="bfloat16-head")
    monkeypatch.undo()

    # The engine decodes every request at that precision: the library's captions at it.
    engine = server_module.load_engine(str(run_dir), max_batch=3, precision="bfloat16-head", backbone_precision="bfloat16")
    seen: list = []
    library = decoding.generate_captions

    def recording(*args, **kwargs):
        seen.append((kwargs.get("precision"), kwargs.get("backbone_precision")))
        return library(*args, **kwargs)

    monkeypatch.setattr(decoding, "generate_captions", recording)
    pixels = np.stack([read_image(_image(seed), SIZE) for seed in (5, 6, 7)])
    for settings in (Settings(beams=2), Settings(top_k=5, seed=3)):
        kwargs = settings.generation()
        if kwargs.get("do_sample"):
            kwargs["seed"] = settings.seed
        expected = caption_strings(engine.model, pixels, tokenizer=engine.tokenizer, precision="bfloat16-head",
                                   backbone_precision="bfloat16", **kwargs)
        assert [r["caption"] for r in engine.caption(pixels, settings)] == expected
    assert seen == [("bfloat16-head", "bfloat16")] * 2


# ------------------------------------------- one request cannot stall the others (issue 33)


def _raw(url: str, head: bytes, body: bytes = b"", wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``head + body`` on a socket and return what comes back within ``wait`` s, and when."""
    host, port = url.split("//")[1].split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        try:
            answer = sock.recv(2000)
        except socket.timeout:
            answer = b""
    return answer, time.perf_counter() - start


def _limited_app(engine, **limits):
    from gpt2_effnet.serving.server import Limits, make_app

    values = dict(max_batch=4, max_wait_ms=300.0, queue=16, max_bytes=MAX_BYTES)
    values.update(limits)
    return make_app(engine, limits=Limits(**values))


def test_the_body_is_bounded_by_its_header_and_by_time(engine) -> None:
    with _running(_limited_app(engine, body_timeout=1.0)) as url:
        image = _image(20)
        huge = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
        answer, took = _raw(url, huge, image[:50])
        assert answer.startswith(b"HTTP/1.1 413") and b"Content-Length 1,000,000,000,000" in answer, answer
        assert took < 5
        partial = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(image)
        answer, took = _raw(url, partial, image[:50])
        assert answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in answer, answer
        assert took < 5
        body, content_type = _multipart(image, {})
        status, reply = _request(url + "/caption", body[: len(body) // 3] + b"\r\n--x--\r\n", content_type)
        assert status == 400 and "malformed request body" in reply["error"], reply
        assert _request(url + "/caption", image)[0] == 200


def test_a_client_that_hangs_up_logs_no_traceback(engine, caplog) -> None:
    import logging

    with _running(_limited_app(engine)) as url:
        image = _image(21)
        with caplog.at_level(logging.DEBUG):
            head = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(image)
            host, port = url.split("//")[1].split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head + image[:40])
            time.sleep(1.0)
            assert _request(url + "/caption", image)[0] == 200
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def test_overload_is_shed_before_uploads_are_decoded(engine, monkeypatch) -> None:
    from gpt2_effnet.serving import server as server_module

    release = threading.Event()
    real_caption, real_read, decoded = engine.caption, server_module.read_image, []

    def held_caption(pixels, settings):  # the worker stays busy until the test lets go
        release.wait(60)
        return real_caption(pixels, settings)

    def counting_read(*args, **kwargs):
        decoded.append(1)
        return real_read(*args, **kwargs)

    from gpt2_effnet.serving.server import Settings

    real_caption(np.stack([real_read(_image(29), SIZE)]), Settings())  # compiled now, not while a request waits
    monkeypatch.setattr(engine, "caption", held_caption)
    monkeypatch.setattr(server_module, "read_image", counting_read)
    with _running(_limited_app(engine, queue=2, max_wait_ms=0.0, queue_wait_ms=1000.0)) as url:
        with ThreadPoolExecutor(4) as pool:
            admitted = [pool.submit(_request, url + "/caption", _image(30 + i)) for i in range(2)]
            deadline = time.time() + 30
            while len(decoded) < 2 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            start = time.perf_counter()
            refused = list(pool.map(lambda i: _request(url + "/caption", _image(40 + i)), range(4)))
            waited = time.perf_counter() - start
            # A request waiting for a place gets it when one frees.
            late = pool.submit(_request, url + "/caption", _image(50))
            time.sleep(0.1)
            release.set()
            assert all(f.result(120)[0] == 200 for f in admitted)
            assert late.result(120)[0] == 200
    assert [status for status, _ in refused] == [503] * 4, refused
    assert "busy" in refused[0][1]["error"] and 0.9 < waited < 5, waited  # after --queue-wait-ms, not at once
    assert len(decoded) == 3  # 7b0ac0c decoded every refused upload before refusing it


def test_uploads_are_decoded_within_a_pixel_budget(engine, monkeypatch) -> None:
    from gpt2_effnet.serving import server as server_module

    real_read, running, peak = server_module.read_image, [0], [0]
    lock = threading.Lock()

    def slow_read(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)
            return real_read(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(server_module, "read_image", slow_read)
    # 40 x 40 = 1,600 pixels an upload: a budget of 2,000 decodes one at a time.
    with _running(_limited_app(engine, decode_pixels=2000)) as url:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda seed: _request(url + "/caption", _image(seed, size=40)), range(50, 54)))
    assert all(status == 200 for status, _ in results), results
    assert peak[0] == 1, peak


def test_beams_count_as_rows_and_programs_are_bounded(engine, monkeypatch) -> None:
    from gpt2_effnet import decoding

    rows: list[int] = []
    library = decoding.generate_captions

    def recording(model, images, **kwargs):
        rows.append(len(images) * kwargs.get("num_beams", 1))
        return library(model, images, **kwargs)

    monkeypatch.setattr(decoding, "generate_captions", recording)
    with _running(_limited_app(engine, max_programs=2)) as url:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda seed: _request(url + "/caption?beams=2", _image(seed)), range(60, 64)))
        assert all(status == 200 for status, _ in results), results
        assert rows and max(rows) <= 4, rows  # --max-batch 4 rows a call (7b0ac0c: 4 requests x 2 beams = 8)
        assert _request(url + "/caption?top_k=3", _image(64))[0] == 200  # a second program
        status, body = _request(url + "/caption?top_k=4", _image(65))  # a third
        assert status == 400 and "--max-programs" in body["error"], body
        assert _request(url + "/caption?top_k=3&temperature=0.7", _image(66))[0] == 200  # same program, new values


def test_a_sampled_caption_does_not_depend_on_its_batch(server) -> None:
    url, _ = server
    query = "/caption?top_p=0.9&seed=7"
    target = _image(70)
    alone = _request(url + query, target)
    assert alone[0] == 200, alone
    mixed = [target if i % 3 == 0 else _image(71 + i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda data: _request(url + query, data), mixed))
    captions = {body["caption"] for (status, body), data in zip(results, mixed) if data is target}
    assert all(status == 200 for status, _ in results)
    assert captions == {alone[1]["caption"]}, captions


def test_serve_checks_its_options_and_port_before_loading_the_model(run_dir, tmp_path, monkeypatch, capsys) -> None:
    import aiohttp.web

    from gpt2_effnet.cli import main
    from gpt2_effnet.serving import server as server_module

    loaded: list = []
    real_load = server_module.load_engine
    monkeypatch.setattr(server_module, "load_engine", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    monkeypatch.setattr(aiohttp.web, "run_app", lambda app, **kwargs: None)  # never serve for real here
    for option, value in (("--max-wait-ms", "nan"), ("--max-wait-ms", "inf"), ("--max-wait-ms", "-1"),
                          ("--max-batch", "0"), ("--max-beams", "0"), ("--body-timeout", "nan"),
                          ("--port", "70000")):
        assert main(["serve", str(run_dir), "--port", "0", option, value]) == 2, (option, value)
        err = capsys.readouterr().err
        assert err.count("gpt2-effnet serve:") == 1 and option in err and "Traceback" not in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on" in err and "serving" not in err, err
    assert not loaded
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    (broken / "tokenizer").mkdir(exist_ok=True)
    (broken / "tokenizer" / "vocab.json").write_text("{not json")
    (broken / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    assert main(["serve", str(broken), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("gpt2-effnet serve:") == 1 and "vocab.json" in err and "Traceback" not in err, err
