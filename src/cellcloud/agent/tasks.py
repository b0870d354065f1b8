"""The agent's task runner: Fargate-style tasks (issue #17, docs/fargate.md).

A task is one network namespace, one cgroup sized from the task's cpu/memory, and the image
layers of its containers held in the layer cache; each container, once started, is an
environment of its own — the same jail as a function's (namespaces, image root, seccomp, an
unprivileged uid of its own), joining the task's network namespace (the containers reach each
other on localhost, awsvpc style) and a cgroup of its own under the task's
(``task-<id>/<container>``: the container's own memory limit, memory reservation and cpu
weight, where its definition gives them; the task's cgroup bounds them all) — whose pid 1 is
``sandbox/container_guest.py``: it runs the container's ENTRYPOINT + CMD (no Runtime API),
forwards its output lines, runs health-check commands and reports its exit.

Ops (request/answer types in core/messages.py, ``TASK_OPS``): ``task_create``,
``task_container_start``, ``task_container_stop``, ``task_exec``, ``task_poll``,
``task_destroy``. What to start when (dependencies, health, restarts) is decided by the cell's
task manager from ``core/ecs_tasks.py``; this runner only does what it is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from .. import eventlog
from ..core import messages as m
from ..core.limits import DEFAULT_LIMITS
from ..sandbox import cgroups, linux
from ..sandbox.spec import EnvSpec
from ..transport import OpError
from ..transport.codec import FrameReader

if TYPE_CHECKING:
    from .server import Agent

log = logging.getLogger("cellcloud.agent.tasks")
W = TypeVar("W", bound="_Wire")

TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CONTAINER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # ECS's container name pattern
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
channel_frame_bytes_max = 8 * 1024 * 1024
stop_margin_s = 10.0  # past grace_s, the container's guest itself is killed
exec_margin_s = 10.0  # past timeout_s, a health check that did not answer counts as timed out
destroy_wait_s = 5.0  # killed processes leave the cgroup within this (then: retried later)
task_cpu_units_max = 16 * 1024  # Fargate's largest task (16 vCPU)


@dataclass
class _Container:
    spec: m.TaskContainer
    state: str = "pending"
    exit_code: int | None = None
    started_ms: int | None = None
    exited_ms: int | None = None
    pid: int = 0  # host pid of its guest
    run: int = 0  # which start this is (a late frame of an earlier run is not this one's)
    reason: str = ""  # why it exited, in ECS's words, when the exit code does not say
    cgroup: cgroups.Cgroup | None = None  # its own, under the task's (OOM kills in it: an OOM exit)
    oom_base: int = 0  # its cgroup's OOM kills when this run started
    transport: asyncio.BaseTransport | None = None
    started: asyncio.Future[dict[str, Any]] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    execs: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    logs: deque[tuple[int, m.TaskLogLine, int]] = field(default_factory=deque)
    next_seq: int = 0
    log_bytes: int = 0
    dropped: int = 0

    def add_lines(self, stream: str, lines: list[Any]) -> None:
        cap = DEFAULT_LIMITS.task_log_bytes_max
        for item in lines:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                continue
            ts, data = item
            if not isinstance(ts, int) or not isinstance(data, bytes):
                continue
            text = data[:DEFAULT_LIMITS.task_log_line_bytes_max].decode("utf-8", "replace")
            size = len(data) + 16
            self.logs.append((self.next_seq, m.TaskLogLine(ts, text, stream), size))
            self.next_seq += 1
            self.log_bytes += size
            while self.log_bytes > cap and self.logs:
                _, _, gone = self.logs.popleft()
                self.log_bytes -= gone
                self.dropped += 1

    def lines_after(self, cursor: int, bytes_max: int) -> tuple[list[m.TaskLogLine], int, int]:
        """Lines from ``cursor`` on (at most ``bytes_max``), the next cursor, bytes used."""
        out: list[m.TaskLogLine] = []
        used = 0
        nxt = max(cursor, self.logs[0][0] if self.logs else self.next_seq)
        for seq, line, size in self.logs:
            if seq < nxt:
                continue
            if out and used + size > bytes_max:
                break
            out.append(line)
            used += size
            nxt = seq + 1
        return out, nxt, used


@dataclass
class _Task:
    req: m.TaskCreateRequest
    containers: dict[str, _Container]
    cgroup: cgroups.Cgroup
    netns_fd: int
    network: dict[str, Any]  # the network helper's lease info ({}: loopback only)
    holds: list[str]  # layer-cache holder ids


class _ContainerChannel(asyncio.Protocol):
    """The agent's end of one container's channel (container_guest.py's frames)."""

    def __init__(self, runner: TaskRunner, ctr: _Container, pid: int, slot: int) -> None:
        self.runner, self.ctr, self.pid, self.slot = runner, ctr, pid, slot
        self.run = ctr.run
        self.reader = FrameReader(channel_frame_bytes_max)
        self.handed_over = False  # live update: the successor reads this channel now
        self.exit_reported = False

    def data_received(self, data: bytes) -> None:
        ctr = self.ctr
        if ctr.run != self.run or self.handed_over:
            return  # an earlier run's last words: that run is over already
        try:
            for doc in self.reader.feed(data):
                if not isinstance(doc, dict):
                    raise ValueError("not a frame")
                kind = doc.get("t")
                if kind == "out":
                    ctr.add_lines(str(doc.get("stream") or "stdout"), list(doc.get("lines") or ()))
                elif kind == "exec_result":
                    fut = ctr.execs.pop(doc.get("id"), None)  # type: ignore[arg-type]
                    if fut is not None and not fut.done():
                        fut.set_result(doc)
                elif kind in ("started", "ready", "exit"):
                    if ctr.started is not None and not ctr.started.done():
                        ctr.started.set_result(doc)
                    if kind == "exit":
                        self.exit_reported = True
                        error = doc.get("error")
                        self.runner._exited(ctr, doc.get("code"), doc.get("exited_ms"),
                                            f"CannotStartContainerError: {error}"
                                            if isinstance(error, str) else "")
                else:
                    raise ValueError(f"unknown frame {kind!r}")
        except Exception:  # noqa: BLE001 - a guest that writes garbage gets no second chance
            if ctr.transport is not None:
                ctr.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """The guest is gone (or going): its uid slot goes back; if this run had not
        reported its exit, it ended without one (killed: 137)."""
        if self.handed_over:
            return
        if not self.exit_reported:  # a guest that reported its exit is ending by itself
            self.runner.agent.backend.kill(self.pid)  # (its pid must not be signalled late)
        self.runner.agent.free_slot(self.slot)
        if self.ctr.run == self.run:
            self.runner._exited(self.ctr, None, None)
            self.ctr.transport = None


def _refuse(why: str) -> OpError:
    return OpError("InvalidRequest", why)


class _Wire(Protocol):
    @classmethod
    def from_wire(cls, doc: Any) -> Self: ...


def _parse(kind: type[W], body: Any) -> W:
    """``body`` as a ``kind`` request, or ``InvalidRequest`` naming what is wrong."""
    try:
        return kind.from_wire(body)
    except m.MessageError as e:
        raise _refuse(str(e)) from e


def _check_volumes(req: m.TaskCreateRequest) -> None:
    names = [v.name for v in req.volumes]
    if len(set(names)) != len(names) or not all(VOLUME_NAME.match(n) for n in names):
        raise _refuse("volumes: unique names of letters, digits, '_' and '-'")
    for c in req.containers:
        for mt in c.mounts:
            if mt.volume not in names:
                raise _refuse(f"container {c.name}: mount of {mt.volume!r}, not a task volume")
            parts = mt.path.split("/")
            if not mt.path.startswith("/") or mt.path == "/" or "" in parts[1:] \
                    or "." in parts or ".." in parts or "\0" in mt.path:
                raise _refuse(f"container {c.name}: mount path must be absolute and normal")


class TaskRunner:
    """The task ops of one agent (registered in ``Agent.ops``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.tasks: dict[str, _Task] = {}
        self._creating: set[str] = set()  # task ids whose task_create is under way
        self._exec_ids = itertools.count(1)
        # Managed volumes attached by the volume helper: task id -> volume name -> host path
        self.volume_paths: dict[str, dict[str, str]] = {}
        self.counters = {"tasks_created": 0, "tasks_destroyed": 0, "containers_started": 0,
                         "containers_exited": 0, "execs": 0}

    def _admitting(self) -> Agent:
        """The agent, unless it is being replaced (then new work is refused)."""
        if self.agent.draining:
            raise OpError("AgentDraining", "the agent is being replaced; retry")
        return self.agent

    def memory_committed_mb(self) -> int:
        """The tasks' configured memory (admission counts it with the functions')."""
        return sum(t.req.memory_mib for t in self.tasks.values())

    def memory_used_bytes(self) -> int:
        """The tasks' cgroups' charge (the agent's memory in use counts it)."""
        return sum(t.cgroup.usage().memory_bytes for t in self.tasks.values()
                   if t.cgroup.version)

    # -- ops --------------------------------------------------------------------------------
    async def task_create(self, body: dict[str, Any]) -> dict[str, Any]:
        self._admitting()
        req = _parse(m.TaskCreateRequest, body)
        self._check(req)
        _check_volumes(req)
        if req.task_id in self.tasks or req.task_id in self._creating:
            raise OpError("TaskExists", req.task_id)
        self._creating.add(req.task_id)
        try:
            return await self._create(req)
        finally:
            self._creating.discard(req.task_id)

    async def _create(self, req: m.TaskCreateRequest) -> dict[str, Any]:
        agent = self.agent
        if len(self.tasks) + len(self._creating) > DEFAULT_LIMITS.agent_tasks_max:
            raise OpError("AgentFull", f"{len(self.tasks)} tasks; the maximum is "
                          f"{DEFAULT_LIMITS.agent_tasks_max}")
        committed = (sum(r.spec.memory_mb for r in agent.envs.values())
                     + self.memory_committed_mb() + req.memory_mib)
        if committed * 2**20 > agent.oversubscription * agent.memory_budget_bytes:
            raise OpError("AgentFull", f"{committed} MB configured would exceed "
                          f"{agent.oversubscription}x the "
                          f"{agent.memory_budget_bytes >> 20} MB budget")
        if req.network == "egress" and agent.network is None:
            raise OpError("NetworkUnavailable", "the task asks for egress but this agent runs "
                          "with --network none")
        holds: list[str] = []
        try:
            for c in req.containers:  # every layer held, or none (LayerMissing names one)
                holder = f"task:{req.task_id}/{c.name}"
                agent.images.acquire(holder, list(c.image_layers))
                holds.append(holder)
                agent.images.check_image_size(list(c.image_layers))
        except BaseException:
            for h in holds:
                agent.images.release(h)
            raise
        cg = cgroups.Cgroup(agent.cgroup_group, f"task-{req.task_id}")
        netns_fd = -1
        info: dict[str, Any] = {}
        # The network namespace (a helper round trip and an nft run) is asked for first and
        # the cgroup made while it comes: one after the other they were most of task_create.
        if agent.network is not None and req.network != "none":
            ingress = [f"{p.protocol}:{p.container_port}"
                       for c in req.containers for p in c.port_mappings]
            net_call: Callable[[], Any] = functools.partial(
                agent.network.acquire, f"task-{req.task_id}", list(req.net_allow), ingress,
                egress=req.network != "private")
        else:
            net_call = linux.new_netns_fd
        net_job = asyncio.ensure_future(asyncio.to_thread(net_call))

        async def wait_network() -> None:
            nonlocal netns_fd, info
            got = await net_job
            if isinstance(got, int):
                netns_fd = got
            else:
                netns_fd, info = got.netns_fd, got.info
        try:
            try:
                if cg.version:
                    period = DEFAULT_LIMITS.env_cpu_period_us
                    cg.create(cgroups.Limits(
                        req.memory_mib * 2**20, agent.pids_max, req.memory_mib,
                        cpu_quota_us=max(DEFAULT_LIMITS.env_cpu_quota_us_min,
                                         period * req.cpu_units // 1024),
                        cpu_shares=req.cpu_units))
                elif not agent.allow_unlimited:
                    raise OpError("TaskCreateFailed", f"no cgroup hierarchy at "
                                  f"{cgroups.ROOT}: the task's cpu and memory cannot be "
                                  "enforced")
            except BaseException:
                with contextlib.suppress(Exception):
                    await wait_network()  # so that what it got is given back below
                raise
            await wait_network()
            if req.volumes:  # last: nothing after it can fail, so no detach on this path
                self.volume_paths[req.task_id] = await self._attach_volumes(req)
        except BaseException as e:
            for h in holds:
                agent.images.release(h)
            if netns_fd >= 0:
                os.close(netns_fd)
            self._release_network(req.task_id, info)
            cg.destroy()
            if isinstance(e, OpError):
                raise
            raise OpError("TaskCreateFailed", str(e)) from e
        self.tasks[req.task_id] = _Task(req, {c.name: _Container(c) for c in req.containers},
                                        cg, netns_fd, info, holds)
        self.counters["tasks_created"] += 1
        return m.TaskCreateReply(req.task_id, str(info.get("address") or "")).to_wire()

    async def container_start(self, body: dict[str, Any]) -> dict[str, Any]:
        agent = self._admitting()
        req = _parse(m.TaskContainerRequest, body)
        task, ctr = self._find(req.task_id, req.container)
        if ctr.state == "running":
            raise OpError("ContainerRunning", f"{req.container} is running")
        c = ctr.spec
        slot = agent.alloc_slot()
        uid = agent.uid_base + slot
        spec = EnvSpec(
            env_id=f"task-{req.task_id}-{c.name}", function_name=c.name, function_version="",
            function_arn="", handler="", runtime="container", memory_mb=task.req.memory_mib,
            timeout_s=0, bundle_dir="", uid=uid, gid=uid, cgroup_group=agent.cgroup_group,
            region=agent.region, ephemeral_mb=DEFAULT_LIMITS.ephemeral_mb_default,
            pids_max=agent.pids_max, runtime_argv=list(c.argv),
            disabled_layers=list(agent.unsafe_disabled_layers),
            allow_unlimited=agent.allow_unlimited,
            image_layers=[agent.images.layer_dir(d) for d in c.image_layers],
            image_workdir=c.workdir, image_env=dict(c.env), network=dict(task.network),
            guest="container", cgroup_name=os.path.join(task.cgroup.name, c.name),
            hostname=task.req.hostname or req.task_id[:63])
        spec.volume_mounts = self._volume_mounts(req.task_id, c)
        cg = task.cgroup.child(c.name)
        if cg.version:  # the task's cgroup holds no process: each container is in a child
            try:
                cg.create_child_limits(c.memory_mib * 2**20, c.memory_reservation_mib * 2**20,
                                       c.cpu_units)
            except FileNotFoundError as e:
                agent.free_slot(slot)
                raise OpError("ContainerStartFailed", f"the cgroup {task.cgroup.name} is gone "
                              f"({e})") from e
            except OSError as e:
                agent.free_slot(slot)
                raise OpError("ContainerStartFailed", f"{c.name}'s cgroup: {e}") from e
        ctr.state, ctr.exit_code, ctr.exited_ms, ctr.reason = "running", None, None, ""
        ctr.cgroup = cg if cg.version else None
        ctr.oom_base = ctr.cgroup.usage().oom_kills if ctr.cgroup else 0
        ctr.run += 1
        ctr.exited = asyncio.Event()
        ctr.started = asyncio.get_running_loop().create_future()
        # A copy of the namespace's fd for the spawn: a task_destroy meanwhile closes the
        # task's, and its number must not come to name another namespace under the spawn.
        netns_fd = os.dup(task.netns_fd)
        try:
            spawned = await agent.backend.spawn(spec, netns_fd=netns_fd)
        except Exception as e:
            agent.free_slot(slot)
            self._exited(ctr, None, None)
            raise OpError("ContainerStartFailed", str(e)) from e
        finally:
            os.close(netns_fd)
        ctr.pid = spawned.pid
        if self.tasks.get(req.task_id) is not task:  # destroyed while it was being spawned
            agent.backend.kill(spawned.pid)
            spawned.channel.close()
            agent.free_slot(slot)
            raise OpError("TaskNotFound", req.task_id)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(
            lambda: _ContainerChannel(self, ctr, spawned.pid, slot), spawned.channel)
        ctr.transport = transport
        try:
            first = await asyncio.wait_for(asyncio.shield(ctr.started),
                                           DEFAULT_LIMITS.env_create_timeout_ms / 1000)
        except TimeoutError:
            first = {"t": "ready", "init_error": {"errorMessage": "the container's guest did "
                                                  "not start in time"}}
        if first.get("t") != "started":
            why = str((first.get("init_error") or {}).get("errorMessage")
                      or first.get("error") or "the container could not be started")
            if ctr.state == "running":
                agent.backend.kill(ctr.pid)
                self._exited(ctr, first.get("code") if isinstance(first.get("code"), int)
                             else None, None)
            raise OpError("ContainerStartFailed", why[-2000:])
        ctr.started_ms = int(first.get("started_ms") or time.time() * 1000)
        self.counters["containers_started"] += 1
        return m.TaskContainerStartReply(spawned.pid).to_wire()

    async def container_stop(self, body: dict[str, Any]) -> dict[str, Any]:
        req = _parse(m.TaskContainerStopRequest, body)
        if not 0 <= req.grace_s <= DEFAULT_LIMITS.task_stop_grace_s_max:
            raise _refuse(f"grace_s must be 0 to {DEFAULT_LIMITS.task_stop_grace_s_max}")
        _, ctr = self._find(req.task_id, req.container)
        if ctr.state != "running":
            return m.TaskContainerStopReply(None).to_wire()
        exited = ctr.exited
        self._send(ctr, {"t": "stop", "grace_s": req.grace_s})
        try:
            await asyncio.wait_for(exited.wait(), req.grace_s + stop_margin_s)
        except TimeoutError:  # the guest did not end it: the whole container goes
            self.agent.backend.kill(ctr.pid)
            self._exited(ctr, 137, None)
        return m.TaskContainerStopReply(ctr.exit_code).to_wire()

    async def task_exec(self, body: dict[str, Any]) -> dict[str, Any]:
        req = _parse(m.TaskExecRequest, body)
        if not req.command:
            raise _refuse("command must name a program")
        if sum(len(a.encode()) for a in req.command) > DEFAULT_LIMITS.task_exec_command_bytes_max:
            raise _refuse(f"command over {DEFAULT_LIMITS.task_exec_command_bytes_max} bytes")
        if not 0 < req.timeout_s <= DEFAULT_LIMITS.task_exec_timeout_s_max:
            raise _refuse(f"timeout_s must be over 0 and at most "
                          f"{DEFAULT_LIMITS.task_exec_timeout_s_max}")
        _, ctr = self._find(req.task_id, req.container)
        if ctr.state != "running":
            raise OpError("ContainerNotRunning", f"{req.container} is {ctr.state}")
        exec_id = next(self._exec_ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ctr.execs[exec_id] = fut
        self.counters["execs"] += 1
        self._send(ctr, {"t": "exec", "id": exec_id, "command": list(req.command),
                         "timeout_s": req.timeout_s,
                         "output_max": DEFAULT_LIMITS.task_exec_output_bytes_max})
        try:
            doc = await asyncio.wait_for(fut, req.timeout_s + exec_margin_s)
        except TimeoutError:
            ctr.execs.pop(exec_id, None)
            return m.TaskExecReply(None, b"", True, "no answer from the container").to_wire()
        code = doc.get("exit_code")
        output = doc.get("output")
        return m.TaskExecReply(
            code if isinstance(code, int) else None,
            output[:DEFAULT_LIMITS.task_exec_output_bytes_max] if isinstance(output, bytes)
            else b"", bool(doc.get("timed_out")), str(doc.get("error") or "")).to_wire()

    async def task_poll(self, body: dict[str, Any]) -> dict[str, Any]:
        req = _parse(m.TaskPollRequest, body)
        task = self._task(req.task_id)
        budget = DEFAULT_LIMITS.task_poll_log_bytes_max
        states, logs, cursors, dropped = {}, {}, {}, {}
        for name, ctr in task.containers.items():
            states[name] = m.TaskContainerState(ctr.state, ctr.exit_code, ctr.started_ms,
                                                ctr.exited_ms, ctr.reason)
            lines, cursors[name], used = ctr.lines_after(req.logs_after.get(name, 0), budget)
            budget = max(0, budget - used)
            if lines:
                logs[name] = tuple(lines)
            if ctr.dropped:
                dropped[name] = ctr.dropped
        usage = task.cgroup.usage() if task.cgroup.version else cgroups.Usage()
        return m.TaskPollReply(states, logs, cursors, usage.cpu_ns, usage.memory_bytes,
                               dropped, usage.oom_kills).to_wire()

    async def task_destroy(self, body: dict[str, Any]) -> dict[str, Any]:
        req = _parse(m.TaskDestroyRequest, body)
        task = self.tasks.pop(req.task_id, None)
        if task is None:
            return m.TaskDestroyReply(False).to_wire()
        self._kill(task)
        for _ in range(int(destroy_wait_s / 0.02)):  # polling a condition (processes gone)
            if task.cgroup.destroy():
                break
            await asyncio.sleep(0.02)
        if task.cgroup.version and not task.cgroup.destroy():
            self.agent.remove_cgroup_later(task.cgroup)  # housekeeping retries it
        await self._detach_volumes(req.task_id)  # its processes (and their mounts) are gone
        self.counters["tasks_destroyed"] += 1
        return m.TaskDestroyReply(True).to_wire()

    # -- managed volumes (the volume helper: volumes/helper.py) -------------------------------
    async def _attach_volumes(self, req: m.TaskCreateRequest) -> dict[str, str]:
        """Each volume attached on this host (FUSE file, loop device, ext4) under the
        attachment the control plane took; all or none."""
        helper = self.agent.volumes
        if helper is None:
            raise OpError("VolumesUnavailable", "the task has managed volumes and this agent "
                          "runs without a volume helper (--volumes-run-dir)")
        if getattr(self.agent.backend, "name", "") != "jail":  # the jail binds the mounts
            raise OpError("VolumesUnavailable", "managed volumes need the jail backend")
        paths: dict[str, str] = {}
        target = f"task/{req.task_id}"
        try:
            for v in req.volumes:
                paths[v.name] = await asyncio.to_thread(
                    helper.attach, f"{req.task_id}-{v.name}", req.account, v.volume_id,
                    v.size_gib, v.attach_epoch, v.replicated, target)
        except BaseException as e:
            for name in paths:
                try:
                    await asyncio.to_thread(helper.detach, f"{req.task_id}-{name}")
                except (OSError, RuntimeError) as d:
                    log.warning("task %s: detaching volume %s: %s", req.task_id, name, d)
            if isinstance(e, RuntimeError):
                raise OpError("VolumeAttachFailed", str(e)[-2000:]) from e
            raise
        return paths

    def _volume_mounts(self, task_id: str, c: m.TaskContainer) -> list[dict[str, Any]]:
        paths = self.volume_paths.get(task_id, {})
        return [{"source": paths[mt.volume], "target": mt.path, "read_only": mt.read_only}
                for mt in c.mounts if mt.volume in paths]

    async def _detach_volumes(self, task_id: str) -> None:
        paths = self.volume_paths.pop(task_id, {})
        helper = self.agent.volumes
        for name in paths:
            if helper is None:
                break
            try:
                await asyncio.to_thread(helper.detach, f"{task_id}-{name}")
            except (OSError, RuntimeError) as e:
                log.warning("task %s: detaching volume %s: %s", task_id, name, e)

    # -- internals ----------------------------------------------------------------------------
    def _check(self, req: m.TaskCreateRequest) -> None:
        if not TASK_ID.match(req.task_id):
            raise _refuse("task_id: 1-100 letters, digits, '_', '.', '-' (not first)")
        if not 128 <= req.cpu_units <= task_cpu_units_max:
            raise _refuse(f"cpu_units must be 128 to {task_cpu_units_max}")
        if not 6 <= req.memory_mib <= self.agent.memory_budget_bytes >> 20:
            raise _refuse(f"memory_mib must be 6 to {self.agent.memory_budget_bytes >> 20} "
                          "(this agent's memory budget)")
        if req.hostname and not HOSTNAME.match(req.hostname):
            raise _refuse("hostname: a host name of at most 63 characters")
        if req.network not in ("", "egress", "none", "private"):
            raise OpError("InvalidNetwork", f"unknown network setting {req.network!r}")
        if req.net_allow and req.network != "egress":
            raise OpError("InvalidNetwork", "an allow-list needs the egress mode")
        if not 1 <= len(req.containers) <= DEFAULT_LIMITS.ecs_containers_per_task_max:
            raise _refuse(f"a task has 1 to {DEFAULT_LIMITS.ecs_containers_per_task_max} "
                          "containers")
        names: set[str] = set()
        ports: set[tuple[int, str]] = set()
        for c in req.containers:
            if not CONTAINER_NAME.match(c.name) or c.name in names:
                raise _refuse(f"container name {c.name!r}: unique, letters, digits, '_', '-'")
            names.add(c.name)
            if not c.argv:
                raise OpError("InvalidImage", f"{c.name}: neither ENTRYPOINT nor CMD")
            if not 1 <= len(c.image_layers) <= DEFAULT_LIMITS.image_layers_max:
                raise OpError("InvalidImage", f"{c.name}: 1 to "
                              f"{DEFAULT_LIMITS.image_layers_max} layers")
            if c.workdir and not c.workdir.startswith("/"):
                raise _refuse(f"{c.name}: workdir must be absolute")
            if c.memory_mib and not 6 <= c.memory_mib <= req.memory_mib:
                raise _refuse(f"{c.name}: memory_mib must be 6 to the task's {req.memory_mib}")
            if c.memory_reservation_mib and not (
                    6 <= c.memory_reservation_mib <= (c.memory_mib or req.memory_mib)):
                raise _refuse(f"{c.name}: memory_reservation_mib must be 6 to its memory "
                              "limit (or the task's)")
            if not 0 <= c.cpu_units <= req.cpu_units:
                raise _refuse(f"{c.name}: cpu_units must be 0 to the task's {req.cpu_units}")
            for p in c.port_mappings:
                key = (p.container_port, p.protocol)
                if not 1 <= p.container_port <= 65535 or p.protocol not in ("tcp", "udp"):
                    raise _refuse(f"{c.name}: port {p.container_port}/{p.protocol}")
                if key in ports:
                    raise _refuse(f"port {p.container_port}/{p.protocol} is mapped twice in "
                                  "the task's one network namespace")
                ports.add(key)

    def _task(self, task_id: str) -> _Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise OpError("TaskNotFound", task_id)
        return task

    def _find(self, task_id: str, name: str) -> tuple[_Task, _Container]:
        task = self._task(task_id)
        ctr = task.containers.get(name)
        if ctr is None:
            raise OpError("ContainerNotFound", f"{task_id} has no container {name!r}")
        return task, ctr

    def _send(self, ctr: _Container, doc: dict[str, Any]) -> None:
        from ..transport.codec import pack

        if ctr.transport is not None and not ctr.transport.is_closing():
            ctr.transport.write(pack(doc))  # type: ignore[attr-defined]

    def _exited(self, ctr: _Container, code: Any, exited_ms: Any, reason: str = "") -> None:
        """The container's process ended (``code`` None: unknown, its guest died: 137)."""
        if ctr.state != "running":
            return
        ctr.state = "exited"
        ctr.exit_code = code if isinstance(code, int) else 137
        if (not reason and ctr.exit_code == 137 and ctr.cgroup is not None
                and ctr.cgroup.usage().oom_kills > ctr.oom_base):
            reason = "OutOfMemoryError: Container killed due to memory usage"
        ctr.reason = reason
        ctr.exited_ms = exited_ms if isinstance(exited_ms, int) else int(time.time() * 1000)
        ctr.exited.set()
        self.counters["containers_exited"] += 1
        for fut in ctr.execs.values():
            if not fut.done():
                fut.set_result({"exit_code": None, "error": "the container exited"})
        ctr.execs.clear()

    def _release_network(self, task_id: str, info: dict[str, Any]) -> None:
        if self.agent.network is not None and info:
            try:
                self.agent.network.release(f"task-{task_id}")
            except (OSError, RuntimeError) as e:
                log.warning("network helper: release task-%s: %s", task_id, e)

    def _kill(self, task: _Task) -> None:
        """Everything of the task ends now; its network, layers and fds go back."""
        for ctr in task.containers.values():
            if ctr.pid:
                self.agent.backend.kill(ctr.pid)
            if ctr.transport is not None:
                ctr.transport.close()
            self._exited(ctr, None, None)
        if task.cgroup.version:
            task.cgroup.kill_all()
        if task.netns_fd >= 0:
            os.close(task.netns_fd)
            task.netns_fd = -1
        self._release_network(task.req.task_id, task.network)
        for h in task.holds:
            self.agent.images.release(h)
        task.holds = []
        log.info("task %s destroyed", task.req.task_id,
                 extra=eventlog.fields(event="task_destroyed", task=task.req.task_id))

    # -- attestation (the agent's periodic remeasure) -------------------------------------------
    def running_layers(self) -> dict[str, list[tuple[str, str]]]:
        """The layer dirs running containers use: dir -> [(task id, container)]."""
        out: dict[str, list[tuple[str, str]]] = {}
        for task_id, task in self.tasks.items():
            for name, ctr in task.containers.items():
                if ctr.state == "running":
                    for d in ctr.spec.image_layers:
                        out.setdefault(self.agent.images.layer_dir(d), []).append((task_id, name))
        return out

    def kill_container(self, task_id: str, name: str, why: str) -> None:
        """End a running container now (its exit: 137 with ``why`` as its reason)."""
        task = self.tasks.get(task_id)
        ctr = task.containers.get(name) if task is not None else None
        if ctr is None or ctr.state != "running":
            return
        self.agent.backend.kill(ctr.pid)
        self._exited(ctr, 137, None, why)

    # -- live update (handover.py) ------------------------------------------------------------
    def hand_over(self) -> list[tuple[dict[str, Any], list[int]]]:
        """Each task's record and its fds (the network namespace first, then the channel of
        each running container), for the successor; from here on this process neither reads
        those channels nor ends anything of the tasks (it exits soon). Log lines not yet
        polled stay behind (counted in ``logs_dropped`` there)."""
        out = []
        for task in list(self.tasks.values()):
            fds = [task.netns_fd]
            containers: dict[str, Any] = {}
            for name, ctr in task.containers.items():
                doc: dict[str, Any] = {
                    "state": ctr.state, "exit_code": ctr.exit_code, "reason": ctr.reason,
                    "started_ms": ctr.started_ms, "exited_ms": ctr.exited_ms, "pid": ctr.pid,
                    "run": ctr.run, "oom_base": ctr.oom_base, "next_seq": ctr.next_seq,
                    "dropped": ctr.dropped + len(ctr.logs)}
                proto = ctr.transport.get_protocol() if ctr.transport is not None else None
                sock = (ctr.transport.get_extra_info("socket")
                        if ctr.transport is not None else None)
                if ctr.state == "running" and isinstance(proto, _ContainerChannel) \
                        and sock is not None:
                    proto.handed_over = True
                    if isinstance(ctr.transport, asyncio.ReadTransport):
                        ctr.transport.pause_reading()
                    doc.update(fd=len(fds), slot=proto.slot)
                    fds.append(sock.fileno())
                containers[name] = doc
            out.append(({"t": "task", "req": task.req.to_wire(), "network": task.network,
                         "cgroup": os.path.basename(task.cgroup.rel),
                         "containers": containers,
                         "volume_paths": self.volume_paths.get(task.req.task_id, {})}, fds))
        return out

    async def adopt(self, handed: list[tuple[dict[str, Any], list[int]]]) -> int:
        """The successor's side: take over the tasks a predecessor handed over."""
        loop = asyncio.get_running_loop()
        agent = self.agent
        for doc, fds in handed:
            req = m.TaskCreateRequest.from_wire(doc["req"])
            cg = cgroups.Cgroup(agent.cgroup_group, str(doc["cgroup"]))
            task = _Task(req, {c.name: _Container(c) for c in req.containers}, cg, fds[0],
                         dict(doc.get("network") or {}), [])
            for c in req.containers:
                holder = f"task:{req.task_id}/{c.name}"
                agent.images.adopt(holder, [agent.images.layer_dir(d) for d in c.image_layers])
                task.holds.append(holder)
            self.tasks[req.task_id] = task
            if doc.get("volume_paths"):  # attached by the (handed-over) volume helper
                self.volume_paths[req.task_id] = {
                    str(k): str(v) for k, v in doc["volume_paths"].items()}
            for name, cdoc in doc["containers"].items():
                ctr = task.containers[name]
                ctr.exit_code, ctr.reason = cdoc["exit_code"], str(cdoc["reason"])
                ctr.started_ms, ctr.exited_ms = cdoc["started_ms"], cdoc["exited_ms"]
                ctr.pid, ctr.run = int(cdoc["pid"]), int(cdoc["run"])
                ctr.oom_base = int(cdoc["oom_base"])
                ctr.next_seq, ctr.dropped = int(cdoc["next_seq"]), int(cdoc["dropped"])
                ctr.cgroup = cg.child(name) if cg.version else None
                fd = cdoc.get("fd")
                if cdoc["state"] == "running" and isinstance(fd, int) and 0 < fd < len(fds):
                    slot = int(cdoc["slot"])
                    agent.reserve_slot(slot)
                    ctr.state = "running"
                    ctr.exited = asyncio.Event()
                    sock = socket.socket(fileno=fds[fd])
                    ctr.transport, _ = await loop.connect_accepted_socket(
                        functools.partial(_ContainerChannel, self, ctr, ctr.pid, slot), sock)
                elif cdoc["state"] == "running":  # its channel did not come: it is lost
                    ctr.state = "running"
                    self._exited(ctr, None, None)
                else:
                    ctr.state = str(cdoc["state"])
        return len(handed)

    def summary(self) -> list[dict[str, Any]]:
        """``status``'s view: each task and its containers' states."""
        return [{"task_id": tid, "cpu_units": t.req.cpu_units, "memory_mib": t.req.memory_mib,
                 "private_ipv4": str(t.network.get("address") or ""),
                 "containers": {n: {"state": c.state, "pid": c.pid, "exit_code": c.exit_code}
                                for n, c in t.containers.items()}}
                for tid, t in self.tasks.items()]

    def close(self) -> None:
        """The agent stops: every task is killed (its cgroup left to the agent's sweep)."""
        for task_id in list(self.tasks):
            task = self.tasks.pop(task_id)
            self._kill(task)
            if task.cgroup.version:
                self.agent.remove_cgroup_later(task.cgroup)
