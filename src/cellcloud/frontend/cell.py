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
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ..core import errors
from ..core.catalog_rules import iso_time_ms
from ..core.errors import LambdaError
from ..core.jsondepth import check_json_depth
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.placement import Create, Placement, Throttle, Use
from ..core.poison import PoisonDetector, PoisonParams
from ..core.sharding import PlainSharder, SignatureSharder, Worker, retry_order
from ..network import policy as net_policy
from ..transport import Client, RemoteError, TransportError
from .events import RESERVED_ZERO_HEADER, Intake
from .functions import Catalog
from .store import FunctionRecord, FunctionStore, StateDiskFull, function_arn

log = logging.getLogger("cellcloud.frontend")

shards_cached_max = 100_000
agent_draining_retries_max = 40  # ~20 s of backoff: an agent handover takes well under that


def _now_iso() -> str:
    return iso_time_ms(time.time())


class InvokeResult:
    __slots__ = ("status", "payload", "function_error", "logs", "request_id", "executed_version")

    def __init__(
        self,
        payload: bytes,
        function_error: str | None,
        logs: bytes,
        request_id: str,
        executed_version: str = "$LATEST",
    ) -> None:
        self.status = 200
        self.payload = payload
        self.function_error = function_error
        self.logs = logs
        self.request_id = request_id
        self.executed_version = executed_version


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
        self.shards: dict[str, tuple[str, ...]] = {}
        self.failed_agents: dict[str, dict[str, Any]] = {}  # reported in status
        self.poison = PoisonDetector(poison or PoisonParams.for_shard(self.shard_size))
        for aid in agents:
            self.placement.add_agent(aid, envs_per_agent_max)
        self._pending_logs: list[tuple[str, str, int, str, bytes]] = []
        self._inflight: dict[tuple[str, str], int] = {}
        # Bundles the catalog freed, per agent, that the agent is still to be told to forget
        # (retried at each agent poll).
        self._forget_pending: dict[str, set[str]] = {}
        self._forgetting = False
        # The durable async intake (frontend/events.py), set by the server; None: no async path.
        self.events: Intake | None = None
        # Sync invokes in flight in the whole cell; over this, 429 with Retry-After (shedding
        # before the hosts' queues collapse).
        self.invokes_inflight_max = invokes_inflight_max
        self._inflight_total = 0
        self.counters = {
            "invocations": 0,
            "function_errors": 0,
            "throttles": 0,
            "cold_starts": 0,
            "agent_failures": 0,
        }

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

    # The invoke path's names for the catalog's bundle and provisioning state.
    @property
    def _bundle_pins(self) -> dict[str, int]:
        return self.catalog.bundle_pins

    @property
    def _bundles_deferred(self) -> set[str]:
        return self.catalog.bundles_deferred

    @property
    def _provisioned(self) -> dict[tuple[str, str, str], tuple[FunctionRecord, int, str]]:
        return self.catalog.provisioned

    def _release_bundles(self, digests: Iterable[str]) -> None:
        self.catalog.release_bundles(digests)

    def _restore_reserve(self) -> None:
        self.catalog.restore_reserve()

    # -- Environments: what the catalog asks of the invoke side --------------------------------
    def retire_function(self, function_key: str) -> None:
        self._retire(function_key)

    def set_provisioned(self, function_key: str, count: int) -> None:
        self.placement.set_provisioned(function_key, count)

    def fill_provisioned(self) -> None:
        self._provision_soon()

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

    def _provision_soon(self) -> None:
        recs = self.catalog.provisioned_records()
        for create in self.placement.provision(int(self.clock() * 1000)):
            rec = recs.get(self.placement.envs[create.env_id].function_key)
            if rec is not None:
                asyncio.ensure_future(self._prewarm(rec, create))

    async def _prewarm(self, rec: FunctionRecord, create: Create) -> None:
        try:
            await self._create_env(rec, create, prewarm=True)
        except _AgentUnavailable:
            log.warning("could not provision an environment for %s", rec.key)

    def _retire(self, function_key: str) -> None:
        self.placement.set_provisioned(function_key, 0)
        for d in self.placement.retire_function(function_key):
            self._destroy_soon(d.env_id, d.agent_id)

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
    ) -> InvokeResult:
        rec, invoked_arn = self.resolve(account, name, qualifier)
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
        # Reserved concurrency is the function's, over all its versions: count in-flight
        # invokes here (the placement's own limit is per version).
        reserved = self.reserved(account, name)
        fkey = (account, name)
        if reserved is not None and self._inflight.get(fkey, 0) >= reserved:
            self.counters["throttles"] += 1
            err = errors.too_many(
                f"Rate Exceeded. Reserved concurrency of {reserved} reached for {name}.",
                "ReservedFunctionConcurrentInvocationLimitExceeded",
            )
            if reserved == 0:  # async events of this function go to on-failure at once
                err.http_headers[RESERVED_ZERO_HEADER] = "0"
            raise err
        if self._inflight_total >= self.invokes_inflight_max:
            self.counters["throttles"] += 1
            raise errors.too_many("Rate Exceeded. The cell is over capacity.",
                                  "CellConcurrencyLimitExceeded")
        self._inflight[fkey] = self._inflight.get(fkey, 0) + 1
        self._inflight_total += 1
        try:
            return await self._invoke_placed(rec, invoked_arn, payload, log_tail, reserved,
                                             request_id)
        finally:
            self._inflight_total -= 1
            self._inflight[fkey] -= 1
            if not self._inflight[fkey]:
                del self._inflight[fkey]

    async def _invoke_placed(
        self,
        rec: FunctionRecord,
        invoked_arn: str,
        payload: bytes,
        log_tail: bool,
        reserved: int | None,
        request_id: str | None = None,
    ) -> InvokeResult:
        request_id = request_id or str(uuid.uuid4())
        self.counters["invocations"] += 1
        # Retries here and only here, only when the failure happened before the handler could
        # have run (an agent that could not be reached or could not start the env), each on a
        # different agent of the function's shard; the poison detector is asked every time.
        skey = f"{rec.account}/{rec.name}"
        shard = self.shard_of(skey)
        failed: list[str] = []
        attempts = max(2, len(shard))
        gone = 0  # environments found dead (EnvGone): placed again, no handler code ran
        attempt = 0
        while attempt < attempts:
            now_ms = int(time.time() * 1000)
            verdict = self.poison.allowed(skey, now_ms)
            if verdict is not True:
                assert not isinstance(verdict, bool)
                self.counters["throttles"] += 1
                raise errors.too_many(
                    f"Rate Exceeded. Invocations of {rec.name} keep killing workers; retry after "
                    f"{verdict.retry_after_ms} ms.", "FunctionKillsWorkers")
            eligible = [a for a in retry_order(shard, attempt, skey, failed=failed)
                        if a not in failed]
            decision = self.placement.acquire(
                rec.key,
                reserved or self.limits.function_concurrency_default,
                now_ms,
                eligible_agents=eligible if shard else None,
            )
            if isinstance(decision, Throttle):
                self.counters["throttles"] += 1
                raise errors.too_many(decision.message, decision.reason)
            if isinstance(decision, Create):
                self.counters["cold_starts"] += 1
                try:
                    await self._create_env(rec, decision)
                except _AgentUnavailable as e:
                    failed.append(decision.agent_id)
                    attempt += 1
                    if attempt < attempts:
                        continue
                    if e.full:  # every agent tried is at its environment or memory cap
                        self.counters["throttles"] += 1
                        raise errors.too_many(
                            "Rate Exceeded. The cell's hosts are at capacity.",
                            "ConcurrentInvocationLimitExceeded",
                        ) from None
                    raise errors.service("No agent could start an execution environment") from None
            try:
                return await self._invoke_on(rec, decision, request_id, payload, log_tail,
                                             invoked_arn)
            except (_EnvGone, _EnvReset) as e:
                # No handler code ran in it: the environment died idle (EnvGone), or the agent
                # reset it because its extensions overran the previous invocation (EnvReset).
                # As Lambda: another environment, a bounded number of times.
                gone += 1
                if gone > self.limits.env_gone_retries_max:
                    raise errors.service(f"The execution environment failed: {e}") from None
        raise AssertionError("unreachable")

    async def _create_env(self, rec: FunctionRecord, decision: Create,
                          prewarm: bool = False) -> None:
        """Pins the function's bundles for the duration: they may be pushed to the agent."""
        digests = _digests(rec)
        for sha in digests:
            self._bundle_pins[sha] = self._bundle_pins.get(sha, 0) + 1
        try:
            await self._create_env_pinned(rec, decision, prewarm)
        finally:
            for sha in digests:
                self._bundle_pins[sha] -= 1
                if not self._bundle_pins[sha]:
                    del self._bundle_pins[sha]
            if self._bundles_deferred & digests:
                self._release_bundles(self._bundles_deferred & digests)

    async def _create_env_pinned(self, rec: FunctionRecord, decision: Create,
                                 prewarm: bool) -> None:
        client = self.agents[decision.agent_id]
        body: dict[str, Any] = {
            "env_id": decision.env_id,
            "function_key": rec.key,
            "bundle_sha256": rec.code_sha256,
            "create_timeout_ms": self.limits.env_create_timeout_ms,
            "function": {
                "name": rec.name,
                "arn": function_arn(self.region, rec.account, rec.name),
                "handler": rec.handler,
                "runtime": rec.runtime,
                "memory_mb": rec.memory_mb,
                "timeout_s": rec.timeout_s,
                "environment": rec.environment,
                "ephemeral_mb": rec.ephemeral_mb,
                "version": rec.version,
                "network": rec.network,
                "net_allow": list(rec.net_allow),
                "layers": [layer["sha256"] for layer in rec.layers],
            },
        }
        timeout_s = self.limits.env_create_timeout_ms / 1000 + 5
        pushed: dict[str, bytes] = {}
        body["bundles"] = pushed
        try:
            # The agent keeps bundles by digest; push only the ones it says it lacks (the code,
            # then each layer), at most once each.
            for _ in range(2 + len(body["function"].get("layers", []))):
                try:
                    await self._call_agent(client, "create_env", body, timeout_s)
                    break
                except RemoteError as e:
                    sha = str(e.data.get("sha256", ""))
                    if e.type != "BundleMissing" or not sha or sha in pushed:
                        raise
                    pushed[sha] = self.store.get_bundle(sha)
            else:
                raise RemoteError("BundleMissing", "the agent kept asking for bundles")
        except TransportError as e:
            self._agent_failed(decision.agent_id, e)
            raise _AgentUnavailable() from e
        except RemoteError as e:
            self.placement.discard(decision.env_id)
            log.warning("agent %s could not create env: %s", decision.agent_id, e)
            raise _AgentUnavailable(full=e.type in ("AgentFull", "HostMemoryExhausted")) from e
        if prewarm:
            self.placement.prewarmed(decision.env_id, int(time.time() * 1000))
        else:
            self.placement.created(decision.env_id, int(time.time() * 1000))

    async def _call_agent(self, client: Client, op: str, body: dict[str, Any],
                          timeout_s: float) -> Any:
        """One agent call; an agent being replaced in place (live update) answers
        AgentDraining before it ran anything, so the call is repeated — on a fresh connection,
        which its successor accepts — with capped exponential backoff and full jitter."""
        for attempt in range(agent_draining_retries_max):
            try:
                return await client.call(op, body, timeout_s=timeout_s)
            except RemoteError as e:
                if e.type != "AgentDraining" or attempt == agent_draining_retries_max - 1:
                    raise
            await client.close()
            await asyncio.sleep(self.rng.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise AssertionError("unreachable")

    async def _invoke_on(
        self,
        rec: FunctionRecord,
        decision: Use | Create,
        request_id: str,
        payload: bytes,
        log_tail: bool,
        invoked_arn: str,
    ) -> InvokeResult:
        client = self.agents[decision.agent_id]
        timeout_ms = rec.timeout_s * 1000
        try:
            res = await self._call_agent(client, "invoke", {
                "env_id": decision.env_id,
                "request_id": request_id,
                "payload": payload,
                "timeout_ms": timeout_ms,
                "arn": invoked_arn,
            }, timeout_ms / 1000 + self.limits.agent_call_timeout_ms / 1000)
        except TransportError as e:
            # The handler may have run: no retry (sync invokes run at most once on our side).
            self.poison.on_env_crash(f"{rec.account}/{rec.name}", decision.agent_id,
                                     int(time.time() * 1000))
            self._agent_failed(decision.agent_id, e)
            raise errors.service(
                f"The execution environment's host failed during the invocation ({e})"
            ) from e
        except RemoteError as e:
            if e.type in ("EnvGone", "EnvNotFound"):
                # The agent placed nothing: the environment had died (or its agent restarted
                # without it). No handler code ran, so the caller places the invoke again.
                self.counters["envs_gone"] = self.counters.get("envs_gone", 0) + 1
                self.placement.discard(decision.env_id)
                raise _EnvGone(str(e)) from e
            self._discard(decision.env_id)
            if e.type == "EnvReset":
                self._file_logs(rec.key, e.data.get("logs"))
                raise _EnvReset(str(e)) from e
            raise errors.service(f"The execution environment failed: {e}") from e
        now_ms = int(time.time() * 1000)
        self._file_logs(rec.key, res.get("previous_logs"))
        if res.get("env_alive", True):
            self.poison.on_success(f"{rec.account}/{rec.name}", decision.agent_id, now_ms)
            for d in self.placement.release(decision.env_id, now_ms):
                self._destroy_soon(d.env_id, d.agent_id)
        else:
            # The environment crashed or timed out but its host survived: the jail contained
            # it, so it is counted (status) but does not throttle the function — an OOM or a
            # timeout is an ordinary Lambda error. Only a host that dies under an invocation
            # (the TransportError path above) counts as a killed worker.
            self.counters["env_failures"] = self.counters.get("env_failures", 0) + 1
            self.placement.discard(decision.env_id)  # the agent already removed it
        logs: bytes = res.get("logs") or b""
        if logs:
            self._pending_logs.append((rec.account, rec.name, now_ms, request_id, logs))
        if res["function_error"]:
            self.counters["function_errors"] += 1
        return InvokeResult(
            res["payload"],
            res["function_error"],
            logs[-self.limits.log_tail_bytes :] if log_tail else b"",
            request_id,
            rec.version,
        )

    def _discard(self, env_id: str) -> None:
        d = self.placement.discard(env_id)
        if d is not None:
            self._destroy_soon(d.env_id, d.agent_id)

    def shard_of(self, key: str) -> tuple[str, ...]:
        shard = self.shards.get(key)
        if shard is None:
            shard = self.sharder.shard(key) if self.sharder is not None else ()
            if len(self.shards) < shards_cached_max:
                self.shards[key] = shard
        return shard

    def _agent_failed(self, agent_id: str, exc: Exception) -> None:
        self.counters["agent_failures"] += 1
        self.failed_agents.setdefault(agent_id, {"since": _now_iso(), "error": str(exc)[:200]})
        lost = self.placement.agent_down(agent_id)
        log.warning("agent %s unreachable (%s); %d environments lost", agent_id, exc, len(lost))

    def _destroy_soon(self, env_id: str, agent_id: str) -> None:
        asyncio.ensure_future(self._destroy(env_id, agent_id))

    async def _destroy(self, env_id: str, agent_id: str) -> None:
        try:
            res = await self.agents[agent_id].call(
                "destroy", {"env_id": env_id}, timeout_s=self.limits.agent_call_timeout_ms / 1000
            )
        except (TransportError, RemoteError) as e:
            log.info("destroy %s on %s: %s", env_id, agent_id, e)
            return
        # What the environment wrote during its SHUTDOWN phase (its extensions' last words)
        # belongs to the function's logs, as on Lambda.
        if isinstance(res, dict):
            self._file_logs(str(res.get("function_key") or ""), res.get("logs"))

    def _file_logs(self, function_key: str, logs: Any) -> None:
        """Logs of an environment outside any invocation's reply (the end of an Invoke phase
        that went on after its response, a SHUTDOWN phase), filed with the function's."""
        if isinstance(logs, bytes) and logs and function_key.count("/") >= 1:
            account, name = function_key.split("/")[:2]
            self._pending_logs.append((account, name, int(time.time() * 1000), "", logs))

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
                    self._agent_failed(agent_id, e)
                continue
            if not self.placement.agents[agent_id].up:
                log.info("agent %s is back", agent_id)
                self.placement.agent_up(agent_id)
                self.failed_agents.pop(agent_id, None)
            known = self.placement.agents[agent_id].envs
            for env in st["envs"]:
                if env["env_id"] not in known and (
                    first or not env["env_id"].startswith(self.placement_prefix)
                ):
                    await self._destroy(env["env_id"], agent_id)
        if any(self._forget_pending.values()) and not self._forgetting:
            await self._send_forgets()

    @property
    def placement_prefix(self) -> str:
        return self.placement._prefix

    def tick(self) -> None:
        for d in self.placement.on_tick(int(time.time() * 1000)):
            self._destroy_soon(d.env_id, d.agent_id)
        if self._provisioned:
            self._provision_soon()  # replaces provisioned environments that were lost
        self.flush_logs()
        self._restore_reserve()  # after a delete on a full disk, once there is room again

    def flush_logs(self) -> None:
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

    async def status(self) -> dict[str, Any]:
        agents = {}
        for agent_id, client in self.agents.items():
            try:
                agents[agent_id] = await client.call("status", None, timeout_s=2)
            except (TransportError, RemoteError) as e:
                agents[agent_id] = {"agent_id": agent_id, "error": str(e)}
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
            "agents": agents,
            "disk": self.store.disk_space().doc(),
            "bundles_to_forget": sum(map(len, self._forget_pending.values())),
        }


def _digests(rec: FunctionRecord) -> set[str]:
    """The bundles a function record holds: its code and its layers."""
    return {rec.code_sha256, *(str(layer["sha256"]) for layer in rec.layers)}


class _EnvReset(Exception):
    """The agent reset the environment before the invocation ran: take another one."""


class _EnvGone(Exception):
    """The agent answered that the environment was dead before the invoke reached it."""


class _AgentUnavailable(Exception):
    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.full = full
