"""An ECS service under a step of load (issue #17): how fast the autoscaler adds tasks, and
how fast it goes back to its minimum, counted by the clients.

Run from the repository root, as root::

    python -m bench.ecs_autoscale [--rate 2] [--clients 20] [--target 400] [--max 10]
                                  [--before-s 20] [--step-s 60] [--cooldown-s 30]

Starts a region (``cellcloud up --detach``), pushes an image of the host's Python libraries,
registers a task definition whose server answers each GET with the name of the task that
answered (its hostname, and the address it was reached at): the clients count distinct tasks
from the answers — the client's observation is the oracle, not the cell's counters.

- **The autoscaled service**: desiredCount 1, a scalable target [1, ``--max``] and one
  target-tracking policy on ``ALBRequestCountPerTarget`` (``--target`` requests per task per
  minute; ScaleOutCooldown 0, ScaleInCooldown ``--cooldown-s``). One client for
  ``--before-s``, then ``--clients`` clients for ``--step-s`` (each paced at ``--rate``
  requests a second, through the router by Host header), then none. Reported, from the step:
  when the first task other than the first one answered a request; when the target was met
  (over the trailing 5 s, the requests answered per distinct answering task, per minute, at or
  under ``--target``); from the stop: when desiredCount and the RUNNING tasks (DescribeTasks)
  were back at 1, against ScaleInCooldown + 60 s.
- **Baseline, same run**: the same ``--clients`` clients against a service fixed at the size
  the autoscaled one settled at (no policy), for the same time: latency p50/p99 of the step
  phase over the baseline's.

Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from bench.common.ecs import ecs_bench, wait_until

# The task's server: each GET answered with "<hostname> <address it was reached at>".
SERVER = """
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s\\n" % (socket.gethostname(), self.connection.getsockname()[0])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

Sample = tuple[float, float, int, str]  # (start, latency s, status, the task that answered)


class Load:
    """Clients through the router, each paced at ``rate`` requests a second; their samples."""

    def __init__(self, endpoint: str, host: str, rate: float) -> None:
        self.endpoint, self.host, self.interval = endpoint, host, 1.0 / rate
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def _get(self) -> tuple[int, str]:
        req = urllib.request.Request(self.endpoint + "/", headers={"Host": self.host})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return int(r.status), r.read().decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            return int(e.code), ""
        except OSError as e:
            return 0, type(e).__name__

    def _client(self, stop: threading.Event) -> None:
        nxt = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic()
            status, who = self._get()
            with self.lock:
                self.samples.append((t0, time.monotonic() - t0, status, who))
            nxt += self.interval
            stop.wait(max(0.0, nxt - time.monotonic()))  # the pace, not a wait on a state

    def clients(self, n: int) -> None:
        """Run ``n`` clients from now (more are started, extra ones stopped)."""
        while len(self.threads) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._client, args=(stop,), daemon=True)
            t.start()
            self.threads.append((t, stop))
        while len(self.threads) > n:
            t, stop = self.threads.pop()
            stop.set()
            t.join()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=2.0, help="requests a second per client")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--target", type=float, default=400.0,
                    help="ALBRequestCountPerTarget: requests per task per minute")
    ap.add_argument("--max", type=int, default=10)
    ap.add_argument("--before-s", type=float, default=20.0)
    ap.add_argument("--step-s", type=float, default=60.0)
    ap.add_argument("--cooldown-s", type=int, default=30)
    a = ap.parse_args()
    with ecs_bench("bench-ecs-as-") as b:
        image, endpoint, ecs, aas = b.image, b.endpoint, b.ecs, b.aas
        service, host = b.service, b.host
        ecs.register_task_definition(
            family="web", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="256", memory="512", containerDefinitions=[{
                "name": "web", "image": image, "portMappings": [{"containerPort": 8080}],
                "command": [sys.executable, "-c", SERVER]}])

        def running(name: str) -> int:
            arns = ecs.list_tasks(cluster="bench", serviceName=name,
                                  desiredStatus="RUNNING")["taskArns"]
            if not arns:
                return 0
            return sum(1 for t in ecs.describe_tasks(cluster="bench", tasks=arns)["tasks"]
                       if t["lastStatus"] == "RUNNING")

        def steady(name: str, n: int) -> float:
            return wait_until(f"{name} at {n}", lambda: (lambda s: s["runningCount"] == n
                              and s["desiredCount"] == n and len(s["deployments"]) == 1)(
                                  service(name)) and running(name) == n, poll_s=0.25)

        res: dict[str, Any] = {"machine": os.uname().nodename, "nproc": os.cpu_count(),
                               "load_start": os.getloadavg(), "args": vars(a)}
        # -- the autoscaled service ----------------------------------------------------------
        ecs.create_service(cluster="bench", serviceName="auto", taskDefinition="web:1",
                           desiredCount=1)
        steady("auto", 1)
        target = {"ServiceNamespace": "ecs", "ResourceId": "service/bench/auto",
                  "ScalableDimension": "ecs:service:DesiredCount"}
        aas.register_scalable_target(**target, MinCapacity=1, MaxCapacity=a.max)
        aas.put_scaling_policy(**target, PolicyName="requests",
                               PolicyType="TargetTrackingScaling",
                               TargetTrackingScalingPolicyConfiguration={
                                   "TargetValue": a.target, "ScaleOutCooldown": 0,
                                   "ScaleInCooldown": a.cooldown_s,
                                   "PredefinedMetricSpecification": {
                                       "PredefinedMetricType": "ALBRequestCountPerTarget"}})
        load = Load(endpoint, host("auto"), a.rate)
        load.clients(1)
        time.sleep(a.before_s)  # the phase's length: one client's steady load
        with load.lock:
            first = {s[3] for s in load.samples if s[2] == 200}
        t_step, wall_step = time.monotonic(), time.time()
        load.clients(a.clients)
        time.sleep(a.step_s)  # the step's length
        t_stop = time.monotonic()
        load.clients(0)
        settled = service("auto")["desiredCount"]
        t_min = steady("auto", 1)
        activities = aas.describe_scaling_activities(ServiceNamespace="ecs")[
            "ScalingActivities"]
        samples = load.samples
        step = [s for s in samples if t_step <= s[0] < t_stop]
        new = [s[0] + s[1] - t_step for s in step if s[2] == 200 and s[3] not in first]
        res["first_added_task_answered_s"] = round(min(new), 2) if new else None
        # the target met: over the trailing 5 s, answers per distinct task (per minute)
        met = None
        ok = sorted((s[0] + s[1], s[3]) for s in step if s[2] == 200)
        for i, (t, _) in enumerate(ok):
            if t - t_step < 5:
                continue
            window = [w for w in ok[:i + 1] if w[0] > t - 5]
            per_task = len(window) / len({w[1] for w in window}) * 60 / 5
            if per_task <= a.target:
                met = round(t - t_step, 2)
                break
        res["target_met_s"] = met
        res["distinct_tasks_answering"] = len({s[3] for s in step if s[2] == 200})
        res["settled_desired_count"] = settled
        res["back_at_min_s"] = round(t_min - t_stop, 1)
        res["scale_in_cooldown_plus_60_s"] = a.cooldown_s + 60
        res["step_requests"] = len(step)
        res["step_failed"] = sum(1 for s in step if s[2] != 200)
        lat = [s[1] for s in step if s[2] == 200]
        res["step_latency_ms_p50_p99"] = [round(_pct(lat, 0.5) * 1000, 1),
                                          round(_pct(lat, 0.99) * 1000, 1)]
        res["step_client_rate_per_s"] = round(len(step) / (t_stop - t_step), 1)
        # each change of desiredCount, seconds from the step
        res["activities"] = [(round(x["StartTime"].timestamp() - wall_step, 1),
                              x["Description"]) for x in reversed(activities)]
        aas.deregister_scalable_target(**target)
        ecs.update_service(cluster="bench", service="auto", desiredCount=0)
        steady("auto", 0)
        ecs.delete_service(cluster="bench", service="auto", force=True)
        # -- the baseline: a service fixed at the size the autoscaled one settled at -----------
        ecs.create_service(cluster="bench", serviceName="fixed", taskDefinition="web:1",
                           desiredCount=settled)
        steady("fixed", settled)
        base = Load(endpoint, host("fixed"), a.rate)
        base.clients(a.clients)
        t0 = time.monotonic()
        time.sleep(min(a.step_s, 30.0))  # the baseline's length
        base.clients(0)
        bsteps = [s for s in base.samples if s[0] >= t0]
        blat = [s[1] for s in bsteps if s[2] == 200]
        res["baseline_tasks"] = settled
        res["baseline_requests"] = len(bsteps)
        res["baseline_failed"] = sum(1 for s in bsteps if s[2] != 200)
        res["baseline_latency_ms_p50_p99"] = [round(_pct(blat, 0.5) * 1000, 1),
                                              round(_pct(blat, 0.99) * 1000, 1)]
        res["step_over_baseline_p50_p99"] = [
            round(res["step_latency_ms_p50_p99"][i] / res["baseline_latency_ms_p50_p99"][i], 2)
            for i in (0, 1)]
        res["load_end"] = os.getloadavg()
        ecs.update_service(cluster="bench", service="fixed", desiredCount=0)
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
