"""Task start as a client sees it (issue #17's goal: p50 ≤ 100 ms with the image cached): from
boto3's RunTask to the container's first HTTP answer at the task's private address.

Run from the repository root, as root::

    python -m bench.ecs_task_start [--n 10] [--warmup 2]

Starts a region (``cellcloud up --detach``), pushes an image holding the host's Python
libraries and a page (tests/oci_images.py) with ``cellcloud image push``, registers a task
definition running ``python -m http.server 8080`` (port 8080 mapped), and per sample: RunTask,
DescribeTasks until the task reports its ``privateIpv4Address`` (every 20 ms), then a GET to
that address every millisecond until it answers 200 (the host may reach a task on its mapped
ports); StopTask. The first ``--warmup`` samples pull the layers onto the agents and are not
counted. Reported: RunTask's answer, the address known, the first answer, each from the
RunTask call; and, interleaved in the same run, the same server started bare on the host
(``bare_first_answer``: the interpreter's and http.server's own start, the floor under any
task start). Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common.region import client, detached_region, push_image, web_image_archive


def _first_answer(addr: str, port: int, path: str, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    req = f"GET {path} HTTP/1.0\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(req)
                if s.recv(64).startswith(b"HTTP/1.0 200"):
                    return time.monotonic()
        except OSError:
            time.sleep(0.001)  # not listening yet: try again in a millisecond
    raise TimeoutError(f"{addr}:{port} never answered")


def _bare(work: str) -> float:
    """The same server started on the host without a jail: seconds to its first answer."""
    srv = os.path.join(work, "bare")
    os.makedirs(srv, exist_ok=True)
    with open(os.path.join(srv, "hello.txt"), "w") as f:
        f.write("hello\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", srv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        return _first_answer("127.0.0.1", port, "/hello.txt") - t0
    finally:
        p.kill()
        p.wait()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 1) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-ecs-start-")
    archive = web_image_archive(work)
    with detached_region("bench-ecs-start-") as (state, doc):
        image = push_image(state, doc, archive, "bench/web:v1")
        ecs = client(doc, "ecs")
        ecs.create_cluster(clusterName="bench")
        ecs.register_task_definition(
            family="web", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="256", memory="512", containerDefinitions=[
                {"name": "web", "image": image, "portMappings": [{"containerPort": 8080}],
                 "command": [sys.executable, "-m", "http.server", "8080", "--directory",
                             "/srv"]}])
        answered: list[float] = []
        addressed: list[float] = []
        run_task: list[float] = []
        bare: list[float] = []
        for i in range(a.warmup + a.n):
            t0 = time.monotonic()
            out = ecs.run_task(cluster="bench", taskDefinition="web", launchType="FARGATE")
            t_run = time.monotonic()
            if out["failures"]:
                raise RuntimeError(out["failures"])
            arn = out["tasks"][0]["taskArn"]
            addr = ""
            deadline = time.monotonic() + 120
            while not addr:
                t: dict[str, Any] = ecs.describe_tasks(cluster="bench", tasks=[arn])["tasks"][0]
                if t["lastStatus"] == "STOPPED":
                    raise RuntimeError(f"the task stopped: {t.get('stoppedReason')}")
                addr = next((d["value"] for att in t.get("attachments", [])
                             for d in att.get("details", [])
                             if d["name"] == "privateIPv4Address" and d["value"]), "")
                if not addr:
                    if time.monotonic() > deadline:
                        raise TimeoutError("no private address")
                    time.sleep(0.02)  # polling DescribeTasks, as a client would
            t_addr = time.monotonic()
            t_ans = _first_answer(addr, 8080, "/hello.txt")
            ecs.stop_task(cluster="bench", task=arn)
            if i >= a.warmup:
                run_task.append(t_run - t0)
                addressed.append(t_addr - t0)
                answered.append(t_ans - t0)
                bare.append(_bare(work))
        res = {"n": a.n, "machine": os.uname().nodename, "load": os.getloadavg(),
               "run_task_ms": {"p50": _pct(run_task, 0.5), "p99": _pct(run_task, 0.99)},
               "address_known_ms": {"p50": _pct(addressed, 0.5), "p99": _pct(addressed, 0.99)},
               "first_answer_ms": {"p50": _pct(answered, 0.5), "p99": _pct(answered, 0.99)},
               "bare_first_answer_ms": {"p50": _pct(bare, 0.5), "p99": _pct(bare, 0.99)},
               "first_answer_over_bare_p50": round(_pct(answered, 0.5) / max(_pct(bare, 0.5),
                                                                               0.1), 2)}
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
