"""Issue 18's second figure: an environment's cold start on the ``microvm`` backend — from the
backend's spawn (bundle disk, cgroup, QEMU) to the guest agent's ``ready`` frame, then one
invocation of a Python handler — through ``MicrovmBackend`` itself (the agent's code path,
without the region). Under the acceleration the probe chose (TCG on the development machine).

Run from the repository root, as root::

    python -m bench.microvm_coldstart [--boots 3] [--machine microvm|pc] [--state-dir DIR]

Prints each boot's spawn, ready and first-invoke times and the load average before and after.
Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

from cellcloud.microvm.backend import MicrovmBackend
from cellcloud.sandbox import cgroups
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel

HANDLER = ("import os\n"
           "def handler(event, context):\n"
           "    return {'release': os.uname().release}\n")


def _destroy(cg: cgroups.Cgroup) -> None:
    deadline = time.monotonic() + 30
    while not cg.destroy() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for QEMU's exit (the cgroup empties), bounded


async def one(backend: MicrovmBackend, bundle: str, n: int) -> tuple[float, float, float, str]:
    spec = EnvSpec(env_id=f"bench-{os.getpid()}-{n}", function_name="bench",
                   function_version="$LATEST",
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:bench",
                   handler="app.handler", runtime="python3.11", memory_mb=512, timeout_s=30,
                   bundle_dir=bundle, uid=1000, gid=1000, cgroup_group="bench-microvm",
                   allow_unlimited=True)
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


async def run(a: argparse.Namespace) -> None:
    sd = a.state_dir or tempfile.mkdtemp(prefix="cellcloud-microvm-bench-")
    backend = MicrovmBackend(sd, machine=a.machine)
    t = time.monotonic()
    backend.start()
    print(f"start (agent image, probe, launcher): {(time.monotonic() - t) * 1000:.0f} ms; "
          f"accel {backend.accel} ({backend.probe.get('reason')})")
    bundle = tempfile.mkdtemp(prefix="cellcloud-bench-bundle-")
    with open(os.path.join(bundle, "app.py"), "w") as f:
        f.write(HANDLER)
    load0 = os.getloadavg()
    rows = []
    try:
        for n in range(a.boots):
            rows.append(await one(backend, bundle, n))
    finally:
        backend.close()
    load1 = os.getloadavg()
    print(f"machine {a.machine}, accel {backend.accel}, guest kernel {rows[0][3]}, host "
          f"{os.uname().release}, load {load0[0]:.2f} -> {load1[0]:.2f}")
    for name, i in (("spawn", 0), ("ready", 1), ("first invoke", 2)):
        v = [r[i] for r in rows]
        print(f"{name:13} median {statistics.median(v):8.0f} ms  min {min(v):8.0f}  "
              f"max {max(v):8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--machine", choices=["microvm", "pc"], default="microvm")
    ap.add_argument("--state-dir", default="")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
