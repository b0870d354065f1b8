"""The router's HTTP connections: uvicorn's httptools protocol with deadlines, a cap and bounds
on the request head. The decisions are :mod:`cellcloud.core.connguard`'s; this is the shell.

uvicorn's ``HttpToolsProtocol`` holds a connection for as long as the client likes while it
sends nothing, part of a head or part of a body, and httptools joins an unbounded head. Here:

- every connection is registered with a :class:`ConnectionGuard` under a small integer id; one
  periodic sweep (``sweep_interval_ms``, a single ``call_later`` chain for all connections)
  aborts those past their phase's deadline, and a new connection over ``connections_max``
  aborts the oldest idle (else longest-stalled) one;
- each request head is counted by a :class:`HeaderScanner` before httptools sees the bytes:
  over a limit, 431 ``RequestHeaderFieldsTooLargeException``, then close;
- a malformed request gets 400 ``InvalidRequestContentException`` as AWS-shaped JSON (uvicorn
  answers plain text), then close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..core.connguard import ConnectionGuard, GuardParams, HeaderScanner, HeadTooLarge
from ..core.limits import DEFAULT_LIMITS, Limits

log = logging.getLogger("cellcloud.router")


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def error_response(status: int, type_: str, message: str) -> bytes:
    """A whole HTTP/1.1 response, Lambda-shaped, that closes the connection."""
    body = json.dumps({"Type": "User", "message": message}).encode()
    return b"".join([
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"x-amzn-errortype: ", type_.encode(), b"\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ])


class ConnectionRegistry:
    """Every open connection of one server, its guard and its sweep."""

    def __init__(self, params: GuardParams, limits: Limits = DEFAULT_LIMITS,
                 sweep_interval_ms: int | None = None) -> None:
        self.guard = ConnectionGuard(params)
        self.limits = limits
        self.sweep_interval_s = (sweep_interval_ms or limits.http_sweep_interval_ms) / 1000
        self.conns: dict[int, GuardedHttpToolsProtocol] = {}
        self.counters = {"head_too_large": 0, "malformed": 0}
        self._next_id = 0
        self._sweep: asyncio.TimerHandle | None = None

    def protocol_class(self) -> type[GuardedHttpToolsProtocol]:
        """The class to give ``uvicorn.Config(http=...)``: bound to this registry."""
        return type("RouterHttpProtocol", (GuardedHttpToolsProtocol,), {"registry": self})

    def start(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(self.sweep_interval_s, self._tick)

    def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def statistics(self) -> dict[str, int]:
        return {**self.guard.statistics(), **self.counters}

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def abort(self, cid: int) -> None:
        proto = self.conns.pop(cid, None)
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

    def _tick(self) -> None:
        try:
            for cid in self.guard.expired(_now_ms()):
                self.abort(cid)
        finally:
            self._sweep = asyncio.get_running_loop().call_later(self.sweep_interval_s, self._tick)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    registry: ConnectionRegistry  # set on the subclass protocol_class() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lim = self.registry.limits
        self._cid = self.registry.new_id()
        self._scanner = HeaderScanner(lim.http_header_line_bytes_max, lim.http_header_bytes_max,
                                      lim.http_headers_max)

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        reg = self.registry
        reg.conns[self._cid] = self
        for victim in reg.guard.opened(self._cid, _now_ms()):
            reg.abort(victim)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.guard.closed(self._cid)
        self.registry.conns.pop(self._cid, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # already lost
            return
        if self._scanner.active:
            try:
                self._scanner.feed(data)
            except HeadTooLarge as e:
                self.registry.counters["head_too_large"] += 1
                self._fail(431, "RequestHeaderFieldsTooLargeException", e.message)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.registry.counters["malformed"] += 1
            self._fail(400, "InvalidRequestContentException", f"Malformed HTTP request: {e}")
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request is answered as plain HTTP

    def _fail(self, status: int, type_: str, message: str) -> None:
        """Answer an error the application never saw, then close the connection."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The application has this request: it sees a disconnect and writes nothing more.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.abort()
                return
        if not self.transport.is_closing():
            self.transport.write(error_response(status, type_, message))
            self.transport.close()

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.registry.guard.request_started(self._cid, _now_ms())

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The head is done (also when a pipelined head ended inside a chunk the scanner
        # never saw): what follows is body until the message completes.
        self._scanner.active = False
        self.registry.guard.headers_done(self._cid, _now_ms())

    def on_body(self, body: bytes) -> None:
        self.registry.guard.body_received(self._cid, len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.registry.guard.message_done(self._cid, _now_ms())
        self._scanner.reset()

    def on_response_complete(self) -> None:
        # uvicorn's, less its per-connection keep-alive timer: the guard's sweep keeps time.
        self.server_state.total_requests += 1
        self.registry.guard.response_done(self._cid, _now_ms())
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)


def guard_params(limits: Limits, **overrides: int | None) -> GuardParams:
    base = {"header_timeout_ms": limits.http_header_timeout_ms,
            "body_timeout_ms": limits.http_body_timeout_ms,
            "body_rate_bytes_per_s_min": limits.http_body_rate_bytes_per_s_min,
            "keepalive_idle_timeout_ms": limits.http_keepalive_idle_timeout_ms,
            "connections_max": limits.http_connections_max}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GuardParams(**base)
