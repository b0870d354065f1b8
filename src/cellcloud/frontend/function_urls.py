"""Function URLs in the cell (issue #15): the config operations of the Lambda API
(``/2021-10-31/functions/{name}/url[s]``) and the ``url`` op a router calls with an HTTP
request to a URL. Decisions (validation, CORS, the event and response mapping, who may invoke)
are pure, in ``core/function_urls.py``; this is the shell over the catalog and the invoke path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

from ..core import errors
from ..core import function_urls as fu
from ..core.catalog_rules import iso_time_ms, page_size
from ..core.errors import LambdaError
from ..core.validation import parse_function_ref
from ..transport import Stream
from .cell import Cell, InvokeResult
from .store import function_arn

log = logging.getLogger("cellcloud.frontend")

Reply = dict[str, Any]
ENDPOINT_HEADER = "x-cellcloud-endpoint"  # set by the router: scheme://host[:port] as used


def _reply(status: int, doc: Any) -> Reply:
    return {"s": status, "h": {"content-type": "application/json"},
            "b": b"" if doc is None else json.dumps(doc).encode()}


def _target(cell: Cell, req: dict[str, Any], ref: str,
            q: dict[str, list[str]]) -> tuple[str, str]:
    """(name, qualifier or '') of a URL config request; 404 when the function or its alias is
    absent, 400 for a qualifier that is not an alias name."""
    parsed = parse_function_ref(unquote(ref))
    if parsed.account is not None and parsed.account != req["a"]:
        raise errors.not_found(f"Function not found: {ref}")
    qual = (q.get("Qualifier") or [""])[0] or parsed.qualifier
    fu.check_qualifier(qual)
    if qual:
        cell.catalog.alias(req["a"], parsed.name, qual)
    else:
        cell.catalog.function(req["a"], parsed.name)
    return parsed.name, qual or ""


def _doc(cell: Cell, req: dict[str, Any], name: str, qual: str, url_id: str,
         stored: dict[str, Any], *, last_modified: bool = True) -> dict[str, Any]:
    endpoint = (req.get("h") or {}).get(ENDPOINT_HEADER) or "http://127.0.0.1"
    out: dict[str, Any] = {
        "FunctionUrl": fu.function_url(url_id, cell.region, endpoint),
        "FunctionArn": function_arn(cell.region, req["a"], name, qual or None),
        "AuthType": stored["AuthType"],
        "CreationTime": stored["CreationTime"],
        "InvokeMode": stored.get("InvokeMode", "BUFFERED"),
    }
    if "Cors" in stored:
        out["Cors"] = stored["Cors"]
    if last_modified:
        out["LastModifiedTime"] = stored["LastModifiedTime"]
    return out


def _body(req: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(req["b"] or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise LambdaError(400, "InvalidRequestContentException",
                          f"Could not parse request body into json: {e}") from e
    if not isinstance(doc, dict):
        raise LambdaError(400, "InvalidRequestContentException",
                          "The request body must be a JSON object")
    return doc


def _not_found(cell: Cell, req: dict[str, Any], name: str, qual: str) -> LambdaError:
    return errors.not_found("The resource you requested does not exist. (no function URL "
                            f"config for {function_arn(cell.region, req['a'], name, qual or None)})")


async def create(cell: Cell, req: dict[str, Any], m: dict[str, str],
                 q: dict[str, list[str]]) -> Reply:
    name, qual = _target(cell, req, m["ref"], q)
    stored = fu.check_config(_body(req), None)
    now = iso_time_ms(cell.clock())
    stored["CreationTime"] = stored["LastModifiedTime"] = now
    url_id = fu.new_url_id(req["a"], cell.rng)
    if not cell.catalog.store.put_url(req["a"], name, qual, url_id, stored, new=True):
        raise errors.conflict("Failed to create function url config for [functionArn = "
                              f"{function_arn(cell.region, req['a'], name, qual or None)}]. "
                              "Error message:  FunctionUrlConfig exists for this Lambda "
                              "function")
    return _reply(201, _doc(cell, req, name, qual, url_id, stored, last_modified=False))


async def get(cell: Cell, req: dict[str, Any], m: dict[str, str],
              q: dict[str, list[str]]) -> Reply:
    name, qual = _target(cell, req, m["ref"], q)
    found = cell.catalog.store.get_url(req["a"], name, qual)
    if found is None:
        raise _not_found(cell, req, name, qual)
    return _reply(200, _doc(cell, req, name, qual, found[0], found[1]))


async def update(cell: Cell, req: dict[str, Any], m: dict[str, str],
                 q: dict[str, list[str]]) -> Reply:
    name, qual = _target(cell, req, m["ref"], q)
    found = cell.catalog.store.get_url(req["a"], name, qual)
    if found is None:
        raise _not_found(cell, req, name, qual)
    url_id, old = found
    stored = fu.check_config(_body(req), old)
    stored["LastModifiedTime"] = iso_time_ms(cell.clock())
    if not cell.catalog.store.put_url(req["a"], name, qual, url_id, stored, new=False):
        raise _not_found(cell, req, name, qual)
    return _reply(200, _doc(cell, req, name, qual, url_id, stored))


async def delete(cell: Cell, req: dict[str, Any], m: dict[str, str],
                 q: dict[str, list[str]]) -> Reply:
    name, qual = _target(cell, req, m["ref"], q)
    if not cell.catalog.store.delete_url(req["a"], name, qual):
        raise _not_found(cell, req, name, qual)
    return {"s": 204, "h": {}, "b": b""}


async def list_configs(cell: Cell, req: dict[str, Any], m: dict[str, str],
                       q: dict[str, list[str]]) -> Reply:
    name, _ = _target(cell, req, m["ref"], {})
    limit = page_size((q.get("MaxItems") or [""])[0], cell.limits)
    # the marker is the last qualifier listed; the unqualified URL's is "$" (below every alias)
    marker = (q.get("Marker") or [""])[0] or None
    rows = cell.catalog.store.list_urls(req["a"], name, marker, limit + 1)
    doc: dict[str, Any] = {"FunctionUrlConfigs": [
        _doc(cell, req, name, qual, url_id, stored) for qual, url_id, stored in rows[:limit]]}
    if len(rows) > limit:
        doc["NextMarker"] = rows[limit - 1][0] or "$"
    return _reply(200, doc)


# -- serving a URL ------------------------------------------------------------------------------
def _error(e: LambdaError) -> Reply:
    return {"s": e.status, "h": list(e.headers().items()), "b": e.body()}


def _forbidden() -> LambdaError:
    return LambdaError(403, "AccessDeniedException", "Forbidden. For troubleshooting Function "
                       "URL authorization issues, see: https://docs.aws.amazon.com/lambda/"
                       "latest/dg/urls-auth.html")


async def serve(cell: Cell, body: dict[str, Any]) -> Reply | Stream:
    """The router's ``url`` op: one HTTP request to a function URL -> ``{s, h: [[k, v]], b}``."""
    try:
        return await _serve(cell, body)
    except LambdaError as e:
        return _error(e)


async def _serve(cell: Cell, body: dict[str, Any]) -> Reply | Stream:
    url_id = str(body["id"])
    found = cell.catalog.store.get_url_by_id(url_id)
    if found is None or found[0] != fu.account_of(url_id):
        raise errors.not_found(f"Function URL {url_id} not found")
    owner, name, qual, cfg = found
    caller_doc = body.get("caller")
    caller = {"account": str(caller_doc["account"]),
              "access_key_id": str(caller_doc["access_key_id"])} if caller_doc else None
    policy = cell.catalog.store.get_policy(owner, "f", name, qual)
    if not fu.authorize_url(cfg["AuthType"], owner, caller["account"] if caller else None,
                            policy):
        raise _forbidden()
    pairs = [(str(k).lower(), str(v)) for k, v in body["h"]]
    headers = fu.joined_headers(pairs)
    method = str(body["m"])
    cors = cfg.get("Cors")
    if cors is not None and fu.is_preflight(method, headers):
        return {"s": 200, "h": fu.preflight(cors, headers), "b": b""}
    request_id = str(uuid.uuid4())
    req = fu.UrlRequest(
        url_id=url_id, region=cell.region, method=method, raw_path=str(body["p"]),
        raw_query=str(body.get("q") or ""), headers=pairs, body=bytes(body.get("b") or b""),
        source_ip=str(body.get("ip") or ""), protocol=str(body.get("proto") or "HTTP/1.1"),
        caller=caller if cfg["AuthType"] == "AWS_IAM" else None)
    event = fu.build_event(req, request_id=request_id, now_ms=int(cell.clock() * 1000))
    cors_extra = fu.cors_headers(cors, headers.get("origin"))
    if cfg.get("InvokeMode") == "RESPONSE_STREAM":
        return Stream(_url_stream(cell, owner, name, qual, json.dumps(event).encode(),
                                  request_id, cors_extra))
    res = await cell.invoke(owner, name, json.dumps(event).encode(), log_tail=False,
                            qualifier=qual or None, request_id=request_id)
    mapped = (fu.map_stream_response if cfg.get("InvokeMode") == "RESPONSE_STREAM"
              else fu.map_response)(res.payload, res.function_error, res.request_id)
    return {"s": mapped.status, "h": _with_cors(mapped.headers, cors_extra), "b": mapped.body}


def _with_cors(out: list[tuple[str, str]], extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not extra:
        return out
    names = {k for k, _ in extra}
    return [(k, v) for k, v in out if k not in names] + extra


async def streamed(cell: Cell, owner: str, name: str, qual: str | None, payload: bytes, *,
                   request_id: str | None = None, log_tail: bool = False
                   ) -> AsyncIterator[tuple[bytes, str] | InvokeResult]:
    """A streamed invocation: ``(bytes, content type)`` for each piece of the response as the
    runtime streams it, then the :class:`InvokeResult` (its payload: what was not streamed,
    all of it for a function that does not stream). A refusal (throttle...) raises."""
    chunks: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
    task = asyncio.ensure_future(cell.invoke(
        owner, name, payload, log_tail=log_tail, qualifier=qual, request_id=request_id,
        sink=lambda data, ctype: chunks.put_nowait((data, ctype))))
    try:
        while not task.done():
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            yield getter.result()
        while not chunks.empty():
            yield chunks.get_nowait()
        yield await task
    finally:
        if not task.done():
            task.cancel()


async def _url_stream(cell: Cell, owner: str, name: str, qual: str, payload: bytes,
                      request_id: str, cors_extra: list[tuple[str, str]]
                      ) -> AsyncIterator[dict[str, Any]]:
    """A RESPONSE_STREAM URL's answer for the router: ``{"s", "h"}`` once status and headers
    are known (after the prelude of ``HttpResponseStream.from``, or the first bytes), then
    ``{"b": bytes}`` as the function streams."""
    pending = b""  # bytes before the head is known (at most the prelude's limit)
    head_sent = False
    try:
        async for item in streamed(cell, owner, name, qual or None, payload,
                                   request_id=request_id):
            if isinstance(item, InvokeResult):
                if not head_sent:  # nothing streamed, or the head never completed
                    mapped = fu.map_stream_response(pending + item.payload, item.function_error,
                                                    item.request_id)
                    yield {"s": mapped.status, "h": _with_cors(mapped.headers, cors_extra)}
                    if mapped.body:
                        yield {"b": mapped.body}
                elif item.payload and not item.function_error:
                    yield {"b": item.payload}
                # a failure after the head left: the stream just ends, as on Lambda
                return
            data, ctype = item
            if head_sent:
                yield {"b": data}
                continue
            pending += data
            if ctype.startswith(fu.HTTP_INTEGRATION):
                cut = pending.find(fu.PRELUDE_DELIMITER)
                if cut < 0 and len(pending) <= fu.prelude_bytes_max:
                    continue  # the prelude is not complete yet
                if cut < 0:  # no prelude within its limit: not a response we can map
                    bad = fu.bad_gateway(request_id)
                    yield {"s": bad.status, "h": _with_cors(bad.headers, cors_extra)}
                    yield {"b": bad.body}
                    return
                else:
                    head = fu.map_stream_response(pending[:cut + len(fu.PRELUDE_DELIMITER)],
                                                  None, request_id)
                    rest = pending[cut + len(fu.PRELUDE_DELIMITER):]
            else:
                head = fu.UrlResponse(200, [("content-type", ctype or "application/octet-stream"),
                                            ("x-amzn-requestid", request_id)], b"")
                rest = pending
            yield {"s": head.status, "h": _with_cors(head.headers, cors_extra)}
            head_sent, pending = True, b""
            if rest:
                yield {"b": rest}
    except LambdaError as e:
        if not head_sent:
            yield {"s": e.status, "h": list(e.headers().items())}
            yield {"b": e.body()}
