"""The cell frontend over its I/O: the invoke path, environments, logs, status.

Requests arrive from the router as plain dicts (method, path, query, headers, body, account) and
leave as (status, headers, body); the Lambda REST API's paths and shapes are handled in api.py.
The function catalog (functions, versions, aliases, concurrency settings, layers, bundles) is
``self.catalog`` (frontend/functions.py); the cell is the ``Environments`` it reports to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import eventlog
from ..core import cwlogs, errors
from ..core.catalog_rules import iso_time_ms
from ..core.errors import LambdaError
from ..core.jsondepth import check_json_depth
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.placement import Placement
from ..core.poison import PoisonDetector, PoisonParams
from ..core.sharding import PlainSharder, SignatureSharder, Worker
from ..metrics import Pushed
from ..network import policy as net_policy
from ..transport import Client, RemoteError, TransportError
from . import image_functions
from .events import Intake
from .functions import Catalog
from .invoker import ChunkSink, Invoker, InvokeResult
from .logstore import EventRow, LogStore
from .metrics import FrontendMetrics
from .store import FunctionRecord, FunctionStore, StateDiskFull

if TYPE_CHECKING:
    from ..span_export import SpanExporter
    from .mappings import Mappings
    from .tasks import TaskManager

log = logging.getLogger("cellcloud.frontend")

streams_remembered_max = 100_000  # environments whose log stream name the cell remembers
pending_events_max = 10_000  # log events queued before they are filed at once

__all__ = ["Cell", "InvokeResult"]


def _now_iso() -> str:
    return iso_time_ms(time.time())


class Cell:
    def __init__(
        self,
        cell_id: str,
        store: FunctionStore,
        agents: dict[str, tuple[str, int]],
        *,
        region: str = "cc-local-1",
        limits: Limits = DEFAULT_LIMITS,
        envs_per_agent_max: int = DEFAULT_LIMITS.envs_per_agent_max,
        rng: random.Random | None = None,
        invokes_inflight_max: int = 1000,
        sharding: str = "signature",
        shard_size: int = 2,
        poison: PoisonParams | None = None,
        net_internal: tuple[str, ...] = (net_policy.DEFAULT_POOL,),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cell_id = cell_id
        self.store = store
        self.region = region
        self.limits = limits
        self.rng = rng or random.Random()
        self.clock = clock  # Unix seconds
        self.catalog = Catalog(store, self, region=region, limits=limits, rng=self.rng,
                               clock=clock, net_internal=net_internal)
        self.placement = Placement(
            env_id_prefix=f"{cell_id}-{os.urandom(4).hex()}",
            idle_timeout_ms=limits.env_idle_timeout_ms,
        )
        self.agents = {aid: Client(h, p, expect_role="agent") for aid, (h, p) in agents.items()}
        # Shuffle sharding: a function is placed only on its shard of k agents. Shards are
        # fixed (never re-drawn when an agent fails: a poison function could otherwise walk
        # across the cell); a failed agent leaves every shard's eligible set until it is back.
        workers = [Worker(a) for a in sorted(agents)]
        self.shard_size = max(1, min(shard_size, len(workers)))
        self.sharding = sharding
        self.sharder: PlainSharder | SignatureSharder | None = None
        if workers:
            self.sharder = (PlainSharder(workers, self.shard_size) if sharding == "plain" else
                            SignatureSharder(workers, self.shard_size, seed=cell_id.encode(),
                                             one_per_zone=False))
        self.failed_agents: dict[str, dict[str, Any]] = {}  # reported in status
        self.poison = PoisonDetector(poison or PoisonParams.for_shard(self.shard_size))
        for aid in agents:
            self.placement.add_agent(aid, envs_per_agent_max)
        self._pending_logs: list[tuple[str, str, int, str, bytes]] = []
        # Functions' logs as CloudWatch Logs events (frontend/logstore.py; set by the server,
        # None: not kept), queued and filed at each tick; env id -> its stream's name.
        self.logstore: LogStore | None = None
        self._pending_events: list[EventRow] = []
        self._streams: OrderedDict[str, str] = OrderedDict()
        # Bundles the catalog freed, per agent, that the agent is still to be told to forget
        # (retried at each agent poll).
        self._forget_pending: dict[str, set[str]] = {}
        self._forgetting = False
        # The durable async intake (frontend/events.py), set by the server; None: no async path.
        self.events: Intake | None = None
        # SQS event source mappings and their pollers (frontend/mappings.py), set by the server.
        self.mappings: Mappings | None = None
        # ECS tasks (frontend/tasks.py), set by the server; None: this cell runs none.
        self.tasks: TaskManager | None = None
        self.counters = {
            "invocations": 0,
            "function_errors": 0,
            "throttles": 0,
            "cold_starts": 0,
            "agent_failures": 0,
            "metrics_agents_unavailable": 0,  # agents that did not answer a metrics scrape
        }
        # The invoke path: a sans-IO core (core/invoke.py) under a thin shell (invoker.py).
        # Sync invokes in flight in the whole cell are capped there (invokes_inflight_max; over
        # it, 429 with Retry-After, shedding before the hosts' queues collapse).
        self.invoker = Invoker(self, clock=clock, invokes_inflight_max=invokes_inflight_max)
        # Prometheus metrics (frontend/metrics.py), recorded by the invoker, served by `metrics`.
        self.metrics = FrontendMetrics(cell_id, limits.metrics_functions_max,
                                       limits.metrics_functions_per_account_max)
        # the dispatcher's exposition (metrics_push), under its own name only
        self.pushed_metrics = Pushed(limits, names=re.escape(f"{cell_id}-dispatcher"))
        # Tracing spans (span_export.py), set by the server when an OTLP endpoint is
        # configured; None: off (trace ids still flow, nothing is exported).
        self.spans: SpanExporter | None = None

    @property
    def invokes_inflight_max(self) -> int:
        return self.invoker.core.params.invokes_inflight_max

    @invokes_inflight_max.setter
    def invokes_inflight_max(self, n: int) -> None:
        core = self.invoker.core
        core.params = replace(core.params, invokes_inflight_max=n)

    @property
    def _inflight(self) -> dict[tuple[str, str], int]:
        """Sync invokes counted per function (account, name), as the invoke core counts them."""
        out: dict[tuple[str, str], int] = {}
        for owner, n in self.invoker.core.inflight.items():
            account, name = owner.split("/", 1)
            out[(account, name)] = n
        return out

    @property
    def shards(self) -> dict[str, tuple[str, ...]]:
        return self.invoker.core.shards

    def replace_sharder(self, sharder: PlainSharder | SignatureSharder) -> None:
        """A different sharder from now on (the blast-radius experiment's planted bug): the
        invoke core draws shards with it, and the shards it drew before are forgotten."""
        self.sharder = sharder
        self.invoker.core.sharder = sharder
        self.invoker.core.shards.clear()

    # -- the catalog, as the invoke path reads it --------------------------------------------
    def function(self, account: str, name: str) -> FunctionRecord:
        return self.catalog.function(account, name)

    def resolve(self, account: str, name: str, qualifier: str | None) -> tuple[FunctionRecord, str]:
        return self.catalog.resolve(account, name, qualifier)

    def reserved(self, account: str, name: str) -> int | None:
        return self.catalog.reserved(account, name)

    def invokes_in_flight(self, account: str) -> int:
        """Sync invokes running now for one tenant (a migration waits for zero)."""
        return sum(n for (acct, _), n in self._inflight.items() if acct == account)

    # -- Environments: what the catalog asks of the invoke side --------------------------------
    def retire_function(self, function_key: str) -> None:
        self._retire(function_key)

    def set_provisioned(self, rec: FunctionRecord, count: int) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No loop yet (the server's start, a unit test): the pool is recorded in placement
            # and filled by the first tick.
            self.placement.memory_mb[rec.key] = rec.memory_mb
            self.placement.set_provisioned(rec.key, count)
            return
        self.invoker.provisioned(rec, count)

    def provisioned_ready(self, function_key: str) -> int:
        return sum(1 for e in self.placement.envs.values()
                   if e.function_key == function_key and e.provisioned
                   and e.state != "creating")

    def bundles_freed(self, digests: list[str]) -> None:
        for agent_id in self.agents:
            self._forget_pending.setdefault(agent_id, set()).update(digests)
        self._forget_soon()

    def _forget_soon(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): the next agent poll sends them
        if not self._forgetting:
            self._forgetting = True
            asyncio.ensure_future(self._send_forgets())

    async def _send_forgets(self) -> None:
        """Tell each agent which digests it may drop (a digest wanted again meanwhile is not
        sent); what could not be delivered stays pending for the next agent poll."""
        self._forgetting = True
        try:
            for agent_id in list(self._forget_pending):
                pending = self._forget_pending[agent_id]
                pending.intersection_update(self.store.unreferenced(pending))
                batch = sorted(pending)[: self.limits.forget_bundles_digests_max]
                if not batch or not self.placement.agents[agent_id].up:
                    continue
                try:
                    await self.agents[agent_id].call(
                        "forget_bundles", {"sha256": batch},
                        timeout_s=self.limits.agent_call_timeout_ms / 1000)
                except (TransportError, RemoteError) as e:
                    log.warning("agent %s could not forget %d bundles yet: %s", agent_id,
                                len(batch), e)
                    continue
                pending.difference_update(batch)
        finally:
            self._forgetting = False
        if any(self._forget_pending.values()):
            log.debug("bundles still to forget: %d", sum(map(len, self._forget_pending.values())))

    def _retire(self, function_key: str) -> None:
        self.invoker.retire(function_key)

    # -- the invoke path ---------------------------------------------------------------------
    async def invoke(
        self,
        account: str,
        name: str,
        payload: bytes,
        *,
        log_tail: bool,
        qualifier: str | None = None,
        request_id: str | None = None,
        sink: ChunkSink | None = None,
        trace_header: str | None = None,
    ) -> InvokeResult:
        """``sink``: stream the response (its bytes go there as the runtime streams them; the
        result's payload holds what was not streamed)."""
        rec, invoked_arn = self.resolve(account, name, qualifier)
        image_functions.check_runnable(self.catalog, rec)  # a deleted image: Failed
        if len(payload) > self.limits.invoke_payload_bytes_max:
            raise LambdaError(
                413,
                "RequestEntityTooLargeException",
                f"{len(payload)} byte payload is too large for the RequestResponse invocation "
                f"type (limit {self.limits.invoke_payload_bytes_max} bytes)",
            )
        if payload:
            check_json_depth(payload, self.limits.json_depth_max)
            try:
                json.loads(payload)
            except (ValueError, UnicodeDecodeError) as e:
                raise LambdaError(
                    400,
                    "InvalidRequestContentException",
                    f"Could not parse request body into json: {e}",
                ) from e
        return await self.invoker.invoke(rec, invoked_arn, payload, log_tail,
                                         self.reserved(account, name), request_id, sink,
                                         trace_header)

    def shard_of(self, key: str) -> tuple[str, ...]:
        return self.invoker.core.shard_of(key)

    def file_logs(self, function_key: str, logs: Any, request_id: str = "", *,
                  env_id: str = "", live_bytes: int = 0) -> None:
        """An environment's log lines, filed with its function's: an invocation's reply, or
        output outside any reply (the end of an Invoke phase that went on after its response,
        a SHUTDOWN phase). ``live_bytes``: how many leading bytes were filed as events already
        while the invocation ran (:meth:`file_live_logs`)."""
        if isinstance(logs, bytes) and logs and function_key.count("/") >= 1:
            account, name = function_key.split("/")[:2]
            self._pending_logs.append((account, name, self.invoker.now_ms(), request_id, logs))
            self._file_events(function_key, logs[max(0, live_bytes):], request_id, env_id)

    def file_live_logs(self, function_key: str, logs: bytes, request_id: str,
                       env_id: str) -> None:
        """A running invocation's lines, pulled from its agent (``live_logs``): events now."""
        if logs and function_key.count("/") >= 1:
            self._file_events(function_key, logs, request_id, env_id)

    def logging_of(self, function_key: str) -> tuple[str, cwlogs.LoggingConfig]:
        """(function name, LoggingConfig) of the record a placement key names."""
        parts = function_key.split("/")
        account, name = parts[0], parts[1]
        version = parts[2] if len(parts) > 2 else "$LATEST"
        try:
            rec = (self.catalog.function(account, name) if version == "$LATEST"
                   else self.catalog.version(account, name, version))
            return name, cwlogs.LoggingConfig.from_record(rec.logging)
        except LambdaError:
            return name, cwlogs.LoggingConfig()

    def stream_for(self, env_id: str, version: str) -> str:
        """The log stream of an environment (named at its creation, as Lambda names it)."""
        stream = self._streams.get(env_id)
        if stream is None:
            stream = self._streams[env_id] = cwlogs.stream_name(
                version, env_id or "cellcloud", self.invoker.now_ms())
            while len(self._streams) > streams_remembered_max:
                self._streams.popitem(last=False)
        return stream

    def _file_events(self, function_key: str, logs: bytes, request_id: str,
                     env_id: str) -> None:
        if self.logstore is None or not logs:
            return
        account = function_key.split("/")[0]
        parts = function_key.split("/")
        version = parts[2] if len(parts) > 2 else "$LATEST"
        name, cfg = self.logging_of(function_key)
        now = self.invoker.now_ms()
        group = cfg.group_for(name)
        stream = self.stream_for(env_id, version)
        for line in cwlogs.lambda_events(logs.decode(errors="replace"), cfg, now):
            self._pending_events.append((account, group, stream, now, request_id, line))
        if len(self._pending_events) >= pending_events_max:
            self.flush_events()

    def log_tail(self, function_key: str, logs: bytes) -> bytes:
        """``LogType=Tail``'s last bytes, in the function's log format."""
        tail_max = self.limits.log_tail_bytes
        _name, cfg = self.logging_of(function_key)
        if cfg.log_format == "JSON":
            logs = "".join(cwlogs.lambda_events(logs.decode(errors="replace"), cfg,
                                                self.invoker.now_ms())).encode()
        return logs[-tail_max:]

    def flush_events(self) -> None:
        if self._pending_events and self.logstore is not None:
            rows, self._pending_events = self._pending_events, []
            try:
                self.logstore.append(rows, self.invoker.now_ms())
            except sqlite3.Error as e:
                # Logs are acknowledged to no one: on a full disk they are dropped, counted.
                self.counters["log_events_dropped"] = (
                    self.counters.get("log_events_dropped", 0) + len(rows))
                log.warning("could not file %d log events: %s", len(rows), e)

    async def pull_live_logs(self) -> None:
        """Running invocations' new lines from every agent (passive: we call them)."""
        for agent_id, client in self.agents.items():
            if not self.placement.agents[agent_id].up:
                continue
            try:
                res = await client.call("live_logs", None,
                                        timeout_s=self.limits.agent_call_timeout_ms / 1000)
            except (TransportError, RemoteError):
                continue  # an agent of an older build, or down: its lines come with replies
            for env in res.get("envs", []) if isinstance(res, dict) else []:
                if isinstance(env, dict) and isinstance(env.get("logs"), bytes):
                    self.file_live_logs(str(env.get("function_key") or ""), env["logs"],
                                        str(env.get("request_id") or ""),
                                        str(env.get("env_id") or ""))
        self.flush_events()

    # -- housekeeping ----------------------------------------------------------------------------
    async def sync_agents(self, *, first: bool = False) -> None:
        """Poll every agent (passive: we call them). Down agents come back up; on the first
        poll, environments left by a previous frontend process are destroyed."""
        for agent_id, client in self.agents.items():
            try:
                st = await client.call(
                    "status", {"light": True},
                    timeout_s=self.limits.agent_call_timeout_ms / 1000
                )
            except (TransportError, RemoteError) as e:
                if self.placement.agents[agent_id].up:
                    self.invoker.agent_lost(agent_id, str(e))
                continue
            known_agent = self.placement.agents[agent_id]
            memory_mb_max = st.get("memory_mb_max") if isinstance(st, dict) else None
            if not known_agent.up or (isinstance(memory_mb_max, int)
                                      and memory_mb_max != known_agent.memory_mb_max):
                if not known_agent.up:
                    log.info("agent %s is back", agent_id,
                             extra=eventlog.fields(event="agent_back", agent=agent_id))
                self.invoker.agent_back(agent_id, known_agent.envs_max,
                                        memory_mb_max if isinstance(memory_mb_max, int) else None)
                self.failed_agents.pop(agent_id, None)
            known = self.placement.agents[agent_id].envs
            for env in st["envs"]:
                if env["env_id"] not in known and (
                    first or not env["env_id"].startswith(self.placement_prefix)
                ):
                    await self.invoker.destroy(env["env_id"], agent_id)
        if any(self._forget_pending.values()) and not self._forgetting:
            await self._send_forgets()

    @property
    def placement_prefix(self) -> str:
        return self.placement.env_id_prefix

    def tick(self) -> None:
        # Idle reaping, deadlines, provisioned pools (lost environments replaced).
        self.invoker.tick()
        self.flush_logs()
        self.catalog.restore_reserve()  # after a delete on a full disk, once there is room again

    def flush_logs(self) -> None:
        self.flush_events()
        if self._pending_logs:
            rows, self._pending_logs = self._pending_logs, []
            try:
                self.store.append_logs(rows)
            except StateDiskFull:
                # Logs are acknowledged to no one: on a full disk they are dropped, counted.
                self.counters["logs_dropped"] = self.counters.get("logs_dropped", 0) + len(rows)
                log.warning("state disk full: dropped %d log batches", len(rows))

    async def attest(self, account: str, name: str, qualifier: str | None,
                     nonce: str) -> dict[str, Any]:
        """A fresh attestation document, bound to ``nonce``, from a running environment of the
        function (the agent that runs it signs; the caller verifies offline)."""
        rec, _ = self.resolve(account, name, qualifier)
        envs = [e for e in self.placement.envs.values()
                if e.function_key == rec.key and e.state != "creating"]
        if not envs:
            raise errors.not_found(f"No execution environment of {name} is running; invoke it "
                                   "first (or give it provisioned concurrency)")
        env = max(envs, key=lambda e: e.last_used_ms)
        try:
            doc: dict[str, Any] = await self.agents[env.agent_id].call(
                "attest", {"env_id": env.env_id, "nonce": nonce},
                timeout_s=self.limits.agent_call_timeout_ms / 1000)
        except RemoteError as e:
            raise errors.invalid(e.message) if e.type == "InvalidNonce" else errors.service(
                str(e)) from e
        except TransportError as e:
            raise errors.service(str(e)) from e
        return doc

    def logs(self, account: str, name: str, limit: int) -> list[dict[str, Any]]:
        self.function(account, name)
        self.flush_logs()
        return [
            {"timestamp": ts, "requestId": rid, "message": text.decode(errors="replace")}
            for ts, rid, text in self.store.read_logs(account, name, limit)
        ]

    def recent_invocations(self, account: str, name: str, limit: int = 10,
                           lines_max: int = 200) -> list[dict[str, Any]]:
        """The function's latest invocations that logged, newest first, each with its log
        lines (the web console's function page reads this): ``request_id``, ``time_ms`` (of
        its last line), ``stream`` and ``lines`` (at most ``lines_max``). Read-only; [] when
        the cell keeps no log store."""
        if self.logstore is None:
            return []
        self.flush_events()
        rec = self.function(account, name)
        group = cwlogs.LoggingConfig.from_record(rec.logging).group_for(name)
        out = []
        for request_id, time_ms in self.logstore.recent_requests(account, group,
                                                                 max(1, min(limit, 100))):
            events = self.logstore.request_events(account, group, request_id, lines_max)
            out.append({"request_id": request_id, "time_ms": time_ms,
                        "stream": events[0].stream if events else "",
                        "lines": [e.message for e in events]})
        return out

    def metrics_exposition(self) -> bytes:
        """The cell's Prometheus text exposition, gauges refreshed from the cell's state."""
        m = self.metrics
        m.agents.set(len(self.agents))
        m.agents_failed.set(len(self.failed_agents))
        m.shard_size.set(self.shard_size)
        m.shard_functions.clear()
        for agent_id in self.agents:
            m.shard_functions.labels(agent_id).set(0)
        for shard in self.shards.values():
            for agent_id in shard:
                m.shard_functions.labels(agent_id).inc()
        m.environments.clear()
        for agent_id in self.agents:
            for state in ("creating", "idle", "busy"):
                m.environments.labels(agent_id, state).set(0)
        for env in self.placement.envs.values():
            m.environments.labels(env.agent_id, env.state).inc()
        if self.events is not None:
            m.async_depth.clear()
            m.async_oldest.clear()
            oldest: dict[tuple[str, str], float] = {}
            for row in self.events.store.backlog(int(time.time() * 1000)):
                labels = m.labels(str(row["account"]), str(row["function"]))
                m.async_depth.labels(*labels).inc(int(row["queued"]))
                oldest[labels] = max(oldest.get(labels, 0.0), row["oldest_age_ms"] / 1000)
            for labels, age_s in oldest.items():
                m.async_oldest.labels(*labels).set(age_s)
        return m.exposition()

    async def metrics_components(self, agents: bool) -> dict[str, bytes]:
        """Expositions by component: the frontend's own; with ``agents``, each agent's that
        answers (its ``metrics`` op, asked at once) and what the cell's dispatcher pushed."""
        out = {f"{self.cell_id}-frontend": self.metrics_exposition()}
        if not agents:
            return out
        timeout_s = self.limits.metrics_agent_timeout_ms / 1000

        async def one(client: Any) -> Any:
            return await client.call("metrics", None, timeout_s=timeout_s)

        ids = list(self.agents)
        got = await asyncio.gather(*(one(self.agents[a]) for a in ids), return_exceptions=True)
        for agent_id, text in zip(ids, got, strict=True):
            if isinstance(text, bytes):
                out[agent_id] = text
            else:
                self.counters["metrics_agents_unavailable"] += 1
        out.update(self.pushed_metrics.fresh(int(time.time() * 1000)))
        return out

    async def status(self) -> dict[str, Any]:
        async def one(agent_id: str, client: Any) -> dict[str, Any]:
            try:
                doc: dict[str, Any] = await client.call(
                    "status", None, timeout_s=self.limits.agent_call_timeout_ms / 1000)
                return doc
            except (TransportError, RemoteError) as e:
                return {"agent_id": agent_id, "error": str(e)}

        # All at once: a hung agent costs the status one agent timeout, not one per agent.
        asked = list(self.agents.items())
        answers = await asyncio.gather(*(one(a, c) for a, c in asked))
        agents = {a: doc for (a, _), doc in zip(asked, answers, strict=True)}
        return {
            "cell_id": self.cell_id,
            "pid": os.getpid(),
            "counters": dict(self.counters),
            "placement": self.placement.statistics(),
            # per function: queued async events, in flight, age of the oldest (fairness metric)
            "async": self.events.statistics() if self.events is not None else None,
            "shards": {"sharding": self.sharding, "k": self.shard_size,
                       "functions": {k: list(v) for k, v in self.shards.items()},
                       "failed_agents": dict(self.failed_agents)},
            "poison": self.poison.statistics(),
            "invoke": self.invoker.core.statistics(),
            "agents": agents,
            "disk": self.store.disk_space().doc(),
            "bundles_to_forget": sum(map(len, self._forget_pending.values())),
            # each running event source mapping poller: its counters (frontend/mappings.py)
            "mappings": self.mappings.statistics() if self.mappings is not None else {},
            "ecs_tasks": self.tasks.statistics() if self.tasks is not None else {},
        }

