"""The Runtime API's HTTP binding, as a runtime process sees it."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any

import pytest

from cellcloud.sandbox import runtime_api
from cellcloud.sandbox.runtime_api import Invocation, RuntimeApi, serve_http


def test_replies_go_out_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply is written as headers then body; with Nagle's algorithm on, the body waited for
    the runtime's delayed ACK (~40 ms, twice per warm invoke over a kept-alive connection)."""
    seen: list[int] = []
    setup = runtime_api._Handler.setup

    def recording_setup(self: Any) -> None:
        setup(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(runtime_api._Handler, "setup", recording_setup)
    api = RuntimeApi(1 << 20)
    server = serve_http(api, "127.0.0.1", 0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        got: dict[str, Any] = {}

        def poll() -> None:
            conn.request("GET", "/2018-06-01/runtime/invocation/next")
            resp = conn.getresponse()
            got["id"] = resp.headers["Lambda-Runtime-Aws-Request-Id"]
            got["body"] = resp.read()

        t = threading.Thread(target=poll)
        t.start()
        assert api.wait_ready(60)
        api.submit(Invocation("r-1", b'{"x": 1}', int(time.time() * 1000) + 60_000, "arn"))
        t.join(60)
        assert got == {"id": "r-1", "body": b'{"x": 1}'}
        assert seen and all(v != 0 for v in seen)
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
