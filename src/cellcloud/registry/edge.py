"""The registry at the router: ``/v2/`` requests authenticated by the registry token, bodies
streamed to the tenant's cell in bounded internal calls, blobs streamed back the same way; and
``GetAuthorizationToken``, answered here (the router holds the registry key, no database).

A blob upload never crosses the transport whole: the router reads the client's body as it
arrives and forwards it as ``registry_append`` calls of at most ``registry_chunk_bytes_max``
bytes (each acknowledged before the next, so at most one chunk per upload is in memory), then
``registry_commit``. A blob GET is ``registry`` (size, headers) then ``registry_read`` calls of
at most the same size, each written to the client before the next is asked for.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl

from .. import runtime
from ..core.limits import DEFAULT_LIMITS, Limits
from ..transport import CallTimeout, RemoteError, TransportError
from . import core
from .core import RegistryError


class CellCaller(Protocol):
    """What the edge needs of the router that mounts it: a call to the cell that holds an
    account (structural, so the registry does not import the router)."""

    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any: ...

log = logging.getLogger("cellcloud.registry")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KEY_FILE = "registry.key"
REALM = "cellcloud"
call_timeout_s = 60.0
_FORWARDED = ("content-type", "accept", "range")


def registry_key_path(state_dir: str) -> str:
    return os.path.join(state_dir, KEY_FILE)


def ensure_registry_key(state_dir: str) -> str:
    """The HMAC key registry tokens are signed with: 32 random bytes, mode 0600, made once."""
    path = registry_key_path(state_dir)
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one keeps the winner's key
        except FileExistsError:
            pass
        os.unlink(tmp)
    return path


class RegistryKey:
    def __init__(self, path: str) -> None:
        with open(path) as f:
            self.key = bytes.fromhex(f.read().strip())
        assert len(self.key) >= 16


class RegistryEdge:
    def __init__(self, router: CellCaller, key: RegistryKey | None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.router = router
        self.key = key
        self.limits = limits
        self.counters = {"requests": 0, "unauthorized": 0, "blob_bytes_in": 0,
                         "blob_bytes_out": 0}

    # -- GetAuthorizationToken -----------------------------------------------------------------
    def authorization_data(self, account: str, host: str, scheme: str) -> dict[str, Any]:
        if self.key is None:
            raise RegistryError(503, "UNAVAILABLE", "this router has no registry key")
        password, expires = core.make_password(self.key.key, account, int(time.time()),
                                               self.limits.registry_token_ttl_s)
        return {"authorizationData": [{
            "authorizationToken": core.authorization_token(password),
            "expiresAt": expires, "proxyEndpoint": f"{scheme}://{host}"}]}

    # -- /v2/ ----------------------------------------------------------------------------------
    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.counters["requests"] += 1
        declared = _declared(scope)
        state = {"pending": declared != 0, "started": False}
        try:
            await self._serve(scope, receive, send, state)
        except RegistryError as e:
            if state["pending"] and declared is not None \
                    and declared <= self.limits.http_drain_bytes_max:
                # Refused before its body (413, 401…): a small declared rest is read and
                # dropped so that a client still sending can read the answer (as app.py).
                await _drain(receive, state)
            await self._reply(send, state, e.status, {"content-type": "application/json",
                                                      **e.headers}, e.body())
        except (TransportError, CallTimeout, RemoteError) as e:
            err = RegistryError(503, "UNAVAILABLE", f"the registry's cell is unavailable: {e}")
            await self._reply(send, state, err.status, {"content-type": "application/json"},
                              err.body())
        except Exception:
            log.exception("registry request %s %s failed", scope.get("method"), scope["path"])
            err = RegistryError(500, "UNKNOWN", "an internal error occurred")
            await self._reply(send, state, err.status, {"content-type": "application/json"},
                              err.body())

    async def _reply(self, send: Send, state: dict[str, Any], status: int,
                     headers: dict[str, str], body: bytes) -> None:
        if state["started"]:
            return  # a streamed answer already under way: the connection is cut instead
        out = [(k.encode(), v.encode()) for k, v in headers.items() if k != "content-length"]
        out.append((b"docker-distribution-api-version", b"registry/2.0"))
        out.append((b"content-length", b"%d" % len(body)))
        if state["pending"]:
            out.append((b"connection", b"close"))  # the client's body was not read
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    def _account(self, headers: dict[str, str]) -> str:
        auth = headers.get("authorization", "")
        if not auth:
            raise core.unauthorized(REALM)
        basic = core.parse_basic(auth)
        account = None
        if basic is not None and basic[0] == "AWS" and self.key is not None:
            account = core.verify_password(self.key.key, basic[1], time.time())
        if account is None:
            self.counters["unauthorized"] += 1
            raise core.unauthorized(REALM, "invalid or expired registry token: get one with "
                                           "GetAuthorizationToken (aws ecr get-login-password)")
        return account

    async def _call(self, account: str, op: str, body: dict[str, Any]) -> Any:
        return await self.router.call_cell(account, op, body, call_timeout_s)

    async def _serve(self, scope: Scope, receive: Receive, send: Send,
                     state: dict[str, Any]) -> None:
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        # Authentication first, before the route, the body or anything about the store.
        account = self._account(headers)
        route = core.parse_v2_path(scope["path"])
        if method not in core.ROUTE_METHODS[route.kind]:
            raise RegistryError(405, "UNSUPPORTED", f"{method} is not supported here",
                                headers={"allow": ", ".join(core.ROUTE_METHODS[route.kind])})
        body_max = core.route_body_bytes_max(route, method, self.limits)
        declared = _declared(scope)
        if declared is not None and declared > body_max:
            if route.kind == "manifest":
                raise core.manifest_invalid(
                    f"manifest is {declared} bytes; at most {body_max}", 413)
            raise RegistryError(413, "SIZE_INVALID", f"request body over {body_max} bytes")
        if route.kind == "base":
            await self._reply(send, state, 200, {"content-type": "application/json"}, b"{}")
            return
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        req: dict[str, Any] = {"a": account, "m": method, "k": route.kind, "n": route.name,
                               "r": route.ref, "q": query,
                               "h": {k: headers[k] for k in _FORWARDED if k in headers}}
        if route.kind == "upload_start" or (route.kind == "upload" and method in ("PATCH", "PUT")):
            await self._upload(scope, receive, send, state, account, route, query, req, headers)
            return
        if body_max or declared != 0:
            req["b"] = await _read_body(receive, body_max, route)
        state["pending"] = False
        resp = await self._call(account, "registry", req)
        if route.kind == "blob" and method in ("GET", "HEAD") and resp["s"] == 200:
            await self._send_blob(scope, send, state, account, route, headers, resp)
            return
        await self._reply(send, state, resp["s"], resp["h"], resp["b"])

    async def _upload(self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any],
                      account: str, route: core.V2Route, query: dict[str, str],
                      req: dict[str, Any], headers: dict[str, str]) -> None:
        """POST (start, mount, or monolithic with ?digest=), PATCH (a chunk), PUT (the last
        chunk and the digest): the body goes to the cell in bounded appends."""
        if route.kind == "upload_start":
            if "digest" in query:  # monolithic: check the digest's shape before any byte
                core.parse_digest(query["digest"])
            resp = await self._call(account, "registry", {**req, "m": "POST"})
            if resp["s"] != 202 or ("digest" not in query and not state["pending"]):
                await self._reply(send, state, resp["s"], resp["h"], resp["b"])
                return
            uuid = resp["h"]["docker-upload-uuid"]
        else:
            uuid = route.ref
            if scope["method"] == "PUT":
                if "digest" not in query:
                    raise core.digest_invalid("PUT of an upload needs ?digest=")
                core.parse_digest(query["digest"])
        start = None
        if scope["method"] == "PATCH":
            rng = core.parse_content_range(headers.get("content-range"))
            start = rng[0] if rng else None
        last = await self._stream_body(receive, state, account, route.name, uuid, start)
        if last is not None and last["s"] != 202:
            await self._reply(send, state, last["s"], last["h"], last["b"])
            return
        if scope["method"] == "PATCH" or ("digest" not in query):
            if last is None:  # an empty PATCH: where the upload stands
                last = await self._call(account, "registry",
                                        {**req, "k": "upload", "r": uuid, "m": "GET"})
                if last["s"] == 204:
                    last = {**last, "s": 202}
            await self._reply(send, state, last["s"], last["h"], last["b"])
            return
        resp = await self._call(account, "registry_commit", {"a": account, "n": route.name,
                                                             "u": uuid,
                                                             "digest": query["digest"]})
        await self._reply(send, state, resp["s"], resp["h"], resp["b"])

    async def _stream_body(self, receive: Receive, state: dict[str, Any], account: str,
                           name: str, uuid: str, start: int | None) -> dict[str, Any] | None:
        """Forward the request body as appends of at most ``registry_chunk_bytes_max``; the
        last reply (None: no body), or the first refusal (the rest is not read)."""
        chunk_max = self.limits.registry_chunk_bytes_max
        buf = bytearray()
        last: dict[str, Any] | None = None
        more = state["pending"]
        while more or buf:
            if more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise RegistryError(400, "BLOB_UPLOAD_INVALID", "the client went away")
                buf += msg.get("body", b"")
                more = bool(msg.get("more_body", False))
                if not more:
                    state["pending"] = False
            while len(buf) >= chunk_max or (buf and not more):
                piece = bytes(buf[:chunk_max])
                del buf[:chunk_max]
                last = await self._call(account, "registry_append",
                                        {"a": account, "n": name, "u": uuid, "o": start,
                                         "d": piece})
                start = None
                if last["s"] != 202:
                    return last
                self.counters["blob_bytes_in"] += len(piece)
        return last

    async def _send_blob(self, scope: Scope, send: Send, state: dict[str, Any], account: str,
                         route: core.V2Route, headers: dict[str, str],
                         resp: dict[str, Any]) -> None:
        size = int(resp["size"])
        rng = core.parse_range(headers.get("range"), size)
        start, end = rng if rng is not None else (0, size - 1)
        out = {**resp["h"], "content-length": str(max(end - start + 1, 0)),
               "accept-ranges": "bytes"}
        status = 200
        if rng is not None:
            status = 206
            out["content-range"] = f"bytes {start}-{end}/{size}"
        hdrs = [(k.encode(), v.encode()) for k, v in out.items()]
        hdrs.append((b"docker-distribution-api-version", b"registry/2.0"))
        if scope["method"] == "HEAD" or size == 0:
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": b""})
            return
        # The first piece before the head, so that a blob gone meanwhile is still a clean 404.
        offset = start
        piece = await self._read(account, route, offset, end)
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        state["started"] = True
        while True:
            offset += len(piece)
            more = offset <= end
            await send({"type": "http.response.body", "body": piece, "more_body": more})
            self.counters["blob_bytes_out"] += len(piece)
            if not more:
                return
            piece = await self._read(account, route, offset, end)

    async def _read(self, account: str, route: core.V2Route, offset: int, end: int) -> bytes:
        length = min(end - offset + 1, self.limits.registry_chunk_bytes_max)
        r = await self._call(account, "registry_read", {"a": account, "n": route.name,
                                                        "d": route.ref, "o": offset,
                                                        "l": length})
        if r["s"] != 200:
            raise RegistryError(r["s"], "BLOB_UNKNOWN", "blob unknown to registry")
        data: bytes = r["d"]
        if not data:
            raise RegistryError(500, "UNKNOWN", "blob shorter than recorded")
        return data


def _declared(scope: Scope) -> int | None:
    """The declared body size: Content-Length, None when chunked, 0 when there is none."""
    length = 0
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                return None
        elif k == b"transfer-encoding":
            return None
    return length


async def _drain(receive: Receive, state: dict[str, Any]) -> None:
    while state["pending"]:
        msg = await receive()
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            state["pending"] = False


async def _read_body(receive: Receive, body_max: int, route: core.V2Route) -> bytes:
    def too_large() -> Exception:
        if route.kind == "manifest":
            return core.manifest_invalid(f"manifest over {body_max} bytes", 413)
        return RegistryError(413, "SIZE_INVALID", f"request body over {body_max} bytes")

    return await runtime.read_asgi_body(
        receive, body_max, too_large,
        lambda: RegistryError(400, "UNKNOWN", "the client went away"))
