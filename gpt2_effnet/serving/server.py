"""``gpt2-effnet serve``: captions over HTTP, with concurrent requests batched into one decode.

aiohttp serves three routes: ``GET /`` (the page, :mod:`.page`), ``GET /health`` and
``POST /caption`` (the image as a multipart file field or as the raw request body;
decoding settings as query or form fields: ``beams``, ``top_p``, ``top_k``,
``temperature``, ``max_new_tokens``, ``seed``, ``attention``). Requests wait in a
bounded queue; a single worker takes up to ``max_batch`` of them with the same settings
(waiting at most ``max_wait_ms`` for more) and captions them in one call of the compiled
decode loop, in a thread so the server keeps accepting. Every bad input is a 4xx JSON
``{"error": ...}`` naming the problem; the request never names a file, so nothing on disk
but the model is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..image_input import ImageTooLarge, read_image

SETTINGS = ("beams", "top_p", "top_k", "temperature", "max_new_tokens", "seed", "attention")


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
    def parse(cls, fields: dict[str, str]) -> "Settings":
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
                raise BadRequest(f"{name}: expected a number, got {text!r}") from None
        settings = cls(**values)
        settings.generation()  # checks ranges now (beams 0, top_p 1.5, ...)
        return settings

    def generation(self) -> dict[str, Any]:
        """``generate()`` keywords, checked by GenerationConfig; raises BadRequest naming the field."""
        from ..decoding import check_generation, decoding_kwargs

        if self.beams > 1 and any(v is not None for v in (self.top_p, self.top_k, self.temperature)):
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
        self.max_new_tokens = config.model.max_caption_length

    def plan(self, settings: Settings | None = None) -> Any:
        """The decode plan a batch with these settings runs (default: a plain request's)."""
        from ..decoding import plan_for

        return plan_for(self.model, self.max_batch, eos_token_id=self.tokenizer.eos_token_id, precision=self.precision,
                        backbone_precision=self.backbone_precision, **(settings or Settings()).generation())

    def caption(self, pixels: np.ndarray, settings: Settings) -> list[dict[str, Any]]:
        from ..attention import attention_for_captions
        from ..decoding import cut_at_eos, generate_captions

        count = len(pixels)
        if count < self.max_batch:  # always the same batch size: one compiled program per setting's shape
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], self.max_batch - count, axis=0)])
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
    """A bounded queue and one worker that decodes up to ``max_batch`` same-setting jobs at once."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self.batches = 0
        self.images = 0
        self._held: list[_Job] = []

    async def submit(self, pixels: np.ndarray, settings: Settings) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(pixels, settings, future))
        except asyncio.QueueFull:
            raise BadRequest(f"busy: {self.queue.maxsize} requests are waiting; retry shortly", 503) from None
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
            deadline = time.perf_counter() + self.max_wait
            while len(jobs) < self.max_batch:
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
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self.batches += 1
            self.images += len(jobs)
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)


def make_app(engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 64,
             max_bytes: int = 20 * 2**20) -> Any:
    from aiohttp import web

    from .page import PAGE

    batcher = Batcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as err:
            return web.json_response({"error": str(err)}, status=err.status)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            reason = err.text if err.text and not err.text.startswith(str(err.status)) else err.reason
            if err.status == 413:
                reason = f"the upload is over the limit of {max_bytes:,} bytes"
            return web.json_response({"error": reason}, status=err.status)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "batches": batcher.batches, "images": batcher.images,
                                  "waiting": batcher.queue.qsize(), "image_size": engine.image_size,
                                  "precision": engine.precision, "backbone_precision": engine.backbone_precision,
                                  "decode_plan": engine.plan().as_dict()})

    async def caption(request: web.Request) -> web.Response:
        fields = dict(request.query)
        data: bytes | None = None
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            for name, value in form.items():
                if hasattr(value, "file"):
                    if data is not None:
                        raise BadRequest("one image per request")
                    data = value.file.read()
                else:
                    fields[name] = str(value)
        else:
            data = await request.read()
        if not data:
            raise BadRequest("no image: send it as the request body or as a multipart file field")
        settings = Settings.parse(fields)
        try:
            pixels = await asyncio.to_thread(read_image, data, engine.image_size, engine.max_pixels)
        except ImageTooLarge as err:
            raise BadRequest(str(err), 413) from None
        except Exception as err:  # anything Pillow cannot decode, truncated files included
            raise BadRequest(f"not a readable image ({type(err).__name__}: {str(err)[:120]})") from None
        return web.json_response(await batcher.submit(pixels, settings))

    async def start_worker(app: web.Application) -> None:
        app["worker"] = asyncio.create_task(batcher.run())

    async def stop_worker(app: web.Application) -> None:
        app["worker"].cancel()

    app = web.Application(middlewares=[json_errors], client_max_size=max_bytes)
    app.router.add_get("/", page)
    app.router.add_get("/health", health)
    app.router.add_post("/caption", caption)
    app.on_startup.append(start_worker)
    app.on_cleanup.append(stop_worker)
    app["batcher"] = batcher
    return app


def load_engine(run_dir: str, max_batch: int, precision: str = "float32", backbone_precision: str = "float32") -> Engine:
    from ..captioner import Captioner
    from ..tokenizer import GPT2Tokenizer

    model = Captioner.load(run_dir)
    tokenizer = GPT2Tokenizer.for_run(run_dir, model.decoder.num_special_tokens)
    return Engine(model, tokenizer, max_batch, precision, backbone_precision)
