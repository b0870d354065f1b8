"""The public endpoint's connection handling (issue #11), against a real router process.

The router runs on its own here (no cells: every request below is answered before a cell is
asked), with short deadlines so that closing is quick; the tests wait on conditions with
generous bounds, never on fixed sleeps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cellcloud.region.tenants import ensure_operator_token, ensure_tenants, operator_token_path
from cellcloud.sdk import Client

pytestmark = pytest.mark.integration

WAIT_S = 60.0


@dataclass
class Router:
    proc: subprocess.Popen[str]
    host: str
    port: int
    access_key_id: str
    secret_access_key: str
    operator_token: str

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=WAIT_S)
        return s

    def client(self) -> Client:
        return Client(f"http://{self.host}:{self.port}",
                      (self.access_key_id, self.secret_access_key), timeout_s=WAIT_S)


def start_router(state_dir: str, *extra: str) -> Router:
    tenants = ensure_tenants(state_dir)["tenants"][0]
    token = ensure_operator_token(state_dir)
    cell_map = os.path.join(state_dir, "cellmap.json")
    with open(cell_map, "w") as f:
        # A cell nobody listens on: nothing below reaches it.
        json.dump({"version": 1, "cells": {"cell-1": ["127.0.0.1", 9]}, "assignments": {},
                   "overrides": {}}, f)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellcloud.router.server", "--insecure", "--listen",
         "127.0.0.1:0", "--cell-map", cell_map, "--tenants",
         os.path.join(state_dir, "tenants.json"), "--operator-token-file",
         operator_token_path(state_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return Router(proc, info["host"], info["port"], tenants["access_key_id"],
                  tenants["secret_access_key"], token)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    r = start_router(str(tmp_path_factory.mktemp("router")), "--header-timeout-ms", "1000",
                     "--body-timeout-ms", "1000", "--keepalive-idle-timeout-ms", "1000",
                     "--sweep-interval-ms", "100")
    try:
        yield r
    finally:
        r.proc.terminate()
        r.proc.wait(30)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (content-length framed) from ``s``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def wait_closed(s: socket.socket, timeout_s: float = WAIT_S) -> bool:
    """Whether the server closes ``s`` within the bound (reading whatever it still sends)."""
    s.settimeout(timeout_s)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def signed_headers(r: Router, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    from cellcloud.security import sigv4

    return sigv4.sign(method, f"http://{r.host}:{r.port}{path}", {}, body,
                      access_key_id=r.access_key_id, secret_access_key=r.secret_access_key,
                      region="cc-local-1")


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- 1. deadlines ----------------------------------------------------------------------------
def test_silent_partial_head_and_stalled_body_are_closed(router: Router) -> None:
    silent = router.connect()
    partial = router.connect()
    partial.sendall(b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nHost: x\r\n")
    stalled = router.connect()
    h = signed_headers(router, "POST", "/2015-03-31/functions/f/invocations", b"{}")
    stalled.sendall(request_head("POST", "/2015-03-31/functions/f/invocations",
                                 {**h, "content-length": "1000"}) + b"{")
    for s in (silent, partial, stalled):
        assert wait_closed(s), "the router held a stalled connection"
        s.close()


def test_trickled_body_is_closed(router: Router) -> None:
    s = router.connect()
    h = signed_headers(router, "POST", "/2015-03-31/functions/f/invocations", b"{}")
    s.sendall(request_head("POST", "/2015-03-31/functions/f/invocations",
                           {**h, "content-length": "100000"}))
    deadline = time.monotonic() + WAIT_S
    closed = False
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            s.sendall(b" ")  # well under the minimum rate
            if s.recv(65536) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
    s.close()
    assert closed, "a body trickling a byte at a time was held"


def test_idle_keepalive_is_closed_and_active_one_is_not(router: Router) -> None:
    s = router.connect()
    s.sendall(request_head("GET", "/2015-03-31/functions/", {"host": "x"}))
    status, headers, _ = read_response(s)
    assert status == 403 and headers.get("connection") != "close"
    assert wait_closed(s)
    s.close()


# -- 2. refused before the body --------------------------------------------------------------
@pytest.mark.parametrize("path", ["/2015-03-31/functions/f/invocations", "/2015-03-31/functions"])
def test_unsigned_huge_body_is_refused_before_it_is_sent(router: Router, path: str) -> None:
    s = router.connect()
    s.sendall(request_head("POST", path, {"host": "x", "content-length": str(60 << 20)}))
    status, headers, body = read_response(s)  # no byte of the body was sent
    assert (status, headers["x-amzn-errortype"]) == (403, "MissingAuthenticationTokenException")
    assert json.loads(body)["message"] == "Missing Authentication Token"
    assert headers["connection"] == "close"
    assert wait_closed(s)
    s.close()


def test_declared_length_over_the_limit_is_refused_before_the_body(router: Router) -> None:
    for path, size in [("/2015-03-31/functions/f/invocations", 6 * 2**20 + 1),
                       ("/2015-03-31/functions", 200 << 20)]:
        s = router.connect()
        h = signed_headers(router, "POST", path)  # the signature would not match: no matter
        s.sendall(request_head("POST", path, {**h, "content-length": str(size)}))
        status, headers, _ = read_response(s)
        assert (status, headers["x-amzn-errortype"]) == (413, "RequestEntityTooLargeException")
        # A rest of up to 8 MiB is read and dropped (the client can read the answer while it
        # sends); more is cut off. Either way the router holds none of it.
        assert (headers.get("connection") == "close") == (size > 8 * 2**20)
        s.close()


def test_chunked_body_over_the_limit_is_cut_off(router: Router) -> None:
    path = "/2015-03-31/functions/f/invocations"
    s = router.connect()
    h = signed_headers(router, "POST", path)
    s.sendall(request_head("POST", path, {**h, "transfer-encoding": "chunked"}))
    chunk = b"x" * 65536
    sent, status = 0, None
    try:
        while sent < 8 * 2**20:
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        status, headers, _ = read_response(s)
        assert headers["x-amzn-errortype"] == "RequestEntityTooLargeException"
    except (ConnectionError, OSError):
        status = 413  # closed while we were still sending: also never read past the cap
    assert status == 413
    s.close()


# -- 3. head limits --------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    b"GET /2015-03-31/functions/ HTTP/1.1\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /2015-03-31/functions/ HTTP/1.1\r\n" + b"".join(
        b"x-h%d: v\r\n" % i for i in range(101)) + b"\r\n",
    b"GET /2015-03-31/functions/ HTTP/1.1\r\n" + b"".join(
        b"x-h%d: %s\r\n" % (i, b"v" * 8000) for i in range(9)) + b"\r\n",
    b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\n\r\n",
])
def test_oversized_head_gets_431(router: Router, head: bytes) -> None:
    s = router.connect()
    try:
        s.sendall(head)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, headers, body = read_response(s)
    assert status == 431
    assert headers["x-amzn-errortype"] == "RequestHeaderFieldsTooLargeException"
    assert json.loads(body)["message"]
    assert wait_closed(s)
    s.close()


def test_huge_header_does_not_block_the_router(router: Router) -> None:
    s = router.connect()
    try:
        for _ in range(2048):  # up to 128 MiB, as in the issue; refused after 64 KiB
            s.sendall(b"GET / HTTP/1.1\r\nx: " if _ == 0 else b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.close()
    assert router.client().request("GET", "/2015-03-31/functions/", sign=False)[0] == 403


# -- 4. parser errors ------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_request_gets_aws_shaped_400(router: Router, raw: bytes) -> None:
    s = router.connect()
    s.sendall(raw)
    status, headers, body = read_response(s)
    assert (status, headers["x-amzn-errortype"]) == (400, "InvalidRequestContentException")
    assert headers["content-type"] == "application/json" and json.loads(body)["message"]
    assert wait_closed(s)
    s.close()


# -- the connection cap and the fd limit -----------------------------------------------------
def test_cap_closes_the_oldest_stalled_connection_not_the_new_one(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    r = start_router(str(tmp_path_factory.mktemp("capped")), "--connections-max", "50",
                     "--sweep-interval-ms", "100")
    try:
        stalled = [r.connect() for _ in range(50)]
        for s in stalled:
            s.sendall(b"GET / HTTP/1.1\r\n")  # a head that never ends
        # A good client still gets in, every time, and the oldest stalled ones make room.
        c = r.client()
        for _ in range(20):
            status, headers, _ = c.request("GET", "/2015-03-31/functions/", sign=False)
            assert status == 403
            c.close()
        assert wait_closed(stalled[0])
        with open(f"/proc/{r.proc.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert soft == hard  # the router raised its soft fd limit to the hard one
        for s in stalled:
            s.close()
    finally:
        r.proc.terminate()
        r.proc.wait(30)


def test_operator_token_on_the_router(router: Router) -> None:
    c = router.client()
    for token in ("wrong", ""):
        status, headers, _ = c.request("GET", "/cellcloud/v1/status", sign=False,
                                       headers={"authorization": f"Bearer {token}"})
        assert status == 403, headers
    status, headers, _ = c.request("GET", "/cellcloud/v1/status", sign=False)
    assert (status, headers["x-amzn-errortype"]) == (403, "MissingAuthenticationTokenException")
    # The token opens the status paths only.
    status, _, _ = c.request("GET", "/2015-03-31/functions/", sign=False,
                             headers={"authorization": f"Bearer {router.operator_token}"})
    assert status == 403
    status, _, body = c.request("GET", "/cellcloud/v1/status", sign=False,
                                headers={"authorization": f"Bearer {router.operator_token}"})
    assert status == 200 and "connections" in json.loads(body)["router"]
