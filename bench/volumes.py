"""Replicated volumes on loopback (issue #19): write latency against a local file in the same
run, sequential throughput, and failover time.

    python -m bench.volumes [--writes 300] [--trials 10]

Starts a store colony (3 nodes) and 4 storage servers (``cellcloud storage serve``), creates
1 GiB volumes (3 replicas, sparse files).
* 4 KiB random writes, each followed by ``flush`` (durable on all 3 replicas: 3 fdatasyncs in
  parallel plus the round trips), against ``pwrite`` + ``fdatasync`` on a local file in the
  same directory, interleaved in rounds of 50: p50/p99 and writes per second (one in flight).
* 1 MiB sequential writes (64 MiB) against the same on the local file: MB/s.
* failover: a writer writes 4 KiB records back to back; the volume's primary is killed with
  SIGKILL; failover time = from the kill to the next acknowledged write (the client sees the
  failure, compare-and-sets the configuration in the store, fences the new replica set and
  resends). p50/p99 over ``--trials`` (a fresh volume each; the killed server restarts).
Prints JSON, with the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

from tests.volumes.harness import Stack

from cellcloud.volumes.client import VolumeClient, create_volume

GIB = 1024**3


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def _latency(stack: Stack, writes: int, tmp: str) -> dict[str, Any]:
    store = stack.store()
    await create_volume(store, "bench-lat", GIB, stack.servers, rng=random.Random(1))
    vc = VolumeClient("bench-lat", store, stack.servers, client_id="bench")
    await vc.attach()
    fd = os.open(os.path.join(tmp, "local.img"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, GIB)
    rng = random.Random(2)
    vol: list[float] = []
    local: list[float] = []
    block = os.urandom(4096)
    for r in range(0, writes, 50):
        for _ in range(min(50, writes - r)):
            off = rng.randrange(0, 64 * 1024 * 1024 // 4096) * 4096
            t0 = time.perf_counter()
            await vc.write(off, block)
            await vc.flush()
            vol.append(time.perf_counter() - t0)
        for _ in range(min(50, writes - r)):
            off = rng.randrange(0, 64 * 1024 * 1024 // 4096) * 4096
            t0 = time.perf_counter()
            os.pwrite(fd, block, off)
            os.fdatasync(fd)
            local.append(time.perf_counter() - t0)
    # 16 writes in flight at once (random, non-overlapping 4 KiB blocks), each flushed.
    offs = rng.sample(range(64 * 1024 * 1024 // 4096), writes)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def one(off: int) -> None:
        async with sem:
            await vc.write(off * 4096, block)

    await asyncio.gather(*[one(o) for o in offs])
    await vc.flush()
    qd16 = writes / (time.perf_counter() - t0)
    mib = os.urandom(1024 * 1024)
    t0 = time.perf_counter()
    for i in range(64):
        await vc.write(128 * 1024 * 1024 + i * len(mib), mib)
    await vc.flush()
    seq_vol = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(64):
        os.pwrite(fd, mib, 128 * 1024 * 1024 + i * len(mib))
        os.fdatasync(fd)
    seq_local = 64 / (time.perf_counter() - t0)
    os.close(fd)
    await vc.close()
    await store.close()

    def summary(xs: list[float]) -> dict[str, float]:
        return {"p50_ms": round(_pct(xs, 0.5) * 1000, 2), "p99_ms": round(_pct(xs, 0.99) * 1000, 2),
                "writes_per_s": round(len(xs) / sum(xs), 1)}

    return {"write_4k_volume": summary(vol), "write_4k_local_file": summary(local),
            "write_4k_volume_16_in_flight_per_s": round(qd16, 1),
            "seq_1m_volume_mib_s": round(seq_vol, 1), "seq_1m_local_mib_s": round(seq_local, 1)}


async def _failover(stack: Stack, trial: int) -> float:
    store = stack.store()
    vid = f"bench-fo-{trial}"
    cfg = await create_volume(store, vid, GIB, stack.servers, rng=random.Random(100 + trial))
    vc = VolumeClient(vid, store, stack.servers, client_id="bench")
    await vc.attach()
    block = os.urandom(4096)
    for i in range(20):
        await vc.write(i * 4096, block)
    killed = time.perf_counter()
    stack.kill9(cfg.primary)
    await vc.write(20 * 4096, block)
    took = time.perf_counter() - killed
    await vc.close()
    await store.close()
    stack.revive()
    return took


async def main_async(writes: int, trials: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="bench-volumes-")
    stack = Stack(tmp)
    try:
        out = await _latency(stack, writes, tmp)
        fo = [await _failover(stack, t) for t in range(trials)]
        out["failover_ms"] = {"p50": round(statistics.median(fo) * 1000, 1),
                              "p99": round(_pct(fo, 0.99) * 1000, 1),
                              "max": round(max(fo) * 1000, 1), "trials": trials}
        out["loadavg_1m"] = os.getloadavg()[0]
        out["cpus"] = os.cpu_count()
        return out
    finally:
        stack.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.volumes")
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args.writes, args.trials)), indent=2))


if __name__ == "__main__":
    main()
