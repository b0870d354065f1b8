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

Two workloads, interleaved sample by sample (``--workload`` picks one): ``python`` as above,
and ``busybox``: the host's static BusyBox and the page as the image's one layer, the task
running ``busybox httpd -f -p 8080 -h /srv`` — a server whose own start is a few
milliseconds, so the rest is the platform's (its baseline: the same binary started bare).
Each sample's stages are also read from DescribeTasks (``pullStartedAt``, ``connectivityAt``,
``startedAt``, as the cell saw them) for the profile in docs/benchmarks.md.
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
from bench.task_start import BUSYBOX, WORKLOADS, busybox_layer, server_argv


def _first_answer(addr: str, port: int, path: str, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    req = f"GET {path} HTTP/1.0\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(req)
                if s.recv(64).split(b" ", 2)[1:2] == [b"200"]:  # HTTP/1.0 or 1.1
                    return time.monotonic()
        except OSError:
            time.sleep(0.001)  # not listening yet: try again in a millisecond
    raise TimeoutError(f"{addr}:{port} never answered")


def busybox_image_archive(work: str) -> str:
    """An OCI archive of one layer: /bin/busybox (the host's static one) and
    /srv/hello.txt."""
    sys.path.insert(0, os.getcwd())
    from tests.oci_images import image_layout

    layout = os.path.join(work, "bb-img")
    image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                 blobs=[busybox_layer()])
    archive = os.path.join(work, "bb-img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    return archive


def _bare(work: str, workload: str = "python") -> float:
    """The same server started on the host without a jail: seconds to its first answer."""
    srv = os.path.join(work, "bare")
    os.makedirs(srv, exist_ok=True)
    with open(os.path.join(srv, "hello.txt"), "w") as f:
        f.write("hello\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    p = subprocess.Popen(server_argv(workload, port, srv, busybox=BUSYBOX, bind="127.0.0.1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return _first_answer("127.0.0.1", port, "/hello.txt") - t0
    finally:
        p.kill()
        p.wait()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 1) if xs else 0.0


def _sample(ecs: Any, family: str) -> dict[str, float]:
    """One task: RunTask → address → first answer → StopTask; seconds from RunTask's call
    (the cell's own timestamps from DescribeTasks beside them, on the same clock: one host)."""
    t0w, t0 = time.time(), time.monotonic()
    out = ecs.run_task(cluster="bench", taskDefinition=family, launchType="FARGATE")
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
    t = ecs.describe_tasks(cluster="bench", tasks=[arn])["tasks"][0]
    ecs.stop_task(cluster="bench", task=arn)
    out_s = {"run_task": t_run - t0, "address_known": t_addr - t0, "first_answer": t_ans - t0}
    for member, name in (("createdAt", "cell_created"), ("connectivityAt", "cell_provisioned"),
                         ("startedAt", "cell_running")):
        if t.get(member):
            out_s[name] = t[member].timestamp() - t0w
    return out_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu", default="256", choices=("256", "512", "1024", "2048", "4096"),
                    help="the task definition's cpu (1024 = 1 vCPU), with Fargate's smallest "
                         "memory for it")
    ap.add_argument("--workload", choices=WORKLOADS, action="append",
                    help="python (http.server) and/or busybox (httpd); default both")
    a = ap.parse_args()
    workloads = a.workload or list(WORKLOADS)
    work = tempfile.mkdtemp(prefix="bench-ecs-start-")
    with detached_region("bench-ecs-start-") as (state, doc):
        ecs = client(doc, "ecs")
        ecs.create_cluster(clusterName="bench")
        for w in workloads:
            archive = web_image_archive(work) if w == "python" else busybox_image_archive(work)
            image = push_image(state, doc, archive, f"bench/{w}:v1")
            ecs.register_task_definition(
                family=w, networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
                cpu=a.cpu, memory=str(int(a.cpu) * 2), containerDefinitions=[
                    {"name": "web", "image": image, "portMappings": [{"containerPort": 8080}],
                     "command": server_argv(w, 8080)}])
        samples: dict[str, list[dict[str, float]]] = {w: [] for w in workloads}
        bare: dict[str, list[float]] = {w: [] for w in workloads}
        for i in range(a.warmup + a.n):
            for w in workloads:  # interleaved: every workload sees the same load
                s = _sample(ecs, w)
                if i >= a.warmup:
                    samples[w].append(s)
                    bare[w].append(_bare(work, w))
        res: dict[str, Any] = {"n": a.n, "machine": os.uname().nodename,
                               "load": os.getloadavg()}
        for w in workloads:
            keys = sorted({k for s in samples[w] for k in s})
            res[w] = {f"{k}_ms": {"p50": _pct([s[k] for s in samples[w] if k in s], 0.5),
                                  "p99": _pct([s[k] for s in samples[w] if k in s], 0.99)}
                      for k in keys}
            res[w]["bare_first_answer_ms"] = {"p50": _pct(bare[w], 0.5),
                                              "p99": _pct(bare[w], 0.99)}
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
