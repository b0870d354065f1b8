"""The keynote's storm (slow): 200 volumes, one storage server dies, every volume that had a
replica on it rewires at once through its own store cell. Reports the store's request rate and
latency during the storm and the longest write pause; asserts all of them rewired and no
acknowledged record was lost.

    pytest tests/volumes/test_storm.py -m slow -s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time

import pytest

from cellcloud.store.client import StoreClient, StoreError
from cellcloud.volumes.client import VolumeClient, cell_of, create_volume
from cellcloud.volumes.core import VolumeError

from .harness import Stack
from .test_chaos import GIB, REC, parse, record

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VOLUMES = 200


@pytest.mark.timeout(1800)
def test_200_volumes_lose_a_server_at_once(tmp_path) -> None:
    stack = Stack(str(tmp_path), store_nodes=5, servers=6)
    try:
        figures = asyncio.run(_storm(stack))
    finally:
        stack.stop_all()
    print("\nstorm:", figures)


async def _storm(stack: Stack) -> dict[str, float]:
    # One store client for all 200 volumes here (in production each host has its own): lanes
    # enough that the volumes' calls do not queue behind each other in it.
    store = stack.store(attempt_ms=2_000, op_ms=30_000, lanes=512)
    t0 = time.monotonic()
    # One process hosts all 200 clients here (a tick of 100 ms each keeps its loop usable).
    clients = [VolumeClient(f"st-{k}", store, stack.servers, client_id="host-s", tick_ms=100)
               for k in range(VOLUMES)]
    for first in range(0, VOLUMES, 10):  # set-up in batches (not what is measured)
        batch = range(first, first + 10)
        await asyncio.gather(*[_create(store, stack, k) for k in batch])
        await asyncio.gather(*[clients[k].attach(timeout_s=300) for k in batch])
    setup_s = time.monotonic() - t0
    # Time the store's calls (the config cells' traffic) from here on.
    lat: list[tuple[float, float]] = []
    orig_execute = store.execute

    async def timed(cell, command):  # type: ignore[no-untyped-def]
        a = time.monotonic()
        try:
            return await orig_execute(cell, command)
        finally:
            lat.append((a, time.monotonic() - a))

    store.execute = timed  # type: ignore[method-assign]
    stop = asyncio.Event()
    acked: dict[int, int] = {k: 0 for k in range(VOLUMES)}
    pauses: dict[int, float] = {k: 0.0 for k in range(VOLUMES)}

    errors: dict[int, str] = {}

    async def writer(k: int) -> None:
        vc = clients[k]
        i = 0
        while not stop.is_set():
            a = time.monotonic()
            try:
                await vc.write(i * REC, record(i))
            except Exception as exc:  # reported below; the volume keeps being written
                errors[k] = repr(exc)
                continue
            pauses[k] = max(pauses[k], time.monotonic() - a)
            acked[k] = i = i + 1
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(writer(k)) for k in range(VOLUMES)]
    await asyncio.sleep(3)  # a steady state of writes before the failure
    victim = "s0"
    hit = [k for k, c in enumerate(clients) if victim in c.core.config.replicas]  # type: ignore[union-attr]
    before = {k: acked[k] for k in hit}
    kill_at = time.monotonic()
    stack.kill9(victim)
    deadline = kill_at + 300

    def stuck() -> list[int]:
        return [k for k in hit if victim in clients[k].core.config.replicas  # type: ignore[union-attr]
                or acked[k] <= before[k]]

    while stuck():
        assert time.monotonic() < deadline, (
            f"{len(stuck())} of {len(hit)} volumes did not rewire: "
            f"{[(k, clients[k].core.phase, errors.get(k)) for k in stuck()[:10]]}")
        await asyncio.sleep(0.1)
    storm_s = time.monotonic() - kill_at
    stop.set()
    await asyncio.gather(*tasks)
    for k in hit[:50]:
        for i in range(acked[k]):
            assert parse(await clients[k].read(i * REC, REC)) == i
    window = [d for a, d in lat if kill_at <= a <= kill_at + storm_s]
    for c in clients:
        await c.close()
    await store.close()
    return {
        "volumes": VOLUMES, "volumes_rewired": len(hit), "setup_s": round(setup_s, 1),
        "all_rewired_s": round(storm_s, 2),
        "longest_write_pause_s": round(max(pauses[k] for k in hit), 2),
        "median_write_pause_hit_s": round(statistics.median(pauses[k] for k in hit), 2),
        "store_calls_in_storm": len(window), "write_errors": len(errors),
        "store_calls_per_s": round(len(window) / storm_s, 1),
        "store_call_p50_ms": round(statistics.median(window) * 1000, 1) if window else 0.0,
        "store_call_p99_ms": round(sorted(window)[int(0.99 * len(window))] * 1000, 1)
        if window else 0.0,
        "loadavg_1m": os.getloadavg()[0], "store_client": dict(store.counters),
    }


async def _create(store: StoreClient, stack: Stack, k: int) -> None:
    """Set-up on a loaded machine: a create whose outcome is unknown is looked up, then
    retried."""
    for _ in range(10):
        try:
            await create_volume(store, f"st-{k}", GIB, stack.servers, rng=random.Random(k))
            return
        except (StoreError, VolumeError):
            with contextlib.suppress(StoreError):
                if await store.get(cell_of(f"st-{k}"), "config") is not None:
                    return
    raise AssertionError(f"could not create st-{k}")
