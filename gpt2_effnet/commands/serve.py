"""``gpt2-effnet serve``: an HTTP captioning service with a page, for a trained run.

    gpt2-effnet serve runs/coco --port 8000      # then open http://127.0.0.1:8000/

See :mod:`gpt2_effnet.serving.server` for the API and the batching.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..decoding.precision import BACKBONE_PRECISIONS, PRECISIONS
from . import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_DIR", help="a trained run folder (config.yaml + captioner.weights.h5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8,
                        help="rows of one decode call: requests decoded together, a beam request's beams "
                             "counting as rows (default 8)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for others (default 10 ms, at most 10000)")
    parser.add_argument("--queue", type=int, default=64,
                        help="requests served at once (uploading, waiting or decoding); more get 503 before their "
                             "upload is read (default 64)")
    parser.add_argument("--queue-wait-ms", type=float, default=1000.0,
                        help="how long a request over --queue waits for a place before its 503 (default 1000 ms)")
    parser.add_argument("--max-bytes", type=int, default=20 * 2**20,
                        help="largest upload in bytes; a larger Content-Length is refused at once (default 20 MiB)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request body may take to arrive; then 408 (default 30)")
    parser.add_argument("--max-beams", type=int, default=8, help="largest beams a request may ask for (default 8)")
    parser.add_argument("--decode-pixels", type=int, default=100_000_000,
                        help="pixels of uploads decoded at one time (default 100,000,000); "
                             "the model's train.max_image_pixels bounds each one")
    parser.add_argument("--max-programs", type=int, default=16,
                        help="decode programs the service compiles (each new shape of settings is one; "
                             "then such requests are refused; default 16)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="opt-in bfloat16 decoding for every request, as `caption --precision` "
                             "(README, BENCHMARKS.md); /health reports it")
    parser.add_argument("--backbone-precision", default="float32", choices=BACKBONE_PRECISIONS,
                        help="opt-in bfloat16 image backbone for every request, as `caption --backbone-precision`; "
                             "/health reports it")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a busy port fails in the first second."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=512)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: {err.strerror}") from None
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def main(args: argparse.Namespace) -> int:
    from ..captioner import CONFIG_FILE, WEIGHTS_FILE
    from ..serving.server import Limits

    def fail(message: str) -> int:
        print(f"gpt2-effnet serve: {message}", file=sys.stderr)
        return 2

    run = Path(args.checkpoint)
    if not (run / CONFIG_FILE).is_file() or not (run / WEIGHTS_FILE).is_file():
        return fail(f"{run}: not a trained run folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        limits = Limits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue=args.queue,
                        queue_wait_ms=args.queue_wait_ms,
                        max_bytes=args.max_bytes, max_beams=args.max_beams, body_timeout=args.body_timeout,
                        decode_pixels=args.decode_pixels, max_programs=args.max_programs).check()
        listener = _listen(args.host, args.port)
    except ValueError as err:
        return fail(str(err))
    from aiohttp import web

    from ..serving.server import load_engine, make_app

    try:
        engine = load_engine(str(run), args.max_batch, args.precision, args.backbone_precision)
    except (OSError, ValueError) as err:  # a broken config, weights file or vocabulary in the run
        listener.close()
        first = first_line(err)
        return fail(f"cannot load {run}: {first}")
    app = make_app(engine, limits=limits)
    host, port = listener.getsockname()[:2]
    print(f"serving {run} on http://{host}:{port}/ (max batch {args.max_batch}, {args.precision}, "
          f"backbone {args.backbone_precision})",
          file=sys.stderr)
    try:
        web.run_app(app, sock=listener, print=None)
    finally:
        listener.close()
    return 0
