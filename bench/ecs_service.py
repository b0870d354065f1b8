"""ECS services under traffic (issue #17): the first request's latency from zero, and failed
requests during a rolling deployment, counted by the clients.

Run from the repository root, as root::

    python -m bench.ecs_service [--tasks 10] [--clients 4] [--zero-runs 3]

Starts a region (``cellcloud up --detach``), pushes an image of the host's Python libraries
and a page, registers a task definition running ``python -m http.server 8080``.

- **Scale from zero**: a service at desiredCount 0 with a target-tracking policy on requests
  per task (application-autoscaling, MinCapacity 0); one GET through the router by Host header
  is held at the cell's proxy until the scaler's first task answers. Reported: that request's
  latency; then the service is scaled back to 0 (UpdateService) for the next run.
  Baseline in the same run: a GET to a service already running (warm).
- **Rolling deployment**: a service of ``--tasks`` tasks; ``--clients`` threads GET through
  the router by Host header without pause; UpdateService to a new revision (the default
  deployment configuration: 100 % minimum healthy, 200 % maximum); the load runs until the new
  deployment is COMPLETED and the old one gone. Every non-200 answer and every connection
  error counts as a failed request. Reported: requests, failed, the deployment's duration.

Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from bench.common.ecs import ecs_bench, wait_until


def _get(endpoint: str, host: str, timeout_s: float = 90.0) -> int:
    req = urllib.request.Request(endpoint + "/hello.txt", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--zero-runs", type=int, default=3)
    a = ap.parse_args()
    with ecs_bench("bench-ecs-svc-") as b:
        image, endpoint, ecs, aas = b.image, b.endpoint, b.ecs, b.aas
        service, host = b.service, b.host

        def taskdef(marker: str) -> None:
            ecs.register_task_definition(
                family="web", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
                cpu="256", memory="512", containerDefinitions=[{
                    "name": "web", "image": image, "portMappings": [{"containerPort": 8080}],
                    "environment": [{"name": "MARKER", "value": marker}],
                    "command": [sys.executable, "-m", "http.server", "8080", "--directory",
                                "/srv"]}])
        taskdef("1")
        taskdef("2")
        res: dict[str, Any] = {"machine": os.uname().nodename, "load_start": os.getloadavg()}
        # -- scale from zero ---------------------------------------------------------------
        ecs.create_service(cluster="bench", serviceName="zero", taskDefinition="web:1",
                           desiredCount=0)
        target = {"ServiceNamespace": "ecs", "ResourceId": "service/bench/zero",
                  "ScalableDimension": "ecs:service:DesiredCount"}
        aas.register_scalable_target(**target, MinCapacity=0, MaxCapacity=2)
        aas.put_scaling_policy(**target, PolicyName="requests",
                               PolicyType="TargetTrackingScaling",
                               TargetTrackingScalingPolicyConfiguration={
                                   "TargetValue": 1000.0, "PredefinedMetricSpecification": {
                                       "PredefinedMetricType": "ALBRequestCountPerTarget"}})
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(a.zero_runs):
            wait_until("zero tasks", lambda: service("zero")["runningCount"] == 0
                  and not ecs.list_tasks(cluster="bench", serviceName="zero",
                                         desiredStatus="RUNNING")["taskArns"])
            t0 = time.monotonic()
            status = _get(endpoint, host("zero"))
            cold.append(time.monotonic() - t0)
            if status != 200:
                raise RuntimeError(f"from zero: {status}")
            t0 = time.monotonic()
            _get(endpoint, host("zero"))
            warm.append(time.monotonic() - t0)
            ecs.update_service(cluster="bench", service="zero", desiredCount=0)
        res["scale_from_zero_ms"] = [round(x * 1000, 1) for x in cold]
        res["warm_request_ms"] = [round(x * 1000, 1) for x in warm]
        aas.deregister_scalable_target(**target)
        ecs.delete_service(cluster="bench", service="zero", force=True)
        # -- rolling deployment under traffic ----------------------------------------------
        ecs.create_service(cluster="bench", serviceName="roll", taskDefinition="web:1",
                           desiredCount=a.tasks)
        wait_until("the service steady", lambda: (lambda s: s["runningCount"] == a.tasks
                                             and len(s["deployments"]) == 1
                                             and s["deployments"][0]["rolloutState"]
                                             == "COMPLETED")(service("roll")))
        stop = threading.Event()
        lock = threading.Lock()
        outcomes: Counter[str] = Counter()

        def load() -> None:
            while not stop.is_set():
                try:
                    status = _get(endpoint, host("roll"), timeout_s=60)
                    key = "ok" if status == 200 else f"http_{status}"
                except OSError as e:
                    key = type(e).__name__
                with lock:
                    outcomes[key] += 1

        threads = [threading.Thread(target=load) for _ in range(a.clients)]
        for t in threads:
            t.start()
        stop.wait(3)  # steady traffic before the deployment
        t0 = time.monotonic()
        ecs.update_service(cluster="bench", service="roll", taskDefinition="web:2")
        wait_until("the deployment", lambda: (lambda s: len(s["deployments"]) == 1
                                         and s["deployments"][0]["taskDefinition"]
                                         .endswith(":2")
                                         and s["deployments"][0]["rolloutState"] == "COMPLETED"
                                         and s["runningCount"] == a.tasks)(service("roll")))
        res["rolling_deployment_s"] = round(time.monotonic() - t0, 1)
        stop.wait(3)
        stop.set()
        for t in threads:
            t.join()
        res["rolling_requests"] = sum(outcomes.values())
        res["rolling_failed"] = {k: v for k, v in outcomes.items() if k != "ok"}
        res["tasks"], res["clients"] = a.tasks, a.clients
        res["load_end"] = os.getloadavg()
        ecs.update_service(cluster="bench", service="roll", desiredCount=0)
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
