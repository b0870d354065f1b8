"""The cell's queue API (queues/api.py) served over HTTP in this process, so boto3 talks to it
as to SQS: one event loop thread runs every request (as the cell frontend does); the router's
SigV4 check is not in this path (tests/compat covers the region end to end)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from cellcloud.queues.api import QueueApi
from cellcloud.queues.store import QueueStore

ACCOUNT = "123456789012"
REGION = "cc-local-1"


@dataclass
class Server:
    endpoint: str
    api: QueueApi
    loop: asyncio.AbstractEventLoop

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        fut = asyncio.run_coroutine_threadsafe(self.api.handle(req), self.loop)
        return fut.result(timeout=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    api = QueueApi(QueueStore(str(tmp_path / "state")), REGION)
    holder: dict[str, Server] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            target = self.headers.get("x-amz-target") or ""
            req: dict[str, Any] = {"target": target, "b": body, "a": ACCOUNT,
                                   "host": self.headers.get("host") or ""}
            if not target:  # the router's rule: no target, so the query protocol
                path, _, qs = self.path.partition("?")
                req.update(proto="query", p=path, q=qs)
            resp = holder["s"].call(req)
            self.send_response(resp["s"])
            for k, v in resp["h"].items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(resp["b"])))
            self.end_headers()
            self.wfile.write(resp["b"])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["s"] = Server(f"http://127.0.0.1:{httpd.server_address[1]}", api, loop)
    ht = threading.Thread(target=httpd.serve_forever, daemon=True)
    ht.start()
    try:
        yield holder["s"]
    finally:
        httpd.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def client(server: Server) -> Any:
    return boto3.client("sqs", endpoint_url=server.endpoint, region_name=REGION,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                        config=Config(retries={"mode": "standard", "total_max_attempts": 1}))


@pytest.fixture
def sqs(server: Server) -> Any:
    return client(server)


@pytest.fixture
def raw_sqs(server: Server) -> Any:
    """A client that sends what it is given (no client-side validation): the server judges."""
    return boto3.client("sqs", endpoint_url=server.endpoint, region_name=REGION,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                        config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                                      parameter_validation=False))
