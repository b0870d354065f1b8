"""The Lambda REST API (botocore's ``lambda`` 2015-03-31 paths and shapes) and cellcloud's
native additions, on top of :class:`Cell`. A request is a dict from the router; the reply is
``{"s": status, "h": headers, "b": body}``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from ..core import errors, eventstream, params, policies, tracing
from ..core import function_urls as function_url_rules
from ..core.aliases import check_alias_name
from ..core.catalog_rules import page_size
from ..core.errors import LambdaError
from ..core.jsondepth import check_json_depth
from ..core.limits import DEFAULT_LIMITS
from ..core.tenant_status import cell_status_for_tenant
from ..core.validation import parse_function_ref
from ..transport import Stream
from . import events, function_urls, image_functions
from .cell import Cell, InvokeResult
from .mappings import Mappings
from .store import StateDiskFull, config_doc, function_arn, is_disk_full

Reply = dict[str, Any]
Match = dict[str, str]
Q = dict[str, list[str]]
Route = Callable[[Cell, dict[str, Any], Match, Q], Awaitable[Reply | Stream]]

log = logging.getLogger("cellcloud.frontend")

_JSON = {"content-type": "application/json"}


def _reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    body = b"" if doc is None else json.dumps(doc).encode()
    return {"s": status, "h": {**_JSON, **(headers or {})}, "b": body}


def _json_body(req: dict[str, Any]) -> dict[str, Any]:
    check_json_depth(req["b"] or b"", DEFAULT_LIMITS.json_depth_max)
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


_QUALIFIER = re.compile(r"^[a-zA-Z0-9-_$]{1,128}$")


def _qualifier(ref: str, q: dict[str, list[str]]) -> str | None:
    """The qualifier of a request: the ``Qualifier`` query parameter or the ARN's suffix."""
    parsed = parse_function_ref(unquote(ref))
    qual = _one(q, "Qualifier") or parsed.qualifier
    if qual is None:
        return None
    if not _QUALIFIER.match(qual) or ("$" in qual and qual != "$LATEST"):
        raise LambdaError(400, "ValidationException",
                          f"1 validation error detected: Value '{qual}' at 'qualifier' failed to "
                          "satisfy constraint: Member must satisfy regular expression pattern: "
                          "(|[a-zA-Z0-9$_-]+)")
    if parsed.qualifier is not None and _one(q, "Qualifier") not in (None, parsed.qualifier):
        raise errors.invalid("The derived qualifier from the function name does not match the "
                             "specified qualifier.")
    return qual


def _judge(op: str, req: dict[str, Any], body: dict[str, Any], q: Q | None = None,
           name: str = "") -> dict[str, Any]:
    """Refuse a parameter the region does not honour (core/params.py), naming it; returns
    ``body`` so a route reads ``doc = _judge(...)``."""
    found = params.refusal(params.LAMBDA, op, body, query=q, headers=req.get("h") or {},
                           ctx={"function_name": name})
    if found is not None:
        raise errors.invalid(found.message)
    return body


def _one(q: dict[str, list[str]], key: str) -> str | None:
    values = q.get(key)
    return values[0] if values else None


async def create_function(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    doc = _json_body(req)
    name = doc.get("FunctionName")
    _judge("CreateFunction", req, doc, q, name if isinstance(name, str) else "")
    return _reply(201, cell.catalog.create_function(req["a"], doc))


async def get_function(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    rec, _ = cell.catalog.resolve(req["a"], name, _qualifier(m["ref"], q))
    doc: dict[str, Any] = {
        "Configuration": {**config_doc(rec, cell.region),
                          **image_functions.state_fields(cell.catalog, rec)},
        "Code": (image_functions.code_location(rec) if rec.package_type == "Image" else
                 {"RepositoryType": "S3",
                  "Location": f"/cellcloud/v1/bundles/{rec.code_sha256}"}),
        "Tags": rec.tags,
    }
    reserved = cell.catalog.reserved(req["a"], name)
    if reserved is not None:
        doc["Concurrency"] = {"ReservedConcurrentExecutions": reserved}
    return _reply(200, doc)


async def get_configuration(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    rec, _ = cell.catalog.resolve(req["a"], name, _qualifier(m["ref"], q))
    return _reply(200, {**config_doc(rec, cell.region),
                        **image_functions.state_fields(cell.catalog, rec)})


async def list_functions(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    _judge("ListFunctions", req, {}, q)
    version = _one(q, "FunctionVersion")
    if version not in (None, "ALL"):
        raise errors.invalid("FunctionVersion must be ALL")
    return _reply(200, cell.catalog.list_functions(
        req["a"], _one(q, "Marker"), page_size(_one(q, "MaxItems"), cell.limits),
        version == "ALL"))


async def update_code(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("UpdateFunctionCode", req, _json_body(req), q, name)
    return _reply(200, cell.catalog.update_code(req["a"], name, doc))


async def update_configuration(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("UpdateFunctionConfiguration", req, _json_body(req), q, name)
    return _reply(200, cell.catalog.update_configuration(req["a"], name, doc))


async def delete_function(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    qualifier = _qualifier(m["ref"], q)
    cell.catalog.delete_function(req["a"], name, qualifier)
    if cell.events is not None:  # its async settings go with it (queued events fail: Rejected)
        if qualifier is None:
            for qual, _, _ in cell.events.store.list_configs(req["a"], name):
                cell.events.store.delete_config(req["a"], name, qual)
        else:
            cell.events.store.delete_config(req["a"], name, qualifier)
    return {"s": 204, "h": {}, "b": b""}


def _invoke_request(cell: Cell, req: dict[str, Any], m: Match,
                    q: Q) -> tuple[str, str | None, str]:
    """What Invoke and InvokeWithResponseStream check alike before anything runs: the
    request's shape, the caller's right to invoke, the log type. Answers the function's name,
    its qualifier and the invocation type."""
    name = _name(m["ref"], req["a"])
    qualifier = _qualifier(m["ref"], q)
    _judge("Invoke", req, {}, q, name)
    _check_caller(cell, req, name, qualifier)
    log_type = req["h"].get("x-amz-log-type", "None")
    if log_type not in ("None", "Tail"):
        raise errors.invalid(f"Unsupported LogType {log_type!r}")
    return name, qualifier, req["h"].get("x-amz-invocation-type", "RequestResponse")


async def invoke(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qualifier, itype = _invoke_request(cell, req, m, q)
    headers = req["h"]
    if itype == "DryRun":
        cell.resolve(req["a"], name, qualifier)
        return {"s": 204, "h": {}, "b": b""}
    if itype == "Event":
        return _accept_event(cell, req, name, qualifier)
    if itype != "RequestResponse":
        raise errors.invalid(f"Unsupported InvocationType {itype!r}")
    log_type = headers.get("x-amz-log-type", "None")
    res = await cell.invoke(req["a"], name, req["b"] or b"", log_tail=log_type == "Tail",
                            qualifier=qualifier,
                            request_id=headers.get(events.EVENT_ID_HEADER),
                            trace_header=headers.get(tracing.HEADER))
    out_headers = {"x-amz-executed-version": res.executed_version,
                   "x-amzn-requestid": res.request_id, "content-type": "application/json"}
    if res.trace is not None:
        out_headers[tracing.HEADER] = res.trace.response()
    if res.function_error:
        out_headers["x-amz-function-error"] = res.function_error
    if log_type == "Tail":
        out_headers["x-amz-log-result"] = base64.b64encode(res.logs).decode()
    return {"s": 200, "h": out_headers, "b": res.payload}


def _check_caller(cell: Cell, req: dict[str, Any], name: str, qualifier: str | None) -> None:
    """Another account's keys naming this function's ARN (the router sent the request here
    with ``c``, the caller): allowed only by a statement of the function's resource policy."""
    caller = req.get("c")
    if caller is None or caller == req["a"]:
        return
    cell.resolve(req["a"], name, qualifier)  # 404 before 403, as Lambda
    policy = cell.catalog.store.get_policy(req["a"], "f", name, qualifier or "")
    if not function_url_rules.authorize_invoke(req["a"], str(caller), policy):
        arn = function_arn(cell.region, req["a"], name, qualifier)
        raise LambdaError(403, "AccessDeniedException",
                          f"User: arn:aws:iam::{caller}:root is not authorized to perform: "
                          f"lambda:InvokeFunction on resource: {arn} because no resource-based "
                          "policy allows the lambda:InvokeFunction action")


async def invoke_with_response_stream(cell: Cell, req: dict[str, Any], m: Match,
                                      q: Q) -> Reply | Stream:
    """InvokeWithResponseStream: the response as an event stream (``PayloadChunk`` events, then
    ``InvokeComplete``). The cell gathers the function's response before the first event
    leaves (see docs/lambda-api.md, "Response streaming")."""
    name, qualifier, itype = _invoke_request(cell, req, m, q)
    if itype == "DryRun":
        cell.resolve(req["a"], name, qualifier)
        return {"s": 204, "h": {}, "b": b""}
    if itype != "RequestResponse":
        raise errors.invalid(f"Unsupported InvocationType {itype!r}: InvokeWithResponseStream "
                             "takes RequestResponse or DryRun")
    log_type = req["h"].get("x-amz-log-type", "None")
    rec, _ = cell.resolve(req["a"], name, qualifier)
    return Stream(_response_events(cell, req, name, qualifier, rec.version, log_type == "Tail"))


async def _response_events(cell: Cell, req: dict[str, Any], name: str, qualifier: str | None,
                           version: str, log_tail: bool) -> AsyncIterator[dict[str, Any]]:
    """InvokeWithResponseStream's answer for the router: the head, then each piece of the
    response as a ``PayloadChunk`` event the moment the function streams it, then
    ``InvokeComplete`` (with the error, for a function that failed)."""
    request_id = str(uuid.uuid4())
    head = {"s": 200, "h": {"content-type": eventstream.CONTENT_TYPE,
                            "x-amz-executed-version": version, "x-amzn-requestid": request_id}}
    head_sent = False
    try:
        async for item in function_urls.streamed(cell, req["a"], name, qualifier,
                                                 req["b"] or b"", request_id=request_id,
                                                 log_tail=log_tail):
            if not head_sent:
                yield head
                head_sent = True
            if not isinstance(item, InvokeResult):
                yield {"b": eventstream.response_stream(item[0], final=False)}
                continue
            log_result = base64.b64encode(item.logs).decode() if log_tail else None
            if item.function_error:
                yield {"b": eventstream.invoke_complete(
                    item.function_error, item.payload.decode(errors="replace"), log_result)}
            else:
                yield {"b": eventstream.response_stream(item.payload, log_result=log_result)}
    except LambdaError as e:
        if not head_sent:  # refused before anything ran (a throttle...): an ordinary error
            yield {"s": e.status, "h": e.headers()}
            yield {"b": e.body()}
        else:
            yield {"b": eventstream.invoke_complete(e.type, e.message)}


_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<ref>[^/]+)/invocations/?$")


_CONCURRENCY_PATH = re.compile(r"^/2017-10-31/functions/(?P<ref>[^/]+)/concurrency/?$")


def after_change(cell: Cell, req: dict[str, Any], reply: Reply) -> None:
    """A reserved concurrency set or removed: the function's leases were counted under the old
    limit and are revoked."""
    m = _CONCURRENCY_PATH.match(str(req.get("p", "")))
    if m is not None and req.get("m") in ("PUT", "DELETE") and reply["s"] < 300:
        cell.invoker.reserved_changed(req["a"], _name(m["ref"], req["a"]))


async def lease(cell: Cell, body: dict[str, Any]) -> dict[str, Any]:
    """A router's lease request for the function an invoke path names (issue #13): resolved,
    judged and counted as an invoke is (reserved concurrency, poison, throttles), answered
    with the environment, its agent's address and the lease's id and time to live, or with the
    Lambda-shaped error the invoke would have got (``{"error": {s, h, b}}``)."""
    try:
        m = _INVOKE_PATH.match(str(body["p"]))
        if m is None:
            raise LambdaError(404, "UnknownOperationException", "not an invoke path")
        q = parse_qs(str(body.get("q") or ""), keep_blank_values=True)
        account = str(body["a"])
        name = _name(m["ref"], account)
        qualifier = _qualifier(m["ref"], q)
        if qualifier not in (None, "$LATEST") and not qualifier.isdigit():
            # An alias may move (or split by weight) between invokes: each one resolves it.
            raise LambdaError(409, "NotLeasable", "an alias is resolved per invoke")
        rec, invoked_arn = cell.resolve(account, name, qualifier)
        image_functions.check_runnable(cell.catalog, rec)  # a deleted image: Failed
        return await cell.invoker.lease(rec, invoked_arn, cell.reserved(account, name),
                                        str(body["holder"]))
    except LambdaError as e:
        return {"error": {"s": e.status, "h": e.headers(), "b": e.body()}}


def _accept_event(cell: Cell, req: dict[str, Any], name: str, qualifier: str | None) -> Reply:
    """The durable async path: the 202 leaves only after the event is on disk."""
    if cell.events is None:
        raise errors.service("This cell has no event queue")
    rec, _ = cell.resolve(req["a"], name, qualifier)
    payload = req["b"] or b""
    if payload:
        check_json_depth(payload, cell.limits.json_depth_max)
        try:
            json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise LambdaError(400, "InvalidRequestContentException",
                              f"Could not parse request body into json: {e}") from e
    # The router never forwards EVENT_ID_HEADER: only the region's own callers (the control
    # plane's schedules) choose an event's id, and the intake accepts each id once.
    event_id = cell.events.accept(req["a"], name, qualifier or "$LATEST", payload, rec.timeout_s,
                                  rec.dead_letter_target,
                                  event_id=req["h"].get(events.EVENT_ID_HEADER))
    return {"s": 202, "h": {"x-amzn-requestid": event_id, "content-type": "application/json"},
            "b": b""}


async def invoke_async(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    """Native: ``POST /cellcloud/v1/functions/{name}/events`` -> 202 {"RequestId"}."""
    name = _name(m["ref"], req["a"])
    reply = _accept_event(cell, req, name, _qualifier(m["ref"], q))
    rid = reply["h"]["x-amzn-requestid"]
    return _reply(202, {"RequestId": rid}, {"x-amzn-requestid": rid})


# -- async settings (FunctionEventInvokeConfig) --------------------------------------------------
def _event_config_doc(cell: Cell, account: str, name: str, qual: str, doc: dict[str, Any],
                      modified_s: float) -> dict[str, Any]:
    return {"FunctionArn": function_arn(cell.region, account, name, qual),
            "LastModified": modified_s,
            "MaximumRetryAttempts": doc.get("MaximumRetryAttempts", 2),
            "MaximumEventAgeInSeconds": doc.get("MaximumEventAgeInSeconds", 21600),
            "DestinationConfig": {"OnSuccess": {}, "OnFailure": {},
                                  **(doc.get("DestinationConfig") or {})}}


def _event_target(cell: Cell, req: dict[str, Any], m: Match,
                  q: Q) -> tuple[str, str, events.EventStore]:
    if cell.events is None:
        raise errors.service("This cell has no event queue")
    name = _name(m["ref"], req["a"])
    qual = _qualifier(m["ref"], q) or "$LATEST"
    cell.resolve(req["a"], name, None if qual == "$LATEST" else qual)
    return name, qual, cell.events.store


async def put_event_config(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, store = _event_target(cell, req, m, q)
    body = _judge("UpdateFunctionEventInvokeConfig" if req["m"] == "POST"
                  else "PutFunctionEventInvokeConfig", req, _json_body(req), q, name)
    if req["m"] == "POST":  # UpdateFunctionEventInvokeConfig merges into what is there
        found = store.get_config(req["a"], name, qual)
        if found is None:
            raise errors.not_found(f"The function {function_arn(cell.region, req['a'], name, qual)}"
                                   " doesn't have an EventInvokeConfig")
        doc = events.check_config(body, cell.region, req["a"], found[0])
    else:
        doc = events.check_config(body, cell.region, req["a"])
    modified = store.put_config(req["a"], name, qual, doc)
    return _reply(200, _event_config_doc(cell, req["a"], name, qual, doc, modified))


async def get_event_config(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, store = _event_target(cell, req, m, q)
    found = store.get_config(req["a"], name, qual)
    if found is None:
        raise errors.not_found(f"The function {function_arn(cell.region, req['a'], name, qual)} "
                               "doesn't have an EventInvokeConfig")
    return _reply(200, _event_config_doc(cell, req["a"], name, qual, *found))


async def delete_event_config(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, store = _event_target(cell, req, m, q)
    if not store.delete_config(req["a"], name, qual):
        raise errors.not_found(f"The function {function_arn(cell.region, req['a'], name, qual)} "
                               "doesn't have an EventInvokeConfig")
    return {"s": 204, "h": {}, "b": b""}


async def list_event_configs(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, _, store = _event_target(cell, req, m, {})
    rows = store.list_configs(req["a"], name)
    return _reply(200, {"FunctionEventInvokeConfigs": [
        _event_config_doc(cell, req["a"], name, qual, doc, t) for qual, doc, t in rows]})


# -- versions ------------------------------------------------------------------------------------
async def publish_version(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("PublishVersion", req, _json_body(req), q, name)
    return _reply(201, cell.catalog.publish_version(req["a"], name, doc))


async def list_versions(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    return _reply(200, cell.catalog.list_versions(
        req["a"], _name(m["ref"], req["a"]), _one(q, "Marker"),
        page_size(_one(q, "MaxItems"), cell.limits)))


# -- aliases -------------------------------------------------------------------------------------
async def create_alias(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("CreateAlias", req, _json_body(req), q, name)
    return _reply(201, cell.catalog.create_alias(req["a"], name, doc))


async def list_aliases(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    return _reply(200, cell.catalog.list_aliases(
        req["a"], _name(m["ref"], req["a"]), _one(q, "Marker"),
        page_size(_one(q, "MaxItems"), cell.limits), _one(q, "FunctionVersion")))


async def get_alias(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    rec = cell.catalog.alias(req["a"], _name(m["ref"], req["a"]),
                             check_alias_name(unquote(m["alias"])))
    return _reply(200, cell.catalog.alias_doc(rec))


async def update_alias(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("UpdateAlias", req, _json_body(req), q, name)
    return _reply(200, cell.catalog.update_alias(
        req["a"], name, check_alias_name(unquote(m["alias"])), doc))


async def delete_alias(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    cell.catalog.delete_alias(req["a"], _name(m["ref"], req["a"]),
                              check_alias_name(unquote(m["alias"])))
    return {"s": 204, "h": {}, "b": b""}


# -- reserved concurrency ------------------------------------------------------------------------
async def put_concurrency(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("PutFunctionConcurrency", req, _json_body(req), q, name)
    return _reply(200, cell.catalog.put_concurrency(req["a"], name, doc))


async def get_concurrency(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    cell.catalog.function(req["a"], name)
    reserved = cell.catalog.reserved(req["a"], name)
    return _reply(200, {} if reserved is None else {"ReservedConcurrentExecutions": reserved})


async def delete_concurrency(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    cell.catalog.delete_concurrency(req["a"], _name(m["ref"], req["a"]))
    return {"s": 204, "h": {}, "b": b""}


# -- provisioned concurrency -------------------------------------------------------------------
def _qualifier_param(q: Q) -> str:
    qual = (q.get("Qualifier") or [""])[0]
    if not qual:
        raise errors.invalid("Qualifier is required for provisioned concurrency")
    return qual


async def put_provisioned(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    doc = _judge("PutProvisionedConcurrencyConfig", req, _json_body(req), q, name)
    return _reply(202, cell.catalog.put_provisioned(req["a"], name, _qualifier_param(q), doc))


async def get_provisioned(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    return _reply(200, cell.catalog.provisioned_doc(req["a"], name, _qualifier_param(q)))


async def delete_provisioned(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    try:
        cell.catalog.delete_provisioned(req["a"], _name(m["ref"], req["a"]), _qualifier_param(q))
    except LambdaError as e:
        # DeleteProvisionedConcurrencyConfig's model has no ProvisionedConcurrencyConfigNotFound
        # (Get's has): a missing config is its ResourceNotFoundException
        if e.type != "ProvisionedConcurrencyConfigNotFoundException":
            raise
        raise errors.not_found(e.message) from e
    return {"s": 204, "h": {}, "b": b""}


# -- layers --------------------------------------------------------------------------------------
_LAYER_REF = re.compile(
    r"^(?:arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):layer:)?"
    r"(?P<name>[a-zA-Z0-9-_]{1,140})$")


def _layer_name(cell: Cell, ref: str, account: str) -> str:
    ref = unquote(ref)
    match = _LAYER_REF.match(ref)
    if match is None:
        raise LambdaError(400, "ValidationException",
                          f"1 validation error detected: Value '{ref}' at 'layerName' failed to "
                          "satisfy constraint: Member must satisfy regular expression pattern: "
                          "(arn:[a-zA-Z0-9-]+:lambda:[a-zA-Z0-9-]+:\\d{12}:layer:[a-zA-Z0-9-_]+)"
                          "|[a-zA-Z0-9-_]+")
    if match["account"] is not None and (match["account"] != account
                                         or match["region"] != cell.region):
        raise errors.not_found(f"Layer not found: {ref}")
    return match["name"]


def _layer_version_number(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 12:
        raise LambdaError(400, "ValidationException",
                          f"1 validation error detected: Value '{raw}' at 'versionNumber' "
                          "failed to satisfy constraint: Member must be a number")
    return int(raw)


async def publish_layer_version(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _layer_name(cell, m["layer"], req["a"])
    doc = _judge("PublishLayerVersion", req, _json_body(req), q, name)
    return _reply(201, cell.catalog.publish_layer_version(req["a"], name, doc))


async def get_layer_version(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _layer_name(cell, m["layer"], req["a"])
    rec = cell.catalog.layer_version(req["a"], name, _layer_version_number(m["version"]))
    return _reply(200, cell.catalog.layer_doc(rec, content=True))


async def delete_layer_version(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _layer_name(cell, m["layer"], req["a"])
    cell.catalog.delete_layer_version(req["a"], name, _layer_version_number(m["version"]))
    return {"s": 204, "h": {}, "b": b""}


async def list_layer_versions(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _layer_name(cell, m["layer"], req["a"])
    _judge("ListLayerVersions", req, {}, q, name)
    return _reply(200, cell.catalog.list_layer_versions(
        req["a"], name, _one(q, "Marker"), page_size(_one(q, "MaxItems"), cell.limits),
        _one(q, "CompatibleRuntime")))


async def list_layers(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    if _one(q, "find") == "LayerVersion":  # GetLayerVersionByArn
        arn = _one(q, "Arn") or ""
        ref, _, version = arn.rpartition(":")
        name = _layer_name(cell, ref, req["a"]) if ref.startswith("arn:") else _layer_name(
            cell, arn, "-")
        rec = cell.catalog.layer_version(req["a"], name, _layer_version_number(version))
        return _reply(200, cell.catalog.layer_doc(rec, content=True))
    _judge("ListLayers", req, {}, q)
    return _reply(200, cell.catalog.list_layers(
        req["a"], _one(q, "Marker"), page_size(_one(q, "MaxItems"), cell.limits),
        _one(q, "CompatibleRuntime")))


# -- tags ----------------------------------------------------------------------------------------
def _tag_target(cell: Cell, req: dict[str, Any], m: Match) -> str:
    """TagResource & co. name a function by its unqualified ARN (or name, as cellcloud accepts)."""
    ref = unquote(m["res"])
    parsed = parse_function_ref(ref)
    if parsed.qualifier is not None:
        raise errors.invalid("Tags apply to a function, not to a version or alias: "
                             "use the unqualified function ARN")
    name = _name(ref, req["a"])
    cell.catalog.function(req["a"], name)  # 404 if absent
    return name


async def list_tags(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _tag_target(cell, req, m)
    return _reply(200, {"Tags": cell.catalog.function(req["a"], name).tags})


async def tag_resource(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _tag_target(cell, req, m)
    doc = _json_body(req)
    unknown = set(doc) - {"Tags"}
    if unknown:
        raise errors.invalid(f"The parameter {sorted(unknown)[0]} is not supported by this "
                             "region: TagResource has no such parameter.")
    if not isinstance(doc.get("Tags"), dict):
        raise errors.invalid("Tags must be a map of string to string")
    cell.catalog.set_tags(req["a"], name, doc["Tags"], [])
    return {"s": 204, "h": {}, "b": b""}


async def untag_resource(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _tag_target(cell, req, m)
    keys = q.get("tagKeys")
    if not keys:
        raise errors.invalid("tagKeys is required")
    cell.catalog.set_tags(req["a"], name, {}, keys)
    return {"s": 204, "h": {}, "b": b""}


# -- resource policies ---------------------------------------------------------------------------
def _policy_target(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> tuple[str, str, str]:
    """(name, qualifier or '', resource ARN) of a function policy request; 404 if absent."""
    name = _name(m["ref"], req["a"])
    qual = _qualifier(m["ref"], q) or ""
    if qual:
        cell.catalog.resolve(req["a"], name, qual)
    else:
        cell.catalog.function(req["a"], name)
    return name, qual, function_arn(cell.region, req["a"], name, qual or None)


async def add_permission(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, arn = _policy_target(cell, req, m, q)
    doc = _json_body(req)
    unknown = set(doc) - set(_ADD_PERMISSION)
    if unknown:
        raise errors.invalid(f"The parameter {sorted(unknown)[0]} is not supported by this "
                             "region: AddPermission has no such parameter.")
    stmt = policies.function_statement(doc, arn)
    store = cell.catalog.store
    new = policies.add(store.get_policy(req["a"], "f", name, qual), stmt, doc.get("RevisionId"),
                       str(uuid.uuid4()))
    store.put_policy(req["a"], "f", name, qual, new)
    return _reply(201, {"Statement": json.dumps(stmt)})


_ADD_PERMISSION = ("StatementId", "Action", "Principal", "SourceArn", "FunctionUrlAuthType",
                   "InvokedViaFunctionUrl", "SourceAccount", "EventSourceToken", "RevisionId",
                   "PrincipalOrgID")


async def get_policy(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, _ = _policy_target(cell, req, m, q)
    return _reply(200, policies.policy_doc(cell.catalog.store.get_policy(req["a"], "f", name,
                                                                         qual)))


async def remove_permission(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, qual, _ = _policy_target(cell, req, m, q)
    store = cell.catalog.store
    new = policies.remove(store.get_policy(req["a"], "f", name, qual), unquote(m["sid"]),
                          _one(q, "RevisionId"), str(uuid.uuid4()))
    store.put_policy(req["a"], "f", name, qual, new)
    return {"s": 204, "h": {}, "b": b""}


def _layer_policy_target(cell: Cell, req: dict[str, Any], m: Match) -> tuple[str, int, str]:
    name = _layer_name(cell, m["layer"], req["a"])
    version = _layer_version_number(m["version"])
    rec = cell.catalog.layer_version(req["a"], name, version)  # 404 if absent
    return name, version, str(cell.catalog.layer_doc(rec, content=False)["LayerVersionArn"])


async def add_layer_permission(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, version, arn = _layer_policy_target(cell, req, m)
    doc = _json_body(req)
    unknown = set(doc) - {"StatementId", "Action", "Principal", "OrganizationId"}
    if unknown:
        raise errors.invalid(f"The parameter {sorted(unknown)[0]} is not supported by this "
                             "region: AddLayerVersionPermission has no such parameter.")
    stmt = policies.layer_statement(doc, arn)
    store = cell.catalog.store
    rev = str(uuid.uuid4())
    new = policies.add(store.get_policy(req["a"], "l", name, str(version)), stmt,
                       _one(q, "RevisionId"), rev)
    store.put_policy(req["a"], "l", name, str(version), new)
    return _reply(201, {"Statement": json.dumps(stmt), "RevisionId": rev})


async def get_layer_policy(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, version, _ = _layer_policy_target(cell, req, m)
    return _reply(200, policies.policy_doc(cell.catalog.store.get_policy(
        req["a"], "l", name, str(version))))


async def remove_layer_permission(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name, version, _ = _layer_policy_target(cell, req, m)
    store = cell.catalog.store
    new = policies.remove(store.get_policy(req["a"], "l", name, str(version)),
                          unquote(m["sid"]), _one(q, "RevisionId"), str(uuid.uuid4()))
    store.put_policy(req["a"], "l", name, str(version), new)
    return {"s": 204, "h": {}, "b": b""}


# -- settings the region has one answer for ------------------------------------------------------
async def get_account_settings(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    lim = cell.limits
    count, code = cell.catalog.account_usage(req["a"])
    return _reply(200, {
        # no quota on an account's total code: the state disk bounds it
        "AccountLimit": {"TotalCodeSize": cell.catalog.store.disk_space().total_bytes,
                         "CodeSizeUnzipped": lim.unzipped_bytes_max,
                         "CodeSizeZipped": lim.zip_bytes_max,
                         "ConcurrentExecutions": lim.account_concurrency_max,
                         "UnreservedConcurrentExecutions": lim.account_concurrency_max
                         - cell.catalog.store.reserved_total(req["a"], "")},
        "AccountUsage": {"TotalCodeSize": code, "FunctionCount": count}})


def _fn(cell: Cell, req: dict[str, Any], m: Match) -> str:
    name = _name(m["ref"], req["a"])
    cell.catalog.function(req["a"], name)
    return name


async def get_fn_code_signing(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    # No function has a code signing config (CreateFunction refuses CodeSigningConfigArn):
    # AWS answers such a function with an empty ARN.
    return _reply(200, {"CodeSigningConfigArn": "", "FunctionName": _fn(cell, req, m)})


async def delete_fn_code_signing(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    _fn(cell, req, m)
    return {"s": 204, "h": {}, "b": b""}


async def put_fn_code_signing(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    _fn(cell, req, m)
    arn = _json_body(req).get("CodeSigningConfigArn")
    raise LambdaError(404, "CodeSigningConfigNotFoundException",
                      f"Code signing config {arn} not found: code signing is not supported by "
                      "this region, so no code signing config exists")


async def get_runtime_management(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    qual = _qualifier(m["ref"], q)
    cell.catalog.resolve(req["a"], name, qual)
    return _reply(200, {"UpdateRuntimeOn": "Auto",
                        "FunctionArn": function_arn(cell.region, req["a"], name, qual)})


async def put_runtime_management(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    qual = _qualifier(m["ref"], q)
    cell.catalog.resolve(req["a"], name, qual)
    doc = _json_body(req)
    if doc.get("UpdateRuntimeOn") != "Auto" or doc.get("RuntimeVersionArn") is not None:
        raise errors.invalid("The parameter UpdateRuntimeOn is not supported by this region: a "
                             "function runs on the host's runtime as installed (only Auto is "
                             "accepted, without RuntimeVersionArn).")
    return _reply(200, {"UpdateRuntimeOn": "Auto",
                        "FunctionArn": function_arn(cell.region, req["a"], name, qual)})


async def get_recursion(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    # The region does not detect recursive loops between functions and queues: "Allow" is the
    # truthful answer (AWS's default, Terminate, would claim a detection that does not exist).
    _fn(cell, req, m)
    return _reply(200, {"RecursiveLoop": "Allow"})


async def put_recursion(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    _fn(cell, req, m)
    if _json_body(req).get("RecursiveLoop") != "Allow":
        raise errors.invalid("The parameter RecursiveLoop is not supported by this region: "
                             "recursive loops are not detected (only Allow is accepted).")
    return _reply(200, {"RecursiveLoop": "Allow"})


async def list_provisioned(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    name = _name(m["ref"], req["a"])
    return _reply(200, {"ProvisionedConcurrencyConfigs":
                        cell.catalog.list_provisioned_docs(req["a"], name)})


async def provisioned_get_or_list(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    if _one(q, "List") == "ALL":  # ListProvisionedConcurrencyConfigs
        return await list_provisioned(cell, req, m, q)
    return await get_provisioned(cell, req, m, q)


def _absent(what: str, code: str = "ResourceNotFoundException") -> Route:
    """An operation on a kind of resource this region never has: AWS's not-found answer."""
    async def route(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
        if "ref" in m:
            _fn(cell, req, m)
        raise LambdaError(404, code, f"{what} not found: this region has no {what}s")
    return route


def _empty(key: str) -> Route:
    """A list of a kind of resource this region never has: empty, as AWS lists none."""
    async def route(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
        if "ref" in m:
            _fn(cell, req, m)
        return _reply(200, {key: []})
    return route


def _unsupported(feature: str) -> Route:
    """Creating a kind of resource this region does not have: refused, naming the feature."""
    async def route(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
        if "ref" in m:
            _fn(cell, req, m)
        raise errors.invalid(f"{feature} are not supported by this region")
    return route


async def invoke_async_legacy(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    """InvokeAsync (deprecated by AWS, still in the model): queued as an Event invoke."""
    name = _name(m["ref"], req["a"])
    _accept_event(cell, req, name, _qualifier(m["ref"], q))
    return _reply(202, {"Status": 202})


# -- SQS event source mappings (frontend/mappings.py) ------------------------------------------
def _mappings(cell: Cell) -> Mappings:
    if cell.mappings is None:
        raise errors.service("This cell runs no event source mappings")
    return cell.mappings


async def create_esm(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    doc = _judge("CreateEventSourceMapping", req, _json_body(req), q)
    return _reply(202, _mappings(cell).create(req["a"], doc))


async def get_esm(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    return _reply(200, _mappings(cell).get(req["a"], unquote(m["uuid"])))


async def update_esm(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    doc = _judge("UpdateEventSourceMapping", req, _json_body(req), q)
    return _reply(202, _mappings(cell).update(req["a"], unquote(m["uuid"]), doc))


async def delete_esm(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    return _reply(202, _mappings(cell).delete(req["a"], unquote(m["uuid"])))


async def list_esm(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    return _reply(200, _mappings(cell).list(
        req["a"], queue_arn=_one(q, "EventSourceArn"), function=_one(q, "FunctionName"),
        marker=_one(q, "Marker"), max_items=page_size(_one(q, "MaxItems"), cell.limits)))


# -- cellcloud's own -------------------------------------------------------------------------------
async def function_attestation(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    nonce = (q.get("nonce") or [""])[0]
    qualifier = q["Qualifier"][0] if q.get("Qualifier") else None
    return _reply(200, await cell.attest(req["a"], _name(m["ref"], req["a"]), qualifier, nonce))


async def function_logs(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    try:
        limit = max(1, min(1000, int(q.get("limit", ["50"])[0])))
    except ValueError as e:
        raise errors.invalid("limit must be an integer") from e
    return _reply(200, {"events": cell.logs(req["a"], _name(m["ref"], req["a"]), limit)})


async def cell_status(cell: Cell, req: dict[str, Any], m: Match, q: Q) -> Reply:
    """A tenant's view of its cell: its own functions and environments (the operator's whole
    view is the router's, behind the operator token)."""
    return _reply(200, cell_status_for_tenant(await cell.status(), req["a"]))


_FN = r"(?P<ref>[^/]+)"
_FNS = r"^/2015-03-31/functions"
_LAYERS = r"^/2018-10-31/layers"
_RES = r"(?P<res>[^/]+)"
_LV = rf"{_LAYERS}/(?P<layer>[^/]+)/versions/(?P<version>[^/]+)/policy"
_CSC = r"^/2020-04-22/code-signing-configs"
_ESM = r"^/2015-03-31/event-source-mappings"
_CAP = r"^/2025-11-30/capacity-providers"
_DUR = r"^/2025-12-01/durable-executions/(?P<arn>.+?)"
_CB = r"^/2025-12-01/durable-execution-callbacks/(?P<cb>[^/]+)"
_RP = r"^/2026-07-09/resource-policy/(?P<arn>.+)"
_URL = rf"^/2021-10-31/functions/{_FN}/url/?$"
_SCALE = rf"^/2025-11-30/functions/{_FN}/function-scaling-config/?$"
_NO_CSC = "Code signing configs"
_NO_CAP = "Capacity providers (Lambda Managed Instances)"
_NO_DUR = "Durable executions"
#: the operations IaC tools call beyond the function/version/alias/layer core (issue #15): each
#: works, or answers as AWS answers where a feature is absent (never 404 for an unknown route)
IAC_ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("GET", re.compile(rf"^/2017-03-31/tags/{_RES}/?$"), list_tags),
    ("POST", re.compile(rf"^/2017-03-31/tags/{_RES}/?$"), tag_resource),
    ("DELETE", re.compile(rf"^/2017-03-31/tags/{_RES}/?$"), untag_resource),
    ("POST", re.compile(rf"{_FNS}/{_FN}/policy/?$"), add_permission),
    ("GET", re.compile(rf"{_FNS}/{_FN}/policy/?$"), get_policy),
    ("DELETE", re.compile(rf"{_FNS}/{_FN}/policy/(?P<sid>[^/]+)/?$"), remove_permission),
    ("POST", re.compile(rf"{_LV}/?$"), add_layer_permission),
    ("GET", re.compile(rf"{_LV}/?$"), get_layer_policy),
    ("DELETE", re.compile(rf"{_LV}/(?P<sid>[^/]+)/?$"), remove_layer_permission),
    ("GET", re.compile(r"^/2016-08-19/account-settings/?$"), get_account_settings),
    ("GET", re.compile(rf"^/2020-06-30/functions/{_FN}/code-signing-config/?$"),
     get_fn_code_signing),
    ("PUT", re.compile(rf"^/2020-06-30/functions/{_FN}/code-signing-config/?$"),
     put_fn_code_signing),
    ("DELETE", re.compile(rf"^/2020-06-30/functions/{_FN}/code-signing-config/?$"),
     delete_fn_code_signing),
    ("GET", re.compile(rf"^/2021-07-20/functions/{_FN}/runtime-management-config/?$"),
     get_runtime_management),
    ("PUT", re.compile(rf"^/2021-07-20/functions/{_FN}/runtime-management-config/?$"),
     put_runtime_management),
    ("GET", re.compile(rf"^/2024-08-31/functions/{_FN}/recursion-config/?$"), get_recursion),
    ("PUT", re.compile(rf"^/2024-08-31/functions/{_FN}/recursion-config/?$"), put_recursion),
    ("POST", re.compile(rf"^/2014-11-13/functions/{_FN}/invoke-async/?$"), invoke_async_legacy),
    ("POST", re.compile(rf"^/2021-11-15/functions/{_FN}/response-streaming-invocations/?$"),
     invoke_with_response_stream),
    # Function URLs (frontend/function_urls.py)
    ("POST", re.compile(_URL), function_urls.create),
    ("GET", re.compile(_URL), function_urls.get),
    ("PUT", re.compile(_URL), function_urls.update),
    ("DELETE", re.compile(_URL), function_urls.delete),
    ("GET", re.compile(rf"^/2021-10-31/functions/{_FN}/urls/?$"), function_urls.list_configs),
    # SQS event source mappings (frontend/mappings.py)
    ("POST", re.compile(rf"{_ESM}/?$"), create_esm),
    ("GET", re.compile(rf"{_ESM}/?$"), list_esm),
    ("GET", re.compile(rf"{_ESM}/(?P<uuid>[^/]+)/?$"), get_esm),
    ("PUT", re.compile(rf"{_ESM}/(?P<uuid>[^/]+)/?$"), update_esm),
    ("DELETE", re.compile(rf"{_ESM}/(?P<uuid>[^/]+)/?$"), delete_esm),
    # code signing: not supported
    ("POST", re.compile(rf"{_CSC}/?$"), _unsupported(_NO_CSC)),
    ("GET", re.compile(rf"{_CSC}/?$"), _empty("CodeSigningConfigs")),
    ("GET", re.compile(rf"{_CSC}/[^/]+/functions/?$"), _absent("code signing config")),
    ("GET", re.compile(rf"{_CSC}/[^/]+/?$"), _absent("code signing config")),
    ("PUT", re.compile(rf"{_CSC}/[^/]+/?$"), _absent("code signing config")),
    ("DELETE", re.compile(rf"{_CSC}/[^/]+/?$"), _absent("code signing config")),
    # capacity providers (Lambda Managed Instances): not supported
    ("POST", re.compile(rf"{_CAP}/?$"), _unsupported(_NO_CAP)),
    ("GET", re.compile(rf"{_CAP}/?$"), _empty("CapacityProviders")),
    ("GET", re.compile(rf"{_CAP}/[^/]+/function-versions/?$"), _absent("capacity provider")),
    ("GET", re.compile(rf"{_CAP}/[^/]+/?$"), _absent("capacity provider")),
    ("PUT", re.compile(rf"{_CAP}/[^/]+/?$"), _absent("capacity provider")),
    ("DELETE", re.compile(rf"{_CAP}/[^/]+/?$"), _absent("capacity provider")),
    ("GET", re.compile(_SCALE), _absent("function scaling config")),
    ("PUT", re.compile(_SCALE), _unsupported(_NO_CAP)),
    # durable functions: not supported (CreateFunction refuses DurableConfig)
    ("GET", re.compile(rf"^/2025-12-01/functions/{_FN}/durable-executions/?$"),
     _empty("DurableExecutions")),
    ("GET", re.compile(rf"{_DUR}/(history|state)/?$"), _absent("durable execution")),
    ("POST", re.compile(rf"{_DUR}/(checkpoint|pause|resume|stop)/?$"),
     _absent("durable execution")),
    ("GET", re.compile(rf"{_DUR}/?$"), _absent("durable execution")),
    ("DELETE", re.compile(rf"{_DUR}/?$"), _absent("durable execution")),
    ("POST", re.compile(rf"{_CB}/(fail|heartbeat|succeed)/?$"),
     _absent("durable execution callback")),
    # generic resource policies (PutResourcePolicy & co.): not supported; AddPermission is
    ("GET", re.compile(rf"{_RP}/?$"), _absent("resource policy")),
    ("PUT", re.compile(rf"{_RP}/?$"),
     _unsupported("Resource policies by ARN (PutResourcePolicy; use AddPermission)")),
    ("DELETE", re.compile(rf"{_RP}/?$"), _absent("resource policy")),
]

ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    ("POST", re.compile(rf"{_FNS}/?$"), create_function),
    ("GET", re.compile(rf"{_FNS}/?$"), list_functions),
    ("GET", re.compile(rf"{_FNS}/{_FN}/?$"), get_function),
    ("DELETE", re.compile(rf"{_FNS}/{_FN}/?$"), delete_function),
    ("GET", re.compile(rf"{_FNS}/{_FN}/configuration/?$"), get_configuration),
    ("PUT", re.compile(rf"{_FNS}/{_FN}/configuration/?$"), update_configuration),
    ("PUT", re.compile(rf"{_FNS}/{_FN}/code/?$"), update_code),
    ("POST", re.compile(rf"{_FNS}/{_FN}/invocations/?$"), invoke),
    ("POST", re.compile(rf"{_FNS}/{_FN}/versions/?$"), publish_version),
    ("GET", re.compile(rf"{_FNS}/{_FN}/versions/?$"), list_versions),
    ("POST", re.compile(rf"{_FNS}/{_FN}/aliases/?$"), create_alias),
    ("GET", re.compile(rf"{_FNS}/{_FN}/aliases/?$"), list_aliases),
    ("GET", re.compile(rf"{_FNS}/{_FN}/aliases/(?P<alias>[^/]+)/?$"), get_alias),
    ("PUT", re.compile(rf"{_FNS}/{_FN}/aliases/(?P<alias>[^/]+)/?$"), update_alias),
    ("DELETE", re.compile(rf"{_FNS}/{_FN}/aliases/(?P<alias>[^/]+)/?$"), delete_alias),
    ("PUT", re.compile(rf"^/2017-10-31/functions/{_FN}/concurrency/?$"), put_concurrency),
    ("DELETE", re.compile(rf"^/2017-10-31/functions/{_FN}/concurrency/?$"), delete_concurrency),
    ("GET", re.compile(rf"^/2019-09-30/functions/{_FN}/concurrency/?$"), get_concurrency),
    ("PUT", re.compile(rf"^/2019-09-30/functions/{_FN}/provisioned-concurrency/?$"),
     put_provisioned),
    ("GET", re.compile(rf"^/2019-09-30/functions/{_FN}/provisioned-concurrency/?$"),
     provisioned_get_or_list),
    ("DELETE", re.compile(rf"^/2019-09-30/functions/{_FN}/provisioned-concurrency/?$"),
     delete_provisioned),
    ("GET", re.compile(rf"{_LAYERS}/?$"), list_layers),
    ("POST", re.compile(rf"{_LAYERS}/(?P<layer>[^/]+)/versions/?$"), publish_layer_version),
    ("GET", re.compile(rf"{_LAYERS}/(?P<layer>[^/]+)/versions/?$"), list_layer_versions),
    ("GET", re.compile(rf"{_LAYERS}/(?P<layer>[^/]+)/versions/(?P<version>[^/]+)/?$"),
     get_layer_version),
    ("DELETE", re.compile(rf"{_LAYERS}/(?P<layer>[^/]+)/versions/(?P<version>[^/]+)/?$"),
     delete_layer_version),
    ("GET", re.compile(rf"^/2019-09-25/functions/{_FN}/event-invoke-config/list/?$"),
     list_event_configs),
    ("PUT", re.compile(rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$"),
     put_event_config),
    ("POST", re.compile(rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$"),
     put_event_config),
    ("GET", re.compile(rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$"),
     get_event_config),
    ("DELETE", re.compile(rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$"),
     delete_event_config),
    *IAC_ROUTES,
    ("POST", re.compile(rf"^/cellcloud/v1/functions/{_FN}/events/?$"), invoke_async),
    ("GET", re.compile(rf"^/cellcloud/v1/functions/{_FN}/logs/?$"), function_logs),
    ("GET", re.compile(rf"^/cellcloud/v1/functions/{_FN}/attestation/?$"),
     function_attestation),
    ("GET", re.compile(r"^/cellcloud/v1/cell/status/?$"), cell_status),
]


#: the routes another account may reach (the router sends it with ``c``, the caller)
_CROSS_ACCOUNT = frozenset({invoke, invoke_with_response_stream})


async def handle(cell: Cell, req: dict[str, Any]) -> Reply | Stream:
    try:
        path = req["p"]
        method = req["m"]
        allowed: list[str] = []
        for m, pattern, route in ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            allowed.append(m)
            if m != method:
                continue
            q = parse_qs(req.get("q", ""), keep_blank_values=True)
            if req.get("c") not in (None, req["a"]) and route not in _CROSS_ACCOUNT:
                raise errors.not_found(f"Function not found: {path}")
            return await route(cell, req, match.groupdict(), q)
        if allowed:
            raise LambdaError(405, "MethodNotAllowedException", f"{method} is not allowed on {path}",
                              http_headers={"allow": ", ".join(sorted(set(allowed)))})
        raise LambdaError(404, "UnknownOperationException", f"Unknown operation {method} {path}")
    except LambdaError as e:
        return {"s": e.status, "h": e.headers(), "b": e.body()}
    except Exception as e:  # a bug: answer Lambda-shaped, log it, keep serving
        if is_disk_full(e):  # a write outside the function store (async events, queues)
            err: LambdaError = StateDiskFull(cell.store.disk_space().path,
                                             f"{req.get('m')} {req.get('p')}")
            return {"s": err.status, "h": err.headers(), "b": err.body()}
        log.exception("unexpected error on %s %s", req.get("m"), req.get("p"))
        err = LambdaError(500, "ServiceException", f"Internal error: {type(e).__name__}")
        return {"s": err.status, "h": err.headers(), "b": err.body()}
