"""``cellcloud up``: start a region's processes, restart any that crash, stop them in order.

Start order follows the call graph backwards (agents, then each cell's frontend, then the
router), each started only once the ones it calls have said they are listening. A restarted
component gets its previous port back, so nobody's configuration goes stale.

One supervisor per state directory, and its death is never silent: it holds an exclusive
``flock`` on ``region.lock`` for its whole life (the kernel drops it when the process dies, even
by SIGKILL), and every process it starts is armed with ``PR_SET_PDEATHSIG`` = SIGTERM, so its
region stops with it (each process shuts down cleanly: agents destroy their environments and
cgroups). A second ``cellcloud up`` on a locked state directory refuses to start; one that gets
the lock first stops whatever processes a dead supervisor's ``region.json`` still names.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.limits import DEFAULT_LIMITS
from ..core.rollout import Rollout, RolloutError, Traffic, judge
from ..registry.edge import ensure_registry_key
from ..sandbox import linux
from .tenants import ensure_operator_token, ensure_tenants, operator_token_path

log = logging.getLogger("cellcloud.supervisor")

ready_timeout_s = 60.0
stop_timeout_s = 10.0
ROLLOUT_STATE = "rollout-state.json"  # the plan of the rollout under way or the last one
# A rollout waits for a frontend's drain (its calls under way finish) and a little more.
drain_wait_s = DEFAULT_LIMITS.drain_ms / 1000 + 5.0
restart_backoff_base_s = 0.2
restart_backoff_cap_s = 10.0
stable_after_s = 30.0


def default_state_dir() -> str:
    return os.environ.get("CELLCLOUD_HOME") or os.path.expanduser("~/.cellcloud")


# Environment uids: each region running on a host claims its own range (a host-wide lock file
# held for the supervisor's life), so environments of two regions never share a uid (a shared
# uid could signal or trace the other's processes). Each agent takes a slice of its region's.
uid_ranges_dir = "/run/cellcloud/uid-ranges"
uid_range_base = 200_000
uid_range_size = 1_000_000
uid_range_count = 1_000  # regions on one host at a time
uids_per_agent = 10_000  # > envs_per_agent_max, the slots an agent may use at once


def try_lock(path: str) -> int | None:
    """An exclusive ``flock`` on ``path`` (created 0600), held through the returned fd for as
    long as it stays open (the kernel drops it when the process dies); None if another holds
    it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return None
    return fd


def claim_uid_range(directory: str = uid_ranges_dir) -> tuple[int, int]:
    """The first free range on this host: (base uid, lock fd held until the process exits)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for k in range(uid_range_count):
        fd = try_lock(os.path.join(directory, f"{k}.lock"))
        if fd is not None:
            return uid_range_base + k * uid_range_size, fd
    raise RuntimeError(f"all {uid_range_count} environment uid ranges of this host are in use")


class RegionRunning(RuntimeError):
    """Another live supervisor holds this state directory's lock."""


def lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, "region.lock")


def lock_holder(state_dir: str) -> int | None:
    """The pid of the live supervisor that holds ``state_dir``'s lock, or None if nobody does.
    (A probe: it takes the lock for an instant when it is free, and drops it at once.)"""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)


def _die_with(parent_pid: int) -> Any:
    """A ``preexec_fn``: the child gets SIGTERM when the supervisor dies (PDEATHSIG fires on
    the death of the forking *thread*: the supervisor forks only from its event-loop thread,
    which lives as long as the process), and exits at once if it is already gone."""

    def arm() -> None:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            os._exit(1)

    return arm


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pid: int, timeout_s: float) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def stop_leftovers(state_dir: str) -> list[int]:
    """Stop the processes a dead supervisor's ``region.json`` still names (only those whose
    command line names this state directory: a pid may have been reused). Called only with the
    lock held, so no live supervisor owns them. Returns the pids it had to stop."""
    try:
        with open(os.path.join(state_dir, "region.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    stopped = []
    for comp in (doc.get("components") or {}).values():
        pid = comp.get("pid")
        if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
            continue
        if state_dir not in _cmdline(pid):
            continue
        log.warning("stopping pid %d, left running by a dead supervisor", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if not _wait_gone(pid, stop_timeout_s):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, stop_timeout_s)
        stopped.append(pid)
    return stopped


# Components whose module is not cellcloud.<kind>.server.
_MODULES = {"dispatcher": "cellcloud.frontend.dispatcher",
            "storage": "cellcloud.volumes"}  # storage: `cellcloud storage serve`


@dataclass
class Component:
    name: str
    kind: str  # router | frontend | agent | control
    args: list[str]
    listen: str
    proc: asyncio.subprocess.Process | None = None
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    started_at: float = 0.0
    rolling: bool = False  # being restarted on purpose by a rollout: the monitor stands aside
    # The build it runs: "" the supervisor's own, else a directory holding a cellcloud source
    # tree (<build>/src/cellcloud), put first on the process's PYTHONPATH (rollout --to).
    build: str | None = None  # None: as builds.json last recorded it (else the supervisor's)
    rolled: asyncio.Event | None = None  # set when that rollout has started the new process
    fds: tuple[int, ...] = ()  # inherited by the process (the router: the public listener)

    def argv(self) -> list[str]:
        module = _MODULES.get(self.kind, f"cellcloud.{self.kind}.server")
        return [sys.executable, "-m", module, *self.args,
                "--listen", self.listen]


class Supervisor:
    def __init__(self, state_dir: str, *, cells: int = 1, agents_per_cell: int = 2,
                 host: str = "127.0.0.1", port: int = 9009, region: str = "cc-local-1",
                 envs_per_agent_max: int = 1000, seed: int | None = None,
                 extra_args: dict[str, list[str]] | None = None, restart: bool = True,
                 zones_per_cell: int = 3, push_interval_ms: int = 1000,
                 insecure: bool = False,
                 agent_hosts: dict[str, tuple[str, str]] | None = None,
                 storage_servers: int = 0, store_colony: str = "") -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.cells = cells
        self.agents_per_cell = agents_per_cell
        self.host = host
        self.port = port
        self.region = region
        self.envs_per_agent_max = envs_per_agent_max
        self.components: list[Component] = []
        self.stopping = False
        # Per-component extra arguments by name or kind (e.g. "cell-2-frontend": shard settings;
        # "agent": experiment faults); restart=False leaves crashed components down (experiments).
        self.extra_args = extra_args or {}
        self.restart = restart
        self.zones_per_cell = zones_per_cell
        self.push_interval_ms = push_interval_ms
        # Encrypted by default: every internal link is mutual TLS from the region CA; plain
        # text only behind an explicit development flag.
        self.insecure = insecure
        # agent id -> (network namespace, address): agents on hosts of their own (tests give
        # each its own netns + veth on a bridge); the others listen on self.host.
        self.agent_hosts = agent_hosts or {}
        # Storage servers of replicated volumes (docs/volumes.md); their volumes' config
        # cells live in the store colony of ``store_colony`` (required with them).
        if storage_servers and not store_colony:
            raise ValueError("storage servers need a store colony (--store-colony)")
        self.storage_servers = storage_servers
        self.store_colony = os.path.abspath(store_colony) if store_colony else ""
        if not insecure:
            from ..security import pki

            pki.CertificateAuthority.ensure(os.path.join(self.state_dir, "pki"), region)
        self._rng = random.Random(seed)
        self._monitors: list[asyncio.Task[None]] = []
        self._lock_fd: int | None = None
        self._uid_fd: int | None = None
        # The router's public listening socket, held here for the region's life: every router
        # process (a crashed one's successor, a rollout's new one) serves on it (--listen-fd).
        self._router_sock: socket.socket | None = None
        self.uid_base = uid_range_base
        os.makedirs(os.path.join(self.state_dir, "logs"), exist_ok=True)

    def lock(self) -> None:
        """Take the state directory's lock for this process's life, or raise RegionRunning."""
        if self._lock_fd is not None:
            return
        fd = try_lock(lock_path(self.state_dir))
        if fd is None:
            raise RegionRunning(
                f"a region is already running from {self.state_dir} (supervisor pid "
                f"{lock_holder(self.state_dir)}); stop it with `cellcloud down`")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        agents = self.cells * self.agents_per_cell
        if agents * uids_per_agent > uid_range_size:
            raise ValueError(f"{agents} agents need more than one region's uid range "
                             f"({uid_range_size // uids_per_agent} agents at most)")
        self.uid_base, self._uid_fd = claim_uid_range()
        stopped = stop_leftovers(self.state_dir)
        if stopped:
            log.warning("stopped %d processes of a previous supervisor that died", len(stopped))

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        self.lock()
        try:  # the public port first: a busy one fails the start before anything runs
            self._router_sock = _listen_tcp(self.host, self.port)
        except OSError as e:
            raise RuntimeError(f"cannot listen on {self.host}:{self.port}: {e}") from None
        tenants = ensure_tenants(self.state_dir)
        ensure_operator_token(self.state_dir)
        registry_key = ensure_registry_key(self.state_dir)
        cell_eps: dict[str, list[Any]] = {}
        endpoints: dict[str, Any] = {"cells": {}, "routers": {}}
        agent_index = 0
        for c in range(1, self.cells + 1):
            cell_id = f"cell-{c}"
            agent_args = []
            for a in range(self.agents_per_cell):
                agent_id = f"{cell_id}-agent-{a}"
                comp = Component(agent_id, "agent", [
                    "--agent-id", agent_id, "--region", self.region,
                    "--state-dir", os.path.join(self.state_dir, "cells", cell_id, "agents", agent_id),
                    "--uid-base", str(self.uid_base + agent_index * uids_per_agent),
                    "--envs-max", str(self.envs_per_agent_max),
                    "--pki-dir", self.state_dir, "--cell", cell_id,
                    *(["--netns", self.agent_hosts[agent_id][0]]
                      if agent_id in self.agent_hosts else []),
                    # Agents on hosts of their own: region-internal addresses environments
                    # may not reach (this host's own addresses are denied anyway).
                    *[arg for _ns, addr in self.agent_hosts.values()
                      for arg in ("--net-deny", f"{addr}/32")],
                    *self._volume_args(os.path.join(self.state_dir, "cells", cell_id,
                                                    "agents", agent_id)),
                    *self._extra(agent_id, "agent"),
                ], f"{self.agent_hosts[agent_id][1] if agent_id in self.agent_hosts else self.host}:0")
                agent_index += 1
                await self._launch(comp)
                endpoints["cells"].setdefault(cell_id, {"agents": {}})["agents"][agent_id] = {
                    "addr": [comp.info["host"], comp.info["port"]],
                    "zone": f"zone-{a % self.zones_per_cell}" if self.zones_per_cell else None}
                agent_args += ["--agent", f"{agent_id}={comp.info['host']}:{comp.info['port']}"]
            fe = Component(f"{cell_id}-frontend", "frontend", [
                "--cell-id", cell_id, "--region", self.region,
                "--state-dir", os.path.join(self.state_dir, "cells", cell_id, "frontend"),
                "--envs-per-agent-max", str(self.envs_per_agent_max), *agent_args,
                # agents on hosts of their own: no function's allow-list may name them
                *[arg for _ns, addr in self.agent_hosts.values()
                  for arg in ("--net-internal", f"{addr}/32")],
                *self._extra(f"{cell_id}-frontend", "frontend"),
            ], f"{self.host}:0")
            await self._launch(fe)
            cell_eps[cell_id] = [fe.info["host"], fe.info["port"]]
            # The cell's async dispatcher (frontend/dispatcher.py): its own process, reading
            # the frontend's event file and invoking through the frontend.
            await self._launch(Component(f"{cell_id}-dispatcher", "dispatcher", [
                "--cell-id", cell_id, "--region", self.region,
                "--state-dir", os.path.join(self.state_dir, "cells", cell_id, "frontend"),
                "--frontend", f"{fe.info['host']}:{fe.info['port']}",
            ], f"{self.host}:0"))
            endpoints["cells"].setdefault(cell_id, {"agents": {}})["frontend"] = cell_eps[cell_id]
        cell_map_path = os.path.join(self.state_dir, "cellmap.json")
        with open(cell_map_path, "w") as f:
            json.dump({"version": 1, "cells": cell_eps, "assignments": {}, "overrides": {}}, f)
        router = Component("router", "router", [
            "--listen-fd", str(self._router_sock.fileno()),
            "--cell-map", cell_map_path, "--tenants", os.path.join(self.state_dir, "tenants.json"),
            "--region", self.region, "--control-listen", f"{self.host}:0",
            "--operator-token-file", operator_token_path(self.state_dir),
            "--registry-key-file", registry_key,
            *self.extra_args.get("router", []),
        ], f"{self.host}:{self.port}", fds=(self._router_sock.fileno(),))
        await self._launch(router)
        # A restarted router gets its internal port back too.
        router.args[router.args.index("--control-listen") + 1] = (
            f"{router.info['control_host']}:{router.info['control_port']}")
        endpoints["routers"]["router"] = [router.info["control_host"], router.info["control_port"]]
        endpoints_path = self._write_endpoints(endpoints)
        storage_args = await self._start_storage()
        control = Component("control", "control", [
            "--state-dir", self.state_dir, "--endpoints", endpoints_path,
            "--region", self.region, "--push-interval-ms", str(self.push_interval_ms),
            *storage_args,
            *self._extra("control", "control"),
        ], f"{self.host}:0")
        await self._launch(control)
        self._monitors = [asyncio.ensure_future(self._monitor(c)) for c in self.components]
        default = tenants["tenants"][0]
        self.region_doc = {
            "endpoint": f"http://{router.info['host']}:{router.info['port']}",
            "region": self.region, "account_id": default["account_id"],
            "access_key_id": default["access_key_id"],
            "secret_access_key": default["secret_access_key"],
            # The SDK's one-string credentials ("ACCESS_KEY_ID:SECRET"), kept under the old name.
            "api_key": f"{default['access_key_id']}:{default['secret_access_key']}",
            "supervisor_pid": os.getpid(),
            "insecure": self.insecure,
            # The operator's bearer token (region-wide status; `cellcloud status` uses it).
            "operator_token_file": operator_token_path(self.state_dir),
            "state_dir": self.state_dir, "started": time.time(),
        }
        if self.storage_servers:  # where replicated volumes are (`cellcloud volume attach`)
            self.region_doc["storage"] = {
                "servers_file": os.path.join(self.state_dir, "storage", "servers.json"),
                "store_colony": self.store_colony}
        self.write_region()
        return self.region_doc

    def _volume_args(self, agent_state_dir: str) -> list[str]:
        """An agent's volume helper (volumes/helper.py): where it mounts its tasks' managed
        volumes, the control plane's volume files, and the storage servers if any."""
        out = ["--volumes-run-dir", os.path.join(agent_state_dir, "volumes"),
               "--volumes-data-dir", os.path.join(self.state_dir, "volumes")]
        if self.storage_servers:
            out += ["--volumes-colony", self.store_colony, "--volumes-servers",
                    os.path.join(self.state_dir, "storage", "servers.json")]
            if not self.insecure:
                out += ["--volumes-pki-dir", self.state_dir]
        return out

    async def _start_storage(self) -> list[str]:
        """Start the storage servers, each its own failure domain on this machine (a rack of
        the region's one zone), and write their servers file; the control plane's arguments
        that name it (none without storage servers)."""
        if not self.storage_servers:
            return []
        servers: dict[str, Any] = {}
        for i in range(self.storage_servers):
            sid = f"storage-{i}"
            comp = Component(sid, "storage", [
                "serve", "--id", sid, "--region", self.region,
                "--state-dir", os.path.join(self.state_dir, "storage", sid),
            ], f"{self.host}:0")
            await self._launch(comp)
            servers[sid] = {"host": comp.info["host"], "port": comp.info["port"],
                            "labels": {"zone": f"{self.region}a", "rack": f"rack-{i}"}}
        path = os.path.join(self.state_dir, "storage", "servers.json")
        with open(path + ".tmp", "w") as f:  # a restarted server keeps its port: stays true
            json.dump(servers, f, indent=2)
        os.rename(path + ".tmp", path)
        return ["--storage-servers-file", path, "--store-colony", self.store_colony]

    def write_region(self) -> None:
        doc = dict(self.region_doc)
        doc["components"] = {
            c.name: {"kind": c.kind, "pid": c.proc.pid if c.proc else None,
                     "host": c.info.get("host"), "port": c.info.get("port"),
                     "restarts": c.restarts, "version": c.info.get("version"),
                     "build": c.build}
            for c in self.components
        }
        path = os.path.join(self.state_dir, "region.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.rename(path + ".tmp", path)

    def _extra(self, name: str, kind: str) -> list[str]:
        return [*self.extra_args.get(kind, []), *self.extra_args.get(name, [])]

    async def _launch(self, comp: Component) -> None:
        r, w = os.pipe()
        logf = open(os.path.join(self.state_dir, "logs", f"{comp.name}.log"), "ab")
        try:
            env = {**os.environ, "CELLCLOUD_READY_FD": str(w)}
            if comp.build is None:  # a region started again: each process on its last build
                comp.build = self._builds().get(comp.name, "")
            if comp.build:
                env["PYTHONPATH"] = os.pathsep.join(
                    [os.path.join(comp.build, "src"), *filter(None, [env.get("PYTHONPATH")])])
            comp.proc = await asyncio.create_subprocess_exec(
                *comp.argv(), *(["--insecure"] if self.insecure else ["--pki-dir", self.state_dir]),
                pass_fds=(w, *comp.fds), stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=logf, start_new_session=True, preexec_fn=_die_with(os.getpid()),
                env=env,
            )
        finally:
            os.close(w)
            logf.close()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb"))
        try:
            line = await asyncio.wait_for(reader.readline(), ready_timeout_s)
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if not line:
            try:
                comp.proc.kill()
            except ProcessLookupError:  # it exited already (a build that cannot start)
                pass
            await comp.proc.wait()
            raise RuntimeError(f"{comp.name} did not become ready; see "
                               f"{self.state_dir}/logs/{comp.name}.log")
        comp.info = json.loads(line)
        comp.started_at = time.monotonic()
        self._record_build(comp)
        # Come back on the same port after a crash.
        comp.listen = f"{comp.info['host']}:{comp.info['port']}"
        if comp not in self.components:
            self.components.append(comp)

    async def _monitor(self, comp: Component) -> None:
        while True:
            assert comp.proc is not None
            proc = comp.proc
            rc = await proc.wait()
            if self.stopping or not self.restart:
                return
            if comp.rolling and comp.rolled is not None:
                await comp.rolled.wait()  # a rollout stopped it and starts the new one itself
            if comp.proc is not proc:
                continue
            if time.monotonic() - comp.started_at > stable_after_s:
                comp.restarts = 0
            comp.restarts += 1
            # Capped exponential backoff with full jitter, so a crash loop cannot spin.
            delay = self._rng.uniform(
                0, min(restart_backoff_cap_s, restart_backoff_base_s * 2 ** comp.restarts))
            log.warning("%s exited with %s; restarting in %.2fs", comp.name, rc, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._launch(comp)
            except (RuntimeError, OSError) as e:
                log.error("restart of %s failed: %s", comp.name, e)
                continue
            self.write_region()

    # -- builds and rollouts (issue #21) -----------------------------------------------------
    def _builds(self) -> dict[str, str]:
        try:
            with open(os.path.join(self.state_dir, "builds.json")) as f:
                doc = json.load(f)
            return {str(k): str(v) for k, v in doc.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _record_build(self, comp: Component) -> None:
        """Which build each process runs, kept across a supervisor's restart (a rollout that
        crashed halfway leaves its upgraded cells on the new build, and says so)."""
        builds = self._builds()
        if builds.get(comp.name) == (comp.build or ""):
            return
        builds[comp.name] = comp.build or ""
        path = os.path.join(self.state_dir, "builds.json")
        with open(path + ".tmp", "w") as f:
            json.dump(builds, f, indent=2)
        os.rename(path + ".tmp", path)

    def _cells(self) -> list[str]:
        return sorted({c.name.rsplit("-", 2)[0] if c.kind == "agent" else
                       c.name.rsplit("-", 1)[0] for c in self.components
                       if c.kind in ("agent", "frontend", "dispatcher")},
                      key=lambda c: (len(c), c))

    def _load_plan(self) -> Rollout | None:
        try:
            with open(os.path.join(self.state_dir, ROLLOUT_STATE)) as f:
                return Rollout.from_doc(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_plan(self, plan: Rollout) -> None:
        path = os.path.join(self.state_dir, ROLLOUT_STATE)
        with open(path + ".tmp", "w") as f:
            json.dump(plan.to_doc(), f, indent=2)
        os.rename(path + ".tmp", path)

    async def _traffic(self) -> dict[str, Traffic]:
        """The router's per-cell counts (its cell_traffic op): the clients' view."""
        from ..transport import Client, RemoteError, TransportError

        router = next((c for c in self.components if c.kind == "router"), None)
        if router is None or "control_port" not in router.info:
            return {}
        client = Client(router.info["control_host"], router.info["control_port"],
                        expect_role="router")
        try:
            doc = await client.call("cell_traffic", None, timeout_s=10)
        except (TransportError, RemoteError) as e:
            log.warning("rollout: the router's traffic counts are unreadable: %s", e)
            return {}
        finally:
            await client.close()
        return {str(c): Traffic(int(t[0]), int(t[1])) for c, t in doc.items()}

    async def _restart_cell(self, cell_id: str, build: str) -> list[str]:
        order = {"agent": 0, "dispatcher": 1, "frontend": 2}
        comps = sorted((c for c in self.components if c.name.startswith(cell_id + "-")
                        and c.kind in order), key=lambda c: order[c.kind])
        for c in comps:
            c.build = build
            if c.kind == "agent":  # handed over live: environments and calls survive
                await self._restart_agent_live(c)
            else:  # drains (its calls finish; new ones wait at the caller)
                await self._restart(c, stop_wait_s=drain_wait_s, hold=True)
        return [c.name for c in comps]

    async def rollout(self, health_timeout_s: float = 60.0, **kwargs: Any) -> dict[str, Any]:
        """See :meth:`_rollout`; what it could not start is the monitor's again after it."""
        try:
            return await self._rollout(health_timeout_s, **kwargs)
        finally:
            self._release_holds()

    async def _rollout(self, health_timeout_s: float = 60.0, *, to: str | None = None,
                       bake_s: float = 0.0, first: int = 1, growth: int = 2,
                       tolerance: float = 0.01, requests_min: int = 20,
                       components: tuple[str, ...] = ("cells",)) -> dict[str, Any]:
        """Deployment in waves (core/rollout.py): one cell, then growing waves. Each wave's
        processes are replaced on the target build — agents live, frontends and dispatchers
        drained —, its health awaited (every process ready, the frontend seeing all its
        agents), then its traffic observed for ``bake_s`` and judged against the other
        cells'; an unhealthy wave or a regression rolls every upgraded wave back, newest
        first. ``to``: a directory holding a cellcloud source tree; none: the cells restart
        on the build they run. ``components``: ``cells``, ``router``, ``control`` — the
        router and the control plane go after every cell, a wave each (the router replaced
        live on its listening socket, the control plane drained), judged against the traffic
        of the waves before. The plan is saved after each step: a rollout interrupted by
        the supervisor's crash is resumed (or its rollback finished) by the next call."""
        self._mtls()
        unknown = set(components) - {"cells", "router", "control"}
        if unknown:
            return {"ok": False, "cells": [], "waves": [],
                    "error": f"unknown components {sorted(unknown)}: cells, router, control"}
        cells = self._cells() if "cells" in components else []
        then = tuple(c for c in ("router", "control") if c in components
                     and any(x.name == c for x in self.components))
        plan = self._load_plan()
        resumed = plan is not None and plan.active
        if plan is not None and plan.active:
            if to is not None and os.path.abspath(to) != plan.target:
                return {"ok": False, "cells": [], "waves": [],
                        "error": f"a rollout to {plan.target or 'the running build'} is "
                                 "under way; `cellcloud rollout` without --to resumes it"}
            if plan.target and not _is_build(plan.target):
                plan.abandon_resume(f"the target build {plan.target} is gone")
        else:
            current = next((c.build or "" for c in self.components
                            if c.kind == "frontend"), "")
            target = os.path.abspath(to) if to is not None else current
            if to is not None and not _is_build(target):
                return {"ok": False, "cells": [], "waves": [],
                        "error": f"{to} is not a cellcloud build (no src/cellcloud/__init__.py)"}
            try:
                plan = Rollout.start(cells, target, current, first=first, growth=growth,
                                     then=then)
            except RolloutError as e:
                return {"ok": False, "cells": [], "waves": [], "error": str(e)}
        self._save_plan(plan)
        report: dict[str, Any] = {"cells": [], "waves": [], "resumed": resumed,
                                  "target": plan.target, "previous": plan.previous,
                                  "version": _build_version(plan.target)}
        seen = Traffic(0, 0)  # every cell's traffic over the waves so far: a component's baseline
        while True:
            step, wave, build = plan.next_step()
            if step == "finished":
                break
            t0 = time.monotonic()
            before = await self._traffic()
            restarted: list[str] = []
            error = ""
            region_wide = [self._component(u) for u in wave if u in ("router", "control")]
            try:
                for comp in region_wide:
                    comp.build = build
                    if not await self._replace(comp):
                        raise RuntimeError(f"the {comp.name} came back but the router got no "
                                           "cell map push")
                    restarted.append(comp.name)
                for cell_id in wave:
                    if cell_id not in ("router", "control"):
                        restarted += await self._restart_cell(cell_id, build)
                healthy = all([await self._cell_healthy(c, health_timeout_s) for c in wave
                               if c not in ("router", "control")])
            except (RuntimeError, OSError) as e:
                healthy, error = False, str(e)
            if healthy and step == "upgrade" and bake_s > 0:
                # The bake: the wave serves for a while before it is judged (an observation
                # window, not a wait for a condition).
                await asyncio.sleep(bake_s)
            after = await self._traffic()
            if region_wide:
                # Every request crosses the router and may reach the control plane: the whole
                # region's traffic (a new router's counts start at zero) against the waves'.
                if any(c.kind == "router" for c in region_wide):
                    before = {}
                mine, others = _sum(after, before, list(after)), seen
            else:
                mine = _sum(after, before, wave)
                others = _sum(after, before, [c for c in after if c not in wave])
                seen = _sum(after, before, list(after)) + seen
            seconds = time.monotonic() - t0
            if step == "upgrade":
                verdict = judge(mine, others, tolerance=tolerance,
                                requests_min=requests_min) if healthy else None
                plan.upgraded(wave, healthy=healthy, verdict=verdict, seconds=seconds,
                              traffic=mine)
            else:
                plan.rolled_back(wave)
            self._save_plan(plan)
            self.write_region()
            record = next(w for w in plan.waves if w.cells == wave)
            report["waves"].append({"step": step, "cells": wave, "build": build,
                                    "healthy": healthy, "seconds": round(seconds, 2),
                                    "served": mine.served, "failed": mine.failed,
                                    "verdict": record.verdict if step == "upgrade" else "",
                                    **({"error": error} if error else {})})
            for cell_id in wave:
                report["cells"].append({"cell": cell_id, "step": step, "healthy": healthy,
                                        "restarted": [n for n in restarted
                                                      if n == cell_id
                                                      or n.startswith(cell_id + "-")],
                                        "seconds": round(seconds, 2),
                                        **({"error": error} if error else {})})
        report["status"] = plan.status
        report["reason"] = plan.reason
        report["plan"] = [{"cells": w.cells, "status": w.status, "verdict": w.verdict,
                           "served": w.served, "failed": w.failed, "seconds": w.seconds}
                          for w in plan.waves]
        report["ok"] = plan.status == "done"
        if not report["ok"]:
            report["stopped_at"] = plan.reason
        return report

    def _component(self, name: str) -> Component:
        comp = next((c for c in self.components if c.name == name), None)
        if comp is None:
            raise RuntimeError(f"no component named {name}")
        return comp

    def _mtls(self) -> None:
        """The supervisor's own calls (health, traffic) go over the region's mTLS."""
        from .. import transport
        from ..security import pki

        if not self.insecure and transport.mtls_role() is None:
            transport.enable_mtls(pki.tls_config(self.state_dir, self.region, "control",
                                                 "region", "supervisor"), "control")

    async def restart_agent(self, name: str, live: bool) -> dict[str, Any]:
        """Restart one agent. ``live``: the new process adopts the old one's environments
        (agent/handover.py) — no environment and no in-flight invocation is lost."""
        comp = next((c for c in self.components if c.name == name and c.kind == "agent"), None)
        if comp is None:
            raise RuntimeError(f"no agent named {name}")
        old = comp.proc
        old_pid = old.pid if old is not None else None
        if not live:
            await self._restart(comp)
            self.write_region()
            return {"agent": name, "live": False, "old_pid": old_pid, "new_pid": comp.proc.pid
                    if comp.proc else None}
        await self._restart_agent_live(comp)
        self.write_region()
        return {"agent": name, "live": True, "old_pid": old_pid,
                "new_pid": comp.proc.pid if comp.proc else None,
                "adopted": comp.info.get("adopted", 0)}

    async def _restart_agent_live(self, comp: Component) -> None:
        """The new agent process adopts the old one's environments (agent/handover.py)."""
        old = comp.proc
        state_dir = comp.args[comp.args.index("--state-dir") + 1]
        comp.rolling = True
        comp.rolled = asyncio.Event()
        saved = list(comp.args)
        try:
            from ..agent.handover import socket_path

            comp.args = [*saved, "--adopt", socket_path(state_dir)]
            try:
                await self._launch(comp)  # ready once it has adopted everything
            except (RuntimeError, OSError):
                comp.proc = old  # never adopted: the old process still serves
                raise
            if old is not None:
                try:
                    await asyncio.wait_for(old.wait(), stop_timeout_s)
                except TimeoutError:  # it handed over; its lingering is not our problem
                    old.kill()
                    await old.wait()
        finally:
            comp.args = saved
            comp.rolling = False
            comp.rolled.set()

    def _write_endpoints(self, endpoints: dict[str, Any]) -> str:
        path = os.path.join(self.state_dir, "endpoints.json")
        with open(path + ".tmp", "w") as f:
            json.dump(endpoints, f, indent=2)
        os.rename(path + ".tmp", path)  # the control plane rereads it when it changes
        return path

    async def _replace(self, comp: Component) -> bool:
        """Replace the router or the control plane on ``comp.build``; True once the router
        holds a cell map pushed by the control plane (both replacements' health)."""
        if comp.kind == "router":
            await self._restart_router_live(comp)
        else:
            await self._restart(comp, stop_wait_s=drain_wait_s, hold=True)
        return await self._router_pushed(ready_timeout_s)

    async def _restart_router_live(self, comp: Component) -> None:
        """A new router process starts on the supervisor's listening socket beside the old
        one (both accept; the kernel spreads new connections over the two), the control plane
        is told to push to the new one's internal port (endpoints.json), and once the new one
        holds a pushed cell map the old one drains: its copy of the listener closes, the
        requests under way are answered (``Connection: close``), idle kept-alive connections
        close, and it exits. Its leases end with it (a new router starts without any: its
        invokes cross the frontend until it holds some)."""
        old = comp.proc
        comp.rolling = True
        comp.rolled = asyncio.Event()
        saved = list(comp.args)
        i = comp.args.index("--control-listen") + 1
        try:
            comp.args[i] = f"{self.host}:0"  # the old process still holds its internal port
            try:
                await self._launch(comp)  # ready: it serves on the shared socket
            except (RuntimeError, OSError):
                comp.proc, comp.args = old, saved  # never started: the old one still serves
                raise
            comp.args[i] = f"{comp.info['control_host']}:{comp.info['control_port']}"
            try:
                with open(os.path.join(self.state_dir, "endpoints.json")) as f:
                    endpoints = json.load(f)
            except (OSError, ValueError):
                endpoints = None
            if endpoints is not None:
                endpoints.setdefault("routers", {})[comp.name] = [comp.info["control_host"],
                                                                  comp.info["control_port"]]
                self._write_endpoints(endpoints)
                if not await self._router_pushed(ready_timeout_s):
                    # It serves on the map the control plane last wrote (cellmap.json).
                    log.warning("the new router got no cell map push within %.0f s",
                                ready_timeout_s)
            if old is not None and old.returncode is None:
                old.terminate()  # it drains (router/server.py)
                try:
                    await asyncio.wait_for(old.wait(), drain_wait_s)
                except TimeoutError:
                    old.kill()
                    await old.wait()
        finally:
            comp.rolling = False
            comp.rolled.set()

    async def _router_pushed(self, timeout_s: float) -> bool:
        """Wait until the router has taken a cell map push since now (from the control plane
        now running); False at the deadline or without a control plane."""
        from ..transport import Client, RemoteError, TransportError

        router = next((c for c in self.components if c.kind == "router"), None)
        if router is None or "control_port" not in router.info or not any(
                c.kind == "control" for c in self.components):
            return False
        client = Client(router.info["control_host"], router.info["control_port"],
                        expect_role="router")
        deadline = time.monotonic() + timeout_s
        first: int | None = None
        try:
            while time.monotonic() < deadline:
                try:
                    pushes = int((await client.call("map_status", None, timeout_s=5))["pushes"])
                except (TransportError, RemoteError, KeyError, TypeError, ValueError):
                    pushes = None
                if pushes is not None:
                    if first is None:
                        first = pushes
                    elif pushes > first:
                        return True
                await asyncio.sleep(0.1)  # polling a condition, bounded by the deadline
            return False
        finally:
            await client.close()

    async def _restart(self, comp: Component, stop_wait_s: float = stop_timeout_s, *,
                       hold: bool = False) -> None:
        """Stop ``comp`` and start it again. ``hold`` (a rollout's): if the new process does
        not start, the monitor keeps standing aside — the rollout rolls the component back
        itself — until :meth:`_release_holds`; without it both would start the component."""
        comp.rolling = True
        if comp.rolled is None or comp.rolled.is_set():
            comp.rolled = asyncio.Event()  # else: held after a failed start, the monitor waits
        done = comp.rolled
        held = False
        try:
            if comp.proc is not None and comp.proc.returncode is None:
                comp.proc.terminate()
                try:
                    await asyncio.wait_for(comp.proc.wait(), stop_wait_s)
                except TimeoutError:
                    comp.proc.kill()
                    await comp.proc.wait()
            try:
                await self._launch(comp)  # a real wait: its ready line on the pipe
            except (RuntimeError, OSError):
                held = hold
                raise
        finally:
            done.set()
            if held:
                comp.rolled = asyncio.Event()  # what the monitor waits on next
            else:
                comp.rolling = False

    def _release_holds(self) -> None:
        """A rollout is over: the monitor restarts again what it could not start."""
        for c in self.components:
            if c.rolling and c.rolled is not None and not c.rolled.is_set():
                c.rolling = False
                c.rolled.set()

    async def _cell_healthy(self, cell_id: str, timeout_s: float) -> bool:
        from ..transport import Client, RemoteError, TransportError

        fe = next(c for c in self.components if c.name == f"{cell_id}-frontend")
        client = Client(fe.info["host"], fe.info["port"], expect_role="frontend")
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    st = await client.call("status", None, timeout_s=5)
                except (TransportError, RemoteError):
                    st = None
                agents = (st or {}).get("agents", {})
                if agents and all("error" not in a for a in agents.values()):
                    return True
                await asyncio.sleep(0.2)  # polling a health condition, bounded by the deadline
            return False
        finally:
            await client.close()

    async def stop(self) -> None:
        self.stopping = True
        for t in self._monitors:
            t.cancel()
        order = {"control": 0, "router": 1, "dispatcher": 2, "frontend": 3, "agent": 4,
                 "storage": 5}
        for kind in sorted({c.kind for c in self.components}, key=order.__getitem__):
            group = [c for c in self.components if c.kind == kind and c.proc is not None]
            for c in group:
                if c.proc is not None and c.proc.returncode is None:
                    c.proc.terminate()
            for c in group:
                assert c.proc is not None
                try:
                    await asyncio.wait_for(c.proc.wait(), stop_timeout_s)
                except TimeoutError:
                    c.proc.kill()
                    await c.proc.wait()
        if self._router_sock is not None:
            self._router_sock.close()
            self._router_sock = None
        if self._uid_fd is not None:
            os.close(self._uid_fd)  # every environment of ours is gone: the range is free
            self._uid_fd = None
        if self._lock_fd is None:
            return  # never ours: another supervisor's region.json is not ours to delete
        try:
            os.unlink(os.path.join(self.state_dir, "region.json"))
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)  # the lock goes with it
        self._lock_fd = None


async def run_foreground(sup: Supervisor, on_ready: Any = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        doc = await sup.start()
    except BaseException:
        await sup.stop()
        raise
    if on_ready is not None:
        on_ready(doc)

    # `cellcloud rollout` asks with SIGUSR1 and reads the answer from rollout.json.
    async def do_rollout() -> None:
        req: dict[str, Any] = {}
        req_path = os.path.join(sup.state_dir, "rollout-request.json")
        try:
            with open(req_path) as f:
                req = json.load(f)
            os.unlink(req_path)
        except (OSError, ValueError):
            pass
        try:
            report = await sup.rollout(
                float(req.get("health_timeout_s", 60.0)), to=req.get("to"),
                bake_s=float(req.get("bake_s", 0.0)), first=int(req.get("first", 1)),
                growth=int(req.get("growth", 2)),
                components=tuple(req.get("components") or ("cells",)))
        except Exception as e:  # the answer file must appear whatever happens
            log.exception("rollout failed")
            report = {"ok": False, "cells": [], "waves": [], "error": repr(e)}
        path = os.path.join(sup.state_dir, "rollout.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.rename(path + ".tmp", path)

    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(do_rollout()))

    # `cellcloud agent restart NAME [--live]` asks with SIGUSR2 (request and answer as files).
    async def do_agent_restart() -> None:
        req_path = os.path.join(sup.state_dir, "agent-restart.json")
        with open(req_path) as f:
            req = json.load(f)
        try:
            result = await sup.restart_agent(str(req["agent"]), bool(req.get("live")))
        except (RuntimeError, OSError) as e:
            result = {"error": str(e)}
        path = os.path.join(sup.state_dir, "agent-restart-result.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.rename(path + ".tmp", path)

    loop.add_signal_handler(signal.SIGUSR2, lambda: asyncio.ensure_future(do_agent_restart()))
    await stop.wait()
    await sup.stop()


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


def _is_build(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "src", "cellcloud", "__init__.py"))


def _build_version(path: str) -> str | None:
    """A build's ``__version__``, read as text (the supervisor does not import other builds)."""
    import re

    init = (os.path.join(path, "src", "cellcloud", "__init__.py") if path
            else os.path.join(os.path.dirname(os.path.dirname(__file__)), "__init__.py"))
    try:
        with open(init) as f:
            m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def _sum(after: dict[str, Traffic], before: dict[str, Traffic], cells: list[str]) -> Traffic:
    out = Traffic(0, 0)
    for c in cells:
        d = after.get(c, Traffic(0, 0)) - before.get(c, Traffic(0, 0))
        out = Traffic(out.served + d.served, out.failed + d.failed)
    return out
