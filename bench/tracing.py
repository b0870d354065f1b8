"""What tracing costs an invoke: the same sequential invokes against two regions of this tree,
one without an OTLP endpoint (trace ids only) and one exporting every span to a local sink
that reads and drops them; optionally a third region from another source tree (``--baseline
SRC``, e.g. the main checkout's ``src``: before tracing). Batches alternate between the regions
so that a machine's load drifts over all of them alike.

Run from the repository root:  python -m bench.tracing [--invokes 600] [--baseline /path/src]
Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cellcloud import sdk

HANDLER = "def handler(event, context):\n    return event\n"


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _up(state_dir: str, pythonpath: str, *extra: str) -> sdk.Client:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state_dir, *extra], check=True, env=env, timeout=180,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(state_dir, "region.json")) as f:
        doc = json.load(f)
    return sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60)


def _down(state_dir: str, pythonpath: str) -> None:
    subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", state_dir],
                   env={**os.environ, "PYTHONPATH": pythonpath}, timeout=120,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    ap.add_argument("--invokes", type=int, default=600, help="per region, after warm-up")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--baseline", default=None, help="another tree's src/ (before tracing)")
    ap.add_argument("--no-otlp", action="store_true", help="leave out the exporting region")
    args = ap.parse_args()
    here = os.path.abspath("src")
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sink.server_address[1]}"
    subjects: dict[str, tuple[str, tuple[str, ...]]] = {"off": (here, ())}
    if not args.no_otlp:
        subjects["otlp"] = (here, ("--otlp-endpoint", url))
    if args.baseline:
        subjects["baseline"] = (os.path.abspath(args.baseline), ())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", HANDLER)
    root = tempfile.mkdtemp(prefix="cellcloud-bench-tracing-")
    clients: dict[str, sdk.Client] = {}
    try:
        for name, (src, extra) in subjects.items():
            clients[name] = _up(os.path.join(root, name), src, *extra)
            clients[name].create_function("echo", buf.getvalue(), "app.handler")
            for _ in range(50):  # warm-up (and the router's lease)
                clients[name].invoke("echo", {"a": 1})
        lat: dict[str, list[float]] = {n: [] for n in subjects}
        order = list(clients.items())
        for _ in range(0, args.invokes, args.batch):
            order.reverse()  # neither goes first every time
            for name, c in order:
                for _ in range(args.batch):
                    t0 = time.perf_counter()
                    c.invoke("echo", {"a": 1})
                    lat[name].append((time.perf_counter() - t0) * 1000)
        load = os.getloadavg()
        for name, xs in lat.items():
            xs.sort()
            print(f"{name:9s} n={len(xs)} p50={statistics.median(xs):.3f} ms "
                  f"p99={xs[int(len(xs) * 0.99) - 1]:.3f} ms")
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        for c in clients.values():
            c.close()
        for name, (src, _) in subjects.items():
            _down(os.path.join(root, name), src)
        sink.shutdown()


if __name__ == "__main__":
    main()
