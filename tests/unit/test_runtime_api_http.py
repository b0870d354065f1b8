"""The Runtime API's HTTP binding, as a runtime process sees it."""

from __future__ import annotations

import base64
import http.client
import json
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


def _streamed_post(port: int, request_id: str, chunks: list[bytes],
                   trailers: dict[str, str] | None = None) -> tuple[int, bytes, socket.socket]:
    """A runtime's streamed response, as Lambda's runtimes send it: chunked, with the
    streaming mode header and (on a failure midway) the error trailers."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall((f"POST /2018-06-01/runtime/invocation/{request_id}/response HTTP/1.1\r\n"
               "Host: 127.0.0.1\r\nLambda-Runtime-Function-Response-Mode: streaming\r\n"
               "Transfer-Encoding: chunked\r\nTrailer: Lambda-Runtime-Function-Error-Type, "
               "Lambda-Runtime-Function-Error-Body\r\n\r\n").encode())
    for c in chunks:
        s.sendall(b"%x\r\n%s\r\n" % (len(c), c))
    s.sendall(b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in (trailers or {}).items())
              + b"\r\n")
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, f.read(length), s


def _invoke(api: RuntimeApi, port: int, request_id: str) -> threading.Thread:
    def poll() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/2018-06-01/runtime/invocation/next")
        conn.getresponse().read()
        conn.close()
    t = threading.Thread(target=poll)
    t.start()
    assert api.wait_ready(60)
    api.submit(Invocation(request_id, b"{}", int(time.time() * 1000) + 60_000, "arn"))
    t.join(60)
    return t


def test_a_streamed_response_is_read_whole() -> None:
    """A runtime that streams (chunked, ``Lambda-Runtime-Function-Response-Mode: streaming``)
    was answered an empty response: the body was read by Content-Length, absent, so 0 bytes."""
    api = RuntimeApi(1 << 20)
    server = serve_http(api, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        _invoke(api, port, "r-1")
        status, _, s = _streamed_post(port, "r-1", [b"first ", b"second ", b"x" * 70_000])
        s.close()
        assert status == 202
        out = api.wait_outcome()
        assert out.ok and out.payload == b"first second " + b"x" * 70_000
        # a failure midway: the trailers carry the error
        _invoke(api, port, "r-2")
        err = base64.b64encode(json.dumps({"errorType": "Boom", "errorMessage": "midway"})
                               .encode()).decode()
        status, _, s = _streamed_post(port, "r-2", [b"partial"], {
            "Lambda-Runtime-Function-Error-Type": "Boom",
            "Lambda-Runtime-Function-Error-Body": err})
        s.close()
        assert status == 202
        out = api.wait_outcome()
        assert not out.ok and json.loads(out.payload)["errorMessage"] == "midway"
    finally:
        server.shutdown()
        server.server_close()


def test_a_streamed_response_over_its_limit_fails_the_invocation() -> None:
    api = RuntimeApi(1 << 20, response_stream_bytes_max=100_000)
    got: list[bytes] = []
    api.chunk_sink = lambda rid, data, ctype: got.append(data)
    server = serve_http(api, "127.0.0.1", 0)
    port = server.server_address[1]
    try:
        _invoke(api, port, "r-1")
        status, _, s = _streamed_post(port, "r-1", [b"x" * 60_000, b"y" * 60_000])
        s.close()
        assert status == 413
        out = api.wait_outcome()
        assert not out.ok and json.loads(out.payload)["errorType"] == (
            "Function.ResponseSizeTooLarge")
        assert got == [b"x" * 60_000]  # the first piece went on its way as it came
    finally:
        server.shutdown()
        server.server_close()
