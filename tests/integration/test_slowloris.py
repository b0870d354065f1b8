"""5,000 stalled connections and a trickling body do not stop a good client (issue #11).

The region is started with a soft fd limit of 4,096 (its hard limit unchanged), as a default
shell gives it: a router that kept the soft limit would run out of fds under 5,000 stalled
connections and fail every normal invoke; one that raises it and closes stalled connections on
their deadlines serves on. The test process raises its own limit to hold the sockets.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import make_zip

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

STALLED = 5_000
WAIT_S = 120.0
SUM = 'def handler(event, context):\n    return {"sum": event["a"] + event["b"]}\n'


@contextlib.contextmanager
def nofile_soft(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def small_fd_region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < STALLED + 2_000:
        pytest.skip(f"the hard fd limit ({hard}) is too low for {STALLED} connections")
    with nofile_soft(4_096):  # inherited by the region's processes
        ctx = running_region(tmp_path_factory, "slowloris", "--agents-per-cell", "2")
        region = ctx.__enter__()
    try:
        yield region
    finally:
        ctx.__exit__(None, None, None)


def test_stalled_connections_do_not_fail_normal_invokes(small_fd_region: Region) -> None:
    region = small_fd_region
    name = f"sl-{uuid.uuid4().hex[:8]}"
    region.client.create_function(name, make_zip({"app.py": SUM}), "app.handler")
    assert region.client.invoke(name, {"a": 1, "b": 2}).json() == {"sum": 3}
    host, port = region.endpoint.removeprefix("http://").split(":")
    addr = (host, int(port))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failures: list[str] = []
    done = threading.Event()
    invokes = 0

    def invoke_loop() -> None:
        nonlocal invokes
        while not done.is_set():
            try:
                got = region.client.invoke(name, {"a": invokes, "b": 1}).json()
                if got != {"sum": invokes + 1}:
                    failures.append(repr(got))
            except Exception as e:  # every failure counts, whatever it is
                failures.append(f"{type(e).__name__}: {e}")
            finally:
                region.client.close()  # a new connection each time: accept() must keep up
            invokes += 1

    with nofile_soft(hard):
        stalled: list[socket.socket] = []
        trickle = socket.create_connection(addr, timeout=WAIT_S)
        try:
            worker = threading.Thread(target=invoke_loop)
            worker.start()
            # A body trickling a byte at a time, under a signed-looking head.
            trickle.sendall(b"POST /2015-03-31/functions/x/invocations HTTP/1.1\r\nhost: x\r\n"
                            b"authorization: AWS4-HMAC-SHA256 Credential=" +
                            region.client.access_key_id.encode() +
                            b"/20260101/cc-local-1/lambda/aws4_request, SignedHeaders=host, "
                            b"Signature=" + b"0" * 64 + b"\r\ncontent-length: 100000\r\n\r\n")
            for i in range(STALLED):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(addr)
                stalled.append(s)
                if i % 3 == 1:
                    with contextlib.suppress(OSError):
                        s.send(b"POST /2015-03-31/functions/x/invocations HTTP/1.1\r\nHost: x\r\n")
            # Keep invoking while the stalled connections are held, until the router has
            # closed every one of them (their deadline) and the trickle (its body's).
            deadline = time.monotonic() + WAIT_S
            open_ = set(range(len(stalled)))
            trickle.setblocking(False)
            trickle_closed = False
            while (open_ or not trickle_closed) and time.monotonic() < deadline:
                if not trickle_closed:
                    try:
                        trickle.send(b" ")
                        trickle_closed = trickle.recv(65536) == b""
                    except BlockingIOError:
                        pass
                    except OSError:
                        trickle_closed = True
                for i in list(open_):
                    try:
                        if stalled[i].recv(65536) == b"":
                            open_.discard(i)
                    except BlockingIOError:
                        pass
                    except OSError:
                        open_.discard(i)
                time.sleep(1.0)  # the trickle's rate: a byte a second
            done.set()
            worker.join(WAIT_S)
        finally:
            done.set()
            for s in stalled:
                s.close()
            trickle.close()
    assert not failures, f"{len(failures)} of {invokes} normal invokes failed: {failures[:5]}"
    assert invokes > 0
    assert not open_, f"{len(open_)} stalled connections still open after {WAIT_S} s"
    assert trickle_closed, "the trickling body was never closed"
