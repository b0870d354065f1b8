"""ECS tasks end to end in one process (issue #17): the control plane's ECS shell
(control/ecs.py) over SQLite, the tenant's cell (a real frontend Cell with its registry, log
store and task manager, frontend/tasks.py) and FAKE agents that implement the agent's task ops
(task_create, task_container_start/stop, task_exec, task_poll, task_destroy, image_blob).

Shapes and errors as botocore's ``ecs`` model has them; placement on the cluster's shard with
RESOURCE:MEMORY / RESOURCE:CPU failures; layers pushed to an agent that lacks them; awslogs
output in the cell's log store; a restarted frontend still describes and drives its tasks."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.session

from cellcloud.control.configstore import SqliteConfigStore
from cellcloud.control.ecs import TARGET_PREFIX, Ecs
from cellcloud.core import messages as m
from cellcloud.core import pod
from cellcloud.core.limits import DEFAULT_LIMITS, Limits
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.logstore import LogStore
from cellcloud.frontend.store import SqliteFunctionStore
from cellcloud.frontend.tasks import TaskManager, TaskStore
from cellcloud.registry import core as regcore
from cellcloud.registry.storage import RegistryStore
from cellcloud.transport import OpError, RemoteError, TransportError

A, B = "111122223333", "444455556666"
REGION = "cc-local-1"
HOST = "127.0.0.1:8080"
MODEL = botocore.session.get_session().get_service_model("ecs")
ERRORS = {s.name for s in MODEL.error_shapes}
TASK_MEMBERS = set(MODEL.shape_for("Task").members)
CONTAINER_MEMBERS = set(MODEL.shape_for("Container").members)


class FakeAgent:
    """An agent's task ops, in memory (requests read and answers written with the typed
    messages of core/messages.py, as agent/tasks.py does). Containers run until stopped or
    told to exit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.layers: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.health_exit = 0
        self.down = False
        self.exit_on_start: dict[str, int] = {}  # container name -> exits at once with
        self.stop_gate: asyncio.Event | None = None  # set: task_container_stop waits on it
        self.full = False  # task_create answers AgentFull
        self.ip: str | None = None  # the tasks' privateIpv4 (None: 10.200.<n>.<k>)
        # CPU the tasks use (autoscaling): vCPUs busy per task, on this clock (None: none)
        self.clock: Callable[[], int] | None = None
        self.cpu_vcpus = 0.0

    async def call(self, op: str, body: Any, timeout_s: float) -> Any:
        self.calls.append((op, body))
        if self.down:
            raise TransportError("connection refused")
        if op == "image_blob":
            d = body["digest"]
            self.blobs[d] = self.blobs.get(d, b"") + body["data"]
            if body["last"]:
                assert regcore.sha256_digest(self.blobs[d]) == d
                self.layers.add(d)
            return {}
        if op == "task_create":
            req = m.TaskCreateRequest.from_wire(body)
            if self.full:
                raise RemoteError("AgentFull", "agent_tasks_max reached")
            for c in req.containers:
                for d in c.image_layers:
                    if d not in self.layers:
                        raise RemoteError("LayerMissing", f"push {d}", {"digest": d})
            self.tasks[req.task_id] = {
                "body": body, "logs": {c.name: [] for c in req.containers},
                "containers": {c.name: {"state": "pending", "exit_code": None,
                                        "started_ms": None, "exited_ms": None, "reason": ""}
                               for c in req.containers}}
            return m.TaskCreateReply(
                req.task_id, self.ip or f"10.200.{self.n}.{len(self.tasks) + 1}").to_wire()
        parse = {"task_container_start": m.TaskContainerRequest,
                 "task_container_stop": m.TaskContainerStopRequest, "task_exec": m.TaskExecRequest,
                 "task_poll": m.TaskPollRequest, "task_destroy": m.TaskDestroyRequest}[op]
        parse.from_wire(body)  # type: ignore[attr-defined]
        t = self.tasks.get(body["task_id"])
        if t is None and op == "task_destroy":
            return m.TaskDestroyReply(False).to_wire()  # idempotent, as the agent's
        if t is None:
            raise RemoteError("TaskNotFound", "no such task")
        if op == "task_container_start":
            c = t["containers"][body["container"]]
            c.update(state="running", started_ms=1)
            if body["container"] in self.exit_on_start:
                c.update(state="exited", exit_code=self.exit_on_start[body["container"]],
                         exited_ms=2)
            return m.TaskContainerStartReply(100).to_wire()
        if op == "task_container_stop":
            if self.stop_gate is not None:  # a container slow to stop (its grace period)
                await self.stop_gate.wait()
            c = t["containers"][body["container"]]
            t["logs"][body["container"]].append(f"{body['container']} got SIGTERM")
            if c["state"] == "running":
                c.update(state="exited", exit_code=143, exited_ms=3)
            return m.TaskContainerStopReply(c["exit_code"]).to_wire()
        if op == "task_exec":
            return m.TaskExecReply(self.health_exit).to_wire()
        if op == "task_poll":  # every line kept; those after the caller's cursor answered
            after = m.TaskPollRequest.from_wire(body).logs_after
            logs = t["logs"]
            if self.clock is not None:  # cumulative, as a cgroup's cpu.stat usage_usec
                now = self.clock()
                t["cpu_ns"] = t.get("cpu_ns", 0) + int(
                    self.cpu_vcpus * (now - t.get("cpu_ms", now)) * 1_000_000)
                t["cpu_ms"] = now
            return m.TaskPollReply(
                containers={n: m.TaskContainerState(**c) for n, c in t["containers"].items()},
                logs={n: tuple(m.TaskLogLine(7, text) for text in lines[after.get(n, 0):])
                      for n, lines in logs.items()},
                cursors={n: len(lines) for n, lines in logs.items()},
                cpu_usage_ns=t.get("cpu_ns", 0)).to_wire()
        if op == "task_destroy":
            del self.tasks[body["task_id"]]
            return m.TaskDestroyReply(True).to_wire()
        raise RemoteError("UnknownOp", op)

    def exit(self, task_id: str, name: str, code: int, reason: str = "") -> None:
        self.tasks[task_id]["containers"][name].update(state="exited", exit_code=code,
                                                        exited_ms=5, reason=reason)


class FakeFrontend:
    """The control plane's client to the tenant's cell: its ``registry`` HEAD and its
    ``ecs_tasks`` op (typed errors come back as the transport brings them: RemoteError)."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell

    async def call(self, op: str, req: dict[str, Any], timeout_s: float) -> Any:
        if op == "registry":
            reg = self.cell.catalog.registry
            assert reg is not None
            found = reg.resolve(req["a"], req["n"], req["r"]) is not None
            return {"s": 200 if found else 404, "h": {}, "b": b""}
        assert op == "ecs_tasks" and self.cell.tasks is not None
        try:
            return json.loads(json.dumps(await self.cell.tasks.op(req)))
        except OpError as e:
            raise RemoteError(e.type, e.message) from None


def push(reg: RegistryStore, account: str, repo: str, data: bytes) -> str:
    s = reg.upload_start(account, repo, 0)
    reg.upload_append(s, data, 0, 0)
    digest = regcore.sha256_digest(data)
    reg.upload_commit(s, digest, reg.upload_digest(s), 0)
    return digest


def push_image(reg: RegistryStore, account: str, repo: str, tag: str, layer: bytes) -> str:
    if reg.repo(account, repo) is None:
        reg.create_repo(account, repo)
    config = json.dumps({"config": {"Cmd": ["/bin/serve"], "Env": ["FROM_IMAGE=1"]}}).encode()
    cfg = push(reg, account, repo, config)
    ld = push(reg, account, repo, layer)
    body = json.dumps({"schemaVersion": 2, "mediaType": regcore.OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": cfg, "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                   "digest": ld, "size": len(layer)}]}).encode()
    reg.put_manifest(account, repo, tag, body, regcore.OCI_MANIFEST)
    return ld


class World:
    def __init__(self, tmp: Path, limits: Limits = DEFAULT_LIMITS,
                 memory_mb_max: int | None = None) -> None:
        self.tmp, self.limits, self.memory_mb_max = tmp, limits, memory_mb_max
        self.agents = {f"a{i}": FakeAgent(i) for i in range(3)}
        self.reg = RegistryStore(str(tmp / "registry"), limits)
        self.logstore = LogStore(str(tmp / "cell"), limits)
        self.web_layer = push_image(self.reg, A, "team/web", "v1", b"web layer bytes" * 50)
        self.side_layer = push_image(self.reg, A, "team/side", "v1", b"sidecar layer")
        push_image(self.reg, B, "other/app", "latest", b"b's layer")
        self.config = SqliteConfigStore(str(tmp / "config.db"))
        self.now = 1_800_000_000_000
        self.cell = self.make_cell()
        self.ecs = Ecs(self.config, REGION, lambda account: FakeFrontend(self.cell),  # type: ignore[arg-type,return-value]
                       clock=lambda: self.now, limits=limits)

    def make_cell(self) -> Cell:
        cell = Cell("c1", SqliteFunctionStore(str(self.tmp / "cell")),
                    {a: ("127.0.0.1", 1) for a in self.agents}, region=REGION,
                    limits=self.limits, shard_size=2)
        cell.agents = self.agents  # type: ignore[assignment]
        if self.memory_mb_max is not None:
            for a in self.agents:
                cell.placement.add_agent(a, 64, memory_mb_max=self.memory_mb_max)
        cell.catalog.registry = self.reg
        cell.logstore = self.logstore
        cell.tasks = TaskManager(cell, TaskStore(str(self.tmp / "cell")), self.limits)
        return cell

    async def call(self, op: str, doc: Any = None, account: str = A
                   ) -> tuple[int, str, dict[str, Any]]:
        r = await self.ecs.op({"target": TARGET_PREFIX + op,
                               "b": json.dumps(doc or {}).encode(), "a": account})
        out = json.loads(r["b"])
        if r["s"] != 200:
            assert r["h"]["x-amzn-errortype"] == out["__type"]
            return r["s"], out["__type"], out
        return 200, "", out

    async def ok(self, op: str, doc: Any = None, account: str = A) -> dict[str, Any]:
        status, err, out = await self.call(op, doc, account)
        assert status == 200, (err, out)
        return out

    async def err(self, op: str, doc: Any = None, account: str = A) -> tuple[str, str]:
        status, err, out = await self.call(op, doc, account)
        assert status in (400, 500), out
        assert err in ERRORS, err
        return err, out["message"]

    async def task(self, arn: str, cluster: str = "default") -> dict[str, Any]:
        d = await self.ok("DescribeTasks", {"cluster": cluster, "tasks": [arn],
                                            "include": ["TAGS"]})
        assert d["failures"] == [], d
        t: dict[str, Any] = d["tasks"][0]
        return t

    async def wait_for(self, what: str, cond: Callable[[], Awaitable[bool]]) -> None:
        """Until ``cond()`` holds (the task drivers run meanwhile); generous bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await cond():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def wait_status(self, arn: str, status: str, cluster: str = "default"
                          ) -> dict[str, Any]:
        async def reached() -> bool:
            return (await self.task(arn, cluster))["lastStatus"] == status
        await self.wait_for(f"{arn} {status}", reached)
        return await self.task(arn, cluster)

    def agent_of(self, task: dict[str, Any]) -> FakeAgent:
        task_id = task["taskArn"].rsplit("/", 1)[1]
        return next(a for a in self.agents.values() if task_id in a.tasks)


def two_containers(**web_extra: Any) -> dict[str, Any]:
    return {"family": "web", "networkMode": "awsvpc", "requiresCompatibilities": ["FARGATE"],
            "cpu": "256", "memory": "512", "containerDefinitions": [
                {"name": "web", "image": f"{HOST}/team/web:v1", "command": ["serve", "80"],
                 "environment": [{"name": "MODE", "value": "prod"}],
                 "portMappings": [{"containerPort": 8080}],
                 "logConfiguration": {"logDriver": "awslogs", "options": {
                     "awslogs-group": "/ecs/web", "awslogs-region": REGION,
                     "awslogs-stream-prefix": "ecs"}}, **web_extra},
                {"name": "side", "image": f"{HOST}/team/side:v1", "essential": False,
                 "dependsOn": [{"containerName": "web", "condition": "START"}]}]}


def run(world_args: dict[str, Any], body: Callable[[World], Awaitable[None]],
        tmp: Path) -> None:
    async def main() -> None:
        w = World(tmp, **world_args)
        try:
            await body(w)
        finally:
            assert w.cell.tasks is not None
            await w.cell.tasks.close()
    asyncio.run(main())


def test_run_describe_logs_stop(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        out = await w.ok("RunTask", {"taskDefinition": "web", "startedBy": "me",
                                     "tags": [{"key": "k", "value": "v"}]})
        assert out["failures"] == []
        (t,) = out["tasks"]
        assert set(t) <= TASK_MEMBERS
        task_id = t["taskArn"].rsplit("/", 1)[1]
        assert t["taskArn"] == f"arn:aws:ecs:{REGION}:{A}:task/default/{task_id}"
        assert t["lastStatus"] == "PROVISIONING" and t["desiredStatus"] == "RUNNING"
        assert t["launchType"] == "FARGATE" and t["group"] == "family:web"
        assert t["startedBy"] == "me" and t["cpu"] == "256" and t["memory"] == "512"
        assert t["taskDefinitionArn"] == f"arn:aws:ecs:{REGION}:{A}:task-definition/web:1"
        t = await w.wait_status(t["taskArn"], "RUNNING")
        assert set(t) <= TASK_MEMBERS
        agent = w.agent_of(t)
        # the layers were pushed to the agent that lacked them (it never pulls)
        assert {w.web_layer, w.side_layer} <= agent.layers
        create = next(b for op, b in agent.calls if op == "task_create")
        web = create["containers"][0]
        assert web["argv"] == ["serve", "80"]  # command replaces the image's CMD
        assert web["env"] == {"FROM_IMAGE": "1", "MODE": "prod"}
        assert web["port_mappings"] == [{"container_port": 8080, "protocol": "tcp"}]
        assert create["cpu_units"] == 256 and create["memory_mib"] == 512
        # the sidecar started after web (dependsOn START)
        starts = [b["container"] for op, b in agent.calls if op == "task_container_start"]
        assert starts == ["web", "side"]
        ip = agent.tasks[task_id]["body"] and t["containers"][0]["networkInterfaces"][0][
            "privateIpv4Address"]
        assert ip.startswith(f"10.200.{agent.n}.")
        for c in t["containers"]:
            assert set(c) <= CONTAINER_MEMBERS and c["lastStatus"] == "RUNNING"
            assert "exitCode" not in c
        (eni,) = t["attachments"]
        assert eni["type"] == "ElasticNetworkInterface" and eni["status"] == "ATTACHED"
        assert {"name": "privateIPv4Address", "value": ip} in eni["details"]
        assert t["tags"] == [{"key": "k", "value": "v"}] and t["connectivity"] == "CONNECTED"
        # the cluster counts it; a cluster with tasks cannot be deleted
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert (c["runningTasksCount"], c["pendingTasksCount"]) == (1, 0)
        assert (await w.err("DeleteCluster", {"cluster": "default"}))[0] \
            == "ClusterContainsTasksException"
        assert (await w.ok("ListTasks", {}))["taskArns"] == [t["taskArn"]]
        assert (await w.ok("ListTasks", {"family": "other"}))["taskArns"] == []
        assert (await w.ok("ListTasks", {"startedBy": "me"}))["taskArns"] == [t["taskArn"]]
        assert (await w.ok("ListTasks", {"desiredStatus": "STOPPED"}))["taskArns"] == []
        # awslogs output: group awslogs-group, stream <prefix>/<container>/<task id>
        agent.tasks[task_id]["logs"]["web"] += ["hello from web", "second line"]
        agent.tasks[task_id]["logs"]["side"] += ["side has no awslogs"]
        stream = f"ecs/web/{task_id}"

        async def logged() -> bool:
            return len(w.logstore.stream_events(A, "/ecs/web", stream, start=None, end=None,
                                                after_id=None, before_id=None, from_head=True,
                                                limit=10)) == 2
        await w.wait_for("logs", logged)
        events = w.logstore.stream_events(A, "/ecs/web", stream, start=None, end=None,
                                          after_id=None, before_id=None, from_head=True,
                                          limit=10)
        assert [e.message for e in events] == ["hello from web", "second line"]
        # a non-essential container's exit: its exit code, the task runs on
        agent.exit(task_id, "side", 3)

        async def side_exited() -> bool:
            return "exitCode" in (await w.task(t["taskArn"]))["containers"][1]
        await w.wait_for("side's exit", side_exited)
        t = await w.task(t["taskArn"])
        assert t["lastStatus"] == "RUNNING" and t["containers"][1]["exitCode"] == 3
        assert t["containers"][1]["lastStatus"] == "STOPPED"
        # StopTask: desired STOPPED at once, then STOPPED with UserInitiated
        s = (await w.ok("StopTask", {"task": t["taskArn"], "reason": "done"}))["task"]
        assert s["desiredStatus"] == "STOPPED"
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert t["stopCode"] == "UserInitiated" and t["stoppedReason"] == "done"
        assert t["containers"][0]["exitCode"] == 143 and "stoppedAt" in t
        assert t["attachments"][0]["status"] == "DELETED"
        assert task_id not in agent.tasks  # destroyed on its agent
        # its last line, written as it stopped, was filed before the task was destroyed
        events = w.logstore.stream_events(A, "/ecs/web", stream, start=None, end=None,
                                          after_id=None, before_id=None, from_head=True,
                                          limit=10)
        assert [e.message for e in events][-1] == "web got SIGTERM"
        assert (await w.ok("ListTasks", {}))["taskArns"] == []
        assert (await w.ok("ListTasks", {"desiredStatus": "STOPPED"}))["taskArns"] \
            == [t["taskArn"]]
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert (c["runningTasksCount"], c["pendingTasksCount"]) == (0, 0)
        assert (await w.ok("DeleteCluster", {"cluster": "default"}))["cluster"]["status"] \
            == "INACTIVE"
    run({}, body, tmp_path)


def test_a_stopping_task_keeps_its_cluster(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        await w.wait_status(t["taskArn"], "RUNNING")
        gate = asyncio.Event()
        for a in w.agents.values():
            a.stop_gate = gate
        await w.ok("StopTask", {"task": t["taskArn"]})
        await w.wait_status(t["taskArn"], "STOPPING")
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert (c["runningTasksCount"], c["pendingTasksCount"]) == (0, 0)
        assert (await w.err("DeleteCluster", {"cluster": "default"}))[0] \
            == "ClusterContainsTasksException"
        gate.set()
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert t["containers"][0]["exitCode"] == 143
        await w.ok("DeleteCluster", {"cluster": "default"})
    run({}, body, tmp_path)


def test_an_essential_container_that_exits_at_once_stops_the_task_clearly(
        tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {"clusterName": "prod"})
        await w.ok("RegisterTaskDefinition", two_containers())
        for a in w.agents.values():
            a.exit_on_start["web"] = 1
        (t,) = (await w.ok("RunTask", {"cluster": "prod", "taskDefinition": "web:1"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "STOPPED", "prod")
        assert t["stopCode"] == "EssentialContainerExited"
        assert t["stoppedReason"] == "Essential container in task exited (web: exit code 1)"
        assert t["containers"][0]["exitCode"] == 1
        # started once, no restart loop (ECS does not restart a task's containers)
        starts = [b for a in w.agents.values() for op, b in a.calls
                  if op == "task_container_start" and b["container"] == "web"]
        assert len(starts) == 1
    run({}, body, tmp_path)


def test_no_room_is_a_failure_entry(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        # 2 agents in the cluster's shard, 1024 MiB each: four tasks of 512 MiB fit
        out = await w.ok("RunTask", {"taskDefinition": "web", "count": 5})
        assert len(out["tasks"]) == 4
        assert [f["reason"] for f in out["failures"]] == ["RESOURCE:MEMORY"]
        assert out["failures"][0]["arn"].endswith(":task-definition/web:1")
        used = {w.agent_of(t).n for t in [await w.wait_status(x["taskArn"], "RUNNING")
                                          for x in out["tasks"]]}
        assert len(used) == 2  # spread over the shard, never outside it
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert c["runningTasksCount"] == 4
        # a stopped task frees its room
        await w.ok("StopTask", {"task": out["tasks"][0]["taskArn"]})
        await w.wait_status(out["tasks"][0]["taskArn"], "STOPPED")
        again = await w.ok("RunTask", {"taskDefinition": "web"})
        assert len(again["tasks"]) == 1 and again["failures"] == []
    run({"memory_mb_max": 1024}, body, tmp_path)


def test_a_full_agent_sends_the_task_to_another_of_its_shard(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        assert w.cell.tasks is not None
        shard = w.cell.shard_of(f"{A}/ecs/default")
        w.agents[shard[0]].full = w.agents[shard[1]].full = True
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "STOPPED")  # every agent of its shard is full
        assert t["stopCode"] == "TaskFailedToStart"
        assert "AgentFull" in t["stoppedReason"]
        assert w.cell.placement.task_agent == {}
        w.agents[shard[1]].full = False
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        assert w.agent_of(t) is w.agents[shard[1]]
        outside = set(w.agents) - set(shard)
        assert not any(op == "task_create" for a in outside for op, _ in w.agents[a].calls)
    run({}, body, tmp_path)


def test_cpu_is_counted_too(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        out = await w.ok("RunTask", {"taskDefinition": "web", "count": 3})
        assert len(out["tasks"]) == 2
        assert [f["reason"] for f in out["failures"]] == ["RESOURCE:CPU"]
        # the tenant's task cap counts tasks not yet STOPPED
        assert (await w.err("RunTask", {"taskDefinition": "web", "count": 2}))[0] \
            == "LimitExceededException"
        # their layers are held against the registry's collection while they run
        await w.wait_status(out["tasks"][0]["taskArn"], "RUNNING")
        await w.wait_status(out["tasks"][1]["taskArn"], "RUNNING")
        assert w.cell.tasks is not None
        assert w.cell.tasks.held_layers(A) == {w.web_layer, w.side_layer}
        assert w.cell.tasks.held_layers(B) == set()
    run({"limits": replace(DEFAULT_LIMITS, ecs_task_cpu_units_per_agent_max=256,
                           ecs_tasks_per_tenant_max=3)}, body, tmp_path)


def test_a_restarted_frontend_describes_and_drives_its_tasks(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        (stopped,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        await w.wait_status(stopped["taskArn"], "RUNNING")
        await w.ok("StopTask", {"task": stopped["taskArn"]})
        await w.wait_status(stopped["taskArn"], "STOPPED")
        task_id = t["taskArn"].rsplit("/", 1)[1]
        stream = f"ecs/web/{task_id}"

        def lines() -> list[str]:
            return [e.message for e in w.logstore.stream_events(
                A, "/ecs/web", stream, start=None, end=None, after_id=None, before_id=None,
                from_head=True, limit=10)]

        async def filed(n: int) -> bool:
            return len(lines()) >= n
        w.agent_of(t).tasks[task_id]["logs"]["web"].append("before the restart")
        await w.wait_for("a line", lambda: filed(1))
        assert w.cell.tasks is not None
        await w.cell.tasks.close()  # the process ends; the task goes on on its agent
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        again = await w.task(t["taskArn"])
        assert again["lastStatus"] == "RUNNING"
        assert again["containers"] == t["containers"]
        assert (await w.task(stopped["taskArn"]))["stopCode"] == "UserInitiated"
        assert w.cell.placement.task_agent == {t["taskArn"].rsplit("/", 1)[1]:
                                               f"a{w.agent_of(t).n}"}
        # its log cursor was kept: the new process files only new lines
        w.agent_of(t).tasks[task_id]["logs"]["web"].append("after the restart")
        await w.wait_for("a second line", lambda: filed(2))
        assert lines() == ["before the restart", "after the restart"]
        # still driven: the essential container's exit stops it
        w.agent_of(t).exit(task_id, "web", 0)
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert t["stopCode"] == "EssentialContainerExited" and t["containers"][0]["exitCode"] == 0
    run({}, body, tmp_path)


def test_the_agents_exit_reason_names_an_out_of_memory_kill(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        oom = "OutOfMemoryError: Container killed due to memory usage"
        w.agent_of(t).exit(t["taskArn"].rsplit("/", 1)[1], "web", 137, oom)
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert t["stoppedReason"] == f"Essential container in task exited (web: {oom})"
        assert (t["containers"][0]["exitCode"], t["containers"][0]["reason"]) == (137, oom)
    run({}, body, tmp_path)


def test_a_lost_host_stops_its_tasks(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        w.agent_of(t).tasks.clear()  # the host lost it (rebooted)
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert "no longer has it" in t["stoppedReason"]
        assert t["stopCode"] == "EssentialContainerExited"
    run({}, body, tmp_path)


def test_health_checks_run_on_the_agent(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers(healthCheck={
            "command": ["CMD-SHELL", "curl -f http://localhost:8080/ || exit 1"],
            "interval": 5, "retries": 1}))
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        await w.wait_status(t["taskArn"], "RUNNING")

        async def healthy() -> bool:
            return (await w.task(t["taskArn"]))["healthStatus"] == "HEALTHY"
        await w.wait_for("healthy", healthy)
        probe = next(b for a in w.agents.values() for op, b in a.calls if op == "task_exec")
        assert probe["command"] == ["/bin/sh", "-c", "curl -f http://localhost:8080/ || exit 1"]
        assert (await w.task(t["taskArn"]))["containers"][0]["healthStatus"] == "HEALTHY"
    run({}, body, tmp_path)


def test_overrides_idempotency_and_errors(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        assert (await w.err("RunTask", {"taskDefinition": "web"}))[0] \
            == "ClusterNotFoundException"
        await w.ok("CreateCluster", {})
        assert await w.err("RunTask", {"taskDefinition": "web"}) \
            == ("ClientException", "TaskDefinition not found.")
        await w.ok("RegisterTaskDefinition", two_containers())
        for doc, message in [
            ({"launchType": "EC2"}, "launchType EC2 is not supported"),
            ({"count": 11}, "count must be an integer from 1 to 10"),
            ({"networkConfiguration": {"awsvpcConfiguration": {"subnets": []}}},
             "subnets can not be empty."),
            ({"placementStrategy": [{"type": "random"}]}, "placementStrategy is not supported"),
            ({"overrides": {"cpu": "512"}}, "overrides.cpu is not supported"),
            ({"overrides": {"containerOverrides": [{"name": "web", "memory": 5}]}},
             "overrides.containerOverrides[].memory is not supported"),
            ({"overrides": {"containerOverrides": [{"name": "nope"}]}},
             "Override for container named nope is not a container in the TaskDefinition."),
        ]:
            err, msg = await w.err("RunTask", {"taskDefinition": "web", **doc})
            assert err == "InvalidParameterException" and msg.startswith(message), (doc, msg)
        # overrides reach the container; a retried request (same clientToken) starts nothing
        req = {"taskDefinition": "web", "clientToken": "tok-1", "overrides": {
            "containerOverrides": [{"name": "web", "command": ["other"],
                                    "environment": [{"name": "MODE", "value": "dev"}]}]}}
        (t,) = (await w.ok("RunTask", req))["tasks"]
        (t2,) = (await w.ok("RunTask", req))["tasks"]
        assert t2["taskArn"] == t["taskArn"]
        assert t["overrides"]["containerOverrides"][0]["command"] == ["other"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        creates = [b for a in w.agents.values() for op, b in a.calls if op == "task_create"]
        assert {b["task_id"] for b in creates} == {t["taskArn"].rsplit("/", 1)[1]}
        assert creates[0]["containers"][0]["argv"] == ["other"]
        assert creates[0]["containers"][0]["env"]["MODE"] == "dev"
        # another account sees nothing of it
        await w.ok("CreateCluster", {}, account=B)
        d = await w.ok("DescribeTasks", {"tasks": [t["taskArn"]]}, account=B)
        assert d["tasks"] == [] and d["failures"][0]["reason"] == "MISSING"
        assert (await w.ok("ListTasks", {}, account=B))["taskArns"] == []
        assert await w.err("StopTask", {"task": t["taskArn"]}, account=B) \
            == ("InvalidParameterException", "The referenced task was not found.")
        missing = f"arn:aws:ecs:{REGION}:{A}:task/default/{'0' * 32}"
        d = await w.ok("DescribeTasks", {"tasks": [missing]})
        assert d["failures"] == [{"arn": missing, "reason": "MISSING"}]
        assert (await w.err("ListTasks", {"serviceName": "s"}))[0] == "ServiceNotFoundException"
        # what a definition may say that a task cannot honour yet: refused by name
        for extra, message in (({"user": "1000"}, "user is not supported"),
                               ({"logConfiguration": {"logDriver": "splunk"}},
                                "log driver splunk is not supported"),
                               ({"logConfiguration": {"logDriver": "awslogs"}},
                                "needs the awslogs-group option")):
            await w.ok("RegisterTaskDefinition", {**two_containers(**extra), "family": "odd"})
            err, msg = await w.err("RunTask", {"taskDefinition": "odd"})
            assert err == "ClientException" and message in msg, msg
        # an INACTIVE revision runs no new task
        await w.ok("DeregisterTaskDefinition", {"taskDefinition": "web:1"})
        assert await w.err("RunTask", {"taskDefinition": "web:1"}) \
            == ("ClientException", "TaskDefinition is inactive")
    run({}, body, tmp_path)


def test_awsvpc_network_configuration_is_echoed_and_sets_the_tasks_egress(
        tmp_path: Path) -> None:
    """networkConfiguration.awsvpcConfiguration as Fargate scripts pass it: the subnet is
    the ENI's subnetId, assignPublicIp ENABLED asks the agent for egress, DISABLED (ECS's
    default) for an address without egress, none given: the agent's policy; bad shapes are
    refused by name. (The network itself: tests/network/test_task_network.py.)"""
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        modes = {}
        for public in ("ENABLED", "DISABLED", None):
            cfg: dict[str, Any] = {"subnets": ["subnet-0abc1234", "subnet-0def5678"],
                                   "securityGroups": ["sg-0123abcd"]}
            if public:
                cfg["assignPublicIp"] = public
            (t,) = (await w.ok("RunTask", {"taskDefinition": "web", "networkConfiguration": {
                "awsvpcConfiguration": cfg}}))["tasks"]
            t = await w.wait_status(t["taskArn"], "RUNNING")
            details = {d["name"]: d["value"] for d in t["attachments"][0]["details"]}
            assert details["subnetId"] == "subnet-0abc1234"
            create = next(b for op, b in w.agent_of(t).calls if op == "task_create"
                          and b["task_id"] == t["taskArn"].rsplit("/", 1)[1])
            modes[public] = create["network"]
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        details = {d["name"]: d["value"] for d in t["attachments"][0]["details"]}
        assert details["subnetId"] == "subnet-cellcloud-c1"
        create = next(b for op, b in w.agent_of(t).calls if op == "task_create"
                      and b["task_id"] == t["taskArn"].rsplit("/", 1)[1])
        assert modes == {"ENABLED": "egress", "DISABLED": "private", None: "private"}
        assert create["network"] == ""
        for cfg, message in [
            ({"subnets": ["subnet-1"], "assignPublicIp": "YES"},
             "assignPublicIp must be ENABLED or DISABLED"),
            ({"securityGroups": ["sg-1"]}, "subnets can not be empty."),
            ({"subnets": ["vpc-1"]}, "Error retrieving subnet information for 'vpc-1'"),
            ({"subnets": ["subnet-1"], "securityGroups": ["allow:0.0.0.0/0:80"]},
             "Error retrieving security group information"),
            ({"subnets": [f"subnet-{i}" for i in range(17)]}, "subnets can have at most 16"),
            ({"subnets": ["subnet-1"], "securityGroups": [f"sg-{i}" for i in range(6)]},
             "securityGroups can have at most 5"),
        ]:
            err, msg = await w.err("RunTask", {"taskDefinition": "web", "networkConfiguration":
                                               {"awsvpcConfiguration": cfg}})
            assert err == "InvalidParameterException" and msg.startswith(message), (cfg, msg)
        assert await w.err("RunTask", {"taskDefinition": "web", "networkConfiguration": {
            "awsvpcConfiguration": {"subnets": ["subnet-1"]}, "other": 1}}) \
            == ("InvalidParameterException", "networkConfiguration is {awsvpcConfiguration: "
                "{subnets, securityGroups, assignPublicIp}}")
    run({}, body, tmp_path)


def test_an_image_deleted_since_registration_fails_the_task_to_start(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        for d in w.reg.manifest_digests(A, "team/side"):
            w.reg.delete_manifest(A, "team/side", d)
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "STOPPED")
        assert t["stopCode"] == "TaskFailedToStart"
        assert t["stoppedReason"].startswith("CannotPullContainerError: ")
        assert not any(op == "task_create" for a in w.agents.values() for op, _ in a.calls)
    run({}, body, tmp_path)


def test_task_records_survive_in_the_cell_store(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path))
    assert store.unfinished() == [] and store.counts(A, "default") == {
        "running": 0, "pending": 0, "stopping": 0}
    assert os.path.exists(tmp_path / "tasks.db")


def test_a_pods_restart_policy_restarts_with_crash_loop_backoff(tmp_path: Path) -> None:
    """A Pod's restartPolicy travels as a RunTask tag (core/pod.py); the cell's task core gets
    it (without it the crashing container stopped the task, as for any ECS task above)."""
    async def body(w: World) -> None:
        assert w.cell.tasks is not None
        clock = [w.now]
        w.cell.tasks.now_ms = lambda: clock[0]
        await w.ok("CreateCluster", {"clusterName": "default"})
        await w.ok("RegisterTaskDefinition", two_containers())
        for a in w.agents.values():
            a.exit_on_start["web"] = 1
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web:1", "tags": [
            {"key": pod.RESTART_POLICY_TAG, "value": "Always"}]}))["tasks"]

        def starts() -> int:
            return sum(1 for a in w.agents.values() for op, b in a.calls
                       if op == "task_container_start" and b["container"] == "web")

        async def backing_off() -> bool:
            c = (await w.task(t["taskArn"]))["containers"][0]
            return str(c.get("reason", "")).startswith("CrashLoopBackOff")
        await w.wait_for("the first crash", backing_off)
        assert starts() == 1 and (await w.task(t["taskArn"]))["lastStatus"] != "STOPPED"
        clock[0] += 10_000  # the first backoff
        await w.wait_for("the restart", lambda: asyncio.sleep(0, starts() == 2))
        await w.wait_for("the second crash", backing_off)
        assert "restarting in 20 s" in (await w.task(t["taskArn"]))["containers"][0]["reason"]
        await w.ok("StopTask", {"task": t["taskArn"]})
        await w.wait_status(t["taskArn"], "STOPPED")
    run({}, body, tmp_path)


def test_a_tenant_with_tasks_is_not_migrated(tmp_path: Path) -> None:
    """Tasks do not move between cells yet: the export refuses (the migration aborts before
    the flip), rather than leaving them running in a cell that no longer serves the tenant."""
    from cellcloud.frontend.clone import CloneError, export_tenant

    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers())
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        try:
            export_tenant(w.cell, A)
            raise AssertionError("exported a tenant with a running task")
        except CloneError as e:
            assert "1 ECS tasks not yet STOPPED" in str(e)
        assert export_tenant(w.cell, B)["functions"] == []  # another tenant moves
        await w.ok("StopTask", {"task": t["taskArn"]})
        await w.wait_status(t["taskArn"], "STOPPED")
        export_tenant(w.cell, A)
    run({}, body, tmp_path)


def test_a_containers_own_limits_reach_the_agent(tmp_path: Path) -> None:
    """Issue #17: a container's cpu, memory and memoryReservation are sent with task_create
    (the agent enforces them in the container's own cgroup); a container without them gets
    none of its own."""
    async def body(w: World) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", two_containers(
            cpu=128, memory=256, memoryReservation=64))
        (t,) = (await w.ok("RunTask", {"taskDefinition": "web"}))["tasks"]
        t = await w.wait_status(t["taskArn"], "RUNNING")
        create = next(b for op, b in w.agent_of(t).calls if op == "task_create")
        web, side = (m.TaskContainer.from_wire(c) for c in create["containers"])
        assert (web.cpu_units, web.memory_mib, web.memory_reservation_mib) == (128, 256, 64)
        assert (side.cpu_units, side.memory_mib, side.memory_reservation_mib) == (0, 0, 0)
        # a non-essential container killed over its own limit: the task runs on
        oom = "OutOfMemoryError: Container killed due to memory usage"
        w.agent_of(t).exit(t["taskArn"].rsplit("/", 1)[1], "side", 137, oom)

        async def side_exited() -> bool:
            return "exitCode" in (await w.task(t["taskArn"]))["containers"][1]
        await w.wait_for("side's exit", side_exited)
        t = await w.task(t["taskArn"])
        assert t["lastStatus"] == "RUNNING"
        assert (t["containers"][1]["exitCode"], t["containers"][1]["reason"]) == (137, oom)
    run({}, body, tmp_path)
