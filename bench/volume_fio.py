"""Issue 19's volume figures: ``fio`` (Debian's) on a file in the ext4 of an attached volume
(volumes/attach.py: FUSE file served from a FileBlockStore → loop device → ext4) vs the same
jobs on a plain local file in the same directory's filesystem, same run, same parameters.

Run from the repository root, as root::

    python -m bench.volume_fio [--runtime-s 10] [--size-mib 512] [--dir DIR] [--replicated]

``--replicated``: the volume is a replicated one instead (3 replicas over 4 storage servers and
a 3-node store colony on loopback, tests/volumes/harness.py; the FUSE file served by a
``VolumeClient``: ``attach_replicated``).

Jobs (each on both targets, one after the other): 4 KiB random writes with O_DIRECT (no
fsync: the volume's writes are durable anyway — FileBlockStore writes are O_DSYNC — the local
file's are not), the same with O_DSYNC (each write durable on both sides), both of those from 8
writers at once (group commit: the writes that reach the volume client together share one
replicated round; with ``--replicated`` the storage servers' write and batch counts are
printed after each job), 4 KiB random
writes buffered with an fdatasync after each (both durable per write), and sequential 1 MiB
O_DIRECT writes and reads. Prints IOPS, p50/p99 completion latency
and MiB/s per job and target, the ratio volume/local, the load average before and after, and
whether the loop device took direct I/O. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from cellcloud.volumes.attach import (
    Attached,
    ReplicatedVolume,
    attach_file,
    attach_replicated,
    detach,
)

JOBS: list[tuple[str, list[str]]] = [
    ("randwrite 4k direct", ["--rw=randwrite", "--bs=4k", "--direct=1"]),
    # each write durable on both sides, no separate sync: the like-for-like durable row
    ("randwrite 4k direct+dsync", ["--rw=randwrite", "--bs=4k", "--direct=1", "--sync=dsync"]),
    # 8 writers at once (group commit: writes that reach the volume client together share
    # one replicated round, one fdatasync per replica)
    ("randwrite 4k direct 8 jobs", ["--rw=randwrite", "--bs=4k", "--direct=1",
                                    "--numjobs=8"]),
    ("randwrite 4k direct+dsync 8 jobs", ["--rw=randwrite", "--bs=4k", "--direct=1",
                                          "--sync=dsync", "--numjobs=8"]),
    ("randwrite 4k fdatasync=1", ["--rw=randwrite", "--bs=4k", "--fdatasync=1"]),
    ("seq write 1M direct", ["--rw=write", "--bs=1M", "--direct=1"]),
    ("seq read 1M direct", ["--rw=read", "--bs=1M", "--direct=1"]),
]


def fio(path: str, args: list[str], runtime_s: int, size_mib: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=job", f"--filename={path}", f"--size={size_mib}M", "--ioengine=psync",
         "--iodepth=1", "--numjobs=1", "--group_reporting", "--time_based",
         f"--runtime={runtime_s}",
         "--output-format=json", *args],
        capture_output=True, text=True, check=True, timeout=runtime_s * 10 + 300).stdout
    job = json.loads(out)["jobs"][0]
    side: dict[str, Any] = job["write"] if job["write"]["io_bytes"] else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    out = {"iops": side["iops"], "mib_s": side["bw_bytes"] / 2**20,
           "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6}
    sync = job.get("sync", {}).get("lat_ns", {})
    if sync.get("N"):  # fdatasync=1: each write's sync, timed on its own
        out["sync_p50_ms"] = sync["percentile"].get("50.000000", 0) / 1e6
        out["sync_p99_ms"] = sync["percentile"].get("99.000000", 0) / 1e6
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


async def run(a: argparse.Namespace) -> None:
    base = a.dir or tempfile.mkdtemp(prefix="cellcloud-volume-fio-")
    local_dir = os.path.join(base, "local")
    os.makedirs(local_dir, exist_ok=True)
    # the volume: a bit bigger than the fio file, so ext4's own metadata fits beside it
    size_bytes = (a.size_mib + 256) * 2**20
    print(f"load before: {loadavg()}  nproc {os.cpu_count()}")
    stack = None
    if a.replicated:
        from tests.volumes.harness import Stack

        stack = Stack(os.path.join(base, "stack"), store_nodes=3, servers=4)
        att = await _attach_replicated(stack, base, size_bytes)
        what = "replicated (3 of 4 storage servers)"
    else:
        att = await attach_file(os.path.join(base, "volume.img"), size_bytes,
                                os.path.join(base, "fuse"), os.path.join(base, "mnt"))
        what = "FileBlockStore"
    rows = []
    try:
        print(f"volume: {att.loop_device} (loop direct I/O {'on' if att.direct_io else 'off'})"
              f", {what} {size_bytes // 2**20} MiB at {base}")
        for name, args in JOBS:
            if a.only and a.only not in name:
                continue
            vol = fio(os.path.join(att.mount_at, "fio.dat"), args, a.runtime_s, a.size_mib)
            loc = fio(os.path.join(local_dir, "fio.dat"), args, a.runtime_s, a.size_mib)
            rows.append((name, vol, loc))
            print(f"  {name}: volume {vol}  local {loc}", flush=True)
            if stack is not None:
                print(f"    storage servers: {await _server_counts(stack)}", flush=True)
    finally:
        await detach(att)
        if stack is not None:
            stack.stop_all()
        if not a.dir:  # a directory of its own: gone with its sparse volume file
            shutil.rmtree(base, ignore_errors=True)
    print(f"load after: {loadavg()}")
    print("\n| job | volume IOPS | local IOPS | ratio | volume p50 / p99 ms | "
          "local p50 / p99 ms | volume MiB/s | local MiB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v, loc in rows:
        ratio = v["iops"] / loc["iops"] if loc["iops"] else 0.0
        print(f"| {name} | {v['iops']:,.0f} | {loc['iops']:,.0f} | {ratio:.2f}× | "
              f"{v['p50_ms']:.3f} / {v['p99_ms']:.3f} | {loc['p50_ms']:.3f} / "
              f"{loc['p99_ms']:.3f} | {v['mib_s']:.1f} | {loc['mib_s']:.1f} |")
        if "sync_p99_ms" in v:
            print(f"| {name}: the fdatasync alone | | | | {v['sync_p50_ms']:.3f} / "
                  f"{v['sync_p99_ms']:.3f} | {loc.get('sync_p50_ms', 0):.3f} / "
                  f"{loc.get('sync_p99_ms', 0):.3f} | | |")


async def _server_counts(stack: Any) -> dict[str, str]:
    """Each storage server's write requests so far, and how many of them were group-commit
    rounds (several writes, one fdatasync)."""
    from cellcloud import transport

    out = {}
    for sid, s in stack.servers.items():
        c = transport.Client(s.host, s.port)
        try:
            st = await c.call("stats", {}, timeout_s=5)
            out[sid] = f"{st.get('writes', 0)} writes, {st.get('write_batches', 0)} batched"
        except Exception as e:
            out[sid] = f"no stats: {e!r}"
        finally:
            await c.close()
    return out


async def _attach_replicated(stack: Any, base: str, size_bytes: int) -> Attached:
    from cellcloud.volumes.client import create_volume

    gib = 2**30
    size_bytes = -(-size_bytes // gib) * gib  # volumes come in whole GiB
    store = stack.store()
    try:
        await create_volume(store, "vol-fio", size_bytes, stack.servers)
    finally:
        await store.close()
    servers_path = os.path.join(base, "servers.json")
    with open(servers_path, "w") as f:
        json.dump({sid: {"host": s.host, "port": s.port, "labels": s.labels}
                   for sid, s in stack.servers.items()}, f)
    return await attach_replicated(
        ReplicatedVolume("vol-fio", stack.colony_path, servers_path, "bench"),
        os.path.join(base, "fuse"), os.path.join(base, "mnt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-s", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--dir", default="", help="where the volume's file and the local file go")
    ap.add_argument("--only", default="", help="run the jobs whose name contains this")
    ap.add_argument("--replicated", action="store_true",
                    help="a replicated volume (storage servers on loopback), not a local file")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
