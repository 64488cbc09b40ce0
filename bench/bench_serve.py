"""Load on ``gpt2-effnet serve`` at 127.0.0.1: N concurrent clients for T seconds, batched vs
a batch limit of 1, same model, same images, one run.

    python bench/bench_serve.py --run demo_run/run --images demo_run/data/images --clients 16 --seconds 20

Prints requests/s, p50/p99 latency and failures for each server setting. Local only: the
server listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(index: int) -> None:
        nonlocal failures
        n = index
        while time.perf_counter() < stop:
            data = images[n % len(images)]
            n += clients
            start = time.perf_counter()
            try:
                request = urllib.request.Request(url + "/caption", data=data,
                                                 headers={"Content-Type": "application/octet-stream"})
                with urllib.request.urlopen(request, timeout=120) as response:
                    ok = response.status == 200 and "caption" in json.loads(response.read())
            except Exception:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None  # noqa: E731
    return {"requests_per_s": round(len(latencies) / elapsed, 2), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "ok": len(latencies), "failed": failures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="demo_run/run")
    parser.add_argument("--images", default="demo_run/data/images")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))[:64]]
    results = {}
    for batch in (args.max_batch, 1):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "gpt2_effnet.cli", "serve", args.run, "--port", str(port),
                                   "--max-batch", str(batch), "--max-wait-ms", "10", "--queue", str(4 * args.clients)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except Exception:
                    time.sleep(0.5)
            load(url, images, args.clients, 8.0)  # warm-up: traces the batch size once
            results[f"max_batch {batch}"] = load(url, images, args.clients, args.seconds)
        finally:
            server.terminate()
            server.wait(30)
    from bench_train import cpu_name  # this folder is on sys.path when run as a script

    print(json.dumps({"cpu": cpu_name(), "clients": args.clients, "seconds": args.seconds, **results}, indent=1))


if __name__ == "__main__":
    main()
