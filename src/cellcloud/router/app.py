"""The router as a bare ASGI app: authenticate, map the tenant's account id to its cell, forward.

It holds no state of its own beyond the cell map and the tenant table it was given, so any
number of routers can run side by side and a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from .. import eventlog, runtime
from ..console.app import PREFIX as CONSOLE_PREFIX
from ..console.app import Console, session_value
from ..core import tracing
from ..core.autoscale import TARGET_PREFIX as AAS_TARGET_PREFIX
from ..core.cellmap import CellMap
from ..core.ec2_query import XML as EC2_XML
from ..core.ec2_query import error_xml as ec2_error_xml
from ..core.ecs_taskdef import TARGET_PREFIX as ECS_TARGET_PREFIX
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.messages import HttpReply, HttpRequest, MessageError
from ..core.tenant_status import cell_status_for_tenant
from ..metrics import Pushed, process_registry
from ..queues import query as sqs_query
from ..registry.api import ECR_TARGET_PREFIX
from ..registry.core import RegistryError
from ..registry.edge import RegistryEdge, RegistryKey
from ..security import sigv4
from ..transport import (
    CallTimeout,
    Client,
    RedeliveringClient,
    RemoteError,
    TransportError,
    frame_bytes_max,
    protocol_stats,
)
from . import metrics as router_metrics
from .function_urls import STREAM_SUFFIX, UrlEdge, cross_account_owner, open_stream
from .leases import Fallback, Leases
from .services import ServiceEdge

if TYPE_CHECKING:
    from ..span_export import SpanExporter
    from .connections import ConnectionRegistry

log = logging.getLogger("cellcloud.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Headers a frontend needs; everything else stays at the edge.
_FORWARDED = frozenset(
    {b"x-amz-invocation-type", b"x-amz-log-type", b"x-amz-client-context", b"content-type",
     # forwarded so that the cell can refuse them by name (core/params.py), not lose them
     b"x-amz-durable-execution-name", b"x-amz-tenant-id"}
)
_INVOKE_SUFFIXES = ("/invocations", "/invocations/")
LOGS_TARGET_PREFIX = "Logs_20140328."  # frontend/logs_api.py's (no import across components)
control_timeout_s = 30.0
cell_status_margin_s = 5.0  # a cell's status may take its agents' call timeout, plus this
# A request crosses to its cell in one transport frame: leave room for the envelope.
forward_body_bytes_max = frame_bytes_max - 1024 * 1024
STATUS_PATH = "/cellcloud/v1/status"
CELL_STATUS_PATH = "/cellcloud/v1/cell/status"
METRICS_PATH = "/metrics"
_STATUS_PATHS = (STATUS_PATH, CELL_STATUS_PATH, METRICS_PATH)


class OperatorToken:
    """The operator's bearer token (``operator.json`` in the state directory, mode 0600),
    reloaded when the file changes. It opens the region-wide status and nothing else."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime_ns = -1
        self._token = b""
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
            if st.st_mtime_ns == self._mtime_ns:
                return
            with open(self.path) as f:
                self._token = str(json.load(f)["token"]).encode()
            self._mtime_ns = st.st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("operator token file %s unreadable; region status is refused", self.path)

    def matches(self, token: str) -> bool:
        self.reload()
        return bool(self._token) and hmac.compare_digest(token.encode(), self._token)

    def session(self, label: bytes) -> str | None:
        """A value derived from the token (the console's session cookie), None without one."""
        self.reload()
        return session_value(self._token, label) if self._token else None


def _forbidden_token() -> LambdaError:
    return LambdaError(403, "UnrecognizedClientException",
                       "The security token included in the request is invalid.")


class Tenants:
    """Access key id -> (account id, secret), from ``tenants.json`` (reloaded when it changes).

    This table is the router's only state besides the cell map.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime_ns = -1
        self._keys: dict[str, tuple[str, str]] = {}
        self.reload()

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if st.st_mtime_ns == self._mtime_ns:
            return
        with open(self.path) as f:
            doc = json.load(f)
        self._keys = {
            t["access_key_id"]: (t["account_id"], t["secret_access_key"])
            for t in doc["tenants"]
            if "access_key_id" in t
        }
        self._mtime_ns = st.st_mtime_ns

    def lookup(self, access_key_id: str) -> tuple[str, str] | None:
        """(account id, secret) of a key. An unknown key re-reads the table first (one stat), so
        a tenant created a moment ago is known at once."""
        found = self._keys.get(access_key_id)
        if found is None:
            self.reload()
            found = self._keys.get(access_key_id)
        return found

    def accounts(self) -> list[str]:
        """The account ids of every tenant with a key, sorted."""
        self.reload()
        return sorted({account for account, _ in self._keys.values()})

    def secret_for(self, access_key_id: str) -> str | None:
        found = self.lookup(access_key_id)
        return found[1] if found else None


class Router:
    def __init__(
        self,
        cell_map: CellMap,
        tenants: Tenants,
        limits: Limits = DEFAULT_LIMITS,
        region: str = "cc-local-1",
        operator: OperatorToken | None = None,
        connections: ConnectionRegistry | None = None,
        registry_key: RegistryKey | None = None,
        leases: bool = True,
        store_colony: str | None = None,
        spans: SpanExporter | None = None,
    ):
        self.operator = operator
        # Tracing (core/tracing.py): ids from this generator; spans exported only with an
        # OTLP endpoint configured (span_export.py; None: off, the SDK never imported).
        self._rng = random.Random(os.urandom(16))
        self.spans = spans
        self.connections = connections
        self.cell_map = cell_map
        self.region = region
        self.tenants = tenants
        self.limits = limits
        self._clients: dict[str, Client] = {}
        # cell id -> [requests answered, failed (5xx or 429)] for requests forwarded to it
        self.cell_traffic: dict[str, list[int]] = {}
        self.started = time.time()
        # Static stability: the map is replaced only by a newer one; with no push it stays.
        self.cell_map_received = time.monotonic()
        self.cell_map_pushes = 0
        self.cell_map_stale_after_s = 3.0
        self.counters = {"requests": 0, "unauthenticated": 0, "cell_unavailable": 0,
                         "refused_before_body": 0, "internal_errors": 0,
                         "invokes_forwarded": 0, "metrics_cells_unavailable": 0}
        # The warm path (issue #13): sync invokes under a lease go router -> agent.
        self.leases = Leases(self, limits) if leases else None
        # The router's own process metrics (CPU, RSS, fds, TLS handshakes), and what the
        # control plane pushes to the internal port (metrics_push): the operator's only.
        self.metrics_registry = process_registry()
        self.pushed_metrics = Pushed(limits, names=r"control(-[a-z0-9-]{1,32})?")
        # The registry's /v2/ API (registry/edge.py): its own auth (the registry token), body
        # caps and streaming; GetAuthorizationToken is answered here too.
        self.registry = RegistryEdge(self, registry_key, limits)
        # Function URLs: Host <url-id>.lambda-url.<region>.localhost or /lambda-url/<url-id>/.
        self.urls = UrlEdge(self)
        # ECS services: Host <service>.<cluster>.<account>.<region>.localhost (services.py).
        self.services = ServiceEdge(self)
        # The scheduler API (SigV4 service "scheduler") lives in the control plane, whose
        # address comes with every cell map push; None until the first push.
        self.control: Client | None = None
        self._control_addr: tuple[str, int] | None = None
        #: the cell map file the control plane writes (with its address) — read when a
        #: scheduler request comes before the first push
        self.cell_map_file: str | None = None
        # The web console under /console/ (console/app.py), for the operator only.
        self.console = Console(self, limits, store_colony=store_colony)

    def set_cell_map(self, cell_map: CellMap) -> int:
        """A pushed map: taken when not older than the one held; returns the version held."""
        self.cell_map_received = time.monotonic()
        self.cell_map_pushes += 1
        if cell_map.version >= self.cell_map.version:
            old, self.cell_map = self.cell_map, cell_map
            for cell_id in list(self._clients):
                if old.cells.get(cell_id) != cell_map.cells.get(cell_id):
                    self._clients.pop(cell_id)  # endpoint changed: reconnect lazily
        return self.cell_map.version

    def set_control(self, addr: Any) -> None:
        """The control plane's transport address, as a push names it (``doc["control"]``)."""
        if not isinstance(addr, list | tuple) or len(addr) != 2:
            return
        new = (str(addr[0]), int(addr[1]))
        if new != self._control_addr:
            self._control_addr = new
            # A control plane being replaced refuses calls unrun (Draining) and its port is
            # closed until the successor listens: such calls are sent again, never others.
            self.control = RedeliveringClient(new[0], new[1], expect_role="control",
                                              redeliver_s=self.limits.redeliver_ms / 1000)

    async def _scheduler(self, scope: Scope, path: str, body: bytes,
                         account: str) -> tuple[int, dict[str, str], bytes]:
        """EventBridge Scheduler's REST API, forwarded whole to the control plane."""
        return await self._to_control("scheduler", "The scheduler", "InternalServerException", {
            "m": scope["method"], "p": path, "q": scope["query_string"].decode("latin-1"),
            "b": body, "a": account})

    async def _ecs(self, target: str, body: bytes,
                   account: str) -> tuple[int, dict[str, str], bytes]:
        """The ECS API (JSON 1.1, SigV4 service ``ecs``): the control plane's ``ecs`` op."""
        return await self._to_control("ecs", "The ECS API", "ServerException",
                                      {"target": target, "b": body, "a": account})

    async def _to_control(self, op: str, what: str, error_type: str,
                          req: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if self.control is None and self.cell_map_file:
            try:
                with open(self.cell_map_file) as f:
                    self.set_control(json.load(f).get("control"))
            except (OSError, ValueError, AttributeError):
                pass
        def unavailable(message: str) -> LambdaError:
            err = LambdaError(503, error_type, message)
            if op == "ecs":  # JSON 1.1: botocore takes the error's name from the body's __type
                err.extra["__type"] = error_type
            return err

        if self.control is None:
            raise unavailable(f"{what} is not reachable yet (no control plane address)")
        try:
            resp = await self.control.call(op, req, timeout_s=control_timeout_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            self.counters["cell_unavailable"] += 1
            raise unavailable(f"{what} is unavailable: {e}") from e
        return resp["s"], resp["h"], resp["b"]

    def cell_map_status(self) -> dict[str, Any]:
        age_s = time.monotonic() - self.cell_map_received
        return {"version": self.cell_map.version, "age_s": round(age_s, 3),
                "pushes": self.cell_map_pushes, "stale": age_s > self.cell_map_stale_after_s,
                "serving": "last known map (control plane unreachable)"
                if age_s > self.cell_map_stale_after_s else "current map"}

    def client(self, cell_id: str) -> Client:
        c = self._clients.get(cell_id)
        if c is None:
            ep = self.cell_map.cells[cell_id]
            # A frontend being replaced refuses calls unrun (Draining) and its port is closed
            # until the replacement listens: such calls are sent again, never others.
            c = self._clients[cell_id] = RedeliveringClient(
                ep.host, ep.port, expect_role="frontend",
                redeliver_s=self.limits.redeliver_ms / 1000)
        return c

    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any:
        """One internal call to the cell that holds ``account`` (the registry edge's way in)."""
        cell = self.cell_map.cell_for(account)
        return await self.client(cell.cell_id).call(op, body, timeout_s=timeout_s)

    # -- what the console reads (console/app.py RegionReads) -----------------------------------
    async def call_cell_id(self, cell_id: str, op: str, body: Any, timeout_s: float) -> Any:
        return await self.client(cell_id).call(op, body, timeout_s=timeout_s)

    def cell_ids(self) -> list[str]:
        return sorted(self.cell_map.cells)

    def accounts(self) -> list[str]:
        return self.tenants.accounts()

    def operator_matches(self, token: str) -> bool:
        return self.operator is not None and self.operator.matches(token)

    def operator_session(self, label: bytes) -> str | None:
        return self.operator.session(label) if self.operator is not None else None

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
        svc_target = self.services.target(scope)  # an ECS service (router/services.py)
        if svc_target is not None:
            await self.services.serve(scope, receive, send, svc_target)
            return
        url_target = self.urls.target(scope)  # a function URL (router/function_urls.py)
        if url_target is not None:
            await self.urls.serve(scope, receive, send, url_target)
            return
        if scope["path"] == "/v2" or scope["path"].startswith("/v2/"):
            await self.registry.serve(scope, receive, send)
            return
        if scope["path"] == CONSOLE_PREFIX or scope["path"].startswith(CONSOLE_PREFIX + "/"):
            await self.console.serve(scope, receive, send)
            return
        body_state = _BodyState(scope)
        try:
            status, headers, body = await self._handle(scope, receive, body_state)
        except LambdaError as e:
            status, headers, body = e.status, e.headers(), e.body()
            if body_state.sqs_query:
                headers, body = sqs_query.router_error(e.status, e.type, e.message)
            elif body_state.ec2:  # EC2's query protocol: its XML errors (control/ec2.py)
                headers, body = _ec2_error(e)
        except Exception:  # no input may produce a bare 500: answer Lambda-shaped, log it
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"),
                          extra=eventlog.fields(event="request_failed"))
            self.counters["internal_errors"] += 1
            err = LambdaError(500, "ServiceException", "An internal error occurred.")
            status, headers, body = err.status, err.headers(), err.body()
        if body_state.trace is not None and self.spans is not None:
            self._end_trace(body_state.trace, status)
        if body_state.cell is not None:
            # Per cell, as a client counts them: what a rollout's bake judges (core/rollout.py)
            t = self.cell_traffic.setdefault(body_state.cell, [0, 0])
            t[0] += 1
            t[1] += status >= 500 or status == 429
        if not isinstance(body, bytes):  # streamed (InvokeWithResponseStream): chunked
            await self.urls.send_stream(scope, send, status, list(headers.items()), body)
            return
        out = [(k.encode(), v.encode()) for k, v in headers.items()]
        out.append((b"content-length", b"%d" % len(body)))  # not chunked: one write, no trailer
        if body_state.pending and not (
                body_state.declared is not None
                and body_state.declared <= self.limits.http_drain_bytes_max):
            # Answered before the client sent its body: a small declared rest is read and
            # dropped (under the connection's body deadline) so that a client still sending
            # can read the answer; a large or chunked one is cut off.
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive, body_state: _BodyState
                      ) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        path: str = scope["path"]
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        fwd = {k: v for k, v in headers if k.encode() in _FORWARDED}
        auth = ",".join(v for k, v in headers if k == "authorization")
        is_status = path.rstrip("/") in _STATUS_PATHS
        if is_status and auth[:7].lower() == "bearer ":
            return await self._operator_status(scope, path, auth[7:].strip())
        # Everything a request can be refused for without its body, before reading it: the
        # shape of the signature, the key, the declared size.
        try:
            parsed_auth = sigv4.parse_authorization(auth)
            akid = parsed_auth.group("akid")
            body_state.sqs_query = parsed_auth.group("service") == "sqs" and not any(
                k == "x-amz-target" for k, _ in headers)
            # EC2's query protocol (control/ec2.py): no target, signed for "ec2"; XML errors
            body_state.ec2 = parsed_auth.group("service") == "ec2" and not any(
                k == "x-amz-target" for k, _ in headers)
            if self.tenants.lookup(akid) is None:
                raise _forbidden_token()
        except LambdaError:
            self.counters["unauthenticated"] += 1
            self.counters["refused_before_body"] += body_state.pending
            raise
        is_invoke = path.endswith(_INVOKE_SUFFIXES)
        # InvokeWithResponseStream: an invoke's body limit and timeout, never a lease
        is_stream = path.rstrip("/").endswith(STREAM_SUFFIX)
        target = next((v for k, v in headers if k == "x-amz-target"), "")
        is_ecr = target.startswith(ECR_TARGET_PREFIX)
        # The CloudWatch Logs API (JSON 1.1, SigV4 service "logs"): the cell's log store.
        is_logs = target.startswith(LOGS_TARGET_PREFIX)
        # The ECS API (control/ecs.py): its JSON target, or anything signed for service "ecs"
        # (an unknown target is then answered by the ECS API, never a 404 of another's).
        # The application-autoscaling API's ECS subset (control/autoscaling.py) goes the same
        # way: the control plane's ecs op, which tells the two apart by the target.
        is_aas = not is_ecr and not is_logs and (
            target.startswith(AAS_TARGET_PREFIX)
            or parsed_auth.group("service") == "application-autoscaling")
        is_ecs = not is_ecr and not is_logs and (target.startswith(ECS_TARGET_PREFIX)
                                                 or parsed_auth.group("service") == "ecs"
                                                 or is_aas)
        # The EC2 API's volume subset (control/ec2.py): query protocol, signed for "ec2".
        is_ec2 = body_state.ec2
        body_max = (
            self.limits.invoke_payload_bytes_max
            if is_invoke or is_stream
            else self.limits.registry_api_body_bytes_max if is_ecr or is_logs
            else self.limits.ecs_request_bytes_max if is_ecs
            else self.limits.ec2_request_bytes_max if is_ec2
            else min(self.limits.request_body_bytes_max, forward_body_bytes_max)
        )
        if body_state.declared is not None and body_state.declared > body_max:
            self.counters["refused_before_body"] += 1
            raise _ecs_too_large(body_max) if is_ecs else _too_large(body_max, is_invoke)
        body = await (runtime.read_asgi_body(
            receive, body_max, lambda: _ecs_too_large(body_max),
            lambda: LambdaError(400, "ClientDisconnected", "the client went away"))
            if is_ecs else _read_body(receive, body_max, is_invoke))
        body_state.pending = False
        raw_path = scope.get("raw_path") or path.encode()
        # SQS's JSON protocol (the cell's queues): signed for service "sqs", forwarded whole.
        sqs_target = next((v for k, v in headers if k == "x-amz-target"), "")
        # ... and its query protocol (Action=... forms, XML answers): no target, signed "sqs"
        is_sqs_query = body_state.sqs_query
        is_sqs = sqs_target.startswith("AmazonSQS.") or is_sqs_query
        is_scheduler = parsed_auth.group("service") == "scheduler" and not is_sqs and not is_ecr
        is_ecs = is_ecs and not is_sqs
        try:
            verified = sigv4.verify(
                method=scope["method"],
                # surrogateescape: every byte comes back unchanged in the canonical request
                raw_path=raw_path.decode("utf-8", "surrogateescape"),
                raw_query=scope["query_string"].decode("utf-8", "surrogateescape"),
                headers=headers,
                body=body,
                region=self.region,
                secret_for=self.tenants.secret_for,
                service=("sqs" if is_sqs else "ecr" if is_ecr else "logs" if is_logs
                         else "application-autoscaling" if is_ecs and is_aas
                         else "ecs" if is_ecs else "ec2" if is_ec2
                         else "scheduler" if is_scheduler
                         else sigv4.SERVICE),
            )
        except LambdaError:
            self.counters["unauthenticated"] += 1
            raise
        found = self.tenants.lookup(verified.access_key_id)
        assert found is not None
        account = found[0]
        if path.rstrip("/") == METRICS_PATH:
            _only_get(scope, path)
            return await self.metrics(account=account)  # a tenant: its own series only
        if path.rstrip("/") == STATUS_PATH:
            _only_get(scope, path)
            # A tenant sees its own functions and environments only (operator: Bearer token).
            return _json_reply(await self.status(account=account))
        if is_scheduler:
            return await self._scheduler(scope, path, body, account)
        if is_ecs:
            return await self._ecs(target, body, account)
        if is_ec2:
            return await self._to_control("ec2", "The EC2 API", "Unavailable", {
                "b": body, "q": scope["query_string"].decode("latin-1"), "a": account})
        cell = self.cell_map.cell_for(account)
        body_state.cell = cell.cell_id
        if is_ecr:
            return await self._ecr(cell.cell_id, account, target, body, headers, scope)
        if is_logs:
            try:
                resp = await self.client(cell.cell_id).call(
                    "logs", {"target": target, "b": body, "a": account},
                    timeout_s=control_timeout_s)
            except (TransportError, CallTimeout, RemoteError) as e:
                self.counters["cell_unavailable"] += 1
                raise LambdaError(503, "ServiceUnavailableException",
                                  f"Cell {cell.cell_id} is unavailable: {e}") from e
            return resp["s"], resp["h"], resp["b"]
        if is_sqs:
            host = next((v for k, v in headers if k == "host"), "")
            try:
                resp = await self.client(cell.cell_id).call(
                    "sqs", {"target": sqs_target, "b": body, "a": account, "host": host,
                            **({"proto": "query", "p": path,
                                "q": scope["query_string"].decode("latin-1")}
                               if is_sqs_query else {})},
                    timeout_s=control_timeout_s)
            except (TransportError, CallTimeout, RemoteError) as e:
                self.counters["cell_unavailable"] += 1
                raise LambdaError(
                    503, "ServiceUnavailable", f"Cell {cell.cell_id} is unavailable: {e}"
                ) from e
            return resp["s"], resp["h"], resp["b"]
        if path.startswith("/2021-10-31/"):  # FunctionUrl is printed on the endpoint used
            host = next((v for k, v in headers if k == "host"), "")
            fwd["x-cellcloud-endpoint"] = f"{scope.get('scheme') or 'http'}://{host}"
        if is_invoke and scope["method"] == "POST":
            body_state.trace = self._begin_trace(headers, fwd, cell.cell_id)
        owner = cross_account_owner(path, account)
        query = scope["query_string"].decode("latin-1")
        # another account's function (owner): its cell judges its policy
        req = HttpRequest(method=scope["method"], path=path, query=query, headers=fwd,
                          body=body, account=owner or account,
                          caller=account if owner is not None else "").to_wire()
        if owner is not None:
            cell = self.cell_map.cell_for(owner)
            body_state.cell = cell.cell_id
        # A sync invoke may run up to the function's timeout (at most 900 s); the frontend
        # enforces the real one, this is the backstop.
        timeout_s = ((self.limits.timeout_s_max + 30.0) if is_invoke or is_stream
                     else control_timeout_s)
        leases = (self.leases if is_invoke and scope["method"] == "POST" and owner is None
                  else None)
        key = (account, path, query)
        if leases is not None and leases.eligible(fwd, body):
            lease = await leases.take_or_wait(key, cell.cell_id)
            if lease is not None:
                try:
                    return await leases.invoke(lease, key, fwd, body)
                except Fallback:
                    pass  # nothing ran: the frontend's way
        if is_invoke:
            self.counters["invokes_forwarded"] += 1
        if is_stream:  # InvokeWithResponseStream: events leave as the function streams
            status, pairs, streamed = await open_stream(
                self.client(cell.cell_id), "http", req, timeout_s, cell.cell_id, self.counters)
            return status, dict(pairs), streamed
        try:
            resp = HttpReply.from_wire(
                await self.client(cell.cell_id).call("http", req, timeout_s=timeout_s))
        except (TransportError, CallTimeout, RemoteError, MessageError) as e:
            self.counters["cell_unavailable"] += 1
            raise LambdaError(
                503, "ServiceException", f"Cell {cell.cell_id} is unavailable: {e}"
            ) from e
        if leases is not None and resp.status == 200 and leases.eligible(fwd, body):
            leases.want(key, cell.cell_id)
        return resp.status, resp.headers, resp.body

    def _begin_trace(self, headers: list[tuple[str, str]], fwd: dict[str, str],
                     cell_id: str) -> _Trace:
        """X-Ray: every invoke gets a trace id here (a valid incoming one is honoured) and the
        next hop gets it with Parent = this span (docs/observability.md#tracing)."""
        trace, span_id = tracing.begin(
            next((v for k, v in headers if k == tracing.HEADER), None),
            now_ms=int(time.time() * 1000), rng=self._rng, sample=self.spans is not None)
        fwd[tracing.HEADER] = trace.child(span_id).format()
        return _Trace(trace, span_id, time.time_ns(), cell_id)

    def _end_trace(self, t: _Trace, status: int) -> None:
        assert self.spans is not None
        self.spans.export_later(t.trace, "router", t.span_id, t.trace.parent, t.started_ns,
                                time.time_ns(), server=True,
                                attributes={"cellcloud.cell": t.cell_id,
                                            "http.response.status_code": status})

    async def _ecr(self, cell_id: str, account: str, target: str, body: bytes,
                   headers: list[tuple[str, str]],
                   scope: Scope) -> tuple[int, dict[str, str], bytes]:
        """The ECR JSON API (SigV4 service ``ecr``): GetAuthorizationToken here (the router
        holds the registry key), the rest in the tenant's cell (registry/api.py)."""
        host = next((v for k, v in headers if k == "host"), "")
        if target == ECR_TARGET_PREFIX + "GetAuthorizationToken":
            try:
                doc = self.registry.authorization_data(account, host,
                                                       scope.get("scheme") or "http")
            except RegistryError as e:
                raise LambdaError(e.status, "ServerException", e.message) from e
            return 200, {"content-type": "application/x-amz-json-1.1"}, json.dumps(doc).encode()
        try:
            resp = await self.client(cell_id).call(
                "ecr", {"target": target, "b": body, "a": account, "host": host},
                timeout_s=control_timeout_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            self.counters["cell_unavailable"] += 1
            raise LambdaError(503, "ServerException", f"Cell {cell_id} is unavailable: {e}") from e
        return resp["s"], resp["h"], resp["b"]

    async def _operator_status(self, scope: Scope, path: str,
                               token: str) -> tuple[int, dict[str, str], bytes]:
        """``Authorization: Bearer <operator token>``: the whole region (``/status``) or one
        cell (``/cell/status?cell=<id>``; the only cell when there is one)."""
        if self.operator is None or not self.operator.matches(token):
            self.counters["unauthenticated"] += 1
            raise _forbidden_token()
        _only_get(scope, path)
        if path.rstrip("/") == STATUS_PATH:
            return _json_reply(await self.status())
        if path.rstrip("/") == METRICS_PATH:
            return await self.metrics(account=None)
        query = scope["query_string"].decode("latin-1")
        wanted = next((v for k, _, v in (p.partition("=") for p in query.split("&"))
                       if k == "cell"), None)
        if wanted is None and len(self.cell_map.cells) == 1:
            wanted = next(iter(self.cell_map.cells))
        if wanted not in self.cell_map.cells:
            raise LambdaError(400, "InvalidParameterValueException",
                              f"Name a cell with ?cell=: one of {sorted(self.cell_map.cells)}")
        return _json_reply(await self._cell_status(str(wanted)))

    async def metrics(self, account: str | None) -> tuple[int, dict[str, str], bytes]:
        """``GET /metrics`` (docs/observability.md): every cell's expositions, asked at once
        (a cell that does not answer is left out and counted); one tenant's series, or
        (operator) all of them with the cells' agents and dispatchers, the control plane's
        and the router's own."""
        cells = list(self.cell_map.cells)
        ask = {"components": True, "agents": account is None}

        async def one(cell_id: str) -> Any:
            return await self.client(cell_id).call("metrics", ask, timeout_s=5)

        got = await asyncio.gather(*(one(c) for c in cells), return_exceptions=True)
        sources: list[tuple[dict[str, str], bytes]] = []
        for cell_id, answer in zip(cells, got, strict=True):
            if isinstance(answer, bytes):  # a frontend from before components
                sources.append(({"cell": cell_id}, answer))
            elif isinstance(answer, dict) and isinstance(answer.get("components"), dict):
                sources += [({"cell": cell_id, "component": str(comp)}, text)
                            for comp, text in answer["components"].items()
                            if isinstance(text, bytes)]
            else:
                self.counters["metrics_cells_unavailable"] += 1
        if account is None:
            sources.append(({"component": "router"}, generate_latest(self.metrics_registry)))
            sources += [({"component": comp}, text) for comp, text
                        in self.pushed_metrics.fresh(int(time.time() * 1000)).items()]
        body = router_metrics.gather(sources, account)
        return 200, {"content-type": router_metrics.CONTENT_TYPE}, body

    async def _cell_status(self, cell_id: str) -> dict[str, Any]:
        # The cell asks its agents with agent_call_timeout_ms each: wait longer than that, so a
        # hung agent shows as that agent's error, not as the whole cell timing out.
        timeout_s = self.limits.agent_call_timeout_ms / 1000 + cell_status_margin_s
        try:
            doc: dict[str, Any] = await self.client(cell_id).call("status", None,
                                                                  timeout_s=timeout_s)
            return doc
        except (TransportError, RemoteError, CallTimeout) as e:
            return {"cell_id": cell_id, "error": str(e)}

    async def status(self, account: str | None = None) -> dict[str, Any]:
        """The region's status: everything (``account`` None: the operator), or what one
        tenant may see: its own cell, filtered to its own functions and environments."""
        if account is not None:
            cell_id = self.cell_map.cell_for(account).cell_id
            view = cell_status_for_tenant(await self._cell_status(cell_id), account)
            return {"router": {"cell_map_version": self.cell_map.version,
                               "cell_map": self.cell_map_status()},
                    "cells": {cell_id: view}}
        cells = {cell_id: await self._cell_status(cell_id) for cell_id in self.cell_map.cells}
        router: dict[str, Any] = {
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started,
            "cell_map_version": self.cell_map.version,
            "cell_map": self.cell_map_status(),
            "counters": dict(self.counters),
            "registry": dict(self.registry.counters),
            # internal protocol versions spoken and peers refused (core/protocols.py)
            "protocols": protocol_stats.snapshot(),
        }
        if self.connections is not None:
            router["connections"] = self.connections.statistics()
        if self.leases is not None:
            router["leases"] = self.leases.statistics()
        return {"router": router, "cells": cells}


@dataclass(frozen=True)
class _Trace:
    """An invoke's trace at the router: the header as received or made, the router's span."""

    trace: tracing.TraceHeader
    span_id: str
    started_ns: int
    cell_id: str


class _BodyState:
    """Whether the client still owes body bytes, and how many it declared."""

    def __init__(self, scope: Scope) -> None:
        self.declared: int | None = None
        chunked = False
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    self.declared = int(v)
                except ValueError:
                    self.declared = None
            elif k == b"transfer-encoding":
                chunked = True
        self.pending = chunked or bool(self.declared)
        #: an SQS query-protocol request: its errors are answered in SQS's XML
        self.sqs_query = False
        #: an EC2 query-protocol request: its errors are answered in EC2's XML
        self.ec2 = False
        #: an invoke's trace (the router's span ends when the answer is decided)
        self.trace: _Trace | None = None
        #: the cell that answers it (counted in Router.cell_traffic), once known
        self.cell: str | None = None


def _only_get(scope: Scope, path: str) -> None:
    if scope["method"] != "GET":
        raise LambdaError(405, "MethodNotAllowedException",
                          f"{scope['method']} is not allowed on {path}",
                          http_headers={"allow": "GET"})


def _json_reply(doc: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "application/json"}, json.dumps(doc).encode()


def _too_large(body_max: int, is_invoke: bool) -> LambdaError:
    if is_invoke:
        return LambdaError(413, "RequestEntityTooLargeException",
                           f"Request must be smaller than {body_max} bytes for the "
                           "InvokeFunction operation")
    return LambdaError(413, "RequestEntityTooLargeException",
                       f"Request must be smaller than {body_max} bytes")


def _ec2_error(e: LambdaError) -> tuple[dict[str, str], bytes]:
    """A router-side refusal of an EC2 request, as EC2 writes errors (botocore's ec2 parser
    reads ``Response/Errors/Error/Code``): a refused signature or key is EC2's AuthFailure."""
    code = "AuthFailure" if e.status == 403 else e.type
    return {"content-type": EC2_XML}, ec2_error_xml(code, e.message, "")


def _ecs_too_large(body_max: int) -> LambdaError:
    """ECS's own answer to an oversized request (boto3 raises ``ClientException``)."""
    # JSON 1.1: botocore takes the error's name from the body's __type
    return LambdaError(400, "ClientException", f"The request is larger than "
                       f"ecs_request_bytes_max={body_max} bytes", __type="ClientException")


async def _read_body(receive: Receive, body_max: int, is_invoke: bool) -> bytes:
    return await runtime.read_asgi_body(
        receive, body_max, lambda: _too_large(body_max, is_invoke),
        lambda: LambdaError(400, "ClientDisconnected", "the client went away"))
