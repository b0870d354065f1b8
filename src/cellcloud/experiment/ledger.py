"""The chaos experiment's independent oracle: a ledger server outside the region.

``World`` creates a network namespace linked to the host by a veth (``10.X.Y.1`` host side,
``10.X.Y.2`` inside, X/Y random per run) and runs this module's server inside it. Handlers reach
it over their environment's ordinary egress (the helper's NAT and the host's routing, as any
outside server) and POST one record per step of each execution: ``{"id", "seq", "phase"}`` with
phase ``start``, ``ok`` or ``fail``. The experiment reads the records back with GET from the host
side. No region process can write to it except through a function's egress, and the chaos
faulter never touches it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LEDGER_PORT = 8080
#: the ledger keeps at most this many records (the experiment's load stays far below)
LEDGER_RECORDS_MAX = 1_000_000
#: a record's body is at most this many bytes
LEDGER_RECORD_BYTES_MAX = 4096


def serve(port: int) -> None:
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n > LEDGER_RECORD_BYTES_MAX:
                self.send_response(413)
                self.end_headers()
                return
            try:
                rec = json.loads(self.rfile.read(n))
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            with lock:
                full = len(records) >= LEDGER_RECORDS_MAX
                if not full:
                    records.append(rec)
            self.send_response(507 if full else 204)
            self.end_headers()

        def do_GET(self) -> None:
            with lock:
                body = json.dumps(records).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    ThreadingHTTPServer.request_queue_size = 128
    srv = ThreadingHTTPServer(("0.0.0.0", port), H)
    print("ready", flush=True)
    srv.serve_forever()


def _sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


class World:
    """A network namespace outside the region holding the ledger server."""

    def __init__(self, seed: int | None = None) -> None:
        tag = uuid.uuid4().hex[:6]
        self.netns = f"ccl{tag}"
        self.veth = f"ccl{tag}h"
        rng = random.Random(seed) if seed is not None else random.Random()
        x, y = rng.randrange(100, 250), rng.randrange(0, 250)
        self.host_addr = f"10.{x}.{y}.1"
        self.addr = f"10.{x}.{y}.2"
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{LEDGER_PORT}/"

    def start(self) -> None:
        try:
            _sh("ip", "netns", "add", self.netns)
            _sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
                "netns", self.netns)
            _sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.veth)
            _sh("ip", "link", "set", self.veth, "up")
            w = ("ip", "netns", "exec", self.netns)
            _sh(*w, "ip", "link", "set", "lo", "up")
            _sh(*w, "ip", "addr", "add", f"{self.addr}/24", "dev", "eth0")
            _sh(*w, "ip", "link", "set", "eth0", "up")
            _sh(*w, "ip", "route", "add", "default", "via", self.host_addr)
            self.proc = subprocess.Popen(
                [*w, sys.executable, "-m", "cellcloud.experiment.ledger", str(LEDGER_PORT)],
                stdout=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the ledger server did not start")
        except BaseException:
            self.close()
            raise

    def records(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url, timeout=30) as r:
            out: list[dict[str, Any]] = json.loads(r.read())
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        _sh("ip", "link", "del", self.veth, check=False)
        _sh("ip", "netns", "del", self.netns, check=False)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
