"""Load on ``gpt2-effnet serve`` at 127.0.0.1: goodput under overload, and what one large
beam request costs the plain requests beside it. Same model, same images, one run; each
``--tree`` (a source checkout, e.g. this one and the last landed main) serves in turn.

    python bench/bench_serve.py --run demo_run/run --images demo_run/data/images \\
        --tree . --tree /path/to/main --seconds 20

For each tree, one server with the given ``--max-batch`` and otherwise its defaults:

- ``clients_20``: 20 clients, greedy, for T seconds: requests/s answered 200 (goodput),
  p50/p99 latency;
- ``clients_100``: 100 clients, each retrying a request refused with 503 (after its
  ``Retry-After``, else at once; ``--ignore-retry-after``: always at once) until it is
  answered: goodput, and its ratio to ``clients_20``'s (target >= 0.8);
- ``beside_beams``: ``clients_20`` again with one more client sending ``beams=<max>``
  requests one after another: the plain requests' p99, and its ratio to ``clients_20``'s
  (target <= 2).

Local only: the servers listen on 127.0.0.1 and are stopped at the end. Run it from a
folder outside the trees (the bench sets each server's PYTHONPATH to its tree).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, data: bytes) -> tuple[int, float | None]:
    """(status, Retry-After seconds or None); 0 for a failure without an answer."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            ok = "caption" in json.loads(response.read())
            return (200 if ok else 0), None
    except urllib.error.HTTPError as err:
        err.read()
        after = err.headers.get("Retry-After")
        return err.code, (float(after) if after else None)
    except Exception:
        return 0, None


def load(url: str, images: list[bytes], clients: int, seconds: float, retry: bool = False,
         beam_query: str | None = None, honour_retry_after: bool = True) -> dict:
    """``clients`` plain clients (and one beam client if ``beam_query``) for ``seconds``."""
    latencies: list[float] = []
    counts = {"refused": 0, "failed": 0, "beam_done": 0}
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(index: int) -> None:
        n = index
        while time.perf_counter() < stop:
            data = images[n % len(images)]
            n += clients
            start = time.perf_counter()
            while True:  # one request, retried while refused
                status, after = _post(url + "/caption", data)
                if status == 503 and retry and time.perf_counter() < stop:
                    with lock:
                        counts["refused"] += 1
                    if after and honour_retry_after:
                        time.sleep(after)
                    continue
                break
            with lock:
                if status == 200:
                    if time.perf_counter() <= stop:
                        latencies.append(time.perf_counter() - start)
                else:
                    counts["failed"] += 1

    def beam_client() -> None:
        while time.perf_counter() < stop:
            status, _ = _post(url + "/caption?" + beam_query, images[0])
            with lock:
                counts["beam_done"] += status == 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if beam_query:
        threads.append(threading.Thread(target=beam_client))
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    elapsed = min(wall, seconds)
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None  # noqa: E731
    result = {"goodput_per_s": round(len(latencies) / elapsed, 2), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
              "ok": len(latencies), "failed": counts["failed"], "wall_s": round(wall, 1)}
    if retry:
        result["refused_503"] = counts["refused"]
    if beam_query:
        result["beam_requests_done"] = counts["beam_done"]
    return result


def serve_tree(tree: Path, args: argparse.Namespace, images: list[bytes]) -> dict:
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(tree.resolve())}
    log = tempfile.TemporaryFile("w+")  # the server's output, shown if it stops before the bench does
    server = subprocess.Popen([sys.executable, "-m", "gpt2_effnet.cli", "serve", str(Path(args.run).resolve()),
                               "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", "10"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
    url = f"http://127.0.0.1:{port}"
    beam_query = f"beams={args.beams}"
    started = time.perf_counter()
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except Exception:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        # Warm-up: traces the plain and the beam programs once, so no phase pays for it.
        ready = time.perf_counter() - started
        _post(url + "/caption?" + beam_query, images[0])
        load(url, images, 20, 6.0)
        few = load(url, images, 20, args.seconds)
        many = load(url, images, 100, args.seconds, retry=True, honour_retry_after=not args.ignore_retry_after)
        beside = load(url, images, 20, args.seconds, beam_query=beam_query)
    finally:
        exit_code = server.poll()
        server.terminate()
        server.wait(30)
        log.seek(0)
        tail = log.read()[-3000:]
        log.close()
    if exit_code is not None:
        raise RuntimeError(f"the server of {tree} stopped (exit {exit_code}) before the bench ended:\n{tail}")
    return {
        "server_ready_s": round(ready, 1),
        "clients_20": few,
        "clients_100": many,
        "beside_beams": beside,
        "goodput_100_over_20": round(many["goodput_per_s"] / few["goodput_per_s"], 3) if few["goodput_per_s"] else None,
        "p99_beside_beams_over_alone": round(beside["p99_ms"] / few["p99_ms"], 3) if few["p99_ms"] and beside["p99_ms"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="demo_run/run")
    parser.add_argument("--images", default="demo_run/data/images")
    parser.add_argument("--tree", action="append", default=[], help="source checkout to serve from (repeatable)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=8, help="the beam client's beams (the server's --max-beams)")
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="clients_100 retry a refused request at once, whatever Retry-After says")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))[:64]]
    trees = [Path(t) for t in args.tree] or [Path(__file__).resolve().parents[1]]
    results = {str(tree): serve_tree(tree, args, images) for tree in trees}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import cpu_name

    print(json.dumps({"cpu": cpu_name(), "seconds": args.seconds, "max_batch": args.max_batch,
                      "ignore_retry_after": args.ignore_retry_after, **results}, indent=1))
    import headline

    r = results[str(trees[0])]  # headline lines for bench/run_all.py: the first tree
    few, many, beside = r["clients_20"], r["clients_100"], r["beside_beams"]
    headline.emit("20 clients, greedy: goodput", few["goodput_per_s"], "requests/s",
                  f"p50 {few['p50_ms']} ms, p99 {few['p99_ms']} ms")
    headline.emit("100 clients retrying on 503: goodput over the 20 clients'", r["goodput_100_over_20"], "x",
                  f"{many['goodput_per_s']} requests/s (target >= 0.8)")
    headline.emit(f"plain requests' p99 beside a beams={args.beams} client over their p99 alone", r["p99_beside_beams_over_alone"],
                  "x", f"p99 {beside['p99_ms']} vs {few['p99_ms']} ms (target <= 2)")


if __name__ == "__main__":
    main()
