"""ECS tasks in a cell (issue #17, docs/fargate.md): the task manager behind RunTask, StopTask,
DescribeTasks and ListTasks, which the control plane's ECS shell (control/ecs.py) forwards to
the tenant's cell through the frontend's ``ecs_tasks`` op.

Each task is placed on one agent of its cluster's shuffle shard (the cell's sharder, key
``<account>/ecs/<cluster>``; core/placement.py's ``place_task`` counts its memory and cpu),
provisioned there with ``task_create`` (the containers' image layers pushed when the agent
answers ``LayerMissing``, as for image functions: agents never pull), and driven by one
``core/ecs_tasks.Task``: its instructions become agent ops (``task_container_start``,
``task_container_stop``, ``task_exec`` for health checks, ``task_destroy``), and what the agent
reports (``task_poll``: container states, exit codes, logs) and the time passed (``Tick``) go
back in as stimuli. A Pod's restart policy (its task's ``cellcloud.pod/restartPolicy`` tag,
core/pod.py) is the core's ``restart_policy``; other tasks are never restarted. Containers'
``awslogs`` output is filed in the cell's log store (group
``awslogs-group``, stream ``<awslogs-stream-prefix>/<container>/<task id>``).

Every task's record (the request, its placement, the core's snapshot) is kept in
``<state>/tasks.db`` and rewritten at each change, so a restarted frontend still describes its
tasks and goes on driving the ones that were PENDING, RUNNING or STOPPING (a task still
PROVISIONING then is stopped: whether its environment was made is not known); STOPPED tasks
are described for ``ecs_stopped_task_retention_ms``, then forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core import ecs_taskdef as td
from ..core import ecs_tasks as et
from ..core import messages as m
from ..core import pod
from ..core.ecs_taskdef import EcsError
from ..core.ecs_volumes import task_mounts
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.placement import NoRoom
from ..transport import Client, OpError, RemoteError, TransportError
from . import image_functions

if TYPE_CHECKING:
    from .cell import Cell

log = logging.getLogger("cellcloud.frontend.tasks")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, account TEXT NOT NULL, cluster TEXT NOT NULL,
    family TEXT NOT NULL, started_by TEXT NOT NULL, desired TEXT NOT NULL,
    last_status TEXT NOT NULL, created_ms INTEGER NOT NULL, stopped_ms INTEGER,
    doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_cluster ON tasks (account, cluster, created_ms);
CREATE TABLE IF NOT EXISTS run_tokens (
    account TEXT NOT NULL, token TEXT NOT NULL, created_ms INTEGER NOT NULL,
    answer TEXT NOT NULL, PRIMARY KEY (account, token));
"""
_CONTAINER_KEYS = td.CONTAINER_FIELDS
_TASK_KEYS = td.TASK_FIELDS - {"tags"}
_layer_pushes_max = 2  # per layer and create: once, and once more if the agent forgot it
_FULL = frozenset({"AgentFull", "HostMemoryExhausted"})  # task_create: try another agent


class TaskStore:
    """The cell's task records (SQLite, WAL): one row per task, its JSON record in ``doc``."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(state_dir, "tasks.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def put(self, rec: dict[str, Any]) -> None:
        core = rec["core"]
        self.db.execute(
            "INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?)",
            (rec["id"], rec["account"], rec["cluster"], rec["family"], rec["started_by"],
             core["desired_status"], core["last_status"], rec["created_ms"],
             core["stopped_ms"], json.dumps(rec)))

    def get(self, account: str, task_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT doc FROM tasks WHERE account=? AND task_id=?",
                              (account, task_id)).fetchone()
        return json.loads(row[0]) if row else None

    def ids(self, account: str, cluster: str, *, family: str | None, started_by: str | None,
            desired: str, service: str | None = None) -> list[str]:
        q = "SELECT task_id FROM tasks WHERE account=? AND cluster=? AND desired=?"
        args: list[Any] = [account, cluster, desired]
        if service is not None:  # a service's tasks: group service:<name> (frontend/services)
            q += " AND json_extract(doc, '$.group')=?"
            args.append(f"service:{service}")
        if family is not None:
            q += " AND family=?"
            args.append(family)
        if started_by is not None:
            q += " AND started_by=?"
            args.append(started_by)
        return [r[0] for r in self.db.execute(q + " ORDER BY created_ms, task_id", args)]

    def counts(self, account: str, cluster: str) -> dict[str, int]:
        """Tasks not STOPPED: ``running`` (RUNNING), ``pending`` (PROVISIONING, PENDING) and
        ``stopping`` (STOPPING; a cluster with any of them is not empty)."""
        out = {"running": 0, "pending": 0, "stopping": 0}
        names = {"RUNNING": "running", "STOPPING": "stopping"}
        for status, n in self.db.execute(
                "SELECT last_status, count(*) FROM tasks WHERE account=? AND cluster=? "
                "AND last_status != 'STOPPED' GROUP BY last_status", (account, cluster)):
            out[names.get(status, "pending")] += n
        return out

    def active_count(self, account: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM tasks WHERE account=? AND "
                                   "last_status != 'STOPPED'", (account,)).fetchone()[0])

    def unfinished(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.db.execute(
            "SELECT doc FROM tasks WHERE last_status != 'STOPPED' ORDER BY created_ms")]

    def forget_stopped(self, before_ms: int) -> int:
        self.db.execute("DELETE FROM run_tokens WHERE created_ms < ?", (before_ms,))
        return self.db.execute("DELETE FROM tasks WHERE last_status = 'STOPPED' AND "
                               "stopped_ms < ?", (before_ms,)).rowcount

    def token(self, account: str, token: str) -> dict[str, Any] | None:
        """A RunTask's answer by its clientToken: {cluster, ids, failures}."""
        row = self.db.execute("SELECT answer FROM run_tokens WHERE account=? AND token=?",
                              (account, token)).fetchone()
        return json.loads(row[0]) if row else None

    def put_token(self, account: str, token: str, now_ms: int, answer: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO run_tokens VALUES (?,?,?,?)",
                        (account, token, now_ms, json.dumps(answer)))

    def close(self) -> None:
        self.db.close()


@dataclass
class Live:
    """A task this process drives: its record, its core, and what is in flight for it."""
    rec: dict[str, Any]
    task: et.Task
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # container -> resolved
    cursors: dict[str, Any] = field(default_factory=dict)
    poll_failures: int = 0
    # CPU (autoscaling's ECSServiceAverageCPUUtilization): the last poll's (ms, cpu_usage_ns)
    # and the percent of the task's cpu units used between the last two polls
    cpu_sample: tuple[int, int] | None = None
    cpu_percent: float | None = None
    runs: set[asyncio.Task[None]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _err(type_: str, message: str) -> OpError:
    return OpError(type_, message)


def task_definition_of(desc: dict[str, Any], overrides: list[dict[str, Any]]
                       ) -> tuple[td.TaskDefinition, dict[str, Any]]:
    """The core's TaskDefinition of a registered revision (DescribeTaskDefinition's shape)
    with RunTask's ``containerOverrides`` applied (command, environment), and the request
    document it was validated from."""
    names = [c.get("name") for c in desc.get("containerDefinitions") or []]
    by_name: dict[str, dict[str, Any]] = {}
    for o in overrides:
        if o["name"] not in names:
            raise EcsError("InvalidParameterException",
                           f"Override for container named {o['name']} is not a container in "
                           "the TaskDefinition.")
        by_name[o["name"]] = o
    containers = []
    for c in desc["containerDefinitions"]:
        doc = {k: v for k, v in c.items() if k in _CONTAINER_KEYS}
        over = by_name.get(c["name"])
        if over is not None:
            if "command" in over:
                doc["command"] = list(over["command"])
            if "environment" in over:
                env = {e["name"]: e.get("value", "") for e in doc.get("environment") or []}
                env.update({e["name"]: e.get("value", "") for e in over["environment"]})
                doc["environment"] = [{"name": k, "value": v} for k, v in env.items()]
        containers.append(doc)
    doc = {k: v for k, v in desc.items() if k in _TASK_KEYS}
    doc["containerDefinitions"] = containers
    return td.validate_task_definition(doc), doc


def check_runnable(task_def: td.TaskDefinition) -> None:
    """What a registered definition may say that a task here cannot honour yet: refused by
    name at RunTask (ClientException), never run without it."""
    for c in task_def.containers:
        if c.user:
            raise EcsError("ClientException", f"Container {c.name}: user is not supported for "
                           "tasks by cellcloud yet (each container runs as its own "
                           "unprivileged uid)")
        if c.log_driver and c.log_driver != "awslogs":
            raise EcsError("ClientException", f"Container {c.name}: log driver "
                           f"{c.log_driver} is not supported for tasks by cellcloud (awslogs "
                           "only)")
        if c.log_driver == "awslogs" and not dict(c.log_options).get("awslogs-group"):
            raise EcsError("ClientException", f"Container {c.name}: the awslogs log driver "
                           "needs the awslogs-group option")


def network_mode(rec: dict[str, Any]) -> str:
    """The agent's network setting for a task (``TaskCreateRequest.network``): its
    ``assignPublicIp`` ENABLED is egress under the region's policy, DISABLED an address the
    host reaches and no egress ("private"); no ``networkConfiguration``: the agent's policy."""
    awsvpc = (rec.get("network_configuration") or {}).get("awsvpcConfiguration")
    if not awsvpc:
        return ""
    return "egress" if awsvpc.get("assignPublicIp") == "ENABLED" else "private"


def _argv(spec: td.Container, image: dict[str, Any]) -> list[str]:
    """Docker's rule: the definition's entryPoint replaces the image's (and drops its CMD);
    its command replaces the image's CMD."""
    entry = list(spec.entry_point) or list(image.get("entrypoint") or [])
    cmd = list(spec.command) or ([] if spec.entry_point else list(image.get("cmd") or []))
    return entry + cmd


def _probe_argv(command: tuple[str, ...]) -> list[str]:
    """A healthCheck ``command``: ["CMD-SHELL", "…"] runs in /bin/sh -c, ["CMD", argv…] as
    is (ECS's forms)."""
    if command and command[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(command[1:])]
    if command and command[0] == "CMD":
        return list(command[1:])
    return list(command)


class TaskManager:
    """The ``ecs_tasks`` op of one cell frontend."""

    def __init__(self, cell: Cell, store: TaskStore, limits: Limits = DEFAULT_LIMITS,
                 now_ms: Callable[[], int] | None = None) -> None:
        self.cell = cell
        self.store = store
        self.limits = limits
        self.now_ms = now_ms or cell.invoker.now_ms
        self.live: dict[str, Live] = {}
        self.counters = {"run": 0, "placement_failures": 0, "layers_pushed": 0,
                         "polls_failed": 0, "lost": 0}
        from .services import ServiceManager  # (it imports this module's helpers)
        self.services = ServiceManager(self)

    # -- the op --------------------------------------------------------------------------------
    async def op(self, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("a"), str):
            raise _err("InvalidRequest", "ecs_tasks takes {a, op, …}")
        account, what = body["a"], body.get("op")
        self.sweep()
        try:
            if what == "run":
                return await self.run(account, body)
            if what == "stop":
                return self.stop(account, str(body["cluster"]), str(body["task"]),
                                 str(body.get("reason") or ""))
            if what == "describe":
                return self.describe(account, str(body["cluster"]), list(body["tasks"]),
                                     bool(body.get("tags")))
            if what == "list":
                if body.get("service") is not None and (account, str(body["cluster"]), str(
                        body["service"])) not in self.services.services:
                    raise EcsError("ServiceNotFoundException", "Service not found.")
                return {"taskIds": self.store.ids(
                    account, str(body["cluster"]), family=body.get("family"),
                    started_by=body.get("started_by"),
                    desired=str(body.get("desired") or "RUNNING"),
                    service=body.get("service"))}
            if what == "counts":
                return {**self.store.counts(account, str(body["cluster"])),
                        "services": self.services.count(account, str(body["cluster"]))}
            if isinstance(what, str) and what.startswith("service_"):
                return self.services.op(account, what, body)
        except EcsError as e:
            raise _err(e.type, e.message) from None
        raise _err("InvalidRequest", f"unknown ecs_tasks op {str(what)[:40]!r}")

    def statistics(self) -> dict[str, Any]:
        return {"live": len(self.live), **self.counters,
                "services": len(self.services.services),
                **{f"service_{k}": v for k, v in self.services.counters.items()}}

    # -- ARNs and the DescribeTasks view ---------------------------------------------------------
    def task_arn(self, rec: dict[str, Any]) -> str:
        return (f"arn:aws:ecs:{self.cell.region}:{rec['account']}:task/{rec['cluster']}/"
                f"{rec['id']}")

    def view(self, rec: dict[str, Any], tags: bool = True) -> dict[str, Any]:
        """A task as ECS's ``Task`` shape has it."""
        core, region, account = rec["core"], self.cell.region, rec["account"]
        arn = self.task_arn(rec)
        ip = rec.get("private_ipv4") or ""
        attached = core["last_status"] != "PROVISIONING" or bool(ip)
        eni = {"attachmentId": rec["attachment_id"]}
        if ip:
            eni["privateIpv4Address"] = ip
        health_of = {c["name"]: c for c in rec["def_doc"]["containerDefinitions"]}
        containers = []
        for c in rec["def_doc"]["containerDefinitions"]:
            st = core["containers"].get(c["name"]) or {}
            out: dict[str, Any] = {
                "containerArn": f"arn:aws:ecs:{region}:{account}:container/{rec['cluster']}/"
                                f"{rec['id']}/{rec['container_ids'][c['name']]}",
                "taskArn": arn, "name": c["name"], "image": c["image"],
                "lastStatus": st.get("status", "PENDING"),
                "networkInterfaces": [eni] if attached else [],
                "cpu": str(c.get("cpu", 0)), "networkBindings": [],
            }
            if rec.get("image_digests", {}).get(c["name"]):
                out["imageDigest"] = rec["image_digests"][c["name"]]
            if st.get("exit_code") is not None and st.get("status") == "STOPPED":
                out["exitCode"] = st["exit_code"]
            if st.get("reason"):  # a stopped container's, or a restart's backoff (a Pod's)
                out["reason"] = st["reason"]
            if health_of[c["name"]].get("healthCheck"):
                out["healthStatus"] = st.get("health", "UNKNOWN")
            if c.get("memory"):
                out["memory"] = str(c["memory"])
            containers.append(out)
        status = ("DELETED" if core["last_status"] == "STOPPED" else
                  "ATTACHED" if attached else "PRECREATED")
        awsvpc = (rec.get("network_configuration") or {}).get("awsvpcConfiguration") or {}
        subnet = (awsvpc.get("subnets") or [f"subnet-cellcloud-{self.cell.cell_id}"])[0]
        details = [{"name": "subnetId", "value": subnet},
                   {"name": "networkInterfaceId", "value": rec["eni_id"]},
                   {"name": "privateDnsName", "value": rec["hostname"]}]
        if ip:
            details.append({"name": "privateIPv4Address", "value": ip})
        doc: dict[str, Any] = {
            "taskArn": arn,
            "clusterArn": f"arn:aws:ecs:{region}:{account}:cluster/{rec['cluster']}",
            "taskDefinitionArn": rec["task_definition_arn"],
            "lastStatus": core["last_status"], "desiredStatus": core["desired_status"],
            "launchType": "FARGATE", "platformVersion": "1.4.0", "platformFamily": "Linux",
            "cpu": str(rec["cpu"]), "memory": str(rec["memory"]),
            "containers": containers, "createdAt": rec["created_ms"] / 1000,
            "group": rec["group"], "version": rec["version"],
            "availabilityZone": f"{region}a", "ephemeralStorage": {"sizeInGiB": 20},
            "overrides": {"containerOverrides": rec["overrides"],
                          "inferenceAcceleratorOverrides": []},
            "attachments": [{"id": rec["attachment_id"], "type": "ElasticNetworkInterface",
                             "status": status, "details": details}],
            "healthStatus": rec.get("health_status", "UNKNOWN"),
        }
        for v in rec.get("volumes") or []:  # a managed volume, as ECS shows it
            doc["attachments"].append({
                "id": f"{rec['attachment_id'][:24]}{v['volumeId'][-12:]}",
                "type": "AmazonElasticBlockStorage",
                "status": "DETACHED" if rec.get("volumes_detached") else "ATTACHED",
                "details": [{"name": k, "value": str(v[src])} for k, src in (
                    ("roleArn", "roleArn"), ("volumeName", "name"), ("volumeId", "volumeId"),
                    ("volumeSizeInGiB", "sizeInGiB"), ("volumeType", "volumeType"),
                    ("filesystemType", "filesystemType"),
                    ("deleteOnTermination", "deleteOnTermination"))]})
        if rec["started_by"]:
            doc["startedBy"] = rec["started_by"]
        if attached:
            doc["connectivity"] = "CONNECTED"
            if rec.get("connectivity_ms"):
                doc["connectivityAt"] = rec["connectivity_ms"] / 1000
        for key, member in (("pull_started_ms", "pullStartedAt"),
                            ("pull_stopped_ms", "pullStoppedAt")):
            if rec.get(key):
                doc[member] = rec[key] / 1000
        for key, member in (("started_ms", "startedAt"), ("stopping_ms", "stoppingAt"),
                            ("stopped_ms", "stoppedAt")):
            if core.get(key) is not None:
                doc[member] = core[key] / 1000
        if core["stop_code"]:
            doc["stopCode"] = core["stop_code"]
        if core["stopped_reason"]:
            doc["stoppedReason"] = core["stopped_reason"]
        if core["stopped_reason"] and not core["stop_code"]:
            doc["stopCode"] = "TaskFailedToStart"
        if tags:
            doc["tags"] = rec["tags"]
        return doc

    # -- RunTask -------------------------------------------------------------------------------
    async def run(self, account: str, body: dict[str, Any]) -> dict[str, Any]:
        desc = body["taskDefinition"]
        overrides = list(body.get("containerOverrides") or [])
        task_def, def_doc = task_definition_of(desc, overrides)
        check_runnable(task_def)
        cluster = str(body["cluster"])
        count = int(body.get("count", 1))
        token = str(body.get("clientToken") or "")
        if token:  # the same request again (a retry): the same tasks, none started anew
            again = self.store.token(account, token)
            if again is not None:
                if again["cluster"] != cluster \
                        or again["taskDefinitionArn"] != desc["taskDefinitionArn"]:
                    raise EcsError("InvalidParameterException",
                                   "clientToken was used for a different RunTask request")
                found = self.describe(account, cluster, again["ids"], True)
                return {"tasks": found["tasks"], "failures": again["failures"]}
        if self.store.active_count(account) + count > self.limits.ecs_tasks_per_tenant_max:
            raise EcsError("LimitExceededException",
                           f"An account runs at most {self.limits.ecs_tasks_per_tenant_max} "
                           "tasks at a time (ecs_tasks_per_tenant_max)")
        tasks, failures = [], []
        now = self.now_ms()
        # Managed volumes (control/ecs.py made and attached them to these task ids)
        task_ids = [str(i) for i in body.get("taskIds") or []]
        volumes: dict[str, Any] = body.get("volumes") or {}
        for n in range(count):
            placed = self.launch(account, cluster, desc, def_doc, task_def, overrides,
                                 started_by=str(body.get("startedBy") or ""),
                                 group=str(body.get("group") or f"family:{task_def.family}"),
                                 tags=list(body.get("tags") or []),
                                 task_id=task_ids[n] if n < len(task_ids) else None,
                                 volumes=list(volumes.get(task_ids[n], []))
                                 if n < len(task_ids) else None,
                                 network=body.get("networkConfiguration"))
            if isinstance(placed, NoRoom):
                shard = self.cell.shard_of(f"{account}/ecs/{cluster}")
                failures.append({"arn": desc["taskDefinitionArn"], "reason": placed.reason,
                                 "detail": f"No agent of this cluster's shard ({len(shard)} "
                                           f"of the cell's) has room for {task_def.cpu} cpu "
                                           f"and {task_def.memory_mib} MiB"})
                continue
            tasks.append(self.view(placed))
        if token:
            self.store.put_token(account, token, now, {
                "cluster": cluster, "taskDefinitionArn": desc["taskDefinitionArn"],
                "ids": [t["taskArn"].rsplit("/", 1)[1] for t in tasks], "failures": failures})
        return {"tasks": tasks, "failures": failures}

    def launch(self, account: str, cluster: str, desc: dict[str, Any], def_doc: dict[str, Any],
               task_def: td.TaskDefinition, overrides: list[dict[str, Any]], *,
               started_by: str, group: str, tags: list[dict[str, str]],
               task_id: str | None = None, volumes: list[dict[str, Any]] | None = None,
               network: dict[str, Any] | None = None) -> dict[str, Any] | NoRoom:
        """One task placed on the cluster's shard and its provisioning begun (RunTask's, and
        a service's StartTask: frontend/services.py): its record, or why it has no room.
        ``network``: the request's ``networkConfiguration`` as control/ecs.py checked it
        (None: the region's default network policy)."""
        shard = self.cell.shard_of(f"{account}/ecs/{cluster}")
        task_id = task_id or uuid.uuid4().hex
        placed = self.cell.placement.place_task(
            task_id, task_def.memory_mib, task_def.cpu,
            self.limits.ecs_task_cpu_units_per_agent_max, shard)
        if isinstance(placed, NoRoom):
            self.counters["placement_failures"] += 1
            return placed
        now = self.now_ms()
        task = et.Task(task_def, now, restart_policy=pod.restart_policy_from_tags(tags))
        rec = {
            "id": task_id, "account": account, "cluster": cluster,
            "family": task_def.family, "task_definition_arn": desc["taskDefinitionArn"],
            "def_doc": def_doc, "overrides": overrides, "started_by": started_by,
            "group": group, "tags": tags, "created_ms": now,
            "cpu": task_def.cpu, "memory": task_def.memory_mib,
            "agent_id": placed.agent_id, "hostname": f"ip-{task_id[:12]}",
            "attachment_id": str(uuid.uuid4()), "eni_id": f"eni-{task_id[:17]}",
            "container_ids": {c.name: str(uuid.uuid4()) for c in task_def.containers},
            "version": 1, "core": task.snapshot(), "cursors": {},
        }
        if volumes:  # managed volumes: [{name, volumeId, attachEpoch, sizeInGiB, ...}]
            rec["volumes"] = volumes
        if network:
            rec["network_configuration"] = network
        self.store.put(rec)
        live = Live(rec, task)
        self.live[task_id] = live
        self._spawn(live, self._provision(live))
        self.counters["run"] += 1
        return rec

    def record(self, account: str, task_id: str) -> dict[str, Any] | None:
        """A task's record, live or kept (None: never run here, or forgotten)."""
        live = self.live.get(task_id)
        return live.rec if live is not None else self.store.get(account, task_id)

    def stop_by_scheduler(self, task_id: str, reason: str) -> None:
        """A service stops one of its tasks (stopCode ServiceSchedulerInitiated)."""
        live = self.live.get(task_id)
        if live is not None:
            self._feed(live, et.StopRequested(reason, "scheduler"))

    # -- StopTask, DescribeTasks ----------------------------------------------------------------
    def _record(self, account: str, cluster: str, task_id: str) -> dict[str, Any] | None:
        live = self.live.get(task_id)
        rec = live.rec if live is not None else self.store.get(account, task_id)
        if rec is None or rec["account"] != account or rec["cluster"] != cluster:
            return None
        return rec

    def stop(self, account: str, cluster: str, task_id: str, reason: str) -> dict[str, Any]:
        rec = self._record(account, cluster, task_id)
        if rec is None:
            raise EcsError("InvalidParameterException", "The referenced task was not found.")
        live = self.live.get(task_id)
        if live is not None:
            self._feed(live, et.StopRequested(reason or "Task stopped by user", "user"))
            rec = live.rec
        return {"task": self.view(rec)}

    def describe(self, account: str, cluster: str, ids: list[str], tags: bool
                 ) -> dict[str, Any]:
        tasks, failures = [], []
        for ident in ids:
            rec = self._record(account, cluster, ident)
            if rec is None:
                failures.append({"arn": ident, "reason": "MISSING"})
            else:
                tasks.append(self.view(rec, tags))
        return {"tasks": tasks, "failures": failures}

    def held_layers(self, account: str) -> set[str]:
        """Layers the tenant's unfinished tasks run on: kept by the registry's collection
        even when their manifests were deleted (as image functions' are)."""
        return {str(d) for live in list(self.live.values()) if live.rec["account"] == account
                for d in live.rec.get("layers", [])}

    def sweep(self) -> None:
        self.store.forget_stopped(self.now_ms() - self.limits.ecs_stopped_task_retention_ms)

    # -- driving one task ------------------------------------------------------------------------
    def _spawn(self, live: Live, coro: Any) -> None:
        t: asyncio.Task[None] = asyncio.ensure_future(coro)
        live.runs.add(t)
        t.add_done_callback(live.runs.discard)

    def _feed(self, live: Live, stimulus: et.Stimulus) -> None:
        for ins in live.task.handle(stimulus, max(self.now_ms(), live.task.now_ms)):
            self._execute(live, ins)
        self._save(live)

    def _save(self, live: Live) -> None:
        snap = live.task.snapshot()
        rec = live.rec
        if snap != rec["core"] or live.task.health_status != rec.get("health_status"):
            rec["core"] = snap
            rec["health_status"] = live.task.health_status
            rec["version"] += 1
            rec["cursors"] = live.cursors
            self.store.put(rec)

    def _execute(self, live: Live, ins: et.Instruction) -> None:
        match ins:
            case et.StartContainer(name):
                self._spawn(live, self._start(live, name))
            case et.StopContainer(name, grace_ms):
                self._spawn(live, self._stop_container(live, name, grace_ms))
            case et.RunHealthCheck(name, command, timeout_ms):
                self._spawn(live, self._probe(live, name, command, timeout_ms))
            case et.Release():
                self._spawn(live, self._release(live))

    def _client(self, live: Live) -> Client:
        client = self.cell.agents.get(live.rec["agent_id"])
        if client is None:
            raise TransportError(f"agent {live.rec['agent_id']} is not in this cell")
        return client

    async def _call(self, live: Live, op: str, body: dict[str, Any],
                    timeout_s: float | None = None) -> Any:
        return await self.cell.invoker.call_agent(
            self._client(live), op, body,
            timeout_s if timeout_s is not None else self.limits.agent_call_timeout_ms / 1000)

    async def _provision(self, live: Live) -> None:
        rec, account = live.rec, live.rec["account"]
        rec["pull_started_ms"] = self.now_ms()
        containers = []
        mounts = task_mounts(rec["def_doc"]) if rec.get("volumes") else {}
        try:
            for c in live.task.task_def.containers:
                image = image_functions.resolve(self.cell.catalog, account, c.image)
                live.images[c.name] = image
                env = {**image.get("env", {}), **dict(c.environment)}
                containers.append(m.TaskContainer(
                    name=c.name, image_layers=tuple(image["layers"]),
                    argv=tuple(_argv(c, image)), env=env,
                    workdir=c.working_directory or image.get("workdir") or "",
                    port_mappings=tuple(m.TaskPortMapping(p.container_port, p.protocol)
                                        for p in c.ports),
                    mounts=tuple(m.TaskMount(mp.source_volume, mp.container_path, mp.read_only)
                                 for mp in mounts.get(c.name, ())),
                    memory_mib=c.memory_mib or 0,
                    memory_reservation_mib=c.memory_reservation_mib or 0,
                    cpu_units=c.cpu))
        except LambdaError as e:
            self._feed(live, et.ProvisionFailed(f"CannotPullContainerError: {e.message}"))
            return
        rec["image_digests"] = {n: i["digest"] for n, i in live.images.items()}
        rec["layers"] = sorted({d for i in live.images.values() for d in i["layers"]})
        if live.task.desired_status == "STOPPED":  # stopped before its environment was made
            self._feed(live, et.ProvisionFailed("stopped before provisioning"))
            return
        body = m.TaskCreateRequest(task_id=rec["id"], account=account, cpu_units=rec["cpu"],
                                   memory_mib=rec["memory"], containers=tuple(containers),
                                   hostname=rec["hostname"],
                                   volumes=tuple(m.TaskVolume(
                                       str(v["name"]), str(v["volumeId"]), int(v["sizeInGiB"]),
                                       int(v["attachEpoch"]), bool(v["replicated"]))
                                       for v in rec.get("volumes") or []),
                                   network=network_mode(rec)).to_wire()
        timeout_s = self.limits.agent_call_timeout_ms / 1000
        # a managed volume is attached (FUSE, loop device, first mkfs) within task_create
        create_timeout_s = (self.limits.env_create_timeout_ms + len(rec.get("volumes") or [])
                            * self.limits.ecs_task_volume_attach_timeout_ms) / 1000
        pushes: dict[str, int] = {}
        full: set[str] = set()  # agents of the shard that answered they are full
        try:
            while True:
                try:
                    reply = m.TaskCreateReply.from_wire(await self._call(
                        live, "task_create", body, create_timeout_s))
                    break
                except RemoteError as e:
                    if e.type in _FULL and self._replace(live, full):
                        pushes.clear()  # the next agent's layers are its own
                        continue
                    digest = str(e.data.get("digest", ""))
                    if e.type != "LayerMissing" or pushes.get(digest, 0) >= _layer_pushes_max:
                        raise
                    pushes[digest] = pushes.get(digest, 0) + 1
                    holder = next((i for i in live.images.values() if digest in i["layers"]),
                                  None)
                    if holder is None:
                        raise
                    await image_functions.push_image_layer(self.cell, self._client(live),
                                                           account, holder, digest, timeout_s)
                    self.counters["layers_pushed"] += 1
        except (RemoteError, TransportError, LambdaError, m.MessageError) as e:
            message = e.message if isinstance(e, LambdaError) else str(e)  # "Type: message"
            self._feed(live, et.ProvisionFailed(
                f"ResourceInitializationError: the task's environment could not be made "
                f"on its host: {message}"))
            return
        rec["private_ipv4"] = reply.private_ipv4
        rec["pull_stopped_ms"] = rec["connectivity_ms"] = self.now_ms()
        self._feed(live, et.Provisioned())
        await self._poll_loop(live)

    def _replace(self, live: Live, full: set[str]) -> bool:
        """Its agent is full (what placement did not know: the agent's own task cap, its
        host's memory): the task moves to another agent of its shard, if one has room."""
        rec = live.rec
        full.add(rec["agent_id"])
        placement = self.cell.placement
        placement.release_task(rec["id"])
        shard = [a for a in self.cell.shard_of(f"{rec['account']}/ecs/{rec['cluster']}")
                 if a not in full]
        placed = placement.place_task(rec["id"], rec["memory"], rec["cpu"],
                                      self.limits.ecs_task_cpu_units_per_agent_max, shard)
        if isinstance(placed, NoRoom):
            placement.hold_task(rec["id"], rec["agent_id"], rec["memory"], rec["cpu"])
            return False  # released again by the Release that follows the failure
        log.info("task %s: agent %s is full; placed on %s", rec["id"], rec["agent_id"],
                 placed.agent_id)
        rec["agent_id"] = placed.agent_id
        self.store.put(rec)
        return True

    async def _start(self, live: Live, name: str) -> None:
        try:
            await self._call(live, "task_container_start",
                             m.TaskContainerRequest(live.rec["id"], name).to_wire())
        except (RemoteError, TransportError) as e:
            self._feed(live, et.ContainerStartFailed(name, f"CannotStartContainerError: {e}"))
            return
        self._feed(live, et.ContainerStarted(name))

    async def _stop_container(self, live: Live, name: str, grace_ms: int) -> None:
        try:
            reply = m.TaskContainerStopReply.from_wire(await self._call(
                live, "task_container_stop",
                m.TaskContainerStopRequest(live.rec["id"], name, grace_ms / 1000).to_wire(),
                self.limits.agent_call_timeout_ms / 1000 + grace_ms / 1000))
        except (RemoteError, TransportError, m.MessageError) as e:
            # Its host cannot stop it: as far as this cell knows, it is gone.
            self._feed(live, et.ContainerExited(name, None, f"could not be stopped: {e}"))
            return
        # Answered once it exited: its exit now, not at the next poll (None: it was not
        # running; the poll reports how it ended).
        if reply.exit_code is not None and live.task.containers[name].status == "RUNNING":
            self._feed(live, et.ContainerExited(name, reply.exit_code))

    async def _probe(self, live: Live, name: str, command: tuple[str, ...],
                     timeout_ms: int) -> None:
        try:
            reply = m.TaskExecReply.from_wire(await self._call(
                live, "task_exec", m.TaskExecRequest(live.rec["id"], name,
                                                     tuple(_probe_argv(command)),
                                                     timeout_ms / 1000).to_wire(),
                self.limits.agent_call_timeout_ms / 1000 + timeout_ms / 1000))
            ok = reply.exit_code == 0
        except (RemoteError, TransportError, m.MessageError):
            ok = False
        self._feed(live, et.HealthResult(name, ok))

    async def _release(self, live: Live) -> None:
        # The containers' last lines (written after the last poll) are filed before the
        # task's environment, and the agent's buffer of them, goes.
        if live.task.started_ms is not None or live.rec.get("private_ipv4"):
            try:
                last = m.TaskPollReply.from_wire(await self._call(
                    live, "task_poll",
                    m.TaskPollRequest(live.rec["id"], live.cursors).to_wire()))
                self._file_logs(live, last.logs)
            except (RemoteError, TransportError, m.MessageError):
                pass  # its host is gone, or it was never made: nothing more to file
        try:
            await self._call(live, "task_destroy",
                             m.TaskDestroyRequest(live.rec["id"]).to_wire())
        except (RemoteError, TransportError) as e:
            log.warning("task %s: destroy on %s failed: %s", live.rec["id"],
                        live.rec["agent_id"], e)
        if live.rec.get("volumes"):  # the host let go of them (or is gone): the control
            live.rec["volumes_detached"] = True  # plane's sweep ends their attachments
            live.rec["version"] += 1
            self.store.put(live.rec)
        self.cell.placement.release_task(live.rec["id"])
        self._save(live)
        live.done.set()
        self.live.pop(live.rec["id"], None)

    async def _poll_loop(self, live: Live) -> None:
        interval_s = self.limits.ecs_task_poll_interval_ms / 1000
        while live.task.last_status != "STOPPED":
            await self.poll_once(live)
            if live.task.last_status == "STOPPED":
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(live.done.wait(), interval_s)  # periodic, or ended

    async def poll_once(self, live: Live) -> None:
        try:
            reply = m.TaskPollReply.from_wire(await self._call(
                live, "task_poll", m.TaskPollRequest(live.rec["id"], live.cursors).to_wire()))
        except (RemoteError, TransportError, m.MessageError) as e:
            live.poll_failures += 1
            self.counters["polls_failed"] += 1
            gone = isinstance(e, RemoteError) and e.type in ("TaskNotFound", "NoSuchTask")
            if gone or live.poll_failures >= self.limits.ecs_task_poll_failures_max:
                self.counters["lost"] += 1
                self._lost(live, "the task's host no longer has it" if gone else
                           f"the task's host stopped answering ({e})")
            else:
                self._feed(live, et.Tick())
            return
        live.poll_failures = 0
        self._sample_cpu(live, reply.cpu_usage_ns)
        self._file_logs(live, reply.logs)
        cursors = {**live.cursors, **reply.cursors}
        if cursors != live.cursors:  # kept, so a restarted frontend files no line twice
            live.cursors = live.rec["cursors"] = cursors
            self.store.put(live.rec)
        for name, st in reply.containers.items():
            c = live.task.containers.get(name)
            if c is None or c.status != "RUNNING":
                continue
            if st.state == "exited" or st.exited_ms is not None:
                self._feed(live, et.ContainerExited(name, st.exit_code, st.reason))
        self._feed(live, et.Tick())

    def _sample_cpu(self, live: Live, cpu_ns: int) -> None:
        now, prev = self.now_ms(), live.cpu_sample
        if prev is not None and (now <= prev[0] or cpu_ns < prev[1]):
            if cpu_ns < prev[1]:  # a restarted counter: start again
                live.cpu_sample = (now, cpu_ns)
            return
        if prev is not None:
            vcpus = max(int(live.rec.get("cpu") or 1024), 1) / 1024
            live.cpu_percent = (cpu_ns - prev[1]) / ((now - prev[0]) * 1e6) / vcpus * 100
        live.cpu_sample = (now, cpu_ns)

    def cpu_percent(self, task_id: str) -> float | None:
        """The task's CPU use between its last two polls, in percent of its cpu units
        (None: not measured yet, or not driven by this process)."""
        live = self.live.get(task_id)
        return live.cpu_percent if live is not None else None

    def _lost(self, live: Live, reason: str) -> None:
        for name, c in live.task.containers.items():
            if c.status == "RUNNING" or c.starting:
                self._feed(live, et.ContainerExited(name, None, reason))
        if live.task.last_status == "PENDING":
            self._feed(live, et.StopRequested(reason, "scheduler"))

    def _file_logs(self, live: Live, logs: dict[str, tuple[m.TaskLogLine, ...]]) -> None:
        store = self.cell.logstore
        if store is None:
            return
        rec, now = live.rec, self.now_ms()
        rows = []
        for name, lines in logs.items():
            c = next((c for c in live.task.task_def.containers if c.name == name), None)
            if c is None or c.log_driver != "awslogs":
                continue
            opts = dict(c.log_options)
            group = opts.get("awslogs-group", "")
            if not group:
                continue
            stream = f"{opts.get('awslogs-stream-prefix', 'ecs')}/{name}/{rec['id']}"
            for line in lines:  # the agent bounds a poll's lines
                rows.append((rec["account"], group, stream, line.time_ms, "", line.text))
        if rows:
            try:
                store.append(rows, now)
            except sqlite3.Error as e:
                log.warning("could not file %d task log lines: %s", len(rows), e)

    # -- a restarted frontend ------------------------------------------------------------------
    def load(self) -> None:
        """Go on driving the tasks a previous process left unfinished (in a running event
        loop: their drivers are spawned)."""
        now = self.now_ms()
        for rec in self.store.unfinished():
            try:
                task_def, _ = task_definition_of(rec["def_doc"], [])
            except EcsError as e:  # a definition this build refuses: ended, saying why
                log.warning("task %s: %s", rec["id"], e.message)
                rec["core"].update(last_status="STOPPED", desired_status="STOPPED",
                                   stop_code="TaskFailedToStart", stopped_ms=now,
                                   stopped_reason=f"the cell cannot drive this task after "
                                                  f"a restart: {e.message}")
                self.store.put(rec)
                continue
            task = et.Task.restored(task_def, rec["core"], now,
                                    restart_policy=pod.restart_policy_from_tags(rec["tags"]))
            live = Live(rec, task, cursors=dict(rec.get("cursors") or {}))
            self.live[rec["id"]] = live
            self.cell.placement.hold_task(rec["id"], rec["agent_id"], rec["memory"], rec["cpu"])
            if task.last_status == "PROVISIONING":  # its environment may or may not exist
                self._feed(live, et.ProvisionFailed(
                    "ResourceInitializationError: the cell's frontend restarted while the "
                    "task was being provisioned"))
                continue
            if rec["agent_id"] not in self.cell.agents:
                self._lost(live, f"its host {rec['agent_id']} is no longer in this cell")
                continue
            for ins in task.resume(now):
                self._execute(live, ins)
            self._save(live)
            self._spawn(live, self._poll_loop(live))
        self.services.ensure_running()  # the services go on where they were

    async def close(self) -> None:
        """Stop driving (the tasks go on running on their agents; a restart resumes them)."""
        await self.services.close()
        runs = [t for live in self.live.values() for t in live.runs]
        for t in runs:
            t.cancel()
        for t in runs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
