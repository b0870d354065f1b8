"""The invoke path's shell: feeds stimuli to the sans-IO core (``core/invoke.py``) and executes
its instructions with the agents (the transport ``Client``) and asyncio tasks.

Rules the core relies on (the simulator, ``frontend/sim.py``, follows the same): every
``CreateEnv`` gets exactly one ``EnvCreated``/``EnvCreateFailed``, every ``RunInvoke`` exactly
one ``InvokeFinished``; a caller waits for its request's ``Answer`` or ``Throttle``. Time is the
injected ``clock`` (seconds, ``time.time`` by default), passed to the core in milliseconds.

What stays here because it is I/O: the create body and the BundleMissing push loop (the agent
names a bundle it lacks, we push it, at most once each), AgentDraining retries with capped
backoff and full jitter (an agent being replaced in place), destroys and the logs they return,
and mapping the agents' answers to stimuli.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import eventlog
from ..core import errors, tracing
from ..core import messages as m
from ..core.cwlogs import LoggingConfig
from ..core.errors import LambdaError
from ..core.invoke import (
    AgentBack,
    AgentLost,
    Answer,
    CreateEnv,
    CreateFailure,
    DestroyEnv,
    EnvCreated,
    EnvCreateFailed,
    FunctionRef,
    FunctionRetired,
    GrantLease,
    Instruction,
    InvokeCore,
    InvokeFinished,
    InvokeOutcome,
    InvokeParams,
    InvokeRequested,
    LeaseRequested,
    LeaseReturned,
    LeaseRevoked,
    MarkAgentDown,
    ProvisionedSet,
    ReservedChanged,
    RevokeLease,
    RunInvoke,
    Stimulus,
    Throttle,
    Tick,
)
from ..transport import DRAINING, Client, NotDelivered, RemoteError, TransportError
from . import image_functions
from .events import RESERVED_ZERO_HEADER
from .store import FunctionRecord, function_arn

if TYPE_CHECKING:
    from .cell import Cell

log = logging.getLogger("cellcloud.frontend")

agent_draining_retries_max = 40  # ~20 s of backoff: an agent handover takes well under that


class InvokeResult:
    __slots__ = ("status", "payload", "function_error", "logs", "request_id", "executed_version",
                 "trace")

    def __init__(
        self,
        payload: bytes,
        function_error: str | None,
        logs: bytes,
        request_id: str,
        executed_version: str = "$LATEST",
        trace: tracing.TraceHeader | None = None,
    ) -> None:
        self.status = 200
        self.trace = trace  # the invocation's X-Ray trace (its root goes back to the caller)
        self.payload = payload
        self.function_error = function_error
        self.logs = logs
        self.request_id = request_id
        self.executed_version = executed_version


def function_ref(rec: FunctionRecord, reserved: int | None) -> FunctionRef:
    return FunctionRef(rec.key, f"{rec.account}/{rec.name}", rec.timeout_s * 1000,
                       rec.memory_mb, reserved)


#: (bytes, content type) of a streamed response, as the runtime streams them
ChunkSink = Callable[[bytes, str], None]


class _Call:
    __slots__ = ("request_id", "rec", "invoked_arn", "payload", "log_tail", "done", "reply",
                 "sink", "trace_id", "spans", "env_id")

    def __init__(self, request_id: str, rec: FunctionRecord, invoked_arn: str, payload: bytes,
                 log_tail: bool, done: asyncio.Future[Instruction],
                 sink: ChunkSink | None = None) -> None:
        #: a streamed invocation's receiver of the response's bytes as they come
        self.sink = sink
        self.request_id = request_id  # the caller's (sent to the agent, returned)
        self.rec = rec
        self.invoked_arn = invoked_arn
        self.payload = payload
        self.log_tail = log_tail
        self.done = done
        self.reply: m.InvokeReply | None = None
        self.trace_id = ""  # the header the agent gets (Parent = the frontend's span)
        self.spans = False  # ask the agent for its spans (exporting, sampled)
        self.env_id = ""  # the environment it ran in (its log stream)


class Invoker:
    def __init__(self, cell: Cell, *, clock: Callable[[], float],
                 invokes_inflight_max: int) -> None:
        self.cell = cell
        self.clock = clock
        self.core = InvokeCore(
            cell.placement, poison=cell.poison, sharder=cell.sharder,
            params=InvokeParams.from_limits(cell.limits, invokes_inflight_max))
        self._calls: dict[str, _Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: set[asyncio.Future[Any]] = set()  # agents told to refuse a lease
        self._seq = 0
        self._rng = random.Random(os.urandom(16))  # trace and span ids (core/tracing.py)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- stimuli in, instructions out ------------------------------------------------------------
    def feed(self, stimulus: Stimulus) -> None:
        for ins in self.core.handle(stimulus, self.now_ms()):
            self._execute(ins)

    def _execute(self, ins: Instruction) -> None:
        match ins:
            case CreateEnv():
                self._spawn(self._create(ins))
            case RunInvoke():
                self._spawn(self._run(ins))
            case DestroyEnv():
                self.destroy_soon(ins.env_id, ins.agent_id)
            case RevokeLease():
                # The agent's refusal is asked (and counted in what settle_leases waits for)
                # now, not when the task first runs: a change answered in between would let a
                # router start the old code under the lease.
                refused = (self._refuse_lease(ins.lease_id, ins.agent_id)
                           if ins.agent_id in self.cell.agents else None)
                self._spawn(self._end_lease(ins.lease_id, ins.agent_id, revoked=True,
                                            refused=refused))
            case GrantLease():
                call = self._calls.pop(ins.lease_id, None)
                if call is not None and not call.done.done():
                    call.done.set_result(ins)
                else:  # the asker went away: nobody holds it
                    self.feed(LeaseReturned(ins.lease_id))
            case Answer() | Throttle():
                call = self._calls.pop(ins.request_id, None)
                if call is not None and not call.done.done():
                    call.done.set_result(ins)
            case MarkAgentDown():
                self.cell.counters["agent_failures"] += 1
                self.cell.failed_agents.setdefault(
                    ins.agent_id, {"since": _now_iso(self.clock()), "error": ins.detail[:200]})
                log.warning("agent %s unreachable (%s); %d environments lost", ins.agent_id,
                            ins.detail, ins.envs_lost,
                            extra=eventlog.fields(event="agent_lost", agent=ins.agent_id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the caller's side ----------------------------------------------------------------------
    async def invoke(self, rec: FunctionRecord, invoked_arn: str, payload: bytes, log_tail: bool,
                     reserved: int | None, request_id: str | None = None,
                     sink: ChunkSink | None = None,
                     trace_header: str | None = None) -> InvokeResult:
        request_id = request_id or str(uuid.uuid4())
        # The router's trace (Parent = its span), else (async deliveries, event sources) a new
        # one: every invocation has its own X-Ray trace id.
        spans = self.cell.spans
        trace, span_id = tracing.begin(trace_header, now_ms=self.now_ms(), rng=self._rng,
                                       sample=spans is not None)
        started_ns = time.time_ns()
        try:
            return await self._invoke(rec, invoked_arn, payload, log_tail, reserved, request_id,
                                      trace, span_id, sink)
        finally:
            if spans is not None and trace.sampled:
                spans.export_later(trace, "frontend", span_id, trace.parent, started_ns,
                                   time.time_ns(), attributes={"aws.request_id": request_id,
                                                               "faas.name": rec.name})

    async def _invoke(self, rec: FunctionRecord, invoked_arn: str, payload: bytes,
                      log_tail: bool, reserved: int | None, request_id: str,
                      trace: tracing.TraceHeader, span_id: str,
                      sink: ChunkSink | None = None) -> InvokeResult:
        # The core's key for this call: the caller's id unless that is in flight already (an
        # async event redelivered while its first delivery still runs keeps its request id).
        key = request_id
        while key in self._calls or key in self.core.requests:
            self._seq += 1
            key = f"{request_id}#{self._seq}"
        done: asyncio.Future[Instruction] = asyncio.get_running_loop().create_future()
        # The entry goes when the core answers (a caller that goes away leaves it to the
        # core's deadline).
        call = self._calls[key] = _Call(request_id, rec, invoked_arn, payload, log_tail, done,
                                        sink)
        call.trace_id = trace.child(span_id).format()
        call.spans = self.cell.spans is not None and bool(trace.sampled)
        counters = self.cell.counters
        mx = self.cell.metrics
        labels = mx.labels(rec.account, rec.name)
        started = time.monotonic()
        self.feed(InvokeRequested(key, function_ref(rec, reserved)))
        if not (done.done() and isinstance(done.result(), Throttle)
                and key not in self.core.requests):
            counters["invocations"] += 1
            mx.invocations.labels(*labels).inc()
        mx.concurrent.labels(*labels).inc()
        try:
            ins = await done
        finally:
            mx.concurrent.labels(*labels).dec()
        if isinstance(ins, Throttle):
            counters["throttles"] += 1
            mx.throttles.labels(*labels).inc()
            err = errors.too_many(ins.message, ins.reason)
            if ins.reserved_zero:  # async events of this function go to on-failure at once
                err.http_headers[RESERVED_ZERO_HEADER] = "0"
            raise err
        assert isinstance(ins, Answer)
        if not ins.ok:
            raise LambdaError(ins.status, ins.error_type, ins.message)
        res = call.reply
        assert res is not None
        if res.spans and self.cell.spans is not None:
            self.cell.spans.export_remote_later(trace, res.spans, {"aws.request_id": request_id})
        mx.duration.labels(*labels).observe(time.monotonic() - started)
        logs = res.logs
        if logs:
            self.cell.file_logs(rec.key, logs, request_id, env_id=call.env_id,
                                live_bytes=res.logs_live_bytes)
        if res.function_error:
            counters["function_errors"] += 1
            mx.errors.labels(*labels).inc()
        return InvokeResult(res.payload, res.function_error,
                            self.cell.log_tail(rec.key, logs) if log_tail else b"",
                            request_id, rec.version, trace)

    # -- leases (issue #13): a router runs warm invokes router -> agent ------------------------
    async def lease(self, rec: FunctionRecord, invoked_arn: str, reserved: int | None,
                    holder: str) -> dict[str, Any]:
        """A lease on a warm (or new) environment of ``rec`` for ``holder``, counted like an
        invocation; the agent is told before the holder is (it refuses anything else)."""
        lease_id = f"lease-{uuid.uuid4()}"
        done: asyncio.Future[Instruction] = asyncio.get_running_loop().create_future()
        self._calls[lease_id] = _Call(lease_id, rec, invoked_arn, b"", False, done)
        # Only a warm environment: a lease never costs a cold start (nor keeps one alive that
        # an invocation left behind, e.g. killed on its timeout).
        self.feed(LeaseRequested(lease_id, holder, function_ref(rec, reserved), warm_only=True))
        ins = await done
        if isinstance(ins, Throttle):
            raise errors.too_many(ins.message, ins.reason)
        if isinstance(ins, Answer):
            raise LambdaError(ins.status, ins.error_type or "ServiceException", ins.message)
        assert isinstance(ins, GrantLease)
        cell = self.cell
        client = cell.agents[ins.agent_id]
        ttl_ms = max(0, ins.expires_ms - self.now_ms())
        try:
            await self.call_agent(client, "lease_grant", {"lease_id": lease_id,
                                                          "env_id": ins.env_id,
                                                          "ttl_ms": ttl_ms},
                                  cell.limits.agent_call_timeout_ms / 1000)
        except (TransportError, RemoteError) as e:
            self.feed(LeaseReturned(lease_id))
            raise LambdaError(503, "ServiceException", f"could not lease: {e}") from e
        cell.counters["leases_granted"] = cell.counters.get("leases_granted", 0) + 1
        return {"lease_id": lease_id, "env_id": ins.env_id, "agent_id": ins.agent_id,
                "host": client.host, "port": client.port, "ttl_ms": ttl_ms,
                "version": rec.version, "timeout_ms": rec.timeout_s * 1000, "arn": invoked_arn,
                "logging": rec.logging}

    def lease_holder(self, lease_id: str) -> str | None:
        req = self.core.requests.get(lease_id)
        return req.holder if req is not None else None

    async def lease_return(self, lease_id: str, holder: str) -> dict[str, Any]:
        """The holder is done with the lease: the agent ends it (waits for its invocation, if
        one runs, and hands back their logs), then the slot goes back."""
        req = self.core.requests.get(lease_id)
        if req is None or req.holder != holder or req.agent_id is None:
            return {"returned": False}
        await self._end_lease(lease_id, req.agent_id, revoked=False)
        return {"returned": True}

    def reserved_changed(self, account: str, name: str) -> None:
        self.feed(ReservedChanged(f"{account}/{name}"))

    async def settle_leases(self) -> None:
        """Wait (bounded) until every lease being revoked is refused by its agent: a change
        (new code, new configuration, a deletion) is answered only once no router can start
        an invocation of the old one under a lease."""
        if self._ending:
            await asyncio.wait(list(self._ending),
                               timeout=self.cell.limits.agent_call_timeout_ms / 1000 + 1)

    def lease_logs(self, lease_id: str, holder: str, request_id: str, logs: list[Any],
                   function_error: str | None = None, duration_ms: float | None = None,
                   live_bytes: int = 0) -> bool:
        """One invocation under a lease, reported by the holder as it answers: its logs,
        filed with the function's, and its outcome, counted in the function's metrics as the
        frontend's own invocations are."""
        req = self.core.requests.get(lease_id)
        if req is None or req.holder != holder:
            return False
        if duration_ms is not None:  # an invocation ran (else: a reset environment's logs)
            counters = self.cell.counters
            counters["leased_invocations"] = counters.get("leased_invocations", 0) + 1
            account, name = req.fn.key.split("/")[:2]
            mx = self.cell.metrics
            labels = mx.labels(account, name)
            mx.invocations.labels(*labels).inc()
            mx.duration.labels(*labels).observe(duration_ms / 1000)
            if function_error:
                counters["function_errors"] += 1
                mx.errors.labels(*labels).inc()
        for i, part in enumerate(logs):  # [previous logs, this invocation's]
            self.cell.file_logs(req.fn.key, part, request_id, env_id=req.env_id or "",
                                live_bytes=live_bytes if i == len(logs) - 1 else 0)
        return True

    def _refuse_lease(self, lease_id: str, agent_id: str) -> asyncio.Future[Any]:
        """Ask the agent to refuse the lease from now on (answered at once); settle_leases
        waits for every such ask under way."""
        cell = self.cell
        ended = asyncio.ensure_future(self.call_agent(
            cell.agents[agent_id], "lease_end", {"lease_id": lease_id, "wait": False},
            cell.limits.agent_call_timeout_ms / 1000))
        self._ending.add(ended)
        ended.add_done_callback(self._ending.discard)
        return ended

    async def _end_lease(self, lease_id: str, agent_id: str, *, revoked: bool,
                         refused: asyncio.Future[Any] | None = None) -> None:
        """Exactly one LeaseRevoked/LeaseReturned once the agent confirms the lease is over;
        none when the agent cannot be reached (the core frees it when the agent is lost)."""
        cell = self.cell
        # First the agent refuses the lease (at once: what settle_leases waits for), then it
        # answers once no invocation under it runs.
        ended = refused if refused is not None else self._refuse_lease(lease_id, agent_id)
        try:
            await asyncio.shield(ended)
            res = await self.call_agent(cell.agents[agent_id], "lease_end",
                                        {"lease_id": lease_id},
                                        cell.limits.timeout_s_max
                                        + cell.limits.agent_call_timeout_ms / 1000)
        except (TransportError, RemoteError) as e:
            log.info("lease %s on %s: %s", lease_id, agent_id, e)
            return
        alive = bool(res.get("env_alive", True))
        req = self.core.requests.get(lease_id)
        if not alive and req is not None and req.env_id:
            # The environment went under the lease (e.g. reset because its extensions overran
            # an Invoke phase): the agent keeps what its SHUTDOWN phase wrote for the destroy
            # that names it, as on the frontend's own path.
            self.destroy_soon(req.env_id, agent_id)
        self.feed(LeaseRevoked(lease_id, alive) if revoked
                  else LeaseReturned(lease_id, "ok" if alive else "env_died"))

    # -- provisioned pools, retirement, agents, time ---------------------------------------------
    def provisioned(self, rec: FunctionRecord, count: int) -> None:
        self.feed(ProvisionedSet(function_ref(rec, None), count))

    def retire(self, function_key: str) -> None:
        self.feed(FunctionRetired(function_key))

    def agent_lost(self, agent_id: str, detail: str) -> None:
        self.feed(AgentLost(agent_id, detail))

    def agent_back(self, agent_id: str, envs_max: int, memory_mb_max: int | None) -> None:
        self.feed(AgentBack(agent_id, envs_max, memory_mb_max))

    def tick(self) -> None:
        self.feed(Tick())

    # -- agent operations ------------------------------------------------------------------------
    async def call_agent(self, client: Client, op: str, body: dict[str, Any],
                         timeout_s: float) -> Any:
        """One agent call; an agent being replaced in place (live update) answers
        AgentDraining before it ran anything, so the call is repeated — on a fresh connection,
        which its successor accepts — with capped exponential backoff and full jitter."""
        for attempt in range(agent_draining_retries_max):
            try:
                return await client.call(op, body, timeout_s=timeout_s)
            except RemoteError as e:
                # AgentDraining: the agent refused it; Draining: its transport did (the
                # connection's last moments before the handover). Nothing ran either way.
                if e.type not in ("AgentDraining", DRAINING) \
                        or attempt == agent_draining_retries_max - 1:
                    raise
            await client.close()
            await asyncio.sleep(self.cell.rng.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise AssertionError("unreachable")

    async def _create(self, ins: CreateEnv) -> None:
        """Exactly one EnvCreated or EnvCreateFailed for the env, whatever happens."""
        reason: CreateFailure | None = "error"
        detail = ""
        try:
            rec = self._record_for(ins)
            if rec is None:
                detail = f"no function record for {ins.function_key}"
            else:
                mx = self.cell.metrics
                labels = mx.labels(rec.account, rec.name)
                started = time.monotonic()
                mx.cold_starts.labels(*labels).inc()
                reason, detail = await self._create_pinned(rec, ins)
                if reason is None:
                    mx.init_duration.labels(*labels).observe(time.monotonic() - started)
        finally:
            self.feed(EnvCreated(ins.env_id) if reason is None
                      else EnvCreateFailed(ins.env_id, reason, detail))

    def _record_for(self, ins: CreateEnv) -> FunctionRecord | None:
        if ins.request_id is not None:
            call = self._calls.get(ins.request_id)
            if call is not None:
                return call.rec
        return self.cell.catalog.provisioned_records().get(ins.function_key)

    async def _create_pinned(self, rec: FunctionRecord,
                             ins: CreateEnv) -> tuple[CreateFailure | None, str]:
        """Pins the function's bundles for the duration: they may be pushed to the agent."""
        digests = rec.bundle_digests()
        self.cell.catalog.pin_bundles(digests)
        try:
            return await self._create_call(rec, ins)
        finally:
            self.cell.catalog.unpin_bundles(digests)

    async def _create_call(self, rec: FunctionRecord,
                           ins: CreateEnv) -> tuple[CreateFailure | None, str]:
        cell = self.cell
        limits = cell.limits
        client = cell.agents[ins.agent_id]
        pushed: dict[str, bytes] = {}
        log_cfg = LoggingConfig.from_record(rec.logging)
        body = m.CreateEnvRequest(
            env_id=ins.env_id, bundle_sha256=rec.code_sha256, function_key=rec.key,
            create_timeout_ms=limits.env_create_timeout_ms, bundles=pushed,
            function=m.FunctionSpec(
                name=rec.name, arn=function_arn(cell.region, rec.account, rec.name),
                handler=rec.handler, runtime=rec.runtime, memory_mb=rec.memory_mb,
                timeout_s=rec.timeout_s,
                environment={**rec.environment, **log_cfg.environment()},
                log_group=log_cfg.group_for(rec.name),
                log_stream=cell.stream_for(ins.env_id, rec.version),
                ephemeral_mb=rec.ephemeral_mb, version=rec.version, network=rec.network,
                net_allow=tuple(rec.net_allow),
                layers=tuple(layer["sha256"] for layer in rec.layers),
                snapstart=rec.snapstart if rec.version != "$LATEST" else ""),
            image=(image_functions.agent_image(rec)
                   if rec.package_type == image_functions.IMAGE else None)).to_wire()
        layers_pushed: dict[str, int] = {}
        pushes_max = limits.image_layer_pushes_per_create_max
        timeout_s = limits.env_create_timeout_ms / 1000 + 5
        try:
            # The agent keeps bundles by digest; push only the ones it says it lacks (the code,
            # then each layer), at most once each. Image layers are streamed in chunks, each
            # at most pushes_max times: an agent whose bounded layer cache forgot one between
            # its stream and this create (agent/images.py) asks for it again.
            image_layers = len(rec.image.get("layers", []))
            for _ in range(2 + len(rec.layers) + pushes_max * image_layers):
                try:
                    await self.call_agent(client, "create_env", body, timeout_s)
                    return None, ""
                except RemoteError as e:
                    digest = str(e.data.get("digest", ""))
                    if e.type == "LayerMissing" and layers_pushed.get(digest, 0) < pushes_max:
                        layers_pushed[digest] = layers_pushed.get(digest, 0) + 1
                        await image_functions.push_layer(cell, client, rec, digest, timeout_s)
                        continue
                    sha = str(e.data.get("sha256", ""))
                    if e.type != "BundleMissing" or not sha or sha in pushed:
                        raise
                    pushed[sha] = cell.store.get_bundle(sha)
            raise RemoteError("BundleMissing", "the agent kept asking for bundles")
        except TransportError as e:
            return "unreachable", str(e)
        except LambdaError as e:  # an image layer that could not be streamed
            return "error", e.message
        except RemoteError as e:
            log.warning("agent %s could not create env: %s", ins.agent_id, e,
                        extra=eventlog.fields(event="env_create_failed", agent=ins.agent_id,
                                              env=ins.env_id, function=rec.name,
                                              version=rec.version))
            if e.type == "EnvUnsupported":  # the agent's own message, meant for the caller
                return "unsupported", e.message
            reasons: dict[str, CreateFailure] = {"AgentFull": "agent_full",
                                                 "HostMemoryExhausted": "host_memory",
                                                 "BundleMissing": "bundle_missing"}
            return reasons.get(e.type, "error"), str(e)

    async def _run(self, ins: RunInvoke) -> None:
        """Exactly one InvokeFinished for the request, whatever happens."""
        outcome: InvokeOutcome = "env_error"
        detail = ""
        call = self._calls.get(ins.request_id)
        try:
            if call is None:  # the caller went away: nothing to run
                outcome, detail = "env_gone", "the caller went away"
                return
            outcome, detail = await self._run_call(call, ins)
        finally:
            counters = self.cell.counters
            if outcome == "env_gone":
                counters["envs_gone"] = counters.get("envs_gone", 0) + 1
            elif outcome == "env_died":
                counters["env_failures"] = counters.get("env_failures", 0) + 1
            self.feed(InvokeFinished(ins.request_id, outcome, detail))

    async def _run_call(self, call: _Call, ins: RunInvoke) -> tuple[InvokeOutcome, str]:
        cell = self.cell
        rec = call.rec
        timeout_ms = rec.timeout_s * 1000
        call.env_id = ins.env_id
        body = m.InvokeRequest(env_id=ins.env_id, request_id=call.request_id,
                               payload=call.payload, timeout_ms=timeout_ms,
                               arn=call.invoked_arn, stream=call.sink is not None,
                               trace_id=call.trace_id, spans=call.spans).to_wire()
        timeout_s = timeout_ms / 1000 + cell.limits.agent_call_timeout_ms / 1000
        try:
            if call.sink is not None:
                reply = await self._stream_agent(cell.agents[ins.agent_id], body, timeout_s,
                                                 call.sink)
            else:
                reply = await self.call_agent(cell.agents[ins.agent_id], "invoke", body,
                                              timeout_s)
            res = m.InvokeReply.from_wire(reply)
        except m.MessageError as e:  # an answer not of its type: the handler may have run
            return "env_error", f"malformed agent reply: {e}"
        except NotDelivered as e:  # never reached the agent: nothing ran
            return "not_delivered", str(e)
        except TransportError as e:  # the handler may have run
            return "transport_lost", str(e)
        except RemoteError as e:
            if e.type in ("EnvGone", "EnvNotFound"):
                # The agent placed nothing: the environment had died (or its agent restarted
                # without it). No handler code ran, so the core places the invoke again.
                return "env_gone", str(e)
            if e.type == "EnvReset":
                cell.file_logs(rec.key, e.data.get("logs"), env_id=ins.env_id)
                return "env_reset", str(e)
            return "env_error", str(e)
        cell.file_logs(rec.key, res.previous_logs, env_id=ins.env_id)
        call.reply = res
        if not res.env_alive:
            # Crashed or timed out but its host survived: the jail contained it; counted, but
            # an ordinary Lambda error, not a poison.
            return "env_died", ""
        return ("function_error" if res.function_error else "ok"), ""

    @staticmethod
    async def _stream_agent(client: Client, body: dict[str, Any], timeout_s: float,
                            sink: ChunkSink) -> Any:
        """A streamed ``invoke``: each piece of the response to ``sink`` as it arrives; the
        agent's reply (an agent that does not stream answers whole: its payload is the
        response)."""
        reply = None
        async for kind, value in client.call_stream("invoke", body, timeout_s=timeout_s):
            if kind == "end":
                reply = value if value is not None else reply
            elif isinstance(value, dict) and isinstance(value.get("c"), bytes):
                sink(value["c"], str(value.get("ct") or ""))
            elif isinstance(value, dict) and "r" in value:
                reply = value["r"]
        return reply

    def destroy_soon(self, env_id: str, agent_id: str) -> None:
        self._spawn(self.destroy(env_id, agent_id))

    async def destroy(self, env_id: str, agent_id: str) -> None:
        cell = self.cell
        try:
            res = await cell.agents[agent_id].call(
                "destroy", {"env_id": env_id},
                timeout_s=cell.limits.agent_call_timeout_ms / 1000)
        except (TransportError, RemoteError) as e:
            log.info("destroy %s on %s: %s", env_id, agent_id, e,
                     extra=eventlog.fields(event="env_destroy_failed", env=env_id,
                                           agent=agent_id))
            return
        # What the environment wrote during its SHUTDOWN phase (its extensions' last words)
        # belongs to the function's logs, as on Lambda.
        if isinstance(res, dict):
            cell.file_logs(str(res.get("function_key") or ""), res.get("logs"), env_id=env_id)


def _now_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}+0000"
