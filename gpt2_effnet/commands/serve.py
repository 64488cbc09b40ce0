"""``gpt2-effnet serve``: an HTTP captioning service with a page, for a trained run.

    gpt2-effnet serve runs/coco --port 8000      # then open http://127.0.0.1:8000/

See :mod:`gpt2_effnet.serving.server` for the API and the batching.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..decoding.precision import BACKBONE_PRECISIONS, PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_DIR", help="a trained run folder (config.yaml + captioner.weights.h5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for others (default 10 ms)")
    parser.add_argument("--queue", type=int, default=64, help="requests allowed to wait; more get 503 (default 64)")
    parser.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest upload in bytes (default 20 MiB)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="opt-in bfloat16 decoding for every request, as `caption --precision` "
                             "(README, BENCHMARKS.md); /health reports it")
    parser.add_argument("--backbone-precision", default="float32", choices=BACKBONE_PRECISIONS,
                        help="opt-in bfloat16 image backbone for every request, as `caption --backbone-precision`; "
                             "/health reports it")


def main(args: argparse.Namespace) -> int:
    from ..captioner import CONFIG_FILE, WEIGHTS_FILE

    run = Path(args.checkpoint)
    if not (run / CONFIG_FILE).is_file() or not (run / WEIGHTS_FILE).is_file():
        print(f"gpt2-effnet serve: {run}: not a trained run folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})", file=sys.stderr)
        return 2
    for name in ("max_batch", "queue", "max_bytes"):
        if getattr(args, name) < 1:
            print(f"gpt2-effnet serve: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from aiohttp import web

    from ..serving.server import load_engine, make_app

    engine = load_engine(str(run), args.max_batch, args.precision, args.backbone_precision)
    app = make_app(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue,
                   max_bytes=args.max_bytes)
    print(f"serving {run} on http://{args.host}:{args.port}/ (max batch {args.max_batch}, {args.precision}, "
          f"backbone {args.backbone_precision})",
          file=sys.stderr)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
