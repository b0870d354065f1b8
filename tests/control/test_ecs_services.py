"""ECS services end to end in one process (issue #17): the control plane's ECS shell
(control/ecs.py), the tenant's cell with its task manager and service loop
(frontend/tasks.py, frontend/services.py) and the FAKE agents of test_ecs_tasks.py.

Shapes and errors as botocore's ``ecs`` model has them; a rolling deployment within
minimumHealthyPercent/maximumPercent; a killed task replaced; the circuit breaker rolling back;
a cluster with services kept; a restarted frontend still driving its services. The cell's
clock is the test's (``w.now``), moved on while waiting, so backoffs pass at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.tasks import TaskManager
from tests.control.test_ecs_tasks import ERRORS, HOST, MODEL, REGION, A, World

SERVICE_MEMBERS = set(MODEL.shape_for("Service").members)
DEPLOYMENT_MEMBERS = set(MODEL.shape_for("Deployment").members)
LIMITS = replace(DEFAULT_LIMITS, ecs_service_tick_interval_ms=5)


class SvcWorld(World):
    """The cell's task manager on the test's clock."""

    def make_cell(self) -> Cell:
        cell = super().make_cell()
        assert cell.tasks is not None
        cell.tasks = TaskManager(cell, cell.tasks.store, self.limits, now_ms=lambda: self.now)
        return cell

    async def until(self, what: str, cond: Callable[[], Any]) -> None:
        """Until ``cond()`` holds; time passes meanwhile (100 ms of the cell's clock each
        round), bounded by 60 s of real time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            got = cond()
            if asyncio.iscoroutine(got):
                got = await got
            if got:
                return
            assert loop.time() < deadline, f"timed out waiting for {what}"
            self.now += 100
            await asyncio.sleep(0.005)

    async def service(self, name: str = "web") -> dict[str, Any]:
        out = await self.ok("DescribeServices", {"services": [name], "include": ["TAGS"]})
        assert out["failures"] == [], out
        s: dict[str, Any] = out["services"][0]
        return s

    async def steady(self, name: str = "web", revision: int | None = None) -> dict[str, Any]:
        async def done() -> bool:
            s = await self.service(name)
            (d, *rest) = s["deployments"]
            return (not rest and d["rolloutState"] == "COMPLETED"
                    and s["runningCount"] == s["desiredCount"] and s["pendingCount"] == 0
                    and (revision is None or d["taskDefinition"].endswith(f":{revision}")))
        await self.until(f"{name} steady", done)
        return await self.service(name)

    async def web_service_on(self, port: int, desired: int) -> None:
        """Service ``web`` (:func:`web_def`, ``desired`` tasks) whose tasks listen on
        127.0.0.1:``port``: the agents give their tasks 127.0.0.1, so a server of the test's
        on that port stands for them."""
        for a in self.agents.values():
            a.ip = "127.0.0.1"
        await self.ok("CreateCluster", {})
        d = web_def()
        d["containerDefinitions"][0]["portMappings"] = [{"containerPort": port}]
        await self.ok("RegisterTaskDefinition", d)
        await self.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                        "desiredCount": desired})

    def live_tasks(self) -> dict[str, dict[str, Any]]:
        """The tasks the agents hold (created, not yet destroyed)."""
        return {i: t for a in self.agents.values() for i, t in a.tasks.items()}

    def task_ids(self) -> set[str]:
        return set(self.live_tasks())


def web_def(family: str = "web", container: str = "web", **extra: Any) -> dict[str, Any]:
    return {"family": family, "networkMode": "awsvpc", "requiresCompatibilities": ["FARGATE"],
            "cpu": "256", "memory": "512", "containerDefinitions": [
                {"name": container, "image": f"{HOST}/team/web:v1",
                 "portMappings": [{"containerPort": 8080}], **extra}]}


async def answer_ok(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
    """A task's server (:meth:`SvcWorld.web_service_on`): each request answered 200 ``ok``."""
    await r.readuntil(b"\r\n\r\n")
    wr.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await wr.drain()
    wr.close()


def run(body: Callable[[SvcWorld], Any], tmp: Path, **world: Any) -> None:
    async def main() -> None:
        w = SvcWorld(tmp, **{"limits": LIMITS, **world})
        try:
            await body(w)
        finally:
            assert w.cell.tasks is not None
            await w.cell.tasks.close()
    asyncio.run(main())


def test_service_shapes_counts_and_deletion(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        out = await w.ok("CreateService", {
            "serviceName": "web", "taskDefinition": "web", "desiredCount": 2,
            "deploymentConfiguration": {"minimumHealthyPercent": 50, "maximumPercent": 200},
            "tags": [{"key": "k", "value": "v"}], "launchType": "FARGATE"})
        s = out["service"]
        assert set(s) <= SERVICE_MEMBERS
        assert s["serviceArn"] == f"arn:aws:ecs:{REGION}:{A}:service/default/web"
        assert s["status"] == "ACTIVE" and s["desiredCount"] == 2
        assert s["taskDefinition"] == f"arn:aws:ecs:{REGION}:{A}:task-definition/web:1"
        (d,) = s["deployments"]
        assert set(d) <= DEPLOYMENT_MEMBERS and d["status"] == "PRIMARY"
        assert d["rolloutState"] == "IN_PROGRESS"
        s = await w.steady()
        assert s["runningCount"] == 2 and s["tags"] == [{"key": "k", "value": "v"}]
        assert any("has reached a steady state" in e["message"] for e in s["events"])
        assert all(set(e) == {"id", "createdAt", "message"} for e in s["events"])
        # its tasks: started by the deployment, grouped by the service
        arns = (await w.ok("ListTasks", {}))["taskArns"]
        assert len(arns) == 2
        t = await w.task(arns[0])
        assert t["group"] == "service:web" and t["startedBy"] == d["id"]
        assert (await w.ok("ListTasks", {"serviceName": "web"}))["taskArns"] == arns
        assert (await w.err("ListTasks", {"serviceName": "other"}))[0] \
            == "ServiceNotFoundException"
        assert (await w.ok("ListServices", {}))["serviceArns"] == [s["serviceArn"]]
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert c["activeServicesCount"] == 1 and c["runningTasksCount"] == 2
        # errors, as botocore names them
        assert (await w.err("DeleteCluster", {"cluster": "default"}))[0] \
            == "ClusterContainsServicesException"
        assert await w.err("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                             "desiredCount": 1}) \
            == ("InvalidParameterException", "Creation of service was not idempotent.")
        err, msg = await w.err("CreateService", {
            "serviceName": "lb", "taskDefinition": "web", "desiredCount": 1,
            "loadBalancers": [{"targetGroupArn": "x", "containerPort": 80}]})
        assert err == "InvalidParameterException" and "loadBalancers" in msg
        err, msg = await w.err("CreateService", {
            "serviceName": "x", "taskDefinition": "web", "desiredCount": 1,
            "deploymentConfiguration": {"minimumHealthyPercent": 100, "maximumPercent": 100}})
        assert err == "InvalidParameterException"
        err, msg = await w.err("UpdateService", {
            "service": "web", "deploymentConfiguration": {"alarms": {"enable": True}}})
        assert err == "InvalidParameterException" and "alarms" in msg
        err, msg = await w.err("UpdateService", {"service": "web", "desiredCount": 10 ** 9})
        assert err == "InvalidParameterException" and "ecs_service_desired_count_max" in msg
        assert (await w.err("UpdateService", {"service": "nope", "desiredCount": 1}))[0] \
            == "ServiceNotFoundException"
        assert (await w.err("CreateService", {"serviceName": "x", "taskDefinition": "nope",
                                              "desiredCount": 1}))[0] == "ClientException"
        missing = await w.ok("DescribeServices", {"services": ["nope"]})
        assert missing["services"] == [] and missing["failures"] == [
            {"arn": f"arn:aws:ecs:{REGION}:{A}:service/default/nope", "reason": "MISSING"}]
        assert (await w.err("DeleteService", {"service": "web"})) == (
            "InvalidParameterException",
            "The service cannot be stopped while it is scaled above 0.")
        # deleted with force: DRAINING while its tasks stop, then INACTIVE
        out = await w.ok("DeleteService", {"service": "web", "force": True})
        assert out["service"]["status"] in ("DRAINING", "INACTIVE")
        await w.until("INACTIVE", lambda: _status(w, "INACTIVE"))
        assert w.task_ids() == set()
        assert (await w.ok("ListServices", {}))["serviceArns"] == []
        assert (await w.err("UpdateService", {"service": "web", "desiredCount": 1}))[0] \
            == "ServiceNotActiveException"
        c = (await w.ok("DescribeClusters", {}))["clusters"][0]
        assert c["activeServicesCount"] == 0
        await w.ok("DeleteCluster", {"cluster": "default"})
        for code in ("ClusterContainsServicesException", "ServiceNotFoundException",
                     "ServiceNotActiveException"):
            assert code in ERRORS
    run(body, tmp_path)


async def _status(w: SvcWorld, status: str) -> bool:
    return bool((await w.service())["status"] == status)


def test_a_rolling_deployment_stays_within_its_bounds(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {
            "serviceName": "web", "taskDefinition": "web:1", "desiredCount": 4,
            "deploymentConfiguration": {"minimumHealthyPercent": 50, "maximumPercent": 150}})
        await w.steady()
        old = w.task_ids()
        await w.ok("RegisterTaskDefinition", web_def(command=["serve", "v2"]))
        out = await w.ok("UpdateService", {"service": "web", "taskDefinition": "web:2"})
        primary, active = out["service"]["deployments"]
        assert primary["status"] == "PRIMARY" and primary["taskDefinition"].endswith(":2")
        assert active["status"] == "ACTIVE" and active["taskDefinition"].endswith(":1")
        most, fewest_running = 0, 4

        async def rolled() -> bool:
            nonlocal most, fewest_running
            s = await w.service()
            most = max(most, len(w.live_tasks()))  # never above 150 % of 4
            fewest_running = min(fewest_running, s["runningCount"])
            d = s["deployments"]
            return len(d) == 1 and d[0]["rolloutState"] == "COMPLETED" \
                and s["runningCount"] == 4
        await w.until("rolled", rolled)
        assert most <= 6 and fewest_running >= 2
        new = w.task_ids()
        assert len(new) == 4 and not new & old
        for t in w.live_tasks().values():
            assert t["body"]["containers"][0]["argv"] == ["serve", "v2"]
        # forceNewDeployment rolls every task again, on the same revision
        await w.ok("UpdateService", {"service": "web", "forceNewDeployment": True})
        s = await w.steady(revision=2)
        assert not w.task_ids() & new and s["runningCount"] == 4
        # scale in
        await w.ok("UpdateService", {"service": "web", "desiredCount": 1})
        await w.steady()
        assert len(w.task_ids()) == 1
    run(body, tmp_path)


def test_a_killed_or_stopped_task_is_replaced(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 2})
        await w.steady()
        victim = sorted(w.task_ids())[0]
        agent = next(a for a in w.agents.values() if victim in a.tasks)
        agent.exit(victim, "web", 137, "killed")
        t = await w.wait_status(f"arn:aws:ecs:{REGION}:{A}:task/default/{victim}", "STOPPED")
        assert t["stopCode"] == "EssentialContainerExited"

        async def replaced() -> bool:
            # the service's own view first (its runningCount may still count the victim
            # until its next tick has seen the stop), then the agents' tasks
            s = await w.service()
            seen = any("failed: EssentialContainerExited" in e["message"] for e in s["events"])
            return seen and s["runningCount"] == 2 and victim not in w.task_ids()
        await w.until("replaced", replaced)
        s = await w.service()
        assert s["deployments"][0]["failedTasks"] == 1
        assert any("failed: EssentialContainerExited" in e["message"] for e in s["events"])
        # a task stopped by the user is replaced too (not a failure of the deployment)
        other = sorted(w.task_ids())[0]
        await w.ok("StopTask", {"task": other})

        async def again() -> bool:
            s = await w.service()
            return (s["runningCount"] == 2 and other not in w.task_ids()
                    and len(w.task_ids()) == 2)
        await w.until("replaced again", again)
        assert (await w.service())["deployments"][0]["failedTasks"] == 1
    run(body, tmp_path)


def test_the_circuit_breaker_rolls_back(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {
            "serviceName": "web", "taskDefinition": "web:1", "desiredCount": 2,
            "deploymentConfiguration": {"deploymentCircuitBreaker": {"enable": True,
                                                                     "rollback": True}}})
        await w.steady()
        for a in w.agents.values():
            a.health_exit = 1  # revision 2's health check never passes
        await w.ok("RegisterTaskDefinition", web_def(healthCheck={
            "command": ["CMD-SHELL", "curl -f localhost:8080"], "interval": 5, "timeout": 2,
            "retries": 1}))
        await w.ok("UpdateService", {"service": "web", "taskDefinition": "web:2"})
        s = await w.steady(revision=1)  # rolled back
        assert s["taskDefinition"].endswith("web:1")
        messages = [e["message"] for e in s["events"]]
        assert any("failed: 3 tasks failed" in m for m in messages), messages
        assert any("rolling back to" in m and m.endswith("web:1.") for m in messages), messages
        assert any("container health checks failed" in m for m in messages), messages
        assert s["runningCount"] == 2
        for t in w.live_tasks().values():  # revision 1's tasks, never checked
            assert t["body"]["containers"][0]["argv"] == ["/bin/serve"]
    run(body, tmp_path)


def test_no_room_leaves_tasks_pending_with_a_reason(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        # 2 agents in the cluster's shard, 1024 MiB each: four tasks of 512 MiB fit
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 5})

        async def said() -> bool:
            s = await w.service()
            return s["runningCount"] == 4 and any(
                "was unable to place a task" in e["message"] and "RESOURCE:MEMORY"
                in e["message"] for e in s["events"])
        await w.until("a placement event", said)
        s = await w.service()
        assert s["deployments"][0]["rolloutState"] == "IN_PROGRESS"
        assert s["deployments"][0]["failedTasks"] == 0
    run(body, tmp_path, memory_mb_max=1024)


def test_a_restarted_frontend_keeps_its_services(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 2})
        before = await w.steady()
        ids = w.task_ids()
        assert w.cell.tasks is not None
        await w.cell.tasks.close()  # the process ends; its tasks go on on their agents
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        after = await w.steady()
        assert after["deployments"] == [{**before["deployments"][0],
                                         "updatedAt": after["deployments"][0]["updatedAt"]}]
        assert w.task_ids() == ids  # the same tasks, none started anew
        victim = sorted(ids)[0]
        next(a for a in w.agents.values() if victim in a.tasks).exit(victim, "web", 1)

        async def replaced() -> bool:
            s = await w.service()
            return s["runningCount"] == 2 and victim not in w.task_ids()
        await w.until("replaced after the restart", replaced)
    run(body, tmp_path)


def test_traffic_goes_to_running_tasks_and_a_stopped_one_drains(tmp_path: Path) -> None:
    """The cell's side of a service's traffic (``ecs_http``): a request proxied to a RUNNING
    task's privateIpv4:containerPort (here a server on 127.0.0.1 stands for the tasks); a task
    the service stops takes no new request, and its request in flight finishes before the
    task is stopped."""
    async def body(w: SvcWorld) -> None:
        seen: list[tuple[str, str]] = []
        gate, got_slow = asyncio.Event(), asyncio.Event()

        async def handle(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
            head = (await r.readuntil(b"\r\n\r\n")).decode()
            path = head.split(" ")[1]
            fwd = next((x.split(":", 1)[1].strip() for x in head.split("\r\n")
                        if x.lower().startswith("x-forwarded-for:")), "")
            seen.append((path, fwd))
            if path == "/slow":
                got_slow.set()
                await gate.wait()
            text = f"hello {path}".encode()
            wr.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d"
                     b"\r\n\r\n%s" % (len(text), text))
            await wr.drain()
            wr.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for a in w.agents.values():
            a.ip = "127.0.0.1"
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        d = web_def()
        d["containerDefinitions"][0]["portMappings"] = [{"containerPort": port}]
        await w.ok("RegisterTaskDefinition", d)
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web:2",
                                     "desiredCount": 2})
        await w.steady()
        assert w.cell.tasks is not None
        sm = w.cell.tasks.services

        def req(path: str) -> dict[str, Any]:
            return {"a": A, "cluster": "default", "service": "web", "m": "GET", "p": path,
                    "h": [["host", f"web.default.{A}.{REGION}.localhost"]], "b": b"",
                    "ip": "192.0.2.7"}
        out = await sm.http(req("/x?q=1"))
        assert out["s"] == 200 and out["b"] == b"hello /x?q=1"
        assert ["Content-Type", "text/plain"] in out["h"]
        assert seen == [("/x?q=1", "192.0.2.7")]
        slow = asyncio.ensure_future(sm.http(req("/slow")))
        await got_slow.wait()
        (busy,) = sm._inflight
        await w.ok("UpdateService", {"service": "web", "desiredCount": 0})
        idle = (w.task_ids() - {busy}).pop()
        await w.wait_status(idle, "STOPPED")
        # the busy one drains: still RUNNING, but no new request goes to it
        t = await w.task(busy)
        assert t["lastStatus"] == "RUNNING" and t["desiredStatus"] == "RUNNING"
        assert (await sm.http(req("/after")))["s"] == 503
        assert [p for p, _ in seen] == ["/x?q=1", "/slow"]
        gate.set()
        assert (await slow)["b"] == b"hello /slow"
        t = await w.wait_status(busy, "STOPPED")
        assert t["stopCode"] == "ServiceSchedulerInitiated"
        # an unknown service is the API's error
        try:
            await sm.http({**req("/"), "service": "nope"})
            raise AssertionError("an unknown service answered")
        except Exception as e:
            assert getattr(e, "type", "") == "ServiceNotFoundException"
        server.close()
    run(body, tmp_path)


def test_the_host_names_a_service_its_cluster_and_account() -> None:
    from cellcloud.router.services import host_service
    assert host_service(f"web.prod.{A}.{REGION}.localhost:8080", REGION) == ("web", "prod", A)
    assert host_service(f"Web.Prod.{A}.{REGION}.LOCALHOST", REGION) == ("web", "prod", A)
    for other in (f"web.prod.{A}.other-1.localhost", f"web.{A}.{REGION}.localhost",
                  f"web.prod.1234.{REGION}.localhost", f"x.lambda-url.{REGION}.localhost",
                  f"a.b.web.prod.{A}.{REGION}.localhost", "localhost:8080"):
        assert host_service(other, REGION) is None, other


def test_a_tenant_with_a_service_is_not_migrated(tmp_path: Path) -> None:
    """A service lives in its cell's store, even at desiredCount 0 with no task: the export
    refuses until it is deleted (INACTIVE), rather than leaving it behind in a cell that no
    longer serves the tenant."""
    from cellcloud.frontend.clone import CloneError, export_tenant

    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 0})
        await w.steady()
        try:
            export_tenant(w.cell, A)
            raise AssertionError("exported a tenant with a service")
        except CloneError as e:
            assert "1 ECS services not yet INACTIVE" in str(e)
        await w.ok("DeleteService", {"service": "web"})
        await w.until("INACTIVE", lambda: _status(w, "INACTIVE"))
        export_tenant(w.cell, A)
    run(body, tmp_path)


def test_a_task_draining_when_the_frontend_restarts_is_still_stopped(tmp_path: Path) -> None:
    """A stop the service deferred (requests in flight) lives only in the process: a restarted
    frontend's service loop sees the task it meant to stop still running and stops it."""
    async def body(w: SvcWorld) -> None:
        gate, got = asyncio.Event(), asyncio.Event()

        async def handle(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            got.set()
            await gate.wait()
            wr.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        await w.web_service_on(server.sockets[0].getsockname()[1], desired=1)
        await w.steady()
        assert w.cell.tasks is not None
        (busy,) = w.task_ids()
        slow = asyncio.ensure_future(w.cell.tasks.services.http({
            "a": A, "cluster": "default", "service": "web", "m": "GET", "p": "/", "h": [],
            "b": b""}))
        await got.wait()
        await w.ok("UpdateService", {"service": "web", "desiredCount": 0})
        assert (await w.task(busy))["desiredStatus"] == "RUNNING"  # draining
        await w.cell.tasks.close()  # the process ends while the task drains
        slow.cancel()
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        t = await w.wait_status(busy, "STOPPED")
        assert t["stopCode"] == "ServiceSchedulerInitiated"
        await w.steady()
        gate.set()
        server.close()
    run(body, tmp_path)


def test_a_task_that_refuses_the_connection_is_skipped(tmp_path: Path) -> None:
    """A RUNNING task whose server is not listening yet (no health check: RUNNING is all ECS
    knows) refuses the proxy's connection; nothing reached it, so the next task answers
    instead of a 502 (a rolling deployment of 10 tasks under traffic failed 62 of 3,953
    requests with 502 before)."""
    import socket

    async def body(w: SvcWorld) -> None:
        server = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web:1",
                                     "desiredCount": 1})
        await w.steady()
        assert w.cell.tasks is not None
        sm = w.cell.tasks.services
        (live,) = w.task_ids()
        sm._targets = lambda svc: [("starting", "127.0.0.1", closed),  # type: ignore[method-assign]
                                   (live, "127.0.0.1", port)]
        req = {"a": A, "cluster": "default", "service": "web", "m": "GET", "p": "/",
               "h": [["host", f"web.default.{A}.{REGION}.localhost"]], "b": b""}
        answers = [await sm.http(dict(req)) for _ in range(4)]
        assert [(a["s"], a["b"]) for a in answers] == [(200, b"ok")] * 4
        assert sm.counters["http_task_unreachable"] == 2  # every other request tried it first
        sm._targets = lambda svc: [("starting", "127.0.0.1", closed)]  # type: ignore[method-assign]
        assert (await sm.http(dict(req)))["s"] == 502  # none takes it: still an answer
        server.close()
    run(body, tmp_path)


def test_a_services_network_configuration_is_echoed_and_reaches_its_tasks(
        tmp_path: Path) -> None:
    """CreateService's awsvpcConfiguration is DescribeServices' networkConfiguration and each
    task's (DISABLED: an address without egress); UpdateService with another one deploys
    anew, and the new tasks get it (ENABLED: egress)."""
    async def body(w: SvcWorld) -> None:
        await w.ok("CreateCluster", {})
        await w.ok("RegisterTaskDefinition", web_def())
        net = {"awsvpcConfiguration": {"subnets": ["subnet-0aa"], "securityGroups": ["sg-0bb"]}}
        s = (await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                          "desiredCount": 1, "networkConfiguration": net})
             )["service"]
        echoed = {"awsvpcConfiguration": {**net["awsvpcConfiguration"],
                                          "assignPublicIp": "DISABLED"}}
        assert s["networkConfiguration"] == echoed
        await w.steady()

        def modes() -> set[str]:
            return {t["body"]["network"] for t in w.live_tasks().values()}
        assert modes() == {"private"}
        public = {"awsvpcConfiguration": {**echoed["awsvpcConfiguration"],
                                          "assignPublicIp": "ENABLED"}}
        s = (await w.ok("UpdateService", {"service": "web", "networkConfiguration": public})
             )["service"]
        assert s["networkConfiguration"] == public
        await w.until("the new deployment's task", lambda: modes() == {"egress"})
        assert (await w.service())["networkConfiguration"] == public
        err, msg = await w.err("UpdateService", {"service": "web", "networkConfiguration": {
            "awsvpcConfiguration": {"subnets": ["x"]}}})
        assert err == "InvalidParameterException" and "subnet" in msg
    run(body, tmp_path)
