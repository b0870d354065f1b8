"""ECS services in a cell (issue #17, docs/fargate.md): the shell around the sans-IO
deployment controller ``core/ecs_service.Service``, behind CreateService, UpdateService,
DeleteService, DescribeServices and ListServices (control/ecs.py forwards them to the tenant's
cell through the frontend's ``ecs_tasks`` op, ``service_*``).

One loop per cell ticks every service each ``ecs_service_tick_interval_ms``: it reports each
of the service's tasks as the task manager (frontend/tasks.py) has it (``TaskReport``, or
``TaskStopped`` with the task's stopCode once STOPPED), then a ``Tick`` with the time passed,
and runs what the controller answers: ``StartTask`` places and provisions a task through the
task manager's ``launch`` (startedBy the deployment's id, group ``service:<name>``; no room,
or the tenant's task cap reached, is a ``PlacementFailed``), ``StopTask`` stops it
(stopCode ``ServiceSchedulerInitiated``).

Each service's record (its task definitions, the controller's snapshot, the map of the
controller's task ids to the tasks' ids) is kept in the cell's ``tasks.db`` (table
``services``) and rewritten at each change, so a restarted frontend goes on driving its
services and their tasks. A deleted service is DRAINING until its tasks stopped, then
INACTIVE (still described for ``ecs_inactive_service_retention_ms``).

Managed volumes (``volumeConfigurations``, docs/fargate.md#volumes): the control plane makes
volumes (EC2's records are its own) and the cell never dials it, so each service with volumes
keeps a **pool** of volumes the control plane made ahead, each already attached to a task id
of its own (``rec["pool"]``: ``{key, taskId, volumes}``, ``key`` naming the configuration).
A ``StartTask`` of a deployment with volumes takes one (the task gets that id and those
volumes); none ready, the task waits PROVISIONING (``rec["waiting"]``, tried again at each
tick) until the control plane's volume round hands one in.
CreateService and UpdateService hand in the first ones; the control plane's volume round
(``service_volumes``, every ``ecs_task_volume_sweep_interval_ms``) tops each pool up to what
the primary deployment still has to start and takes back what no deployment will use
(``service_volumes_add`` hands the new ones in). A task's volume ends with the task, as
RunTask's do (control/ecs.py's sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11

from ..core import autoscale as asc
from ..core import ecs_service as es
from ..core.ecs_taskdef import EcsError
from ..core.placement import NoRoom

if TYPE_CHECKING:
    from .tasks import TaskManager

log = logging.getLogger("cellcloud.frontend.services")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    account TEXT NOT NULL, cluster TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (account, cluster, name));
"""
Key = tuple[str, str, str]  # account, cluster, service name


def not_found() -> EcsError:
    return EcsError("ServiceNotFoundException", "Service not found.")


def not_active() -> EcsError:
    return EcsError("ServiceNotActiveException", "Service was not ACTIVE.")


def config_of(doc: dict[str, Any] | None, base: es.DeploymentConfig | None = None
              ) -> es.DeploymentConfig:
    """``deploymentConfiguration`` (control/ecs.py checked its members' types) on ``base``."""
    base = base or es.DeploymentConfig()
    if not doc:
        return base
    breaker = doc.get("deploymentCircuitBreaker")
    cfg = es.DeploymentConfig(
        minimum_healthy_percent=int(doc.get("minimumHealthyPercent",
                                            base.minimum_healthy_percent)),
        maximum_percent=int(doc.get("maximumPercent", base.maximum_percent)),
        circuit_breaker=es.CircuitBreaker(bool(breaker["enable"]), bool(breaker["rollback"]))
        if breaker else base.circuit_breaker)
    es.check_config(cfg)
    return cfg


def volumes_key(configs: list[dict[str, Any]]) -> str:
    """Names one volume configuration (a pool's volumes fit the deployments that have it)."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:16]


def health_checked(desc: dict[str, Any]) -> bool:
    """Its essential containers have health checks: a task counts once HEALTHY."""
    return any(c.get("healthCheck") and c.get("essential", True)
               for c in desc.get("containerDefinitions") or [])


@dataclass
class Svc:
    rec: dict[str, Any]
    core: es.Service
    # autoscaling (``rec["scaling"]``: its scalable target and policies, and ``state``: each
    # policy's cooldowns and panic, kept at each decision): each policy's scaler (its
    # samples in memory: a restarted one observes a stable window again before it scales
    # in), and when the current sample began
    scalers: dict[str, asc.Scaler] = field(default_factory=dict)
    period_start_ms: int | None = None


CPU_METRIC = "ECSServiceAverageCPUUtilization"
REQUESTS_METRIC = "ALBRequestCountPerTarget"
CONCURRENCY_METRIC = "ECSServiceAverageConcurrency"  # cellcloud's own (Knative's concurrency)


class ServiceManager:
    """The services of one cell; ``op`` answers the task manager's ``service_*`` ops."""

    def __init__(self, tasks: TaskManager) -> None:
        self.tasks = tasks
        self.limits = tasks.limits
        self.db = tasks.store.db
        self.db.executescript(_SCHEMA)
        self.services: dict[Key, Svc] = {}
        for doc, in self.db.execute("SELECT doc FROM services"):
            rec = json.loads(doc)
            self.services[(rec["account"], rec["cluster"], rec["name"])] = Svc(
                rec, es.Service.restored(rec["core"]))
        self._loop: asyncio.Task[None] | None = None
        self.counters = {"ticks": 0, "started": 0, "stopped": 0, "placement_failures": 0,
                         "http_requests": 0, "http_no_task": 0, "http_task_failed": 0,
                         "http_task_unreachable": 0,
                         "autoscale_datapoints": 0, "autoscale_set": 0, "http_held": 0,
                         "volume_waits": 0, "volumes_pooled": 0}
        # Traffic (``http``): the next task per service (round robin), requests in flight per
        # task, and tasks the controller stopped that still answer requests (draining): task
        # id -> when the stop was asked.
        self._next: dict[Key, int] = {}
        self._inflight: dict[str, int] = {}
        self._draining: dict[str, int] = {}
        self._drain_reasons: dict[str, str] = {}
        # requests proxied to each service in its current metric period (autoscaling), and
        # its requests in flight: [in-flight × ms since the last sample, in flight now, when
        # the count last changed]
        self._requests: dict[Key, int] = {}
        self._busy: dict[Key, list[int]] = {}
        # scale from zero: requests held for a service with no task to answer them (how many),
        # and the event the loop sets once it has one
        self._waiting: dict[Key, int] = {}
        self._ready: dict[Key, asyncio.Event] = {}

    # -- the loop ------------------------------------------------------------------------------
    def ensure_running(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        interval_s = self.limits.ecs_service_tick_interval_ms / 1000
        while True:
            self.tick_all()
            await asyncio.sleep(interval_s)  # the controller's period, not a wait on a state

    async def close(self) -> None:
        """Stop driving: deferred stops are dropped with the process (a restarted frontend's
        loop finds those tasks still running and stops them: ``tick``)."""
        self._draining.clear()
        self._drain_reasons.clear()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    def tick_all(self) -> None:
        self.counters["ticks"] += 1
        now = self.tasks.now_ms()
        for task_id, since in list(self._draining.items()):
            if now - since >= self.limits.ecs_service_deregistration_delay_ms:
                self._stop_drained(task_id)  # its requests took too long: stopped anyway
        for key, svc in list(self.services.items()):
            rec = svc.rec
            if rec["status"] == "INACTIVE":
                if rec["deleted_ms"] < now - self.limits.ecs_inactive_service_retention_ms:
                    self.db.execute("DELETE FROM services WHERE account=? AND cluster=? AND "
                                    "name=?", key)
                    del self.services[key]
                continue
            try:
                self.tick(svc)
                self.scale(key, svc, now)
                if key in self._ready and self._targets(svc):
                    self._ready.pop(key).set()  # the held requests go on
            except Exception:  # one service's fault must not stop the others'
                log.exception("service %s/%s: tick failed", rec["cluster"], rec["name"])

    def tick(self, svc: Svc) -> None:
        rec, core = svc.rec, svc.core
        account = rec["account"]
        waiting = rec.get("waiting") or {}
        for core_id in [i for i in waiting if i not in core.tasks]:
            del waiting[core_id]  # (the controller no longer has it)
        for core_id, ts in list(core.tasks.items()):
            if core_id in waiting:  # waits for its managed volume
                if ts.stop_sent:  # (scaled in meanwhile): never started
                    waiting.pop(core_id)
                    self._feed(svc, es.TaskStopped(core_id, "ServiceSchedulerInitiated",
                                                   "stopped before its volume was made"))
                elif not self._start(svc, core_id, *waiting[core_id]):
                    continue  # (nothing changed)
                self._write(svc)
                continue
            task_id = rec["ids"].get(core_id)
            task = self.tasks.record(account, task_id) if task_id else None
            stim: es.Stimulus | None = None
            if task is None:
                stim = es.TaskStopped(core_id, "ServiceSchedulerInitiated",
                                      "the task's record is gone")
            elif ts.stop_sent and task["core"]["desired_status"] != "STOPPED" \
                    and task_id not in self._draining:
                # the controller stopped it, but the stop was lost (deferred while draining
                # in a process that ended): asked again
                self.tasks.stop_by_scheduler(task_id, "Stopped by its service")
            elif task["core"]["last_status"] == "STOPPED":
                stim = es.TaskStopped(core_id, task["core"]["stop_code"] or "TaskFailedToStart",
                                      task["core"]["stopped_reason"])
            else:
                status, health = task["core"]["last_status"], task.get("health_status",
                                                                         "UNKNOWN")
                if (status, health) != (ts.status, ts.health):
                    stim = es.TaskReport(core_id, status, health)
            if stim is not None:
                self._feed(svc, stim)
                if isinstance(stim, es.TaskStopped):
                    rec["ids"].pop(core_id, None)
        self._feed(svc, es.Tick())
        if rec["status"] == "DRAINING" and not core.tasks:
            rec["status"], rec["deleted_ms"] = "INACTIVE", core.now_ms
        self._save(svc)

    def _feed(self, svc: Svc, stimulus: es.Stimulus,
              before: Callable[[], None] | None = None) -> None:
        """``before``: run once the controller answered, before its instructions are (a new
        deployment's volume configurations)."""
        now = max(self.tasks.now_ms(), svc.core.now_ms)
        out = svc.core.handle(stimulus, now)
        if before is not None:
            before()
        for ins in out:
            self._execute(svc, ins)

    def _execute(self, svc: Svc, ins: es.Instruction) -> None:
        rec = svc.rec
        match ins:
            case es.StartTask(core_id, arn, deployment_id):
                self._start(svc, core_id, arn, deployment_id)
            case es.StopTask(core_id, reason):
                task_id = rec["ids"].get(core_id)
                if task_id is None:
                    return
                self.counters["stopped"] += 1
                if self._inflight.get(task_id):  # no new requests; these finish first
                    self._draining[task_id] = self.tasks.now_ms()
                    self._drain_reasons[task_id] = reason
                else:
                    self.tasks.stop_by_scheduler(task_id, reason)

    def _start(self, svc: Svc, core_id: str, arn: str, deployment_id: str) -> bool:
        """The controller's task placed and provisioning (or its ``PlacementFailed``); False:
        it waits (PROVISIONING) for its managed volume, which the control plane's next volume
        round makes (``rec["waiting"]``: tried again at each tick)."""
        from .tasks import task_definition_of  # (tasks.py makes this manager)
        rec = svc.rec
        desc = rec["task_defs"][arn]
        task_def, def_doc = task_definition_of(desc, [])
        cap = self.limits.ecs_tasks_per_tenant_max
        placed: dict[str, Any] | NoRoom
        configs = self._deployment_volumes(svc, deployment_id)
        entry = self._take_pooled(svc, configs) if configs else None
        if configs and entry is None:
            if core_id not in rec.setdefault("waiting", {}):
                self.counters["volume_waits"] += 1
            rec["waiting"][core_id] = [arn, deployment_id]
            return False
        (rec.get("waiting") or {}).pop(core_id, None)
        if self.tasks.store.active_count(rec["account"]) >= cap:
            placed = NoRoom(f"the account runs {cap} tasks already "
                            "(ecs_tasks_per_tenant_max)")
        else:
            placed = self.tasks.launch(
                rec["account"], rec["cluster"], desc, def_doc, task_def, [],
                started_by=deployment_id[:128], group=f"service:{rec['name']}",
                tags=[], network=rec.get("network_configuration"),
                task_id=entry["taskId"] if entry else None,
                volumes=list(entry["volumes"]) if entry else None)
        if isinstance(placed, NoRoom):
            if entry is not None:  # not used: back to the pool
                rec.setdefault("pool", []).append(entry)
            self.counters["placement_failures"] += 1
            self._feed(svc, es.PlacementFailed(core_id, placed.reason))
            return True
        rec["ids"][core_id] = placed["id"]
        self.counters["started"] += 1
        return True

    # -- managed volumes (docs/fargate.md#volumes) ---------------------------------------------
    def _deployment_volumes(self, svc: Svc, deployment_id: str) -> list[dict[str, Any]]:
        """The volume configurations of a deployment's tasks ([]: none). A deployment the
        controller made itself (a circuit breaker's rollback) has those of the deployment it
        rolls back to."""
        dv = svc.rec.setdefault("deployment_volumes", {})
        if deployment_id not in dv:
            last = svc.core.last_completed
            dv[deployment_id] = dv.get(last.id, {}) if last is not None else {}
        return list(dv[deployment_id].get("configs") or [])

    def _take_pooled(self, svc: Svc, configs: list[dict[str, Any]]) -> dict[str, Any] | None:
        key = volumes_key(configs)
        pool = svc.rec.setdefault("pool", [])
        for i, entry in enumerate(pool):
            if entry["key"] == key:
                return dict(pool.pop(i))
        return None

    def _pool_add(self, svc: Svc, configs: list[dict[str, Any]],
                  entries: list[dict[str, Any]]) -> None:
        key = volumes_key(configs)
        pool = svc.rec.setdefault("pool", [])
        for e in entries:
            pool.append({"key": key, "taskId": str(e["taskId"]), "volumes": list(e["volumes"])})
        self.counters["volumes_pooled"] += len(entries)

    def _set_volumes(self, svc: Svc, body: dict[str, Any]) -> None:
        """The primary deployment's volume configurations (just deployed)."""
        primary = svc.core.primary
        if primary is not None:
            svc.rec.setdefault("deployment_volumes", {})[primary.id] = body.get("volumes") or {}

    def volumes_op(self, account: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """The control plane's volume round: ``service_volumes`` answers what each of the
        account's services still needs (``wants``: count and configurations for its primary
        deployment), the pooled volumes nothing will use any more (``release``, taken out of
        the pools: the control plane ends them) and those still pooled (``held``);
        ``service_volumes_add`` hands new ones in (``refused``: those no longer wanted)."""
        if what == "service_volumes_add":
            svc = self.services.get((account, str(body["cluster"]), str(body["service"])))
            entries = list(body.get("entries") or [])
            configs = list(body.get("configs") or [])
            if svc is None or svc.rec["status"] != "ACTIVE" or not configs \
                    or not any(self._deployment_volumes(svc, d.id) == configs
                               for d in svc.core.deployments):
                return {"refused": [str(e["taskId"]) for e in entries]}
            self._pool_add(svc, configs, entries)
            self._write(svc)
            try:  # the tasks waiting for these start now (else at the loop's next tick)
                self.tick(svc)
            except Exception:
                log.exception("service %s/%s: tick failed", svc.rec["cluster"], svc.rec["name"])
            return {"refused": []}
        wants, release, held, services = [], [], [], 0
        for (a, cluster, name), svc in sorted(self.services.items()):
            pool = svc.rec.get("pool") or []
            if a != account or (not pool and not svc.rec.get("deployment_volumes")):
                continue
            core, primary = svc.core, svc.core.primary
            # what each configuration's tasks need: those waiting for one, and the primary's
            # still to start
            need: dict[str, tuple[list[dict[str, Any]], int]] = {}
            for _, dep in (svc.rec.get("waiting") or {}).values():
                configs = self._deployment_volumes(svc, dep)
                if configs:
                    k = volumes_key(configs)
                    need[k] = (configs, need.get(k, (configs, 0))[1] + 1)
            if svc.rec["status"] == "ACTIVE" and primary is not None \
                    and primary.rollout != "FAILED":
                configs = self._deployment_volumes(svc, primary.id)
                live = sum(1 for t in core.tasks.values()
                           if t.deployment_id == primary.id and not t.stop_sent)
                if configs:
                    services += 1
                    k = volumes_key(configs)
                    need[k] = (configs, need.get(k, (configs, 0))[1]
                               + max(core.desired_count - live, 0))
            keep: list[dict[str, Any]] = []
            for k, (_, n) in need.items():
                keep += [e for e in pool if e["key"] == k][:n]
            gone = [e for e in pool if e not in keep]
            if gone:
                svc.rec["pool"] = keep
                self._write(svc)
                release += [e["taskId"] for e in gone]
            held += [e["taskId"] for e in keep]
            for k, (configs, n) in need.items():
                have = sum(1 for e in keep if e["key"] == k)
                if n > have:
                    wants.append({"cluster": cluster, "service": name, "count": n - have,
                                  "configs": configs})
        return {"wants": wants, "release": release, "held": held, "services": services}

    # -- autoscaling (the application-autoscaling API: control/autoscaling.py) ----------------
    def scale(self, key: Key, svc: Svc, now: int) -> None:
        """Each ``ecs_autoscale_sample_interval_ms``: one sample per policy (its metric since
        the last one) to its scaler; the target's decision from all its policies
        (``core/autoscale.decide``) is applied as UpdateService's desiredCount is, and the
        scalers' cooldowns and panic kept with the service's row."""
        scaling = svc.rec.get("scaling")
        if not scaling or not scaling["policies"] or svc.rec["status"] != "ACTIVE":
            svc.period_start_ms = None
            self._requests.pop(key, None)
            self._busy.pop(key, None)
            return
        if svc.period_start_ms is None:
            svc.period_start_ms = now
            self._requests[key] = 0
            self._busy[key] = [0, 0, now]
            return
        elapsed = now - svc.period_start_ms
        # (half a tick early is on time: the loop's sleeps jitter around the interval)
        if elapsed < self.limits.ecs_autoscale_sample_interval_ms \
                - self.limits.ecs_service_tick_interval_ms // 2 or elapsed <= 0:
            return
        svc.period_start_ms = now
        requests = self._requests.get(key, 0)
        self._requests[key] = 0
        cpu, measured = self._cpu(svc)
        # ALBRequestCountPerTarget: a per-minute count per task, as CloudWatch's Sum over its
        # one-minute period; kept as the service's total rate (over one task when none runs)
        targets = max(len(self._targets(svc)), 1)
        per_minute = requests * 60_000 / elapsed
        self._concurrency(key, 0)
        busy = self._busy.setdefault(key, [0, 0, now])
        in_flight = busy[0] / elapsed  # the average requests in flight over the sample
        busy[0] = 0
        current = svc.core.desired_count
        samples = {CPU_METRIC: asc.Datapoint(cpu, current, measured),
                   REQUESTS_METRIC: asc.Datapoint(per_minute / targets, current, targets),
                   CONCURRENCY_METRIC: asc.Datapoint(in_flight / targets, current, targets)}
        scalers = []
        for name, pol in sorted(scaling["policies"].items()):
            scaler = self._scaler(svc, name)
            scaler.observe(samples[pol["metric"]], now)
            self.counters["autoscale_datapoints"] += 1
            scalers.append(scaler)
        ins = asc.decide(scalers, current, now)
        if ins is None:
            return
        log.info("service %s/%s: policy %s sets desiredCount %d (%s)",
                 svc.rec["cluster"], svc.rec["name"], ins.by, ins.count, ins.reason)
        self.counters["autoscale_set"] += 1
        self._keep_scalers(svc)
        self._activity(svc, ins.count, f"monitor alarm for policy {ins.by} in state "
                       f"ALARM: {ins.reason}")
        self._set_desired(svc, ins.count)

    def _keep_scalers(self, svc: Svc) -> None:
        """The scalers' cooldowns and panic, with the service's row (written by the caller's
        ``_activity`` / ``_write``): a restarted frontend goes on from them."""
        svc.rec["scaling"]["state"] = {n: sc.snapshot() for n, sc in sorted(svc.scalers.items())
                                       if n in svc.rec["scaling"]["policies"]}
        self._write(svc)

    def _activity(self, svc: Svc, count: int, cause: str) -> None:
        """One scaling activity (DescribeScalingActivities), newest last, at most
        ``ecs_service_events_max`` kept with the target."""
        if count == svc.core.desired_count:
            return
        acts = svc.rec["scaling"].setdefault("activities", [])
        acts.append({"ms": self.tasks.now_ms(), "from": svc.core.desired_count, "to": count,
                     "cause": cause})
        del acts[:-self.limits.ecs_service_events_max]
        self._write(svc)

    def _cpu(self, svc: Svc) -> tuple[float | None, int]:
        """The average CPU of the service's RUNNING tasks, percent of their cpu units (None:
        none measured), and how many were measured."""
        got = []
        for core_id, ts in svc.core.tasks.items():
            task_id = svc.rec["ids"].get(core_id)
            if task_id is None or ts.status != "RUNNING":
                continue
            v = self.tasks.cpu_percent(task_id)
            if v is not None:
                got.append(v)
        return (sum(got) / len(got) if got else None), len(got)

    def _scaler(self, svc: Svc, name: str) -> asc.Scaler:
        scaling = svc.rec["scaling"]
        pol = scaling["policies"][name]
        policy = asc.TargetTracking(
            target_value=float(pol["target"]), min_capacity=int(scaling["min"]),
            max_capacity=int(scaling["max"]),
            scale_out_cooldown_ms=int(pol["out_cooldown_s"]) * 1000,
            scale_in_cooldown_ms=int(pol["in_cooldown_s"]) * 1000,
            disable_scale_in=bool(pol["disable_in"]),
            stable_window_ms=self.limits.ecs_autoscale_stable_window_ms,
            panic_window_ms=self.limits.ecs_autoscale_panic_window_ms)
        scaler = svc.scalers.get(name)
        if scaler is None:  # new, or this process's first look: its kept cooldowns
            scaler = svc.scalers[name] = asc.Scaler.restored(
                policy, (scaling.get("state") or {}).get(name), name)
        elif scaler.policy != policy:
            scaler.policy = policy  # the range changed: its samples and cooldowns go on
        return scaler

    def _set_desired(self, svc: Svc, count: int) -> None:
        if count != svc.core.desired_count:
            self._feed(svc, es.SetDesiredCount(count))
            self._save(svc)

    def _write(self, svc: Svc) -> None:
        rec = svc.rec
        self.db.execute("INSERT OR REPLACE INTO services VALUES (?,?,?,?,?)",
                        (rec["account"], rec["cluster"], rec["name"], rec["status"],
                         json.dumps(rec)))

    def scaling_op(self, account: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        """``service_scaling_*``: the scalable targets and scaling policies of the
        account's services (control/autoscaling.py checked the members' types)."""
        if what == "service_scaling_describe":  # the account's targets and policies
            out = []
            for (a, cluster, name), s in sorted(self.services.items()):
                if a == account and s.rec.get("scaling") and s.rec["status"] != "INACTIVE":
                    out.append({"cluster": cluster, "service": name, **s.rec["scaling"]})
            return {"targets": out}
        cluster, name = str(body["cluster"]), str(body["service"])
        svc = self.services.get((account, cluster, name))
        live = svc is not None and svc.rec["status"] == "ACTIVE"
        scaling = svc.rec.get("scaling") if svc is not None and live else None
        if what == "service_scaling_register":
            if svc is None or not live:
                raise EcsError("ValidationException", f"ECS service doesn't exist: "
                               f"service/{cluster}/{name}")
            lo, hi = body.get("min"), body.get("max")
            if scaling is None:
                if lo is None or hi is None:
                    raise EcsError("ValidationException", "MinCapacity and MaxCapacity are "
                                   "required to register a new scalable target")
                scaling = {"min": 0, "max": 0, "created_ms": self.tasks.now_ms(),
                           "policies": {}}
            lo = scaling["min"] if lo is None else int(lo)
            hi = scaling["max"] if hi is None else int(hi)
            if lo > hi:
                raise EcsError("ValidationException", f"Maximum capacity {hi} cannot be "
                               f"less than minimum capacity {lo}")
            scaling.update(min=lo, max=hi)
            svc.rec["scaling"] = scaling
            self._write(svc)
            within = min(max(svc.core.desired_count, lo), hi)
            self._activity(svc, within, f"the scalable target's range became [{lo}, {hi}]")
            self._set_desired(svc, within)
            return {}
        if svc is None or scaling is None:
            raise EcsError("ObjectNotFoundException", f"No scalable target registered for "
                           f"service namespace: ecs, resource ID: service/{cluster}/{name}, "
                           "scalable dimension: ecs:service:DesiredCount")
        if what == "service_scaling_deregister":
            del svc.rec["scaling"]
            svc.scalers.clear()
            self._write(svc)
            return {}
        policy = str(body["policy"])
        if what == "service_scaling_put_policy":
            pols = scaling["policies"]
            cap = self.limits.ecs_scaling_policies_per_target_max
            if policy not in pols and len(pols) >= cap:
                raise EcsError("LimitExceededException", f"A scalable target has at most "
                               f"{cap} scaling policies (ecs_scaling_policies_per_target_max)")
            old = pols.get(policy)
            pols[policy] = {**body["config"], "created_ms": old["created_ms"] if old
                            else self.tasks.now_ms()}
            svc.scalers.pop(policy, None)
            (scaling.get("state") or {}).pop(policy, None)
            self._write(svc)
            return {}
        if what == "service_scaling_delete_policy":
            if policy not in scaling["policies"]:
                raise EcsError("ObjectNotFoundException", f"No scaling policy found for "
                               f"service namespace: ecs, resource ID: service/{cluster}/"
                               f"{name}, scalable dimension: ecs:service:DesiredCount, "
                               f"policy name: {policy}")
            del scaling["policies"][policy]
            svc.scalers.pop(policy, None)
            (scaling.get("state") or {}).pop(policy, None)
            self._write(svc)
            return {}
        raise EcsError("InvalidParameterException", f"unknown op {what[:40]}")

    def _stop_drained(self, task_id: str) -> None:
        self._draining.pop(task_id, None)
        reason = self._drain_reasons.pop(task_id, "Service scaled in")
        self.tasks.stop_by_scheduler(task_id, reason)

    def _save(self, svc: Svc) -> None:
        rec, core = svc.rec, svc.core
        snap = core.snapshot()
        used = {d["task_def"] for d in snap["deployments"]}
        if snap["_last_completed"] is not None:
            used.add(snap["_last_completed"]["task_def"])
        task_defs = {a: d for a, d in rec["task_defs"].items() if a in used}
        ids = {d["id"] for d in snap["deployments"]}
        if snap["_last_completed"] is not None:
            ids.add(snap["_last_completed"]["id"])
        if rec.get("deployment_volumes"):
            rec["deployment_volumes"] = {i: v for i, v in rec["deployment_volumes"].items()
                                         if i in ids}
        if snap == rec["core"] and task_defs == rec["task_defs"] \
                and rec["status"] == rec.get("saved_status"):
            return
        rec.update(core=snap, task_defs=task_defs, saved_status=rec["status"])
        self.db.execute("INSERT OR REPLACE INTO services VALUES (?,?,?,?,?)",
                        (rec["account"], rec["cluster"], rec["name"], rec["status"],
                         json.dumps(rec)))

    # -- the ops -------------------------------------------------------------------------------
    def op(self, account: str, what: str, body: dict[str, Any]) -> dict[str, Any]:
        self.ensure_running()
        if what.startswith("service_scaling_"):
            return self.scaling_op(account, what, body)
        if what in ("service_volumes", "service_volumes_add"):
            return self.volumes_op(account, what, body)
        cluster = str(body["cluster"])
        if what == "service_create":
            return self.create(account, cluster, body)
        if what == "service_update":
            return self.update(account, cluster, body)
        if what == "service_delete":
            return self.delete(account, cluster, str(body["service"]), bool(body.get("force")))
        if what == "service_describe":
            out, failures = [], []
            for name in body["services"]:
                svc = self.services.get((account, cluster, name))
                if svc is None:
                    failures.append({"arn": self.arn(account, cluster, name),
                                     "reason": "MISSING"})
                else:
                    out.append(self.view(svc, bool(body.get("tags"))))
            return {"services": out, "failures": failures}
        if what == "service_list":
            return {"serviceArns": sorted(
                self.arn(*k) for k, s in self.services.items()
                if k[:2] == (account, cluster) and s.rec["status"] != "INACTIVE")}
        raise EcsError("InvalidParameterException", f"unknown op {what[:40]}")

    def active_count(self, account: str) -> int:
        """The account's services not INACTIVE (a tenant migration waits for none)."""
        return sum(1 for k, s in self.services.items()
                   if k[0] == account and s.rec["status"] != "INACTIVE")

    def count(self, account: str, cluster: str) -> int:
        """The cluster's services not INACTIVE (its activeServicesCount)."""
        return sum(1 for k, s in self.services.items()
                   if k[:2] == (account, cluster) and s.rec["status"] != "INACTIVE")

    def create(self, account: str, cluster: str, body: dict[str, Any]) -> dict[str, Any]:
        name, desc, desired = str(body["service"]), body["taskDefinition"], int(body["desired"])
        key = (account, cluster, name)
        old = self.services.get(key)
        if old is not None and old.rec["status"] != "INACTIVE":
            raise EcsError("InvalidParameterException", "Creation of service was not "
                           "idempotent.")
        if self.active_count(account) >= self.limits.ecs_services_per_tenant_max:
            raise EcsError("LimitExceededException",
                           f"An account has at most {self.limits.ecs_services_per_tenant_max} "
                           "services (ecs_services_per_tenant_max)")
        from .tasks import check_runnable, task_definition_of
        task_def, _ = task_definition_of(desc, [])
        check_runnable(task_def)
        now = self.tasks.now_ms()
        core = es.Service(name, desired, config_of(body.get("config")), now_ms=now)
        rec = {"account": account, "cluster": cluster, "name": name, "status": "ACTIVE",
               "created_ms": now, "deleted_ms": None, "tags": list(body.get("tags") or []),
               "task_defs": {desc["taskDefinitionArn"]: desc}, "ids": {},
               "core": {}, "saved_status": None}
        if body.get("networkConfiguration"):
            rec["network_configuration"] = body["networkConfiguration"]
        svc = self.services[key] = Svc(rec, core)
        vols = body.get("volumes") or {}
        if vols.get("configs") and body.get("pool"):
            self._pool_add(svc, vols["configs"], body["pool"])
        self._feed(svc, es.Deploy(desc["taskDefinitionArn"], health_checked(desc)),
                   before=lambda: self._set_volumes(svc, body))
        self._save(svc)
        return {"service": self.view(svc, True)}

    def _active(self, account: str, cluster: str, name: str) -> Svc:
        svc = self.services.get((account, cluster, name))
        if svc is None:
            raise not_found()
        if svc.rec["status"] != "ACTIVE":
            raise not_active()
        return svc

    def update(self, account: str, cluster: str, body: dict[str, Any]) -> dict[str, Any]:
        svc = self._active(account, cluster, str(body["service"]))
        core = svc.core
        vols = body.get("volumes")
        old_vols = (svc.rec.get("deployment_volumes") or {}).get(core.primary.id, {}) \
            if core.primary is not None else {}
        from .tasks import check_runnable, task_definition_of
        if body.get("taskDefinition") is not None:  # (refused before anything changes)
            check_runnable(task_definition_of(body["taskDefinition"], [])[0])
        if vols and vols.get("configs") and body.get("pool"):
            # pooled before the tasks that take them are started (by configuration: an old
            # deployment's tasks take none of a new configuration's)
            self._pool_add(svc, vols["configs"], body["pool"])
        if body.get("config"):
            core.config = config_of(body["config"], core.config)
        if body.get("desired") is not None:
            self._feed(svc, es.SetDesiredCount(int(body["desired"])))
        desc = body.get("taskDefinition")
        primary = core.primary
        network = body.get("networkConfiguration")
        if network and network != svc.rec.get("network_configuration"):
            # ECS deploys anew for a changed network configuration: new tasks get it
            svc.rec["network_configuration"] = network
            if desc is None and primary is not None:
                desc = svc.rec["task_defs"].get(primary.task_def)
                body = {**body, "force": True}
        # volumeConfigurations: None keeps the deployment's; a change deploys anew (as ECS)
        if vols is None:
            vols = old_vols
        elif (vols.get("configs") or []) != (old_vols.get("configs") or []):
            if desc is None and primary is not None:
                desc = svc.rec["task_defs"].get(primary.task_def)
            body = {**body, "force": True}
        if desc is not None:
            svc.rec["task_defs"][desc["taskDefinitionArn"]] = desc
        set_vols = lambda: self._set_volumes(svc, {**body, "volumes": vols})  # noqa: E731
        if desc is not None and (primary is None
                                 or desc["taskDefinitionArn"] != primary.task_def
                                 or body.get("force")):
            self._feed(svc, es.Deploy(desc["taskDefinitionArn"], health_checked(desc)),
                       before=set_vols)
        elif body.get("force") and primary is not None:
            self._feed(svc, es.Deploy(primary.task_def, primary.health_checked),
                       before=set_vols)
        else:
            self._feed(svc, es.Tick())
        self._save(svc)
        return {"service": self.view(svc, False)}

    def delete(self, account: str, cluster: str, name: str, force: bool) -> dict[str, Any]:
        svc = self.services.get((account, cluster, name))
        if svc is None:
            raise not_found()
        if svc.rec["status"] == "INACTIVE":
            raise not_active()
        if svc.rec["status"] == "ACTIVE":
            if svc.core.desired_count > 0 and not force:
                raise EcsError("InvalidParameterException", "The service cannot be stopped "
                               "while it is scaled above 0.")
            svc.rec["status"] = "DRAINING"
            self._feed(svc, es.SetDesiredCount(0))
            if not svc.core.tasks:
                svc.rec["status"], svc.rec["deleted_ms"] = "INACTIVE", svc.core.now_ms
            self._save(svc)
        return {"service": self.view(svc, False)}

    # -- traffic (router/services.py: Host <service>.<cluster>.<account>.<region>.localhost) --
    def _targets(self, svc: Svc) -> list[tuple[str, str, int]]:
        """(task id, privateIpv4, port) of the service's RUNNING and healthy tasks not being
        stopped: the first port mapping of the first container that has one."""
        out = []
        for core_id in sorted(svc.core.tasks):
            task_id = svc.rec["ids"].get(core_id)
            if task_id is None or task_id in self._draining or not svc.core.healthy(core_id):
                continue
            rec = self.tasks.record(svc.rec["account"], task_id)
            if rec is None or not rec.get("private_ipv4") \
                    or rec["core"]["last_status"] != "RUNNING":
                continue
            port = next((p["containerPort"] for c in rec["def_doc"]["containerDefinitions"]
                         for p in c.get("portMappings") or []), None)
            if port is not None:
                out.append((task_id, str(rec["private_ipv4"]), int(port)))
        return out

    async def http(self, body: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request to a service, proxied to one of its tasks (round robin):
        ``{s, h: [[name, value]], b}``."""
        key = (str(body["a"]), str(body["cluster"]), str(body["service"]))
        svc = self.services.get(key)
        if svc is None or svc.rec["status"] == "INACTIVE":
            raise not_found()
        self.counters["http_requests"] += 1
        if key in self._requests:  # autoscaling counts them (ALBRequestCountPerTarget)
            self._requests[key] += 1
        if key not in self._busy:
            return await self._http(key, svc, body)
        self._concurrency(key, +1)  # in flight from here to the answer, held ones too
        try:
            return await self._http(key, svc, body)
        finally:
            self._concurrency(key, -1)

    def _concurrency(self, key: Key, delta: int) -> None:
        """The service's requests in flight, integrated over time (ECSServiceAverageConcurrency:
        Knative's concurrency, averaged over each sample as its queue-proxy does)."""
        busy = self._busy.get(key)
        if busy is None:
            return
        now = self.tasks.now_ms()
        busy[0] += busy[1] * max(now - busy[2], 0)
        busy[1] = max(busy[1] + delta, 0)
        busy[2] = now

    async def _http(self, key: Key, svc: Svc, body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.ecs_service_http_timeout_ms / 1000
        targets = self._targets(svc)
        held_until: float | None = None  # a request held while its service scales from zero
        if not targets and self._scales(svc):
            held_until = loop.time() + min(self.limits.ecs_service_cold_start_wait_ms,
                                           self.limits.ecs_service_http_timeout_ms) / 1000
            targets = await self._hold(key, svc, held_until)
        while True:
            if not targets:
                self.counters["http_no_task"] += 1
                return _plain(503, f"service {key[2]} has no RUNNING and healthy task with a "
                                   "port mapping")
            n = self._next.get(key, 0)
            self._next[key] = n + 1
            # Round robin; a task that refuses the connection (RUNNING, its server not
            # listening yet, or going) got nothing: the next one is tried, as a load balancer
            # would. A request held from zero waits on its first task's server (within its
            # hold): RUNNING comes before the server listens.
            for attempt in range(len(targets)):
                task_id, ip, port = targets[(n + attempt) % len(targets)]
                self._inflight[task_id] = self._inflight.get(task_id, 0) + 1
                try:
                    return await asyncio.wait_for(
                        _forward(ip, port, body, self.limits.ecs_service_http_bytes_max),
                        max(deadline - loop.time(), 0.001))
                except _Unreachable as e:
                    self.counters["http_task_unreachable"] += 1
                    if attempt == len(targets) - 1 and (held_until is None
                                                        or loop.time() >= held_until):
                        return _plain(502, f"no task of service {key[2]} took the "
                                           f"connection: {e}")
                except (TimeoutError, OSError, ValueError) as e:
                    self.counters["http_task_failed"] += 1
                    return _plain(502, f"task {task_id} did not answer: {type(e).__name__}: "
                                       f"{e}")
                finally:
                    left = self._inflight[task_id] = self._inflight[task_id] - 1
                    if left <= 0:
                        del self._inflight[task_id]
                        if task_id in self._draining:
                            self._stop_drained(task_id)
            assert held_until is not None  # (the loop returned otherwise)
            await asyncio.sleep(self.limits.ecs_service_cold_connect_retry_ms / 1000)
            targets = self._targets(svc)
            if not targets and self._scales(svc):
                targets = await self._hold(key, svc, held_until)

    @staticmethod
    def _scales(svc: Svc) -> bool:
        scaling = svc.rec.get("scaling")
        return bool(scaling and scaling["policies"] and svc.rec["status"] == "ACTIVE")

    async def _hold(self, key: Key, svc: Svc, until: float) -> list[tuple[str, str, int]]:
        """Scale from zero: a request to an autoscaled service with no task to answer it
        waits (until ``until``, loop time) while ``Demand`` brings ``max(1, min)`` tasks (at
        zero) and the first of them is RUNNING and healthy; its targets then (none: timed
        out)."""
        loop = asyncio.get_running_loop()
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self.counters["http_held"] += 1
        try:
            while True:
                now = self.tasks.now_ms()
                scalers = [self._scaler(svc, name)
                           for name in sorted(svc.rec["scaling"]["policies"])]
                demand = asc.Demand(self._waiting[key], svc.core.desired_count)
                for ins in asc.demand(scalers, demand, now):
                    self.counters["autoscale_set"] += 1
                    self._keep_scalers(svc)
                    self._activity(svc, ins.count, f"{demand.waiting} requests held at "
                                   f"the proxy for policy {ins.by}: {ins.reason}")
                    self._set_desired(svc, ins.count)
                targets = self._targets(svc)
                left = until - loop.time()
                if targets or left <= 0 or not self._scales(svc):
                    return targets
                ready = self._ready.setdefault(key, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), left)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    # -- the DescribeServices view ---------------------------------------------------------------
    def arn(self, account: str, cluster: str, name: str) -> str:
        return f"arn:aws:ecs:{self.tasks.cell.region}:{account}:service/{cluster}/{name}"

    def view(self, svc: Svc, tags: bool) -> dict[str, Any]:
        rec, core = svc.rec, svc.core
        region, account = self.tasks.cell.region, rec["account"]
        cfg = core.config
        deployments = []
        for d in core.deployments:
            mine = [t for t in core.tasks.values() if t.deployment_id == d.id]
            deployments.append({
                "id": d.id, "status": d.status, "taskDefinition": d.task_def,
                "desiredCount": core.desired_count if d is core.primary
                else sum(1 for t in mine if not t.stop_sent),
                "pendingCount": sum(1 for t in mine if t.status in ("PROVISIONING", "PENDING")),
                "runningCount": sum(1 for t in mine if t.status == "RUNNING"),
                "failedTasks": d.failed_tasks, "createdAt": d.created_ms / 1000,
                "updatedAt": core.now_ms / 1000, "launchType": "FARGATE",
                "platformVersion": "1.4.0", "platformFamily": "Linux",
                "rolloutState": d.rollout, "rolloutStateReason": d.rollout_reason})
            wire = ((rec.get("deployment_volumes") or {}).get(d.id) or {}).get("wire")
            if wire:
                deployments[-1]["volumeConfigurations"] = wire
        events = [{"id": _event_id(rec["name"], t, msg), "createdAt": t / 1000,
                   "message": msg} for t, msg in core.events]
        primary = core.primary
        out: dict[str, Any] = {
            "serviceArn": self.arn(account, rec["cluster"], rec["name"]),
            "serviceName": rec["name"],
            "clusterArn": f"arn:aws:ecs:{region}:{account}:cluster/{rec['cluster']}",
            "loadBalancers": [], "serviceRegistries": [], "status": rec["status"],
            "desiredCount": core.desired_count, "runningCount": core.running_count(),
            "pendingCount": core.pending_count(), "launchType": "FARGATE",
            "platformVersion": "1.4.0", "platformFamily": "Linux",
            "taskDefinition": primary.task_def if primary else "",
            "deploymentConfiguration": {
                "deploymentCircuitBreaker": {"enable": cfg.circuit_breaker.enable,
                                             "rollback": cfg.circuit_breaker.rollback},
                "maximumPercent": cfg.maximum_percent,
                "minimumHealthyPercent": cfg.minimum_healthy_percent},
            "deployments": deployments, "events": events[::-1],
            "createdAt": rec["created_ms"] / 1000, "placementConstraints": [],
            "placementStrategy": [], "schedulingStrategy": "REPLICA",
            "deploymentController": {"type": "ECS"}, "enableECSManagedTags": False,
            "propagateTags": "NONE", "enableExecuteCommand": False,
            "createdBy": f"arn:aws:iam::{account}:root"}
        if rec.get("network_configuration"):
            out["networkConfiguration"] = rec["network_configuration"]
        if tags:
            out["tags"] = rec["tags"]
        return out


def _event_id(name: str, t: int, msg: str) -> str:
    """A stable id for one event (ECS's are UUIDs): from its service, time and words."""
    h = hashlib.sha256(f"{name}\0{t}\0{msg}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _plain(status: int, text: str) -> dict[str, Any]:
    return {"s": status, "h": [["content-type", "text/plain"]], "b": text.encode() + b"\n"}


_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te",
                  "upgrade", "proxy-connection", "trailer"})


class _Unreachable(OSError):
    """The task refused or never took the connection: nothing of the request reached it."""


async def _forward(ip: str, port: int, body: dict[str, Any], bytes_max: int
                   ) -> dict[str, Any]:
    """HTTP/1.1 to the task through h11 (one connection per request, ``Connection: close``);
    the answer read whole, at most ``bytes_max`` bytes of body. ``_Unreachable`` when the
    connection itself fails (the caller may try another task: nothing was sent)."""
    try:
        reader, writer = await asyncio.open_connection(ip, port)
    except OSError as e:
        raise _Unreachable(f"{type(e).__name__}: {e}") from e
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=64 * 1024)
    try:
        data = bytes(body.get("b") or b"")
        headers = [(str(k), str(v)) for k, v in body.get("h") or []
                   if str(k).lower() not in _HOP and str(k).lower() != "x-forwarded-for"]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.append(("host", f"{ip}:{port}"))
        headers += [("content-length", str(len(data))), ("connection", "close")]
        if body.get("ip"):
            headers.append(("x-forwarded-for", str(body["ip"])))
        out = conn.send(h11.Request(method=str(body["m"]), target=str(body["p"]),
                                    headers=headers)) or b""
        if data:
            out += conn.send(h11.Data(data=data)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()
        status, answer_headers, answer = 0, [], bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(64 * 1024))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = [[k.decode("latin-1"), v.decode("latin-1")]
                                  for k, v in event.headers.raw_items()]  # names as sent
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > bytes_max:
                    raise ValueError(f"the answer is larger than {bytes_max} bytes")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ValueError("the task closed the connection before its answer")
    except h11.ProtocolError as e:
        raise ValueError(f"not an HTTP answer: {e}") from e
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return {"s": status, "h": [h for h in answer_headers if h[0].lower() not in _HOP],
            "b": bytes(answer)}


