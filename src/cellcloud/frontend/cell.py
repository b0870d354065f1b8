"""The cell frontend's logic over its I/O: function CRUD, the invoke path, logs, status.

Requests arrive from the router as plain dicts (method, path, query, headers, body, account) and
leave as (status, headers, body); the Lambda REST API's paths and shapes are handled in api.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import Any

from ..core import errors
from ..core.bundle import inspect_zip
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.placement import Create, Placement, Throttle, Use
from ..core.validation import check_env, check_handler, check_memory, check_name, check_timeout
from ..transport import Client, RemoteError, TransportError
from .store import FunctionRecord, FunctionStore, config_doc, function_arn

log = logging.getLogger("cellcloud.frontend")

SUPPORTED_RUNTIMES = ("python3.11",)


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}+0000"


class InvokeResult:
    __slots__ = ("status", "payload", "function_error", "logs", "request_id")

    def __init__(self, payload: bytes, function_error: str | None, logs: bytes,
                 request_id: str) -> None:
        self.status = 200
        self.payload = payload
        self.function_error = function_error
        self.logs = logs
        self.request_id = request_id


class Cell:
    def __init__(self, cell_id: str, store: FunctionStore, agents: dict[str, tuple[str, int]],
                 *, region: str = "cc-local-1", limits: Limits = DEFAULT_LIMITS,
                 envs_per_agent_max: int = DEFAULT_LIMITS.envs_per_agent_max) -> None:
        self.cell_id = cell_id
        self.store = store
        self.region = region
        self.limits = limits
        self.placement = Placement(env_id_prefix=f"{cell_id}-{os.urandom(4).hex()}",
                                   idle_timeout_ms=limits.env_idle_timeout_ms)
        self.agents = {aid: Client(h, p) for aid, (h, p) in agents.items()}
        for aid in agents:
            self.placement.add_agent(aid, envs_per_agent_max)
        self._pending_logs: list[tuple[str, str, int, str, bytes]] = []
        self._functions: dict[tuple[str, str], FunctionRecord] = {}
        self.counters = {"invocations": 0, "function_errors": 0, "throttles": 0,
                         "cold_starts": 0, "agent_failures": 0}

    # -- function metadata ----------------------------------------------------------------------
    def function(self, account: str, name: str) -> FunctionRecord:
        key = (account, name)
        rec = self._functions.get(key)
        if rec is None:
            rec = self.store.get(account, name)
            if rec is None:
                raise errors.not_found(
                    f"Function not found: {function_arn(self.region, account, name)}")
            self._functions[key] = rec
        return rec

    def _decode_zip(self, b64: object) -> tuple[bytes, str]:
        if not isinstance(b64, str):
            raise errors.invalid("Code.ZipFile must be a base64-encoded zip file")
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError as e:
            raise errors.invalid("Code.ZipFile is not valid base64") from e
        info = inspect_zip(data, self.limits)
        self.store.put_bundle(info.sha256, data)
        return data, info.sha256

    def create_function(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        name = check_name(doc.get("FunctionName"))
        runtime = doc.get("Runtime")
        if runtime not in SUPPORTED_RUNTIMES:
            raise errors.invalid(
                f"Value {runtime} at 'runtime' failed to satisfy constraint: Member must satisfy "
                f"enum value set: {list(SUPPORTED_RUNTIMES)} (runtimes found on this host)")
        handler = check_handler(doc.get("Handler"))
        memory = check_memory(doc.get("MemorySize", self.limits.memory_mb_default), self.limits)
        timeout = check_timeout(doc.get("Timeout", self.limits.timeout_s_default), self.limits)
        env = check_env((doc.get("Environment") or {}).get("Variables"), self.limits)
        code = doc.get("Code") or {}
        if "ZipFile" not in code:
            raise errors.invalid("Code.ZipFile is required (S3 locations are not supported)")
        if self.store.get(account, name) is not None:
            raise errors.conflict(f"Function already exist: {name}")
        if self.store.count(account) >= self.limits.functions_per_tenant_max:
            raise errors.LambdaError(400, "CodeStorageExceededException",
                                     "Too many functions in this account")
        data, sha = self._decode_zip(code["ZipFile"])
        rec = FunctionRecord(
            account=account, name=name, runtime=runtime, handler=handler, code_sha256=sha,
            code_size=len(data), memory_mb=memory, timeout_s=timeout, environment=env,
            description=str(doc.get("Description", ""))[:256], role=str(doc.get("Role", "")),
            tags=dict(doc.get("Tags") or {}), revision=1, revision_id=str(uuid.uuid4()),
            last_modified=_now_iso(),
        )
        if not self.store.put_new(rec):
            raise errors.conflict(f"Function already exist: {name}")
        return config_doc(rec, self.region)

    def _replace(self, old: FunctionRecord, new: FunctionRecord) -> dict[str, Any]:
        if not self.store.update(new, old.revision):
            raise errors.conflict("The function was modified concurrently; retry")
        self._functions[(new.account, new.name)] = new
        self._retire(old.key)
        return config_doc(new, self.region)

    def update_code(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        if "ZipFile" not in doc:
            raise errors.invalid("ZipFile is required (S3 locations are not supported)")
        data, sha = self._decode_zip(doc["ZipFile"])
        new = replace(old, code_sha256=sha, code_size=len(data), revision=old.revision + 1,
                      revision_id=str(uuid.uuid4()), last_modified=_now_iso())
        return self._replace(old, new)

    def update_configuration(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        if doc.get("RevisionId") and doc["RevisionId"] != old.revision_id:
            raise LambdaError(412, "PreconditionFailedException",
                              "The RevisionId provided does not match the latest RevisionId")
        changes: dict[str, Any] = {}
        if "Handler" in doc:
            changes["handler"] = check_handler(doc["Handler"])
        if "MemorySize" in doc:
            changes["memory_mb"] = check_memory(doc["MemorySize"], self.limits)
        if "Timeout" in doc:
            changes["timeout_s"] = check_timeout(doc["Timeout"], self.limits)
        if "Environment" in doc:
            changes["environment"] = check_env((doc["Environment"] or {}).get("Variables"),
                                               self.limits)
        if "Description" in doc:
            changes["description"] = str(doc["Description"])[:256]
        if "Runtime" in doc:
            if doc["Runtime"] not in SUPPORTED_RUNTIMES:
                raise errors.invalid(f"Runtime {doc['Runtime']} is not supported on this host")
            changes["runtime"] = doc["Runtime"]
        new = replace(old, **changes, revision=old.revision + 1, revision_id=str(uuid.uuid4()),
                      last_modified=_now_iso())
        return self._replace(old, new)

    def delete_function(self, account: str, name: str) -> None:
        old = self.function(account, name)
        self.store.delete(account, name)
        self._functions.pop((account, name), None)
        self._retire(old.key)

    def list_functions(self, account: str, marker: str, max_items: int) -> dict[str, Any]:
        if not 1 <= max_items <= self.limits.list_functions_page_max:
            raise errors.invalid(
                f"MaxItems must be between 1 and {self.limits.list_functions_page_max}")
        after = ""
        if marker:
            try:
                after = base64.urlsafe_b64decode(marker.encode()).decode()
            except (ValueError, UnicodeDecodeError) as e:
                raise errors.invalid("Invalid Marker") from e
        recs = self.store.list_page(account, after, max_items + 1)
        out: dict[str, Any] = {
            "Functions": [config_doc(r, self.region) for r in recs[:max_items]]}
        if len(recs) > max_items:
            out["NextMarker"] = base64.urlsafe_b64encode(recs[max_items - 1].name.encode()).decode()
        return out

    def _retire(self, function_key: str) -> None:
        for d in self.placement.retire_function(function_key):
            self._destroy_soon(d.env_id, d.agent_id)

    # -- the invoke path ---------------------------------------------------------------------
    async def invoke(self, account: str, name: str, payload: bytes, *, log_tail: bool) -> InvokeResult:
        rec = self.function(account, name)
        if len(payload) > self.limits.invoke_payload_bytes_max:
            raise LambdaError(
                413, "RequestEntityTooLargeException",
                f"{len(payload)} byte payload is too large for the RequestResponse invocation "
                f"type (limit {self.limits.invoke_payload_bytes_max} bytes)")
        if payload:
            try:
                json.loads(payload)
            except (ValueError, UnicodeDecodeError) as e:
                raise LambdaError(400, "InvalidRequestContentException",
                                  f"Could not parse request body into json: {e}") from e
        request_id = str(uuid.uuid4())
        self.counters["invocations"] += 1
        # One retry, here and only here, and only when the failure happened before the handler
        # could have run (an agent that could not be reached or could not start the env).
        for attempt in (0, 1):
            decision = self.placement.acquire(
                rec.key, rec.concurrency_max or self.limits.function_concurrency_default,
                int(time.time() * 1000))
            if isinstance(decision, Throttle):
                self.counters["throttles"] += 1
                raise errors.too_many(decision.message, decision.reason)
            if isinstance(decision, Create):
                self.counters["cold_starts"] += 1
                try:
                    await self._create_env(rec, decision)
                except _AgentUnavailable:
                    if attempt == 0:
                        continue
                    raise errors.service("No agent could start an execution environment") from None
            return await self._invoke_on(rec, decision, request_id, payload, log_tail)
        raise AssertionError("unreachable")

    async def _create_env(self, rec: FunctionRecord, decision: Create) -> None:
        client = self.agents[decision.agent_id]
        body: dict[str, Any] = {
            "env_id": decision.env_id, "function_key": rec.key, "bundle_sha256": rec.code_sha256,
            "create_timeout_ms": self.limits.env_create_timeout_ms,
            "function": {
                "name": rec.name, "arn": function_arn(self.region, rec.account, rec.name),
                "handler": rec.handler, "runtime": rec.runtime, "memory_mb": rec.memory_mb,
                "timeout_s": rec.timeout_s, "environment": rec.environment,
                "ephemeral_mb": rec.ephemeral_mb, "version": "$LATEST",
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
                    await client.call("create_env", body, timeout_s=timeout_s)
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
            raise _AgentUnavailable() from e
        self.placement.created(decision.env_id, int(time.time() * 1000))

    async def _invoke_on(self, rec: FunctionRecord, decision: Use | Create, request_id: str,
                         payload: bytes, log_tail: bool) -> InvokeResult:
        client = self.agents[decision.agent_id]
        timeout_ms = rec.timeout_s * 1000
        try:
            res = await client.call("invoke", {
                "env_id": decision.env_id, "request_id": request_id, "payload": payload,
                "timeout_ms": timeout_ms,
                "arn": function_arn(self.region, rec.account, rec.name),
            }, timeout_s=timeout_ms / 1000 + self.limits.agent_call_timeout_ms / 1000)
        except TransportError as e:
            # The handler may have run: no retry (sync invokes run at most once on our side).
            self._agent_failed(decision.agent_id, e)
            raise errors.service(
                f"The execution environment's host failed during the invocation ({e})") from e
        except RemoteError as e:
            self._discard(decision.env_id)
            raise errors.service(f"The execution environment failed: {e}") from e
        now_ms = int(time.time() * 1000)
        if res.get("env_alive", True):
            for d in self.placement.release(decision.env_id, now_ms):
                self._destroy_soon(d.env_id, d.agent_id)
        else:
            self.placement.discard(decision.env_id)  # the agent already removed it
        logs: bytes = res.get("logs") or b""
        if logs:
            self._pending_logs.append((rec.account, rec.name, now_ms, request_id, logs))
        if res["function_error"]:
            self.counters["function_errors"] += 1
        return InvokeResult(res["payload"], res["function_error"],
                            logs[-self.limits.log_tail_bytes:] if log_tail else b"", request_id)

    def _discard(self, env_id: str) -> None:
        d = self.placement.discard(env_id)
        if d is not None:
            self._destroy_soon(d.env_id, d.agent_id)

    def _agent_failed(self, agent_id: str, exc: Exception) -> None:
        self.counters["agent_failures"] += 1
        lost = self.placement.agent_down(agent_id)
        log.warning("agent %s unreachable (%s); %d environments lost", agent_id, exc, len(lost))

    def _destroy_soon(self, env_id: str, agent_id: str) -> None:
        asyncio.ensure_future(self._destroy(env_id, agent_id))

    async def _destroy(self, env_id: str, agent_id: str) -> None:
        try:
            await self.agents[agent_id].call("destroy", {"env_id": env_id},
                                             timeout_s=self.limits.agent_call_timeout_ms / 1000)
        except (TransportError, RemoteError) as e:
            log.info("destroy %s on %s: %s", env_id, agent_id, e)

    # -- housekeeping ----------------------------------------------------------------------------
    async def sync_agents(self, *, first: bool = False) -> None:
        """Poll every agent (passive: we call them). Down agents come back up; on the first
        poll, environments left by a previous frontend process are destroyed."""
        for agent_id, client in self.agents.items():
            try:
                st = await client.call("status", None,
                                       timeout_s=self.limits.agent_call_timeout_ms / 1000)
            except (TransportError, RemoteError) as e:
                if self.placement.agents[agent_id].up:
                    self._agent_failed(agent_id, e)
                continue
            if not self.placement.agents[agent_id].up:
                log.info("agent %s is back", agent_id)
                self.placement.agent_up(agent_id)
            known = self.placement.agents[agent_id].envs
            for env in st["envs"]:
                if env["env_id"] not in known and (first or not env["env_id"].startswith(
                        self.placement_prefix)):
                    await self._destroy(env["env_id"], agent_id)

    @property
    def placement_prefix(self) -> str:
        return self.placement._prefix

    def tick(self) -> None:
        for d in self.placement.on_tick(int(time.time() * 1000)):
            self._destroy_soon(d.env_id, d.agent_id)
        self.flush_logs()

    def flush_logs(self) -> None:
        if self._pending_logs:
            rows, self._pending_logs = self._pending_logs, []
            self.store.append_logs(rows)

    def logs(self, account: str, name: str, limit: int) -> list[dict[str, Any]]:
        self.function(account, name)
        self.flush_logs()
        return [{"timestamp": ts, "requestId": rid, "message": text.decode(errors="replace")}
                for ts, rid, text in self.store.read_logs(account, name, limit)]

    async def status(self) -> dict[str, Any]:
        agents = {}
        for agent_id, client in self.agents.items():
            try:
                agents[agent_id] = await client.call("status", None, timeout_s=2)
            except (TransportError, RemoteError) as e:
                agents[agent_id] = {"agent_id": agent_id, "error": str(e)}
        return {"cell_id": self.cell_id, "pid": os.getpid(), "counters": dict(self.counters),
                "placement": self.placement.statistics(), "agents": agents}


class _AgentUnavailable(Exception):
    pass
