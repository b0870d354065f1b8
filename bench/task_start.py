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


def _first_answer(addr: str, port: int, timeout_s: float = 30.0) -> float:
    """Connect and GET until the server answers 200; the wall time of the answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.0 200"):
                    return time.time()
        except OSError:
            time.sleep(0.001)  # not listening yet: the next try in a millisecond
    raise TimeoutError("the task never answered")


def _bare_server(work: str) -> float:
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
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", srv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        return _first_answer("127.0.0.1", port) - t0
    finally:
        proc.kill()
        proc.wait()


async def run(args: argparse.Namespace, work: str, res: dict[str, Any]) -> None:
    sys.path.insert(0, os.getcwd())
    from tests.oci_images import host_python_layers, image_layout, layer_tar

    layout = os.path.join(work, "image")
    img = image_layout(layout, [], config_doc={"Cmd": ["/bin/true"]}, blobs=[
        host_python_layers()[0], layer_tar({"srv/hello.txt": b"hello\n"})])
    a = InProcAgent(work, "tasks", UID_BASE)
    net = _with_network(a, pool_ready=4)
    try:
        await _push(a, layout, img["layers"])
        create_s, start_s, answer_s, bare_s = [], [], [], []
        for i in range(args.warmup + args.n):
            bare = await asyncio.to_thread(_bare_server, layout)
            if i >= args.warmup:
                bare_s.append(bare)
            await _settled(net, 4)
            task_id = f"bench-{i}"
            t0 = time.time()
            reply = await a.agent.tasks.task_create({
                "task_id": task_id, "account": "1", "cpu_units": 256, "memory_mib": 512,
                "containers": [{"name": "web", "image_layers": img["layers"],
                                "argv": [sys.executable, "-m", "http.server", "8080",
                                         "--directory", "/srv"],
                                "port_mappings": [{"container_port": 8080}]}]})
            t1 = time.time()
            await a.agent.tasks.container_start({"task_id": task_id, "container": "web"})
            t2 = time.time()
            t3 = await asyncio.to_thread(_first_answer, reply["private_ipv4"], 8080)
            await a.agent.tasks.task_destroy({"task_id": task_id})
            if i >= args.warmup:
                create_s.append(t1 - t0)
                start_s.append(t2 - t0)
                answer_s.append(t3 - t0)
            await asyncio.sleep(SAMPLE_GAP_S)
        res["task_create"] = summary_ms(create_s)
        res["container_started"] = summary_ms(start_s)
        res["first_answer"] = summary_ms(answer_s)
        res["bare_first_answer"] = summary_ms(bare_s)
    finally:
        a.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.task_start")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.task_start needs root (namespaces, cgroups, mounts, nftables)")
    res: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:],
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = run_recorded("task_start", res, lambda work: run(args, work, res))
    m = res["machine"]
    print(f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']:.1f} GiB, kernel "
          f"{m['kernel']}, load at start {' '.join(m['loadavg_at_start'])}")
    for name in ("task_create", "container_started", "first_answer", "bare_first_answer"):
        r = res[name]
        print(f"{name:<18} p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms")
    print(f"wall {res['wall_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
