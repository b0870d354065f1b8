"""Function URLs at the router (issue #15): a request whose ``Host`` is
``<url-id>.lambda-url.<region>.localhost[:port]`` (canonical) or whose path is
``/lambda-url/<url-id>/...`` (the path form, for clients that cannot resolve ``*.localhost``)
goes to the owner's cell — the account is read from the URL id itself — as one ``url`` op. A
SigV4-signed request (``Authorization: AWS4-HMAC-SHA256 ...``) is verified here, where the
tenants' keys are; the cell decides, by the URL's AuthType and the function's resource
policy, whether the request may invoke.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .. import runtime
from ..core import function_urls as fu
from ..core.errors import LambdaError
from ..core.validation import parse_function_ref
from ..security import sigv4
from ..transport import CallTimeout, Client, RemoteError, TransportError

if TYPE_CHECKING:
    from .app import Receive, Router, Scope, Send

log = logging.getLogger("cellcloud.router")

_INVOKE = re.compile(r"^/(2015-03-31/functions/(?P<ref>[^/]+)/invocations|"
                     r"2021-11-15/functions/(?P<sref>[^/]+)/response-streaming-invocations)/?$")
STREAM_SUFFIX = "/response-streaming-invocations"


def cross_account_owner(path: str, account: str) -> str | None:
    """The owner of the function an Invoke names by another account's ARN, else None."""
    m = _INVOKE.match(path)
    if m is None:
        return None
    try:
        parsed = parse_function_ref(unquote(m["ref"] or m["sref"]))
    except LambdaError:
        return None
    if parsed.account is None or parsed.account == account:
        return None
    return parsed.account


class UrlEdge:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.counters = {"requests": 0, "refused": 0, "cell_unavailable": 0}

    def target(self, scope: Scope) -> tuple[str, str] | None:
        """(url id, the function's rawPath) when the request is for a function URL."""
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode(
            "utf-8", "surrogateescape")
        for k, v in scope["headers"]:
            if k == b"host":
                url_id = fu.host_url_id(v.decode("latin-1"), self.router.region)
                if url_id is not None:
                    return url_id, raw_path
                break
        found = fu.split_path_form(raw_path)
        return found

    async def serve(self, scope: Scope, receive: Receive, send: Send,
                    target: tuple[str, str]) -> None:
        self.counters["requests"] += 1
        read: list[bool] = []  # appended to once the body has been read
        try:
            status, headers, body = await self._serve(scope, receive, target, read)
            if not isinstance(body, bytes):  # RESPONSE_STREAM: the body as it comes
                await self.send_stream(scope, send, status, headers, body)
                return
        except LambdaError as e:
            self.counters["refused"] += 1
            status, headers, body = e.status, list(e.headers().items()), e.body()
        except Exception:  # no input may produce a bare 500
            log.exception("function URL request %s %s failed", scope.get("method"),
                          scope.get("path"))
            err = LambdaError(500, "ServiceException", "An internal error occurred.")
            status, headers, body = err.status, list(err.headers().items()), err.body()
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers
               if k != "content-length"]
        out.append((b"content-length", b"%d" % len(body)))
        if not read and any(k == b"transfer-encoding" or (k == b"content-length" and v != b"0")
                            for k, v in scope["headers"]):
            out.append((b"connection", b"close"))  # answered before the body: cut it off
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD"
                    else b""})

    async def send_stream(self, scope: Scope, send: Send, status: int,
                           headers: list[tuple[str, str]], body: AsyncIterator[bytes]) -> None:
        """A streamed answer: no Content-Length (chunked), each piece written as it comes."""
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers
               if k not in ("content-length", "transfer-encoding")]
        await send({"type": "http.response.start", "status": status, "headers": out})
        try:
            async for data in body:
                if data and scope["method"] != "HEAD":
                    await send({"type": "http.response.body", "body": data, "more_body": True})
        except (TransportError, RemoteError) as e:  # the cell went away mid-stream: cut it
            self.counters["cell_unavailable"] += 1
            log.warning("function URL stream cut: %s", e)
        await send({"type": "http.response.body", "body": b""})

    async def _serve(self, scope: Scope, receive: Receive,
                     target: tuple[str, str], read: list[bool]
                     ) -> tuple[int, list[tuple[str, str]], bytes | AsyncIterator[bytes]]:
        router = self.router
        url_id, raw_path = target
        owner = fu.account_of(url_id)
        if owner is None:
            raise LambdaError(404, "ResourceNotFoundException", f"Function URL {url_id} not found")
        body_max = router.limits.invoke_payload_bytes_max
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > body_max:
            raise _too_large(body_max)
        body = await runtime.read_asgi_body(
            receive, body_max, lambda: _too_large(body_max),
            lambda: LambdaError(400, "ClientDisconnected", "the client went away"))
        read.append(True)
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        query = scope["query_string"].decode("latin-1")
        caller = None
        auth = ",".join(v for k, v in headers if k == "authorization")
        if auth.startswith(sigv4.ALGORITHM):
            # Signed: verified here (the tenants' keys are here); a bad signature is refused
            # whatever the URL's AuthType, as a request that claims an identity it cannot prove.
            verified = sigv4.verify(
                method=scope["method"], raw_path=(scope.get("raw_path") or b"").decode(
                    "utf-8", "surrogateescape") or scope["path"],
                raw_query=scope["query_string"].decode("utf-8", "surrogateescape"),
                headers=headers, body=body, region=router.region,
                secret_for=router.tenants.secret_for, service=sigv4.SERVICE)
            found = router.tenants.lookup(verified.access_key_id)
            assert found is not None
            caller = {"account": found[0], "access_key_id": verified.access_key_id}
        path_part, _, _ = raw_path.partition("?")
        client = scope.get("client") or ("", 0)
        op: dict[str, Any] = {
            "id": url_id, "m": scope["method"], "p": path_part, "q": query,
            "h": [[k, v] for k, v in headers], "b": body, "ip": client[0],
            "proto": f"HTTP/{scope.get('http_version', '1.1')}", "caller": caller,
        }
        cell = router.cell_map.cell_for(owner)
        return await open_stream(router.client(cell.cell_id), "url", op,
                                 router.limits.timeout_s_max + 30.0, cell.cell_id,
                                 self.counters)


async def open_stream(client: Client, op: str, body: Any, timeout_s: float, cell_id: str,
                      counters: dict[str, int]
                      ) -> tuple[int, list[tuple[str, str]], bytes | AsyncIterator[bytes]]:
    """Call a frontend op that may answer a Stream (``{"s", "h"}``, then ``{"b": bytes}``
    items): (status, headers, the whole body or the body as it comes)."""
    items = client.call_stream(op, body, timeout_s=timeout_s)
    try:
        kind, first = await anext(items)
    except (TransportError, CallTimeout, RemoteError) as e:
        counters["cell_unavailable"] += 1
        raise LambdaError(503, "ServiceException", f"Cell {cell_id} is unavailable: {e}") from e
    headers = first["h"].items() if isinstance(first["h"], dict) else first["h"]
    pairs = [(str(k), str(v)) for k, v in headers]
    if kind == "end":  # answered whole
        return int(first["s"]), pairs, bytes(first["b"])

    async def rest() -> AsyncIterator[bytes]:
        try:
            async for k, item in items:
                if k == "item" and isinstance(item, dict) and isinstance(item.get("b"), bytes):
                    yield item["b"]
        finally:
            await items.aclose()
    return int(first["s"]), pairs, rest()


def _too_large(body_max: int) -> LambdaError:
    return LambdaError(413, "RequestEntityTooLargeException",
                       f"Request must be smaller than {body_max} bytes for the InvokeFunction "
                       "operation")
