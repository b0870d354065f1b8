"""Issue #17's Done-when, the kill: a service of the two-container task (a web server and a
sidecar that reads it over localhost) serves HTTP through the router while one of its tasks'
web server is killed with SIGKILL from outside the region (found in /proc by a mark in its
environment, signalled by the test, not by any cellcloud API). The client — the oracle — counts
requests that still fail after one retry: none may. The service replaces the task, and the
killed one reads STOPPED with its essential container's exit code."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.compat.test_ecs_api import ecs, pair_image, region  # noqa: F401  (fixtures)
from tests.integration.conftest import Region

pytestmark = pytest.mark.integration


def _marked_pids(mark: str) -> list[int]:
    """Host pids of processes whose environment carries ``MARK=<mark>`` (read from /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if f"MARK={mark}".encode() in env and b"http.server" in argv:
            found.append(int(name))
    return found


class _Traffic(threading.Thread):
    """GETs through the router by Host header, each retried once on failure."""

    def __init__(self, url: str, host: str) -> None:
        super().__init__(daemon=True)
        self.url, self.host = url, host
        self.ok = 0
        self.retried = 0
        self.failed: list[str] = []
        self.stop = threading.Event()

    def _get(self) -> str | None:
        req = urllib.request.Request(self.url, headers={"Host": self.host})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
            return None if body == b"hello over localhost\n" else f"body {body!r}"
        except (OSError, urllib.error.HTTPError) as e:
            return repr(e)

    def run(self) -> None:
        while not self.stop.is_set():
            err = self._get()
            if err is not None:
                self.retried += 1
                err = self._get()
            if err is None:
                self.ok += 1
            else:
                self.failed.append(err)

    def wait_ok(self, n: int) -> None:
        deadline = time.monotonic() + 120
        target = self.ok + n
        while self.ok < target:
            assert time.monotonic() < deadline, ("traffic stalled", self.ok, self.failed)
            assert self.is_alive()
            time.sleep(0.05)


def _service(ecs: Any) -> dict[str, Any]:  # noqa: F811
    return dict(ecs.describe_services(cluster="kill", services=["web"])["services"][0])


def _until(what: str, ok: Any) -> Any:
    deadline = time.monotonic() + 120
    while True:
        value = ok()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture
def traffic(region: Region) -> Iterator[_Traffic]:  # noqa: F811
    host = (f"web.kill.{region.doc['account_id']}.{region.doc['region']}.localhost:"
            f"{region.endpoint.rsplit(':', 1)[1]}")
    t = _Traffic(region.endpoint + "/hello.txt", host)
    yield t
    t.stop.set()
    t.join(timeout=120)


def test_a_service_survives_a_killed_task(ecs: Any, pair_image: str,  # noqa: F811
                                          traffic: _Traffic) -> None:
    mark = uuid.uuid4().hex
    ecs.create_cluster(clusterName="kill")
    ecs.register_task_definition(
        family="killpair", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
        cpu="256", memory="512", containerDefinitions=[
            {"name": "web", "image": pair_image, "portMappings": [{"containerPort": 8080}],
             "environment": [{"name": "MARK", "value": mark}],
             "command": [sys.executable, "-u", "-m", "http.server", "8080", "--directory",
                         "/srv"]},
            {"name": "side", "image": pair_image, "essential": False,
             "command": [sys.executable, "/app/client.py"],
             "dependsOn": [{"containerName": "web", "condition": "START"}]}])
    ecs.create_service(cluster="kill", serviceName="web", taskDefinition="killpair:1",
                       desiredCount=2, launchType="FARGATE")
    _until("2 RUNNING", lambda: _service(ecs)["runningCount"] == 2)
    first = set(ecs.list_tasks(cluster="kill", serviceName="web")["taskArns"])
    assert len(first) == 2
    pids = _until("both web servers seen in /proc", lambda: (p := _marked_pids(mark))
                  and len(p) == 2 and p)

    traffic.start()
    traffic.wait_ok(20)
    os.kill(pids[0], signal.SIGKILL)  # a task dies under traffic, not through the API
    killed = _until("a task STOPPED", lambda: [
        t for t in ecs.describe_tasks(cluster="kill", tasks=sorted(first))["tasks"]
        if t["lastStatus"] == "STOPPED"])
    assert len(killed) == 1, killed
    web = next(c for c in killed[0]["containers"] if c["name"] == "web")
    assert web["exitCode"] == 137, killed[0]
    assert killed[0]["stopCode"] == "EssentialContainerExited", killed[0]

    def replaced() -> bool:
        now = set(ecs.list_tasks(cluster="kill", serviceName="web")["taskArns"])
        return len(now) == 2 and killed[0]["taskArn"] not in now \
            and _service(ecs)["runningCount"] == 2
    _until("the killed task replaced", replaced)
    traffic.wait_ok(20)
    traffic.stop.set()
    traffic.join(timeout=120)
    print(f"answered {traffic.ok}, retried {traffic.retried}")
    assert traffic.failed == [], (traffic.failed, traffic.ok, traffic.retried)
    assert traffic.ok >= 40
    ecs.delete_service(cluster="kill", service="web", force=True)
