"""``gpt2-effnet serve``: captions over HTTP, with concurrent requests batched into one decode.

aiohttp serves three routes: ``GET /`` (the page, :mod:`.page`), ``GET /health`` and
``POST /caption`` (the image as a multipart file field or as the raw request body;
decoding settings as query or form fields: ``beams``, ``top_p``, ``top_k``,
``temperature``, ``max_new_tokens``, ``seed``, ``attention``). The request never names a
file, so nothing on disk but the model is read.

Everything a client controls is bounded (:class:`Limits`), so that no request can stall
the others: requests are admitted up to ``queue`` at a time; the rest wait up to
``queue_wait_ms`` for a place and are then refused with 503, before their body is read;
a body must announce no more than ``max_bytes`` and arrive within ``body_timeout``
seconds; uploads are decoded only after their header's pixel
count is checked, and no more than ``decode_pixels`` pixels of them at once; ``beams``
and ``max_new_tokens`` have ceilings, a decode call holds at most ``max_batch`` rows (a
beam request's beams count as rows), and the service compiles at most ``max_programs``
decode programs (each new shape of settings is one). A single worker takes same-setting
jobs together (waiting at most ``max_wait_ms`` for more) and decodes them in a thread, so
the server keeps accepting. Sampled requests are decoded one to a call: a row's random
numbers depend on its place in the batch, so a request alone in row 0 gets the same
caption for the same image, settings and seed whatever else arrives with it.

Client errors are 4xx JSON ``{"error": ...}`` naming the problem; anything else is a 5xx
JSON error, and a client that hangs up is dropped without a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..image_input import read_image

SETTINGS = ("beams", "top_p", "top_k", "temperature", "max_new_tokens", "seed", "attention")
log = logging.getLogger("gpt2_effnet.serve")


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """Every bound of the service; :meth:`check` names an option out of range.

    ``decode_pixels`` is shared by the uploads being decoded at one time (one larger
    than it, but within the model's pixel limit, is decoded alone).
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue: int = 64
    queue_wait_ms: float = 1000.0
    max_bytes: int = 20 * 2**20
    max_beams: int = 8
    body_timeout: float = 30.0
    decode_pixels: int = 100_000_000
    max_programs: int = 16

    def check(self) -> "Limits":
        for name in ("max_batch", "queue", "max_bytes", "max_beams", "decode_pixels", "max_programs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("max_wait_ms", "queue_wait_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 10_000):
                raise ValueError(f"--{name.replace('_', '-')} must be a number of milliseconds in [0, 10000], got {value!r}")
        if not (isinstance(self.body_timeout, (int, float)) and math.isfinite(self.body_timeout)
                and 0 < self.body_timeout <= 3600):
            raise ValueError(f"--body-timeout must be a number of seconds in (0, 3600], got {self.body_timeout!r}")
        return self


@dataclass(frozen=True)
class Settings:
    """A request's decoding settings; requests with equal settings share a batch."""

    beams: int = 1
    top_p: float | None = None
    top_k: int | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    attention: bool = False

    @classmethod
    def parse(cls, fields: dict[str, str], max_beams: int | None = None, max_new_tokens: int | None = None) -> "Settings":
        values: dict[str, Any] = {}
        for name, text in fields.items():
            if name not in SETTINGS:
                raise BadRequest(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
            kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
            try:
                if name == "attention":
                    values[name] = text.lower() in ("1", "true", "yes", "on")
                elif "float" in str(kind):
                    values[name] = float(text)
                    if not math.isfinite(values[name]):
                        raise ValueError
                else:
                    values[name] = int(text)
            except ValueError:
                raise BadRequest(f"{name}: expected a number, got {text[:40]!r}") from None
        settings = cls(**values)
        if max_beams is not None and settings.beams > max_beams:
            raise BadRequest(f"beams must be <= {max_beams} on this server (--max-beams), got {settings.beams}")
        if max_new_tokens is not None and settings.max_new_tokens is not None and settings.max_new_tokens > max_new_tokens:
            raise BadRequest(
                f"max_new_tokens must be <= {max_new_tokens} (the model's caption length), got {settings.max_new_tokens}"
            )
        if not -(2**63) <= settings.seed < 2**63:
            raise BadRequest(f"seed must fit in 64 bits, got {settings.seed}")
        settings.generation()  # checks ranges now (beams 0, top_p 1.5, ...)
        return settings

    @property
    def sampled(self) -> bool:
        return any(v is not None for v in (self.top_p, self.top_k, self.temperature))

    def generation(self) -> dict[str, Any]:
        """``generate()`` keywords, checked by GenerationConfig; raises BadRequest naming the field."""
        from ..decoding import check_generation, decoding_kwargs

        if self.beams > 1 and self.sampled:
            raise BadRequest("beams > 1 cannot be combined with top_p/top_k/temperature")
        kwargs = decoding_kwargs(beams=self.beams, top_p=self.top_p, top_k=self.top_k, temperature=self.temperature,
                                 max_new_tokens=self.max_new_tokens)
        try:
            check_generation(kwargs)
        except (ValueError, NotImplementedError) as err:
            message = str(err)
            for keyword, name in (("num_beams", "beams"), ("max_new_tokens", "max_new_tokens")):
                message = message.replace(keyword, name)
            raise BadRequest(message) from None
        return kwargs


class Engine:
    """The model side: pixels of one batch + settings -> one result dict per image."""

    def __init__(
        self, model: Any, tokenizer: Any, max_batch: int, precision: str = "float32", backbone_precision: str = "float32"
    ) -> None:
        from ..decoding.precision import check_backbone_precision, check_precision

        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # One precision for the whole service, not a request setting: each precision is its
        # own compiled program, and a request should not decide what the server compiles.
        self.precision = check_precision(precision)
        self.backbone_precision = check_backbone_precision(backbone_precision)
        config = model.captioner_config
        self.image_size = config.model.image_size
        self.max_pixels = config.train.max_image_pixels
        # BOS takes one position: a longer caption has no position embedding left.
        self.max_new_tokens = min(config.model.max_caption_length, config.gpt2.n_positions - 1)

    def rows_per_call(self, settings: Settings) -> int:
        """Jobs one decode call takes: beams count as rows; sampled requests go alone (see the module)."""
        if settings.sampled:
            return 1
        return max(1, self.max_batch // settings.beams)

    def program_key(self, settings: Settings) -> tuple:
        """What makes a decode call a different compiled program (shape settings, rows, attention)."""
        from ..decoding import check_generation

        kwargs = settings.generation()
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        return (check_generation(kwargs).program_key(), self.rows_per_call(settings), settings.attention)

    def plan(self) -> Any:
        """The decode plan a full batch of plain requests runs (what /health reports)."""
        from ..decoding import plan_for

        return plan_for(self.model, self.max_batch, eos_token_id=self.tokenizer.eos_token_id, precision=self.precision,
                        backbone_precision=self.backbone_precision, **Settings().generation())

    def caption(self, pixels: np.ndarray, settings: Settings) -> list[dict[str, Any]]:
        from ..attention import attention_for_captions
        from ..decoding import cut_at_eos, generate_captions

        count = len(pixels)
        rows = self.rows_per_call(settings)
        if count < rows:  # always the same batch size: one compiled program per setting's shape
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], rows - count, axis=0)])
        kwargs = settings.generation()
        eos = kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        if kwargs.get("do_sample"):
            kwargs["seed"] = settings.seed
        if self.precision != "float32":
            kwargs["precision"] = self.precision
        if self.backbone_precision != "float32":
            kwargs["backbone_precision"] = self.backbone_precision
        out = generate_captions(self.model, pixels, return_scores=True, **kwargs)
        ids = out.new_tokens[:count]
        results = []
        for row in range(count):
            tokens = cut_at_eos(ids[row], eos)
            results.append({"caption": self.tokenizer.decode(tokens).strip(), "score": float(out.scores[row]),
                            "tokens": [int(t) for t in tokens]})
        if settings.attention:
            height, width = self.model.encoder.grid
            maps = attention_for_captions(self.model, pixels[:count], ids, self.tokenizer, eos)
            for result, item in zip(results, maps):
                result["attention"] = {
                    "grid": [height, width],
                    "words": item.words,
                    "maps": [np.round(m, 5).ravel().tolist() for m in item.layer_mean()],
                }
        return results


@dataclass
class _Job:
    pixels: np.ndarray
    settings: Settings
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Admitted jobs and one worker that decodes same-setting jobs together (see the module)."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64,
                 max_programs: int = 16, queue_wait_ms: float = 1000.0) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()  # bounded by admission: at most queue_size requests
        self.admitted = 0
        self.queue_wait = queue_wait_ms / 1000.0
        self.waiting = 0  # requests over queue_size waiting for a place (at most 4 * queue_size)
        self._place: asyncio.Condition | None = None
        self.max_programs = max_programs
        self.programs: set[tuple] = set()
        self.batches = 0
        self.images = 0
        self._held: list[_Job] = []

    async def admit(self) -> None:
        """Count one more request in, or refuse it (503) before anything of it is read.

        Over ``queue_size`` a request waits up to ``queue_wait`` for a place first: a
        refusal answered at once invites a retry at once, and on a busy machine a storm
        of those (each a connection, a parse and an answer) takes the CPU the decoding
        needs; an idle wait costs nothing.
        """
        if self.admitted >= self.queue_size:
            if self._place is None:
                self._place = asyncio.Condition()
            if self.waiting >= 4 * self.queue_size or self.queue_wait <= 0:
                raise self._busy()
            self.waiting += 1
            try:
                async with self._place:
                    await asyncio.wait_for(self._place.wait_for(lambda: self.admitted < self.queue_size), self.queue_wait)
            except asyncio.TimeoutError:
                raise self._busy() from None
            finally:
                self.waiting -= 1
        self.admitted += 1

    def _busy(self) -> BadRequest:
        return BadRequest(f"busy: {self.queue_size} requests are being served; retry shortly", 503, {"Retry-After": "1"})

    async def leave(self) -> None:
        self.admitted -= 1
        if self._place is not None and self.waiting:
            async with self._place:
                self._place.notify(1)

    def check_program(self, settings: Settings) -> None:
        """Refuse settings that would compile one decode program more than ``max_programs``."""
        key = self.engine.program_key(settings)
        if key not in self.programs:
            if len(self.programs) >= self.max_programs:
                raise BadRequest(
                    f"these settings need a new decode program and this server has compiled its "
                    f"{self.max_programs} (--max-programs); use settings other requests use"
                )
            self.programs.add(key)

    async def submit(self, pixels: np.ndarray, settings: Settings) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(pixels, settings, future))
        return await future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.pop(0)
        try:
            return await asyncio.wait_for(self.queue.get(), timeout) if timeout is not None else await self.queue.get()
        except asyncio.TimeoutError:
            return None

    async def run(self) -> None:
        while True:
            first = await self._next(None)
            jobs, later = [first], []
            limit = self.engine.rows_per_call(first.settings)
            deadline = time.perf_counter() + self.max_wait
            while len(jobs) < limit:
                job = await self._next(max(deadline - time.perf_counter(), 0.0))
                if job is None:
                    break
                (jobs if job.settings == first.settings else later).append(job)
            self._held = later + self._held
            try:
                results = await asyncio.to_thread(
                    self.engine.caption, np.stack([j.pixels for j in jobs]), first.settings
                )
            except Exception as err:  # a failed decode fails its requests, not the server
                log.error("decoding failed (%s): %s", type(err).__name__, err)
                failure = ServerError(f"decoding failed ({type(err).__name__}: {_short(err)})")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(failure)
                continue
            self.batches += 1
            self.images += len(jobs)
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)


class ServerError(RuntimeError):
    """The service failed a request it should have served (a 500)."""


class PixelBudget:
    """Pixels of uploads being decoded at once; a request waits for its share."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Condition()

    async def take(self, pixels: int) -> int:
        share = max(1, min(int(pixels), self.total))  # a larger upload (within the model's limit) goes alone
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= share)
            self.free -= share
        return share

    async def give(self, share: int) -> None:
        async with self._changed:
            self.free += share
            self._changed.notify_all()


def _short(err: BaseException, limit: int = 160) -> str:
    """An exception's first line, without the in-memory file objects Pillow names."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", str(err).strip())
    return (text.splitlines() or [type(err).__name__])[0][:limit]


def header_pixels(data: bytes, max_pixels: int) -> int:
    """The pixel count an upload's header announces; 413 over ``max_pixels``, 400 if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise BadRequest(f"the image is over the limit of {max_pixels:,} pixels (a decompression bomb)", 413) from None
    except UnidentifiedImageError:
        raise BadRequest("not a readable image (no image format Pillow reads starts like this upload)") from None
    except Exception as err:  # a header Pillow cannot parse
        raise BadRequest(f"not a readable image ({type(err).__name__}: {_short(err)})") from None
    if width * height > max_pixels:
        raise BadRequest(f"the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}", 413)
    return width * height


def make_app(engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64,
             max_bytes: int = 20 * 2**20, limits: Limits | None = None) -> Any:
    """The aiohttp application; ``limits`` (else the keyword values and the other defaults) bound it."""
    from aiohttp import web

    from .page import PAGE

    limits = (limits or Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue_size,
                               max_bytes=max_bytes)).check()
    batcher = Batcher(engine, max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms, queue_size=limits.queue,
                      max_programs=limits.max_programs, queue_wait_ms=limits.queue_wait_ms)
    budget: dict[str, PixelBudget] = {}  # made in the server's event loop, at start-up

    def error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as err:
            return error(str(err), err.status, err.headers)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            reason = err.text if err.text and not err.text.startswith(str(err.status)) else err.reason
            if err.status == 413:
                reason = f"the upload is over the limit of {limits.max_bytes:,} bytes"
            return error(reason, err.status)
        except ConnectionResetError:  # the client hung up: nobody to answer, nothing to log
            return error("the client hung up", 400)
        except ServerError as err:
            return error(str(err), 500)
        except Exception as err:  # a bug: one log line with its traceback, a JSON 500 for the client
            log.exception("internal error on %s %s", request.method, request.path)
            return error(f"internal error ({type(err).__name__})", 500)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "batches": batcher.batches, "images": batcher.images,
                                  "waiting": batcher.admitted, "image_size": engine.image_size,
                                  "precision": engine.precision, "backbone_precision": engine.backbone_precision,
                                  "max_beams": limits.max_beams, "max_new_tokens": engine.max_new_tokens,
                                  "decode_plan": engine.plan().as_dict()})

    async def read_body(request: web.Request) -> tuple[bytes | None, dict[str, str]]:
        """The upload and the form's fields, within the byte and time limits."""
        if request.content_length is not None and request.content_length > limits.max_bytes:
            raise BadRequest(f"the upload is over the limit of {limits.max_bytes:,} bytes "
                             f"(Content-Length {request.content_length:,})", 413)
        fields: dict[str, str] = {}
        data: bytes | None = None
        try:
            if request.content_type.startswith("multipart/"):
                form = await asyncio.wait_for(request.post(), limits.body_timeout)
                for name, value in form.items():
                    if hasattr(value, "file"):
                        if data is not None:
                            raise BadRequest("one image per request")
                        data = value.file.read()
                    else:
                        fields[name] = str(value)
            else:
                data = await asyncio.wait_for(request.read(), limits.body_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the request body did not arrive within {limits.body_timeout:g} s", 408) from None
        except (BadRequest, web.HTTPException, ConnectionResetError):
            raise
        except Exception as err:  # a multipart body that does not parse
            detail = getattr(err, "message", None) or _short(err)  # aiohttp's parse errors keep theirs here
            raise BadRequest(f"malformed request body ({type(err).__name__}: {str(detail)[:160]})") from None
        return data, fields

    async def caption(request: web.Request) -> web.Response:
        await batcher.admit()  # before reading anything: overload costs a wait or a refusal, not a decode
        try:
            data, form = await read_body(request)
            if not data:
                raise BadRequest("no image: send it as the request body or as a multipart file field")
            settings = Settings.parse({**request.query, **form}, limits.max_beams, engine.max_new_tokens)
            batcher.check_program(settings)
            pixels = header_pixels(data, engine.max_pixels)
            share = await budget["pixels"].take(pixels)
            try:
                image = await asyncio.to_thread(read_image, data, engine.image_size, engine.max_pixels)
            except Exception as err:  # anything Pillow cannot decode (header_pixels refused the size already)  # anything Pillow cannot decode, truncated files included
                raise BadRequest(f"not a readable image ({type(err).__name__}: {_short(err, 120)})") from None
            finally:
                await budget["pixels"].give(share)
            return web.json_response(await batcher.submit(image, settings))
        finally:
            await batcher.leave()

    async def start_worker(app: web.Application) -> None:
        budget["pixels"] = PixelBudget(limits.decode_pixels)
        app["worker"] = asyncio.create_task(batcher.run())

    async def stop_worker(app: web.Application) -> None:
        app["worker"].cancel()

    app = web.Application(middlewares=[json_errors], client_max_size=limits.max_bytes)
    app.router.add_get("/", page)
    app.router.add_get("/health", health)
    app.router.add_post("/caption", caption)
    app.on_startup.append(start_worker)
    app.on_cleanup.append(stop_worker)
    app["batcher"] = batcher
    app["limits"] = limits
    return app


def load_engine(run_dir: str, max_batch: int, precision: str = "float32", backbone_precision: str = "float32") -> Engine:
    from ..captioner import Captioner
    from ..tokenizer import GPT2Tokenizer

    model = Captioner.load(run_dir)
    tokenizer = GPT2Tokenizer.for_run(run_dir, model.decoder.num_special_tokens)
    return Engine(model, tokenizer, max_batch, precision, backbone_precision)
