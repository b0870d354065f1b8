"""Task start on one agent (issue #17's "task start" goal, agent level): from ``task_create``
to the container's first HTTP answer at the task's private address, image cached.

Run from the repository root, as root::

    python -m bench.task_start [--n 20] [--warmup 3]

An in-process ``Agent`` + ``JailBackend`` + network helper (as bench/net_cold.py); the image
is the host's Python libraries (tests/oci_images.py) plus /srv/hello.txt, its layers already in
the agent's cache. Per sample: ``task_create`` (cgroup, network slot, layer holds),
``task_container_start`` of ``python -m http.server 8080`` (port 8080 mapped), then the host
connects to the private address every millisecond until a GET answers 200; then
``task_destroy``. Reported: create, start (the op's answer) and first answer, each from the
sample's start; and, interleaved, the same server started on the host without any jail
(``bare_first_answer``: the interpreter's and http.server's own start). Not counted: RunTask's control plane and placement (not built yet), so this is
the agent's share of the goal (p50 ≤ 100 ms). Benchmarks are not tests: nothing here asserts.

``--workload busybox`` (default: both, interleaved) serves the same page with BusyBox's httpd
(``busybox httpd -f -p 8080 -h /srv``; the static /bin/busybox of this host is the image's
layer, with /srv/hello.txt): a server whose own start is a few milliseconds, so what remains
is the platform's. Its baseline is the same binary started bare on the host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from typing import Any

from bench.common.results import run_recorded
from bench.images import _push
from bench.net_cold import _settled, _with_network
from bench.sandbox import SAMPLE_GAP_S, InProcAgent, machine, summary_ms

UID_BASE = 670_000  # away from the other benches' ranges


BUSYBOX = "/bin/busybox"  # busybox-static (scripts/setup.sh)
WORKLOADS = ("python", "busybox")


def busybox_layer() -> bytes:
    """An image layer: the host's static BusyBox as /bin/busybox and /srv/hello.txt."""
    sys.path.insert(0, os.getcwd())
    from tests.oci_images import layer_tar

    with open(BUSYBOX, "rb") as f:
        data = f.read()
    return layer_tar({"bin/busybox": data, "srv/hello.txt": b"hello\n"},
                     modes={"bin/busybox": 0o755})


def server_argv(workload: str, port: int, srv: str = "/srv", python: str = sys.executable,
                busybox: str = "/bin/busybox", bind: str = "") -> list[str]:
    """The web server of ``workload`` serving ``srv`` on ``port``."""
    if workload == "busybox":
        return [busybox, "httpd", "-f", "-p", f"{bind}:{port}" if bind else str(port),
                "-h", srv]
    return [python, "-m", "http.server", str(port), *(["--bind", bind] if bind else []),
            "--directory", srv]


def _first_answer(addr: str, port: int, timeout_s: float = 30.0) -> float:
    """Connect and GET until the server answers 200; the wall time of the answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
                if s.recv(64).split(b" ", 2)[1:2] == [b"200"]:  # HTTP/1.0 or 1.1
                    return time.time()
        except OSError:
            time.sleep(0.001)  # not listening yet: the next try in a millisecond
    raise TimeoutError("the task never answered")


def _bare_server(work: str, workload: str = "python") -> float:
    """The same server started on the host, no jail: its first answer (the baseline)."""
    import subprocess

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = os.path.join(work, "bare-srv")
    os.makedirs(srv, exist_ok=True)
    with open(os.path.join(srv, "hello.txt"), "w") as f:
        f.write("hello\n")
    t0 = time.time()
    proc = subprocess.Popen(server_argv(workload, port, srv, busybox=BUSYBOX,
                                        bind="127.0.0.1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return _first_answer("127.0.0.1", port) - t0
    finally:
        proc.kill()
        proc.wait()


async def run(args: argparse.Namespace, work: str, res: dict[str, Any]) -> None:
    sys.path.insert(0, os.getcwd())
    from tests.oci_images import host_python_layers, image_layout, layer_tar

    layers: dict[str, list[str]] = {}
    layout = os.path.join(work, "image")
    if "python" in args.workload:
        img = image_layout(layout, [], config_doc={"Cmd": ["/bin/true"]}, blobs=[
            host_python_layers()[0], layer_tar({"srv/hello.txt": b"hello\n"})])
        layers["python"] = list(img["layers"])
    if "busybox" in args.workload:
        bb = os.path.join(work, "busybox-image")
        layers["busybox"] = list(image_layout(bb, [], config_doc={"Cmd": ["/bin/true"]},
                                              blobs=[busybox_layer()])["layers"])
    a = InProcAgent(work, "tasks", UID_BASE)
    net = _with_network(a, pool_ready=4)
    try:
        for w, ls in layers.items():
            await _push(a, layout if w == "python" else os.path.join(work, "busybox-image"),
                        ls)
        series: dict[str, dict[str, list[float]]] = {
            w: {"task_create": [], "container_started": [], "first_answer": [],
                "bare_first_answer": []} for w in layers}
        for i in range(args.warmup + args.n):
            for w, ls in layers.items():  # interleaved: both see the same load
                bare = await asyncio.to_thread(_bare_server, work, w)
                await _settled(net, 4)
                task_id = f"bench-{w}-{i}"
                t0 = time.time()
                reply = await a.agent.tasks.task_create({
                    "task_id": task_id, "account": "1", "cpu_units": args.cpu,
                    "memory_mib": 512,
                    "containers": [{"name": "web", "image_layers": ls,
                                    "argv": server_argv(w, 8080),
                                    "port_mappings": [{"container_port": 8080}]}]})
                t1 = time.time()
                await a.agent.tasks.container_start({"task_id": task_id, "container": "web"})
                t2 = time.time()
                t3 = await asyncio.to_thread(_first_answer, reply["private_ipv4"], 8080)
                await a.agent.tasks.task_destroy({"task_id": task_id})
                if i >= args.warmup:
                    for k, v in (("task_create", t1 - t0), ("container_started", t2 - t0),
                                 ("first_answer", t3 - t0), ("bare_first_answer", bare)):
                        series[w][k].append(v)
                await asyncio.sleep(SAMPLE_GAP_S)
        for w, by in series.items():
            res[w] = {k: summary_ms(v) for k, v in by.items()}
    finally:
        a.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.task_start")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cpu", type=int, default=256,
                   help="the task's cpu units (1024 = 1 vCPU; its CFS quota): default 256")
    p.add_argument("--workload", choices=WORKLOADS, action="append",
                   help="python (http.server) and/or busybox (httpd); default both")
    args = p.parse_args()
    args.workload = args.workload or list(WORKLOADS)
    if os.geteuid() != 0:
        sys.exit("bench.task_start needs root (namespaces, cgroups, mounts, nftables)")
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:],
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = run_recorded("task_start", res, lambda work: run(args, work, res))
    m = res["machine"]
    print(f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']:.1f} GiB, kernel "
          f"{m['kernel']}, load at start {' '.join(m['loadavg_at_start'])}")
    for w in args.workload:
        for name in ("task_create", "container_started", "first_answer", "bare_first_answer"):
            r = res[w][name]
            print(f"{w:<8} {name:<18} p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms")
    print(f"wall {res['wall_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
