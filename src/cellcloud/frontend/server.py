"""The cell frontend process: a transport server the router forwards requests to."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any

from .. import runtime, span_export
from ..core.ecs_taskdef import EcsError
from ..core.limits import DEFAULT_LIMITS
from ..core.messages import HttpRequest, MessageError
from ..core.poison import PoisonParams
from ..core.sharding import SignatureSharder, Worker
from ..network import policy as net_policy
from ..queues.api import QueueApi
from ..queues.store import QueueStore
from ..registry.api import RegistryApi
from ..registry.storage import RegistryStore, now_ms
from ..transport import Handler, OpError, Server, Stream
from . import api, clone, function_urls, image_functions
from .cell import Cell
from .events import EventStore, Intake
from .logs_api import LogsApi
from .logstore import LogStore
from .mappings import Mappings
from .store import SqliteFunctionStore
from .tasks import TaskManager, TaskStore

log = logging.getLogger("cellcloud.frontend")

tick_interval_s = 1.0
agent_poll_interval_s = 2.0
registry_collect_interval_s = 60.0  # unreferenced blobs and idle uploads (past their grace)
log_sweep_interval_s = 60.0  # log groups' retention applied


async def serve(args: argparse.Namespace) -> None:
    agents = {}
    for spec in args.agent:
        agent_id, _, addr = spec.partition("=")
        agents[agent_id] = runtime.parse_addr(addr)
    store = SqliteFunctionStore(os.path.abspath(args.state_dir))
    limits = DEFAULT_LIMITS
    if args.metrics_functions_per_account_max is not None:
        limits = replace(limits, metrics_functions_per_account_max=(
            args.metrics_functions_per_account_max))
    if args.env_create_timeout_ms is not None:  # agents on microVMs boot a guest (TCG: s)
        limits = replace(limits, env_create_timeout_ms=args.env_create_timeout_ms)
    cell = Cell(args.cell_id, store, agents, region=args.region, limits=limits,
                sharding=args.sharding, shard_size=args.shard_size,
                poison=(PoisonParams(killed_workers_max=args.poison_killed_workers_max)
                        if args.poison_killed_workers_max
                        else PoisonParams.for_shard(args.shard_size)),
                envs_per_agent_max=args.envs_per_agent_max,
                # the default pool too, whatever the region's (refusing it costs nothing)
                net_internal=(net_policy.DEFAULT_POOL, *args.net_internal))
    # The durable async intake and the cell's queues (SQS API); the dispatcher process reads
    # the same events file. CELLCLOUD_PLANT_BUG=ack-before-write plants the chaos test's bug.
    cell.invokes_inflight_max = args.invokes_inflight_max
    cell.spans = span_export.from_config(args.otlp_endpoint, "cellcloud-frontend")
    if args.plant_bug == "sharder-ignores-shard" and cell.sharder is not None:
        # A planted bug for the blast-radius experiment: every function's shard is the whole
        # cell (the cell still says k); the experiment's outside prediction must disagree.
        cell.replace_sharder(SignatureSharder([Worker(a) for a in sorted(agents)], len(agents),
                                              seed=b"bug", one_per_zone=False))
    cell.events = Intake(EventStore(os.path.abspath(args.state_dir)),
                         ack_before_write=os.environ.get("CELLCLOUD_PLANT_BUG")
                         == "ack-before-write", limits=cell.limits)
    queues = QueueApi(QueueStore(os.path.abspath(args.state_dir)), args.region)
    cell.events.queue_exists = queues.store.exists  # DeadLetterConfig's check
    cell.catalog.queue_exists = queues.store.exists
    # SQS event source mappings: their pollers run in this process (frontend/mappings.py).
    cell.mappings = Mappings(cell, queues, os.path.abspath(args.state_dir), limits=cell.limits)
    # The cell's container registry (registry/: OCI + ECR ops; blobs in <state>/registry).
    registry = RegistryApi(RegistryStore(os.path.join(os.path.abspath(args.state_dir),
                                                      "registry"), cell.limits), args.region,
                           cell.limits)
    cell.catalog.registry = registry.store  # ImageUri of PackageType Image functions
    # A deleted image fails the functions on it; their layers stay while a record names them.
    registry.on_deleted = functools.partial(image_functions.images_deleted, cell.catalog)
    # ECS tasks (frontend/tasks.py): records in <state>/tasks.db; unfinished ones resumed
    # (an agent's task containers are not among the environments its status lists, so the
    # first poll below leaves them alone).
    cell.tasks = TaskManager(cell, TaskStore(os.path.abspath(args.state_dir)), cell.limits)
    cell.tasks.load()
    await cell.sync_agents(first=True)
    cell.catalog.load_provisioned()  # the pools are refilled by the first tick
    # Functions' logs as CloudWatch Logs (<state>/logs.db) and the Logs API over them.
    logstore = cell.logstore = LogStore(os.path.abspath(args.state_dir), cell.limits)
    logs_api = LogsApi(logstore, args.region, cell.limits, before_read=cell.flush_events)
    server = Server(ops(cell, queues, registry, logs_api), protocol="frontend")
    host, port = await server.listen_tcp("", 0, sock=runtime.bind_tcp(args.listen))

    async def live_logs() -> None:
        # Running invocations' new lines, pulled from the agents (never pushed by them).
        while True:
            await asyncio.sleep(cell.limits.logs_live_poll_interval_ms / 1000)  # periodic
            try:
                await cell.pull_live_logs()
            except Exception:  # one failed pull must not end the loop
                log.exception("pulling live logs failed")

    async def ticker() -> None:
        polls = 0.0
        collect_in = registry_collect_interval_s
        sweep_in = log_sweep_interval_s
        while True:
            await asyncio.sleep(tick_interval_s)  # a periodic timer, not a wait
            cell.tick()
            sweep_in -= tick_interval_s
            if sweep_in <= 0:
                sweep_in = log_sweep_interval_s
                logstore.sweep(now_ms())  # retention policies
            polls += tick_interval_s
            if polls >= agent_poll_interval_s:
                polls = 0.0
                await cell.sync_agents()
            collect_in -= tick_interval_s
            if collect_in <= 0:
                collect_in = registry_collect_interval_s
                registry.store.collect(now_ms(), functools.partial(held_layers, cell))

    task = asyncio.ensure_future(ticker())
    cell.mappings.start()
    live_task = asyncio.ensure_future(live_logs())
    runtime.announce_ready({"component": "frontend", "cell_id": args.cell_id, "host": host,
                            "port": port, "pid": os.getpid()})
    try:
        await runtime.wait_for_shutdown()
        # Replaced (rollout) or stopped: the calls under way finish, new ones are refused
        # unrun (the router sends them again, to the successor on this port).
        running = await server.drain(cell.limits.drain_ms / 1000)
        if running:
            log.warning("stopping with %d calls still running after the drain", running)
    finally:
        task.cancel()
        await cell.tasks.close()
        await cell.mappings.close()
        live_task.cancel()
        cell.flush_logs()
        await server.close()
        if cell.spans is not None:
            cell.spans.shutdown()


def held_layers(cell: Cell, account: str) -> set[str]:
    """Blobs the registry's collection keeps for ``account``: its image functions' layers and
    its unfinished ECS tasks'."""
    held = image_functions.held_layers(cell.catalog, account)
    return held | cell.tasks.held_layers(account) if cell.tasks is not None else held


def ops(cell: Cell, queues: QueueApi, registry: RegistryApi,
        logs_api: LogsApi | None = None) -> dict[str, Handler]:
    """The frontend's transport ops (docs/design.md lists them)."""

    async def http(body: Any) -> dict[str, Any] | Stream:
        try:  # frontend protocol 2's typed request (a version 1 one was translated)
            req = HttpRequest.from_wire(body).as_api()
        except MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        reply = await api.handle(cell, req)
        if isinstance(reply, Stream):  # InvokeWithResponseStream: changes nothing
            return reply
        if req.get("m") != "GET":  # a change: answered once no lease runs what it replaced
            api.after_change(cell, req, reply)
            await cell.invoker.settle_leases()
        return reply

    async def status(_: Any) -> dict[str, Any]:
        return await cell.status()

    # A router's HTTP request to a function URL (frontend/function_urls.py).
    async def url(body: dict[str, Any]) -> dict[str, Any] | Stream:
        return await function_urls.serve(cell, body)

    # Leases on warm environments for a router's direct path (issue #13).
    async def lease(body: dict[str, Any]) -> dict[str, Any]:
        return await api.lease(cell, body)

    async def lease_return(body: dict[str, Any]) -> dict[str, Any]:
        return await cell.invoker.lease_return(str(body["lease_id"]), str(body["holder"]))

    async def lease_logs(body: dict[str, Any]) -> dict[str, Any]:
        fe = body.get("function_error")
        dur = body.get("duration_ms")
        live = body.get("logs_live_bytes")
        return {"filed": cell.invoker.lease_logs(
            str(body["lease_id"]), str(body["holder"]), str(body["request_id"]),
            list(body.get("logs") or []), str(fe) if fe else None,
            float(dur) if isinstance(dur, (int, float)) else None,
            live if isinstance(live, int) else 0)}

    # The CloudWatch Logs API subset (frontend/logs_api.py), forwarded by the router.
    async def logs(body: dict[str, Any]) -> dict[str, Any]:
        if logs_api is None:
            return {"s": 503, "h": {"content-type": "application/x-amz-json-1.1"},
                    "b": b'{"__type": "ServiceUnavailableException", "message": '
                         b'"this cell keeps no log store"}'}
        return await logs_api.handle(body)

    async def metrics(body: Any) -> Any:
        """The cell's Prometheus exposition; ``{"components": true}`` (the router's ask):
        ``{"components": {name: exposition}}``, with ``"agents": true`` also its agents' and
        its dispatcher's (the operator's scrape)."""
        if isinstance(body, dict) and body.get("components"):
            return {"components": await cell.metrics_components(bool(body.get("agents")))}
        return cell.metrics_exposition()

    async def metrics_push(body: Any) -> dict[str, Any]:
        """A process of the cell (its dispatcher) hands in its exposition."""
        if not isinstance(body, dict):
            raise OpError("InvalidRequest", "metrics_push takes {component, text}")
        try:
            cell.pushed_metrics.put(body.get("component"), body.get("text"),
                                    int(time.time() * 1000))
        except ValueError as e:
            raise OpError("InvalidRequest", str(e)) from e
        return {}

    # The ECS task API's cell side (frontend/tasks.py), called by the control plane only.
    async def ecs_tasks(body: dict[str, Any]) -> dict[str, Any]:
        if cell.tasks is None:
            raise OpError("ServerException", "this cell runs no ECS tasks")
        return await cell.tasks.op(body)

    # ECS services' traffic (frontend/services.py), from the router: one HTTP request to a
    # service, proxied to one of its RUNNING and healthy tasks.
    async def ecs_http(body: dict[str, Any]) -> dict[str, Any]:
        if cell.tasks is None:
            raise OpError("ServerException", "this cell runs no ECS tasks")
        try:
            return await cell.tasks.services.http(body)
        except EcsError as e:
            raise OpError(e.type, e.message) from None

    async def async_status(_: Any) -> dict[str, Any]:
        assert cell.events is not None
        return {**cell.events.statistics(), "queues": dict(queues.counters)}

    # A tenant migration's steps (frontend/clone.py), called by the control plane only.
    async def tenant_export(body: dict[str, Any]) -> dict[str, Any]:
        return clone.export_tenant(cell, str(body["account"]))

    async def tenant_import(body: dict[str, Any]) -> dict[str, Any]:
        return clone.import_tenant(cell, body)

    async def tenant_inflight(body: dict[str, Any]) -> dict[str, Any]:
        return {"inflight": clone.tenant_inflight(cell, str(body["account"]))}

    async def tenant_forget(body: dict[str, Any]) -> dict[str, Any]:
        return clone.forget_tenant(cell, str(body["account"]))

    return {"http": http, "status": status, "lease": lease, "lease_return": lease_return,
            "lease_logs": lease_logs, "logs": logs, "sqs": queues.handle,
            "async_status": async_status,
            "metrics": metrics, "metrics_push": metrics_push, "url": url,
            "tenant_export": tenant_export, "tenant_import": tenant_import,
            "tenant_inflight": tenant_inflight, "tenant_forget": tenant_forget,
            "ecs_tasks": ecs_tasks, "ecs_http": ecs_http,
            **registry.ops()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud frontend serve")
    p.add_argument("--cell-id", required=True)
    p.add_argument("--otlp-endpoint", default=None,
                   help="export spans over OTLP/HTTP to this base URL (default: "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing spans off)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--agent", action="append", default=[], help="AGENT_ID=HOST:PORT")
    p.add_argument("--region", default="cc-local-1")
    p.add_argument("--net-internal", action="append", default=[],
                   help="a region-internal IPv4 CIDR no function's allow-list may name (the "
                        "environments' pool; other hosts' addresses); repeatable")
    p.add_argument("--sharding", choices=("signature", "plain"), default="signature")
    p.add_argument("--shard-size", type=int, default=2, help="k: agents in a function's shard")
    p.add_argument("--plant-bug", choices=("", "sharder-ignores-shard"), default="",
                   help=argparse.SUPPRESS)  # experiments only: a bug their oracle must catch
    p.add_argument("--poison-killed-workers-max", type=int, default=0,
                   help="distinct workers a function may kill before it is throttled "
                        "(default k-1; experiments set k to let a poison exhaust its shard)")
    p.add_argument("--envs-per-agent-max", type=int, default=DEFAULT_LIMITS.envs_per_agent_max)
    p.add_argument("--invokes-inflight-max", type=int, default=1000,
                   help="sync invokes in flight in the cell; over it, 429 with Retry-After")
    p.add_argument("--metrics-functions-per-account-max", type=int, default=None,
                   help="functions of one account with series of their own in /metrics "
                        "(default: core/limits.py); the rest count under __other__")
    p.add_argument("--env-create-timeout-ms", type=int, default=None,
                   help="how long an agent may take to start an environment (default: "
                        "core/limits.py; `cellcloud up --backend microvm` passes "
                        "microvm_create_timeout_ms)")
    runtime.add_security_args(p)
    runtime.add_protocol_max(p)
    args = p.parse_args(argv)
    runtime.apply_protocol_max(args)
    runtime.setup_logging(f"frontend/{args.cell_id}")
    runtime.setup_security(args, "frontend", args.cell_id, f"{args.cell_id}-frontend", args.region)
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
