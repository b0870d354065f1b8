"""The control plane process (one per region): the thin asyncio shell around ``RegionState``
(the truth, persisted in the configuration store) and ``PushScheduler`` (constant work).

Every ``push_interval_ms`` it pushes the whole cell map to every router (transport op
``cell_map`` on the router's internal port) whether or not it changed, and writes it to
``cellmap.json`` (the file a restarted router starts from). It polls agents and frontends for
status (passive: nobody calls it except operators' CLI). The region's endpoints come from the
endpoints file (``endpoints.json``, written by ``cellcloud up``, owned by the control plane from
then on). Tenants from ``tenants.json`` are assigned on first sight to the cell routers already
send them to (the map's rendezvous fallback), so a push never moves a tenant that has deployed;
moving a tenant is a migration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .. import runtime
from ..core.limits import DEFAULT_LIMITS
from ..metrics import process_registry, push_forever
from ..transport import Client, OpError, RemoteError, Server, TransportError
from .configstore import ConfigStore, ConfigStoreError, TimedConfigStore, open_config_store
from .ec2 import Ec2
from .ecs import Ecs
from .push import PushScheduler
from .schedules import Schedules
from .state import ControlError, RegionState

log = logging.getLogger("cellcloud.control")

STATE_KEY = "cellcloud/region/state"
push_call_timeout_s = 2.0
poll_call_timeout_s = 2.0
agent_poll_interval_ms = 2_000
migration_step_timeout_s = 60.0
migration_poll_interval_s = 0.05  # a periodic re-check of a remote condition, bounded by a deadline


def now_ms() -> int:
    return int(time.time() * 1000)


def _write_atomic(path: str, doc: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


class Control:
    def __init__(self, state_dir: str, store: ConfigStore, endpoints_path: str,
                 push_interval_ms: int) -> None:
        self.state_dir = state_dir
        self.store = store
        self.endpoints_path = endpoints_path
        self.state = RegionState()
        self.revision = 0  # of STATE_KEY in the store; 0 = absent
        self.push = PushScheduler(push_interval_ms=push_interval_ms, start_ms=now_ms())
        self.routers: dict[str, Client] = {}
        self.frontends: dict[str, Client] = {}
        self.agents: dict[str, tuple[str, Client]] = {}  # agent id -> (cell id, client)
        self.agent_status: dict[str, dict[str, Any]] = {}
        self._endpoints_mtime = -1
        self._tenants_mtime = -1
        self._persisted_version = -1
        self._written_version = -1
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_ms = now_ms()
        #: where this control plane listens (told to routers in every push: the scheduler API)
        self.address: tuple[str, int] | None = None
        self.region = "cc-local-1"
        self.schedules = Schedules(store, self.region, self.frontend_of)
        # The ECS API (clusters, task definitions: docs/fargate.md), forwarded by routers.
        self.ecs = Ecs(store, self.region, self.frontend_of)
        # The EC2 API's volume subset (docs/volumes.md), forwarded by routers; volumes' and
        # snapshots' bytes (FileBlockStore files) under <state>/volumes.
        self.ec2 = Ec2(store, self.region, data_dir=os.path.join(state_dir, "volumes"))
        self.ecs.ec2 = self.ec2  # tasks' managed volumes (RunTask volumeConfigurations)

    def frontend_of(self, account: str) -> Client | None:
        """The frontend of the cell that holds ``account`` (where its schedules fire)."""
        cell = self.state.cell_of(account)
        if cell is None and self.state.cells:
            cell = self.state.cell_map().cell_for(account).cell_id
        return self.frontends.get(cell) if cell is not None else None

    # -- state ---------------------------------------------------------------------------------
    async def load(self) -> None:
        entry = await self.store.get(STATE_KEY)
        if entry is not None:
            self.state = RegionState.from_json(entry.value)
            self.revision = entry.revision
            self._persisted_version = self.state.version

    async def persist(self) -> None:
        """Write the state with compare-and-set on the revision read (one writer per region;
        a lost CAS means another control process wrote: reload and let the next tick redo)."""
        doc = self.state.to_json()
        rev = await self.store.cas(STATE_KEY, self.revision, doc)
        if rev is None:
            log.warning("region state changed under us; reloading")
            await self.load()
            return
        self.revision = rev
        self._persisted_version = self.state.version

    def reload_endpoints(self) -> None:
        try:
            st = os.stat(self.endpoints_path)
        except FileNotFoundError:
            return
        if st.st_mtime_ns == self._endpoints_mtime:
            return
        with open(self.endpoints_path) as f:
            doc = json.load(f)
        self._endpoints_mtime = st.st_mtime_ns
        for cell_id, c in doc["cells"].items():
            host, port = c["frontend"]
            if cell_id in self.state.cells:
                self.state.set_endpoint(cell_id, host, int(port))
            else:
                self.state.add_cell(cell_id, host, int(port))
            self.frontends[cell_id] = Client(host, int(port), expect_role="frontend")
            for agent_id, a in c.get("agents", {}).items():
                self.state.add_agent(cell_id, agent_id, a.get("zone"))
                self.agents[agent_id] = (cell_id, Client(a["addr"][0], int(a["addr"][1]),
                                                         expect_role="agent"))
        for router_id, (host, port) in doc.get("routers", {}).items():
            old = self.routers.get(router_id)
            if old is not None and (old.host, old.port) == (host, int(port)):
                continue
            if old is not None:  # a router replaced (rollout): push to its successor
                self._spawn(old.close())
            self.routers[router_id] = Client(host, int(port), expect_role="router")
            self.push.add_router(router_id, now_ms())

    def reload_tenants(self) -> None:
        path = os.path.join(self.state_dir, "tenants.json")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if st.st_mtime_ns == self._tenants_mtime or not self.state.cells:
            return
        with open(path) as f:
            doc = json.load(f)
        self._tenants_mtime = st.st_mtime_ns
        current = self.state.cell_map()
        for t in doc["tenants"]:
            account = t["account_id"]
            if self.state.cell_of(account) is None:
                # Pin where routers already send it (see the module doc).
                self.state.assignments[account] = current.cell_for(account).cell_id
                self.state.version += 1

    def map_doc(self) -> dict[str, Any]:
        doc = self.state.cell_map().to_wire()
        if self.address is not None:  # an added field: routers reach the scheduler API here
            doc["control"] = list(self.address)
        return doc

    # -- the loop ------------------------------------------------------------------------------
    async def tick(self) -> None:
        self.reload_endpoints()
        self.reload_tenants()
        if self.state.version != self._persisted_version:
            try:
                await self.persist()
            except ConfigStoreError as e:  # keep pushing the map we have; retry next tick
                log.warning("config store: %s", e)
        doc = self.map_doc()
        if self.state.version != self._written_version:
            _write_atomic(os.path.join(self.state_dir, "cellmap.json"), doc)
            self._written_version = self.state.version
        for p in self.push.on_tick(now_ms(), doc):
            self._spawn(self._push_one(p.router_id, p.doc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_one(self, router_id: str, doc: Any) -> None:
        try:
            res = await self.routers[router_id].call("cell_map", doc, timeout_s=push_call_timeout_s)
        except (TransportError, RemoteError) as e:
            self.push.on_push_failed(router_id, now_ms(), str(e))
            return
        self.push.on_ack(router_id, int(res["version"]), now_ms())

    async def poll_agents(self) -> None:
        """Passive status: the control plane calls agents; agents never call it."""
        async def one(agent_id: str, client: Client) -> None:
            try:
                st = await client.call("status", {"light": True}, timeout_s=poll_call_timeout_s)
                self.agent_status[agent_id] = {"up": True, "envs": len(st.get("envs", [])),
                                               "polled_ms": now_ms()}
            except (TransportError, RemoteError) as e:
                self.agent_status[agent_id] = {"up": False, "error": str(e)[:200],
                                               "polled_ms": now_ms()}

        await asyncio.gather(*(one(a, c) for a, (_, c) in self.agents.items()))

    # -- operations ----------------------------------------------------------------------------
    async def op_status(self, _: Any) -> dict[str, Any]:
        now = now_ms()
        return {
            "pid": os.getpid(),
            "uptime_s": (now - self.started_ms) / 1000,
            "version": self.state.version,
            "cells": {c.cell_id: {"host": c.host, "port": c.port, "accepting": c.accepting,
                                  "agents": dict(c.agents)} for c in self.state.cells.values()},
            "tenants": len(self.state.assignments),
            "loads": self.state.loads(),
            "overrides": {t: [o.cell_id, o.reason] for t, o in self.state.overrides.items()},
            "migrations": {t: {"source": m.source, "target": m.target, "state": m.state}
                           for t, m in self.state.migrations.items()},
            "routers": [{"router_id": r.router_id, "acked_version": r.acked_version,
                         "stale": r.stale, "reason": r.reason} for r in self.push.status(now)],
            "push": self.push.statistics(),
            "agents": dict(self.agent_status),
            "schedules": self.schedules.statistics(),
            "ecs": self.ecs.statistics(),
            "ec2": self.ec2.statistics(),
        }

    async def op_cell_of(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"cell": self.state.cell_of(str(body["tenant"]))}

    async def op_override(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            if body.get("cell"):
                self.state.set_override(str(body["tenant"]), str(body["cell"]), body["reason"])
            else:
                self.state.clear_override(str(body["tenant"]))
        except ControlError as e:
            raise OpError("ControlError", str(e)) from None
        await self.persist()
        return {"version": self.state.version}

    async def op_migrate(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.migrate(str(body["tenant"]), str(body["to"]))
        except ControlError as e:
            raise OpError("ControlError", str(e)) from None

    async def migrate(self, tenant: str, target: str) -> dict[str, Any]:
        """clone → flip → wait for every router's ack of the flip → drain → forget."""
        steps: dict[str, float] = {}
        t0 = time.monotonic()
        m = self.state.begin_migration(tenant, target)
        await self.persist()
        src, dst = self.frontends[m.source], self.frontends[m.target]
        try:
            exported = await src.call("tenant_export", {"account": tenant},
                                      timeout_s=migration_step_timeout_s)
            await dst.call("tenant_import", exported, timeout_s=migration_step_timeout_s)
        except (TransportError, RemoteError):
            self.state.abort_migration(tenant)
            await self.persist()
            raise
        steps["cloned_s"] = time.monotonic() - t0
        m = self.state.migration_cloned(tenant)
        await self.persist()
        await self.tick()  # push the flip now rather than at the next round
        assert m.flip_version is not None
        flip = m.flip_version
        await self._wait_for(lambda: (self.push.min_acked_version() or 0) >= flip,
                             "routers to acknowledge the flip")
        self.state.migration_routers_caught_up(tenant, self.push.min_acked_version() or 0)
        await self.persist()
        steps["flipped_s"] = time.monotonic() - t0

        async def drained() -> bool:
            res = await src.call("tenant_inflight", {"account": tenant}, timeout_s=5)
            return int(res["inflight"]) == 0

        await self._wait_for_async(drained, "the source cell to drain")
        self.state.migration_drained(tenant)
        await self.persist()
        await src.call("tenant_forget", {"account": tenant}, timeout_s=migration_step_timeout_s)
        self.state.forget_migration(tenant)
        await self.persist()
        steps["done_s"] = time.monotonic() - t0
        return {"tenant": tenant, "source": m.source, "target": m.target,
                "functions": len(exported["functions"]), "flip_version": flip, **steps}

    async def _wait_for(self, cond: Any, what: str) -> None:
        async def wrapped() -> bool:
            return bool(cond())

        await self._wait_for_async(wrapped, what)

    async def _wait_for_async(self, cond: Any, what: str) -> None:
        deadline = time.monotonic() + migration_step_timeout_s
        while not await cond():
            if time.monotonic() > deadline:
                raise OpError("MigrationStuck", f"timed out waiting for {what}")
            await asyncio.sleep(migration_poll_interval_s)


async def serve(args: argparse.Namespace) -> None:
    state_dir = os.path.abspath(args.state_dir)
    spec = json.loads(args.config_store) if args.config_store else {
        "kind": "sqlite", "path": os.path.join(state_dir, "control", "config.db")}
    if spec.get("kind") == "sqlite":
        os.makedirs(os.path.dirname(spec["path"]), exist_ok=True)
    # Prometheus (docs/observability.md): the process, TLS handshakes and the config store's
    # request latencies, pushed to the routers each round (they show it at GET /metrics).
    registry = process_registry()
    store = TimedConfigStore(open_config_store(spec), str(spec.get("kind", "sqlite")),
                             registry)
    control = Control(state_dir, store, args.endpoints, args.push_interval_ms)
    control.region = control.schedules.region = control.ecs.region = args.region
    control.ec2.region = args.region
    if args.storage_servers_file:  # the region runs storage servers: volumes are replicated
        from ..volumes.client import RegionVolumes

        control.ec2.volumes = RegionVolumes(args.store_colony, args.storage_servers_file)
    await control.load()
    server = Server({"status": control.op_status, "migrate": control.op_migrate,
                     "override": control.op_override, "cell_of": control.op_cell_of,
                     "cell_map": lambda _: _map(control),
                     # the scheduler API, forwarded by routers (pki.OPS_ALLOWED)
                     "scheduler": control.schedules.op, "ecs": control.ecs.op,
                     "ec2": control.ec2.op,
                     # an operator's `cellcloud volume attach` (not a router's: OPS_ALLOWED)
                     "volume_attachment": control.ec2.op_attachment},
                    protocol="control")
    host, port = await server.listen_tcp("", 0, sock=runtime.bind_tcp(args.listen))
    control.address = (host, port)
    await control.tick()

    async def loop() -> None:
        polled = 0
        interval_s = args.push_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s / 4)  # the tick timer; pushes keep their own cadence
            try:
                await control.tick()
                if now_ms() - polled >= agent_poll_interval_ms:
                    polled = now_ms()
                    control._spawn(control.poll_agents())
            except Exception:  # the loop must outlive a bad tick
                log.exception("tick failed")

    stopping = asyncio.Event()

    async def every_round(interval_ms: int, round_: Callable[[], Awaitable[object]],
                          what: str) -> None:
        """``round_`` run every ``interval_ms`` until a shutdown; on shutdown the round under
        way finishes and no other starts."""
        while not stopping.is_set():
            try:  # the round timer, cut short by a shutdown
                await asyncio.wait_for(stopping.wait(), interval_ms / 1000)
                return
            except TimeoutError:
                pass
            try:
                await round_()
            except Exception:  # the loop must outlive a bad round
                log.exception("%s failed", what)

    task = asyncio.ensure_future(loop())
    pusher = asyncio.ensure_future(push_forever(registry, "control",
                                                lambda: control.routers.values()))
    # Schedules' ticks (control/schedules.py): due steps taken every round; a claimed tick
    # is sent and recorded before a shutdown ends the loop, so a successor never fires
    # beside this process.
    firing = asyncio.ensure_future(every_round(
        control.schedules.limits.schedule_tick_interval_ms, control.schedules.fire_due,
        "schedule round"))
    # Stopped tasks' managed volumes detached (and deleted) once their hosts let go.
    volume_sweep = asyncio.ensure_future(every_round(
        control.ecs.limits.ecs_task_volume_sweep_interval_ms, control.ecs.sweep_task_volumes,
        "task volume sweep"))
    runtime.announce_ready({"component": "control", "host": host, "port": port,
                            "pid": os.getpid()})
    drain_s = DEFAULT_LIMITS.drain_ms / 1000
    try:
        await runtime.wait_for_shutdown()
        # Replaced (rollout) or stopped: no new periodic work (pushes, schedule rounds; the
        # successor takes them over), the calls under way finish (an ECS or scheduler call a
        # router forwarded), new ones are refused unrun: the router sends them again, to the
        # successor on this port.
        task.cancel()
        stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(firing), drain_s)
        except TimeoutError:
            log.warning("a schedule round still running after %.0f s", drain_s)
        running = await server.drain(drain_s)
        if running:
            log.warning("stopping with %d calls still running after the drain", running)
    finally:
        task.cancel()
        pusher.cancel()
        firing.cancel()
        volume_sweep.cancel()
        await server.close()
        await store.close()


async def _map(control: Control) -> dict[str, Any]:
    return control.map_doc()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud control serve")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--endpoints", required=True, help="JSON file with the region's endpoints")
    p.add_argument("--config-store", default="",
                   help='JSON spec, e.g. {"kind":"etcd","url":"http://127.0.0.1:2379"} '
                        "(default: SQLite under the state directory)")
    p.add_argument("--push-interval-ms", type=int, default=1000)
    p.add_argument("--region", default="cc-local-1")
    p.add_argument("--storage-servers-file", default="",
                   help="the region's storage servers (volumes/client.py's servers file): "
                        "CreateVolume replicates new volumes there (needs --store-colony)")
    p.add_argument("--store-colony", default="",
                   help="the store colony file holding replicated volumes' config cells")
    runtime.add_security_args(p)
    runtime.add_protocol_max(p)
    args = p.parse_args(argv)
    if args.storage_servers_file and not args.store_colony:
        p.error("--storage-servers-file needs --store-colony")
    runtime.apply_protocol_max(args)
    runtime.setup_logging("control")
    runtime.setup_security(args, "control", "region", "control", args.region)
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
