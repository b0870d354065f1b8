"""Issue 18's second figure: an environment's cold start on the ``microvm`` backend — from the
backend's spawn (bundle disk, cgroup, QEMU) to the guest agent's ``ready`` frame, then one
invocation of a Python handler — through ``MicrovmBackend`` itself (the agent's code path,
without the region). Under the acceleration the probe chose (TCG on the development machine).

Run from the repository root, as root::

    python -m bench.microvm_coldstart [--boots 3] [--machine microvm|pc] [--state-dir DIR]
                                      [--no-snapshot] [--snapstart] [--node]

Two series in the same run: cold boots, then environments restored from the agent guest's
snapshot (``MicrovmBackend(snapshots=True)``, ``agentsnap.py``; made at the backend's start).
Prints each series' spawn, ready and first-invoke times, the load average before and after, and
the ratio of the medians to ``ready``. Asserts only that each series started as it says.

``--snapstart``: a handler with a heavier init (``INIT_HANDLER``: stdlib imports and a table
built at import) instead, and the second series is SnapStart's: environments of one function
version (``EnvSpec.snapstart``) restored from the version's snapshot taken after its init
(made by the launcher on the version's first environment, timed apart), against cold boots
that each run the init.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import tempfile
import time

from cellcloud.microvm.backend import MicrovmBackend
from cellcloud.sandbox import cgroups
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel

MEMORY_MB = 512
HANDLER = ("import os\n"
           "def handler(event, context):\n"
           "    return {'release': os.uname().release}\n")


INIT_HANDLER = ("import decimal, email.parser, http.client, json, sqlite3, xml.dom.minidom\n"
                "import os\n"
                "TABLE = {i: decimal.Decimal(i).sqrt() for i in range(20000)}\n"
                "def handler(event, context):\n"
                "    return {'release': os.uname().release, 'n': len(TABLE)}\n")
NODE_HANDLER = ("const os = require('node:os');\n"
                "exports.handler = async () => ({release: os.release()});\n")
SNAPSTART_ID = "arn:aws:lambda:cc-local-1:000000000000:function:bench:1 bench"


def _destroy(cg: cgroups.Cgroup) -> None:
    deadline = time.monotonic() + 30
    while not cg.destroy() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for QEMU's exit (the cgroup empties), bounded


async def one(backend: MicrovmBackend, bundle: str, n: int,
              snapstart: str = "", node: list[str] | None = None) -> tuple[float, float, float, str]:
    spec = EnvSpec(env_id=f"bench-{os.getpid()}-{n}", function_name="bench",
                   function_version="1" if snapstart else "$LATEST", snapstart=snapstart,
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:bench",
                   handler="app.handler", runtime="python3.11", memory_mb=MEMORY_MB, timeout_s=30,
                   bundle_dir=bundle, uid=1000, gid=1000, cgroup_group="bench-microvm",
                   allow_unlimited=True)
    if node:  # a Node function: its runtime process, as the agent would start it
        spec = dataclasses.replace(spec, runtime="nodejs22.x", handler="index.handler",
                                   runtime_argv=[*node, "index.handler"])
    t0 = time.monotonic()
    spawned = await backend.spawn(spec)
    t_spawn = time.monotonic()
    chan = StreamChannel(spawned.channel, 64 << 20)
    spawned.channel.settimeout(300)
    ready = await asyncio.to_thread(chan.recv)
    t_ready = time.monotonic()
    assert ready and ready.get("t") == "ready" and not ready.get("init_error"), ready
    chan.send({"t": "invoke", "id": "r1", "request_id": "r1", "payload": b"{}",
               "timeout_ms": 30_000, "deadline_ms": int(time.time() * 1000) + 30_000,
               "arn": spec.function_arn})
    result = await asyncio.to_thread(chan.recv)
    t_inv = time.monotonic()
    assert result and result.get("t") == "result", result
    release = json.loads(result["payload"])["release"]
    backend.kill(spawned.pid)
    spawned.channel.close()
    cg = cgroups.Cgroup(spec.cgroup_group, spec.env_id)
    if cg.version:
        cg.kill_all()
        await asyncio.to_thread(_destroy, cg)
    return ((t_spawn - t0) * 1000, (t_ready - t0) * 1000, (t_inv - t_ready) * 1000, release)


async def series(sd: str, a: argparse.Namespace, bundle: str, *,
                 snapshots: bool) -> list[tuple[float, float, float, str]]:
    snapstart = SNAPSTART_ID if snapshots and a.snapstart else ""
    backend = MicrovmBackend(sd, machine=a.machine, snapshots=snapshots and not snapstart,
                             snapshot_memory_mib=MEMORY_MB)
    t = time.monotonic()
    backend.start()
    what = "agent image, probe, launcher" + (", agent snapshot" if backend.snapshots else "")
    print(f"start ({what}): {(time.monotonic() - t) * 1000:.0f} ms; "
          f"accel {backend.accel} ({backend.probe.get('reason')})")
    load0 = os.getloadavg()
    rows = []
    try:
        if snapstart:
            t = time.monotonic()
            first = await one(backend, bundle, 999, snapstart)
            print(f"SnapStart: the version's first environment (jailed boot, init, save, "
                  f"restore) to ready {first[1]:.0f} ms, {(time.monotonic() - t) * 1000:.0f} ms "
                  f"in all; {backend.snapshot_info()}")
        for n in range(a.boots):
            rows.append(await one(backend, bundle, n + (1000 if snapshots else 0), snapstart))
            want = "restored" if snapshots else "booted"
            assert backend.last_start.startswith(want), backend.last_start
    finally:
        backend.close()
    load1 = os.getloadavg()
    print(f"{'restored' if snapshots else 'cold'}: machine {a.machine}, accel {backend.accel}, "
          f"guest kernel {rows[0][3]}, host {os.uname().release}, "
          f"load {load0[0]:.2f} -> {load1[0]:.2f}")
    for name, i in (("spawn", 0), ("ready", 1), ("first invoke", 2)):
        v = [r[i] for r in rows]
        print(f"  {name:13} median {statistics.median(v):8.0f} ms  min {min(v):8.0f}  "
              f"max {max(v):8.0f}")
    return rows


async def node_vs_python(sd: str, a: argparse.Namespace) -> None:
    """``--node``: cold boots of a python3.11 and a nodejs22.x function, alternated in one
    backend (the same load for both), to the ``ready`` frame and the first invoke's result."""
    from cellcloud.microvm import image
    from cellcloud.sandbox import runtimes

    node = runtimes.find().get("nodejs22.x")
    assert node is not None, "no Node 22 (scripts/setup.sh)"
    image.ensure_tree_disk(sd, node.argv_prefix[0])  # built once, not timed
    py_bundle = tempfile.mkdtemp(prefix="cellcloud-bench-bundle-")
    with open(os.path.join(py_bundle, "app.py"), "w") as f:
        f.write(HANDLER)
    node_bundle = tempfile.mkdtemp(prefix="cellcloud-bench-bundle-")
    with open(os.path.join(node_bundle, "index.js"), "w") as f:
        f.write(NODE_HANDLER)
    backend = MicrovmBackend(sd, machine=a.machine)
    backend.start()
    load0 = os.getloadavg()
    rows: dict[str, list[tuple[float, float, float, str]]] = {"python3.11": [], "nodejs22.x": []}
    try:
        for n in range(a.boots):
            rows["python3.11"].append(await one(backend, py_bundle, 2 * n))
            rows["nodejs22.x"].append(await one(backend, node_bundle, 2 * n + 1,
                                                node=list(node.argv_prefix)))
    finally:
        backend.close()
    load1 = os.getloadavg()
    print(f"cold, machine {a.machine}, accel {backend.accel}, load {load0[0]:.2f} -> "
          f"{load1[0]:.2f}")
    med = {}
    for name, rs in rows.items():
        ready = [r[1] for r in rs]
        first = [r[1] + r[2] for r in rs]
        med[name] = statistics.median(first)
        print(f"  {name:11} to ready median {statistics.median(ready):7.0f} ms "
              f"({min(ready):.0f}-{max(ready):.0f}); to the first result median "
              f"{med[name]:7.0f} ms ({min(first):.0f}-{max(first):.0f})")
    print(f"nodejs22.x / python3.11 to the first result: "
          f"{med['nodejs22.x'] / med['python3.11']:.2f}x")


async def run(a: argparse.Namespace) -> None:
    sd = a.state_dir or tempfile.mkdtemp(prefix="cellcloud-microvm-bench-")
    if a.node:
        await node_vs_python(sd, a)
        return
    bundle = tempfile.mkdtemp(prefix="cellcloud-bench-bundle-")
    with open(os.path.join(bundle, "app.py"), "w") as f:
        f.write(INIT_HANDLER if a.snapstart else HANDLER)
    cold = await series(sd, a, bundle, snapshots=False)
    if a.no_snapshot:
        return
    warm = await series(sd, a, bundle, snapshots=True)
    c = statistics.median(r[1] for r in cold)
    w = statistics.median(r[1] for r in warm)
    inv_c = statistics.median(r[1] + r[2] for r in cold)
    inv_w = statistics.median(r[1] + r[2] for r in warm)
    what = "SnapStart-restored" if a.snapstart else "restored"
    print(f"to ready, median: cold {c:.0f} ms, {what} {w:.0f} ms: {c / w:.1f}x faster; "
          f"to the first invoke's result: cold {inv_c:.0f} ms, {what} {inv_w:.0f} ms: "
          f"{inv_c / inv_w:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--machine", choices=["microvm", "pc"], default="microvm")
    ap.add_argument("--state-dir", default="")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="only cold boots (no series restored from the agent's snapshot)")
    ap.add_argument("--node", action="store_true",
                    help="cold boots of a nodejs22.x and a python3.11 function, alternated")
    ap.add_argument("--snapstart", action="store_true",
                    help="a handler with a heavier init; the second series restores a "
                         "function version's snapshot taken after its init (SnapStart)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
