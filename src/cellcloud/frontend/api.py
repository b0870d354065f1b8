"""The Lambda REST API (botocore's ``lambda`` 2015-03-31 paths and shapes) and cellcloud's
native additions, on top of :class:`Cell`. A request is a dict from the router; the reply is
``{"s": status, "h": headers, "b": body}``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from ..core import errors
from ..core.errors import LambdaError
from ..core.validation import parse_function_ref
from .cell import Cell

Reply = dict[str, Any]
Route = Callable[[Cell, dict[str, Any], str, dict[str, list[str]]], Awaitable[Reply]]

_JSON = {"content-type": "application/json"}


def _reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    body = b"" if doc is None else json.dumps(doc).encode()
    return {"s": status, "h": {**_JSON, **(headers or {})}, "b": body}


def _json_body(req: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(req["b"] or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise LambdaError(400, "InvalidRequestContentException",
                          f"Could not parse request body into json: {e}") from e
    if not isinstance(doc, dict):
        raise LambdaError(400, "InvalidRequestContentException", "The request body must be a JSON object")
    return doc


def _name(ref: str, account: str) -> str:
    parsed = parse_function_ref(unquote(ref))
    if parsed.account is not None and parsed.account != account:
        # A tenant may name only its own functions; another account's ARN is simply not found.
        raise errors.not_found(f"Function not found: {ref}")
    return parsed.name


def _qualifier(ref: str, q: dict[str, list[str]]) -> str | None:
    parsed = parse_function_ref(unquote(ref))
    qual = q.get("Qualifier", [None])[0] or parsed.qualifier
    if qual not in (None, "$LATEST"):
        raise errors.not_found(f"Function not found: {ref}:{qual} (versions and aliases are not "
                               "supported yet)")
    return qual


async def create_function(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    return _reply(201, cell.create_function(req["a"], _json_body(req)))


async def get_function(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    name = _name(ref, req["a"])
    _qualifier(ref, q)
    rec = cell.function(req["a"], name)
    from .store import config_doc

    return _reply(200, {
        "Configuration": config_doc(rec, cell.region),
        "Code": {"RepositoryType": "S3",
                 "Location": f"/cellcloud/v1/bundles/{rec.code_sha256}"},
        "Tags": rec.tags,
    })


async def get_configuration(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    name = _name(ref, req["a"])
    _qualifier(ref, q)
    from .store import config_doc

    return _reply(200, config_doc(cell.function(req["a"], name), cell.region))


async def list_functions(cell: Cell, req: dict[str, Any], ref: str, q: dict[str, list[str]]) -> Reply:
    marker = q.get("Marker", [""])[0]
    raw = q.get("MaxItems", [str(cell.limits.list_functions_page_max)])[0]
    try:
        max_items = int(raw)
    except ValueError as e:
        raise errors.invalid("MaxItems must be an integer") from e
    return _reply(200, cell.list_functions(req["a"], marker, max_items))


async def update_code(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    return _reply(200, cell.update_code(req["a"], _name(ref, req["a"]), _json_body(req)))


async def update_configuration(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    return _reply(200, cell.update_configuration(req["a"], _name(ref, req["a"]), _json_body(req)))


async def delete_function(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    name = _name(ref, req["a"])
    _qualifier(ref, q)
    cell.delete_function(req["a"], name)
    return {"s": 204, "h": {}, "b": b""}


async def invoke(cell: Cell, req: dict[str, Any], ref: str, q: dict[str, list[str]]) -> Reply:
    name = _name(ref, req["a"])
    _qualifier(ref, q)
    headers = req["h"]
    itype = headers.get("x-amz-invocation-type", "RequestResponse")
    if itype == "DryRun":
        cell.function(req["a"], name)
        return {"s": 204, "h": {}, "b": b""}
    if itype == "Event":
        # Accepting an async event we could lose would break DESIGN rule 5; the durable async
        # path lands with its own issue.
        raise LambdaError(400, "InvalidParameterValueException",
                          "InvocationType Event is not available yet: cellcloud accepts async "
                          "events only once they can be stored durably")
    if itype != "RequestResponse":
        raise errors.invalid(f"Unsupported InvocationType {itype!r}")
    log_type = headers.get("x-amz-log-type", "None")
    res = await cell.invoke(req["a"], name, req["b"] or b"", log_tail=log_type == "Tail")
    out_headers = {"x-amz-executed-version": "$LATEST", "x-amzn-requestid": res.request_id,
                   "content-type": "application/json"}
    if res.function_error:
        out_headers["x-amz-function-error"] = res.function_error
    if log_type == "Tail":
        out_headers["x-amz-log-result"] = base64.b64encode(res.logs).decode()
    return {"s": 200, "h": out_headers, "b": res.payload}


async def function_logs(cell: Cell, req: dict[str, Any], ref: str, q: dict[str, list[str]]) -> Reply:
    try:
        limit = max(1, min(1000, int(q.get("limit", ["50"])[0])))
    except ValueError as e:
        raise errors.invalid("limit must be an integer") from e
    return _reply(200, {"events": cell.logs(req["a"], _name(ref, req["a"]), limit)})


async def cell_status(cell: Cell, req: dict[str, Any], ref: str, q: Any) -> Reply:
    return _reply(200, await cell.status())


_FN = r"(?P<ref>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("POST", re.compile(r"^/2015-03-31/functions/?$"), create_function),
    ("GET", re.compile(r"^/2015-03-31/functions/?$"), list_functions),
    ("GET", re.compile(rf"^/2015-03-31/functions/{_FN}/?$"), get_function),
    ("DELETE", re.compile(rf"^/2015-03-31/functions/{_FN}/?$"), delete_function),
    ("GET", re.compile(rf"^/2015-03-31/functions/{_FN}/configuration/?$"), get_configuration),
    ("PUT", re.compile(rf"^/2015-03-31/functions/{_FN}/configuration/?$"), update_configuration),
    ("PUT", re.compile(rf"^/2015-03-31/functions/{_FN}/code/?$"), update_code),
    ("POST", re.compile(rf"^/2015-03-31/functions/{_FN}/invocations/?$"), invoke),
    ("GET", re.compile(rf"^/cellcloud/v1/functions/{_FN}/logs/?$"), function_logs),
    ("GET", re.compile(r"^/cellcloud/v1/cell/status/?$"), cell_status),
]


async def handle(cell: Cell, req: dict[str, Any]) -> Reply:
    try:
        path = req["p"]
        method = req["m"]
        allowed = False
        for m, pattern, route in ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            allowed = True
            if m != method:
                continue
            q = parse_qs(req.get("q", ""), keep_blank_values=True)
            return await route(cell, req, match.groupdict().get("ref", ""), q)
        if allowed:
            raise LambdaError(405, "MethodNotAllowedException", f"{method} is not allowed on {path}")
        raise LambdaError(404, "UnknownOperationException", f"Unknown operation {method} {path}")
    except LambdaError as e:
        return {"s": e.status, "h": e.headers(), "b": e.body()}
