"""The router's warm path (issue #13): sync invokes of a function it holds a lease for go
router -> agent, without crossing the frontend.

The frontend stays the authority on concurrency: it grants a lease (counted like an invocation,
bounded by ``invoke_lease_ms``, revocable) on one environment and registers it with the agent,
which refuses anything else. Here: one invocation per leased environment at a time; a lease
unused for ``router_lease_idle_ms`` (or near its expiry) goes back; at most
``router_leases_per_function_max`` per function (one more asked after each forwarded invoke); on an agent error the lease
goes back and the request goes the frontend's way only when the handler cannot have run.
The logs of leased invocations reach the function's logs through the frontend (the agent hands
them over when the frontend ends the lease).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .. import eventlog
from ..core import cwlogs, tracing
from ..core.cwlogs import LoggingConfig
from ..core.errors import LambdaError
from ..core.jsondepth import check_json_depth
from ..core.limits import Limits
from ..core.messages import InvokeReply, MessageError
from ..transport import DRAINING, CallTimeout, Client, NotDelivered, RemoteError, TransportError

log = logging.getLogger("cellcloud.router")

# What an agent answers when it ran nothing: the request may go the frontend's way instead.
_NOTHING_RAN = frozenset({"LeaseInvalid", "EnvGone", "EnvNotFound", "EnvBusy", "AgentDraining",
                          "EnvReset", "Forbidden", "UnknownOperation", DRAINING})
# Headers under which a leased invoke answers exactly as the frontend would; anything else
# (async, DryRun, client context, refused parameters) goes to the frontend.
_PLAIN = frozenset({"x-amzn-trace-id", "x-amz-invocation-type", "x-amz-log-type", "content-type"})


@dataclass
class Lease:
    lease_id: str
    cell_id: str
    env_id: str
    agent: tuple[str, int]
    expires: float  # time.monotonic()
    version: str
    timeout_ms: int
    arn: str
    busy: bool = False
    last_used: float = 0.0
    logging: LoggingConfig = LoggingConfig()  # the function's (its log tail's format)


Key = tuple[str, str, str]  # account, invoke path, query


class Fallback(Exception):
    """Nothing ran: serve the request through the frontend."""


class Leases:
    def __init__(self, router: Any, limits: Limits) -> None:
        self.router = router
        self.limits = limits
        self.holder = f"router-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.held: dict[Key, list[Lease]] = {}
        self._asking: dict[Key, int] = {}
        # Set when a lease ask for the function ends (granted or not): an invoke arriving
        # meanwhile waits for it rather than going to the frontend, which would find the
        # environment being leased and start a second one (a needless cold start).
        self._asked: dict[Key, asyncio.Event] = {}
        self._agents: dict[tuple[str, int], Client] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.counters = {"leased_invokes": 0, "leases_taken": 0, "leases_returned": 0,
                         "lease_refused": 0, "lease_fallbacks": 0, "lease_outcome_unknown": 0}

    def eligible(self, fwd: dict[str, str], payload: bytes) -> bool:
        if any(k not in _PLAIN for k in fwd):
            return False
        if fwd.get("x-amz-invocation-type", "RequestResponse") != "RequestResponse":
            return False
        if fwd.get("x-amz-log-type", "None") not in ("None", "Tail"):
            return False
        if payload:  # an invalid payload gets the frontend's error
            try:
                check_json_depth(payload, self.limits.json_depth_max)
                json.loads(payload)
            except (LambdaError, ValueError, UnicodeDecodeError, RecursionError):
                return False
        return True

    def take(self, key: Key, cell_id: str) -> Lease | None:
        """A free lease for the function with time left for one more invocation, or None.
        Leases from a cell the tenant no longer maps to (a migration) go back at once: the old
        cell drains only once they are returned."""
        margin = self.limits.router_lease_expiry_margin_ms / 1000
        now = time.monotonic()
        for lease in [x for x in self.held.get(key, ()) if x.cell_id != cell_id and not x.busy]:
            self._drop(key, lease)
        for lease in self.held.get(key, ()):
            if lease.cell_id != cell_id:
                continue
            if not lease.busy and now + margin + lease.timeout_ms / 1000 < lease.expires:
                lease.busy = True
                return lease
        return None

    async def take_or_wait(self, key: Key, cell_id: str) -> Lease | None:
        """``take``, after waiting (bounded) for a lease ask of the function under way."""
        lease = self.take(key, cell_id)
        event = self._asked.get(key)
        if lease is None and event is not None:
            try:
                await asyncio.wait_for(event.wait(),
                                       self.limits.router_lease_ask_wait_ms / 1000)
            except TimeoutError:
                return None
            lease = self.take(key, cell_id)
        return lease

    async def invoke(self, lease: Lease, key: Key, fwd: dict[str, str],
                     payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """Run one invocation under ``lease``; raises Fallback when nothing ran."""
        self._ensure_sweeper()
        request_id = str(uuid.uuid4())
        client = self._agent(lease.agent)
        # The router set the header (Parent = its span); the agent's and the environment's
        # spans come back when the router exports them.
        trace = tracing.parse(fwd.get(tracing.HEADER))
        spans = self.router.spans if trace is not None and trace.sampled else None
        try:
            res = await client.call("leased_invoke", {
                "lease_id": lease.lease_id, "env_id": lease.env_id, "request_id": request_id,
                "payload": payload, "timeout_ms": lease.timeout_ms, "arn": lease.arn,
                **({"trace_id": fwd[tracing.HEADER]} if trace is not None else {}),
                **({"spans": True} if spans is not None else {})},
                timeout_s=lease.timeout_ms / 1000 + self.limits.agent_call_timeout_ms / 1000)
        except NotDelivered as e:
            await self._fall_back(key, lease)
            raise Fallback(str(e)) from e
        except RemoteError as e:
            if e.type in _NOTHING_RAN:
                self.counters["lease_refused"] += e.type == "LeaseInvalid"
                reset_logs = e.data.get("logs")
                if isinstance(reset_logs, bytes) and reset_logs:
                    # An environment reset (its extensions overran the previous invocation):
                    # what it wrote belongs to the function's logs, before the lease goes back.
                    await self._file_logs(lease, "", [reset_logs], {})
                await self._fall_back(key, lease)
                raise Fallback(str(e)) from e
            self._drop(key, lease)
            raise _service_error(f"The invocation failed: {e}") from e
        except (TransportError, CallTimeout) as e:  # it may have run: never run it again
            self._drop(key, lease)
            self.counters["lease_outcome_unknown"] += 1
            raise _service_error(f"The invocation's outcome is unknown: {e}") from e
        lease.busy = False
        lease.last_used = time.monotonic()
        self.counters["leased_invokes"] += 1
        # The logs go to the function's logs through the frontend, with the outcome its
        # metrics count (every leased invocation is reported, logs or not); queued on the
        # cell's one connection before this answer leaves, so a logs read after it sees them.
        parts = [p for p in (res.get("previous_logs"), res.get("logs")) if p]
        self._spawn(self._file_logs(lease, request_id, parts, {
            "function_error": res.get("function_error"),
            "duration_ms": float(res.get("duration_ms") or 0.0),
            # leading bytes of its logs the frontend pulled while it ran (live_logs)
            "logs_live_bytes": int(res.get("logs_live_bytes") or 0)}))
        if not res.get("env_alive", True):
            self._drop(key, lease)
        headers = {"x-amz-executed-version": lease.version, "x-amzn-requestid": request_id,
                   "content-type": "application/json"}
        if trace is not None:
            headers[tracing.HEADER] = trace.response()
            if spans is not None:
                try:
                    remote = InvokeReply.from_wire(res).spans
                except MessageError:
                    remote = ()
                spans.export_remote_later(trace, remote, {"aws.request_id": request_id})
        if res.get("function_error"):
            headers["x-amz-function-error"] = str(res["function_error"])
        if fwd.get("x-amz-log-type") == "Tail":
            logs: bytes = res.get("logs") or b""
            if lease.logging.log_format == "JSON":  # the tail as the function's format
                logs = "".join(cwlogs.lambda_events(logs.decode(errors="replace"),
                                                    lease.logging,
                                                    int(time.time() * 1000))).encode()
            headers["x-amz-log-result"] = base64.b64encode(
                logs[-self.limits.log_tail_bytes:]).decode()
        return 200, headers, res["payload"]

    def release(self, lease: Lease) -> None:
        lease.busy = False

    # -- getting and giving back leases ----------------------------------------------------------
    def want(self, key: Key, cell_id: str) -> None:
        """After an invoke went the frontend's way: ask for a lease for the next ones."""
        if (len(self.held.get(key, ())) + self._asking.get(key, 0)
                >= self.limits.router_leases_per_function_max):
            return
        self._asking[key] = self._asking.get(key, 0) + 1
        self._asked.setdefault(key, asyncio.Event())
        self._spawn(self._ask(key, cell_id))

    async def _ask(self, key: Key, cell_id: str) -> None:
        try:
            doc = await self.router.client(cell_id).call(
                "lease", {"a": key[0], "p": key[1], "q": key[2], "holder": self.holder},
                timeout_s=self.limits.timeout_s_max + 30.0)
        except (TransportError, RemoteError) as e:
            log.info("lease for %s: %s", key[1], e)
            return
        finally:
            self._asking[key] -= 1
            if not self._asking[key]:
                del self._asking[key]
                self._asked.pop(key).set()
        if "error" in doc:
            return
        lease = Lease(str(doc["lease_id"]), cell_id, str(doc["env_id"]),
                      (str(doc["host"]), int(doc["port"])),
                      time.monotonic() + int(doc["ttl_ms"]) / 1000, str(doc["version"]),
                      int(doc["timeout_ms"]), str(doc["arn"]), last_used=time.monotonic(),
                      logging=LoggingConfig.from_record(doc.get("logging")))
        self.counters["leases_taken"] += 1
        self.held.setdefault(key, []).append(lease)
        self._ensure_sweeper()

    async def _fall_back(self, key: Key, lease: Lease) -> None:
        """Nothing ran under the lease: it goes back *before* the request goes the frontend's
        way, so that its environment is free for it (warm) rather than held by a dead lease
        (e.g. an agent restarted in place, which knows no lease)."""
        self.counters["lease_fallbacks"] += 1
        lease.busy = False
        held = self.held.get(key, [])
        if lease in held:
            held.remove(lease)
            if not held:
                del self.held[key]
        self.counters["leases_returned"] += 1
        await self._return(lease)

    def _drop(self, key: Key, lease: Lease) -> None:
        lease.busy = False
        held = self.held.get(key, [])
        if lease in held:
            held.remove(lease)
            if not held:
                del self.held[key]
        self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        self.counters["leases_returned"] += 1
        self._spawn(self._return(lease))

    async def _return(self, lease: Lease) -> None:
        try:
            await self.router.client(lease.cell_id).call(
                "lease_return", {"lease_id": lease.lease_id, "holder": self.holder},
                timeout_s=self.limits.timeout_s_max + 30.0)
        except (TransportError, RemoteError) as e:  # it expires at the frontend anyway
            log.info("lease return %s: %s", lease.lease_id, e)

    async def _file_logs(self, lease: Lease, request_id: str, parts: list[bytes],
                         outcome: dict[str, Any]) -> None:
        try:
            await self.router.client(lease.cell_id).call(
                "lease_logs", {"lease_id": lease.lease_id, "holder": self.holder,
                               "request_id": request_id, "logs": parts, **outcome},
                timeout_s=self.limits.timeout_s_max + 30.0)
        except (TransportError, RemoteError) as e:
            log.warning("logs of %s under lease %s lost: %s", request_id, lease.lease_id, e,
                        extra=eventlog.fields(event="lease_logs_lost", request_id=request_id,
                                              cell=lease.cell_id, env=lease.env_id))

    def sweep(self) -> None:
        now = time.monotonic()
        idle_s = self.limits.router_lease_idle_ms / 1000
        margin = self.limits.router_lease_expiry_margin_ms / 1000
        for key, leases in list(self.held.items()):
            for lease in list(leases):
                if not lease.busy and (now - lease.last_used > idle_s
                                       or now + margin >= lease.expires):
                    self._drop(key, lease)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while self.held:
            await asyncio.sleep(0.5)  # a periodic timer, not a wait
            self.sweep()

    def _agent(self, addr: tuple[str, int]) -> Client:
        c = self._agents.get(addr)
        if c is None:
            c = self._agents[addr] = Client(addr[0], addr[1], expect_role="agent")
        return c

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def statistics(self) -> dict[str, Any]:
        leases = [lease for held in self.held.values() for lease in held]
        return {**self.counters, "held": len(leases), "busy": sum(x.busy for x in leases)}


def _service_error(message: str) -> LambdaError:
    return LambdaError(500, "ServiceException", message)
