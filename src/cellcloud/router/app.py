"""The router as a bare ASGI app: authenticate, map the tenant's account id to its cell, forward.

It holds no state of its own beyond the cell map and the tenant table it was given, so any
number of routers can run side by side and a restart loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.cellmap import CellMap
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..transport import CallTimeout, Client, RemoteError, TransportError

log = logging.getLogger("cellcloud.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Headers a frontend needs; everything else stays at the edge.
_FORWARDED = frozenset({b"x-amz-invocation-type", b"x-amz-log-type", b"x-amz-client-context",
                        b"content-type"})
_INVOKE_SUFFIXES = ("/invocations", "/invocations/")
control_timeout_s = 30.0


class Tenants:
    """API key -> account id. Replaced by SigV4 credentials with the Lambda API issue."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = 0.0
        self._keys: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if st.st_mtime == self._mtime:
            return
        with open(self.path) as f:
            doc = json.load(f)
        self._keys = {t["api_key"]: t["account_id"] for t in doc["tenants"]}
        self._mtime = st.st_mtime

    def account_for(self, api_key: str) -> str | None:
        return self._keys.get(api_key)


class Router:
    def __init__(self, cell_map: CellMap, tenants: Tenants, limits: Limits = DEFAULT_LIMITS):
        self.cell_map = cell_map
        self.tenants = tenants
        self.limits = limits
        self._clients: dict[str, Client] = {}
        self.started = time.time()
        self.counters = {"requests": 0, "unauthenticated": 0, "cell_unavailable": 0}

    def client(self, cell_id: str) -> Client:
        c = self._clients.get(cell_id)
        if c is None:
            ep = self.cell_map.cells[cell_id]
            c = self._clients[cell_id] = Client(ep.host, ep.port)
        return c

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.counters["requests"] += 1
        try:
            status, headers, body = await self._handle(scope, receive)
        except LambdaError as e:
            status, headers, body = e.status, e.headers(), e.body()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, str], bytes]:
        path: str = scope["path"]
        api_key = ""
        fwd: dict[str, str] = {}
        for k, v in scope["headers"]:
            if k == b"x-api-key":
                api_key = v.decode("latin-1")
            elif k in _FORWARDED:
                fwd[k.decode()] = v.decode("latin-1")
        account = self.tenants.account_for(api_key) if api_key else None
        if account is None:
            self.counters["unauthenticated"] += 1
            raise LambdaError(403, "UnrecognizedClientException",
                              "The security token included in the request is invalid.")
        is_invoke = path.endswith(_INVOKE_SUFFIXES)
        body_max = (self.limits.invoke_payload_bytes_max if is_invoke
                    else self.limits.request_body_bytes_max)
        body = await _read_body(receive, body_max, is_invoke)
        if path.rstrip("/") == "/cellcloud/v1/status":
            return 200, {"content-type": "application/json"}, json.dumps(
                await self.status()).encode()
        cell = self.cell_map.cell_for(account)
        req = {"m": scope["method"], "p": path, "q": scope["query_string"].decode("latin-1"),
               "h": fwd, "b": body, "a": account}
        # A sync invoke may run up to the function's timeout (at most 900 s); the frontend
        # enforces the real one, this is the backstop.
        timeout_s = (self.limits.timeout_s_max + 30.0) if is_invoke else control_timeout_s
        try:
            resp = await self.client(cell.cell_id).call("http", req, timeout_s=timeout_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            self.counters["cell_unavailable"] += 1
            raise LambdaError(503, "ServiceException",
                              f"Cell {cell.cell_id} is unavailable: {e}") from e
        return resp["s"], resp["h"], resp["b"]

    async def status(self) -> dict[str, Any]:
        cells = {}
        for cell_id in self.cell_map.cells:
            try:
                cells[cell_id] = await self.client(cell_id).call("status", None, timeout_s=5)
            except (TransportError, RemoteError) as e:
                cells[cell_id] = {"cell_id": cell_id, "error": str(e)}
        return {"router": {"pid": os.getpid(), "uptime_s": time.time() - self.started,
                           "cell_map_version": self.cell_map.version,
                           "counters": dict(self.counters)},
                "cells": cells}


async def _read_body(receive: Receive, body_max: int, is_invoke: bool) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise LambdaError(400, "ClientDisconnected", "the client went away")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > body_max:
            if is_invoke:
                raise LambdaError(
                    413, "RequestEntityTooLargeException",
                    f"Request must be smaller than {body_max} bytes for the InvokeFunction "
                    "operation")
            raise LambdaError(413, "RequestEntityTooLargeException",
                              f"Request must be smaller than {body_max} bytes")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)
