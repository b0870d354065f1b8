"""Volumes on real processes (a store colony and storage servers on loopback), with faults.

* kill -9 a storage server (the primary) under a load of checksummed, numbered records, each
  written and flushed before the next: every acknowledged record reads back after the failover
  (through the same client and through a fresh one that takes the volume over); the longest
  write pause is measured and printed.
* a deposed reader whose old primary comes back with its epoch and bytes gets Deposed, not
  stale bytes (reads are fenced);
* a paused (SIGSTOP) primary is rewired away; resumed, it still believes the old epoch, and a
  writer with the old configuration gets no write acknowledged (the other replicas fence it).
* a client whose volume another client took over gets ``Deposed`` on its next write, and the
  new writer's data stays.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

from cellcloud import transport
from cellcloud.volumes.client import VolumeClient, create_volume
from cellcloud.volumes.core import Deposed, VolumeAttached, VolumeConfig, VolumeError

from .harness import Stack

pytestmark = pytest.mark.integration

GIB = 1024**3
REC = 4096
HEADER = struct.Struct(">4sII")  # magic, number, crc32(payload)


def record(i: int) -> bytes:
    payload = random.Random(i).randbytes(REC - HEADER.size)
    return HEADER.pack(b"REC1", i, zlib.crc32(payload)) + payload


def parse(raw: bytes) -> int | None:
    magic, i, crc = HEADER.unpack(raw[: HEADER.size])
    if magic != b"REC1" or zlib.crc32(raw[HEADER.size:]) != crc:
        return None
    return int(i)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory):
    s = Stack(str(tmp_path_factory.mktemp("volumes")))
    yield s
    s.stop_all()


@pytest.fixture
def stack(shared_stack: Stack):
    yield shared_stack
    shared_stack.revive()  # servers a test killed or paused come back for the next one


def test_kill_the_primary_under_writes_loses_no_acknowledged_record(stack: Stack) -> None:
    async def main() -> dict[str, float]:
        store = stack.store()
        cfg = await create_volume(store, "vol-a", GIB, stack.servers, rng=random.Random(5))
        vc = VolumeClient("vol-a", store, stack.servers, client_id="host-1")
        await vc.attach()
        acked: list[int] = []
        latencies: list[float] = []
        killed_at = None
        for i in range(120):
            if i == 40:
                stack.kill9(cfg.primary)
                killed_at = i
            t0 = time.monotonic()
            await vc.write(i * REC, record(i))
            await vc.flush()
            latencies.append(time.monotonic() - t0)
            acked.append(i)
        now = vc.core.config
        assert now is not None and cfg.primary not in now.replicas
        assert now.epoch > cfg.epoch + 1  # attach, then at least one rewire
        for i in acked:  # through the client that lived through the failover
            assert parse(await vc.read(i * REC, REC)) == i
        # The re-mirror (sparse: only allocated ranges travel) completes while idle; then
        # EVERY replica, the new one too, holds every acknowledged record.
        deadline = time.monotonic() + 120
        while vc.core.config is not None and vc.core.config.catching_up:
            assert time.monotonic() < deadline, vc.core.config
            await asyncio.sleep(0.05)
        final = vc.core.config
        assert final is not None and len(final.replicas) == 3
        for sid in final.replicas:
            a = stack.servers[sid]
            c = transport.Client(a.host, a.port)
            req = {"op": "read", "volume": "vol-a", "epoch": final.epoch,
                   "config": final.to_dict(), "offset": 0, "length": REC * len(acked)}
            got = (await c.call("volume", req, timeout_s=30))["data"]
            await c.close()
            assert [parse(got[i * REC:(i + 1) * REC]) for i in acked] == acked, sid
        await vc.close()
        # A fresh client takes the volume over (one more failover) and reads everything.
        vc2 = VolumeClient("vol-a", store, stack.servers, client_id="host-2")
        await vc2.attach()
        for i in acked:
            assert parse(await vc2.read(i * REC, REC)) == i
        await vc2.close()
        await store.close()
        before = sorted(latencies[:killed_at])
        return {"pause_s": max(latencies[killed_at:]), "p50_before_s": before[len(before) // 2]}

    figures = asyncio.run(main())
    print(f"\nwrite pause after kill -9 of the primary: {figures['pause_s'] * 1000:.0f} ms "
          f"(write+flush p50 before: {figures['p50_before_s'] * 1000:.1f} ms)")
    assert figures["pause_s"] < 60


def test_a_paused_primary_resumed_with_an_old_epoch_gets_no_write_acknowledged(
        stack: Stack) -> None:
    async def main() -> None:
        store = stack.store()
        cfg = await create_volume(store, "vol-b", GIB, stack.servers, rng=random.Random(7))
        vc = VolumeClient("vol-b", store, stack.servers, client_id="host-1")
        old = await vc.attach()
        await vc.write(0, b"A" * 512)
        stack.signal(cfg.primary, signal.SIGSTOP)
        try:
            await vc.write(0, b"B" * 512)  # times out on the paused primary, rewires, goes on
            new = vc.core.config
            assert new is not None and cfg.primary not in new.replicas
        finally:
            stack.signal(cfg.primary, signal.SIGCONT)
        # The resumed primary still believes the old epoch; a writer with the old
        # configuration sends to all of its replicas, as the protocol does.
        req = {"op": "write", "volume": "vol-b", "epoch": old.epoch, "config": old.to_dict(),
               "offset": 0, "data": b"Z" * 512}
        statuses = {}
        for sid in old.replicas:
            a = stack.servers[sid]
            c = transport.Client(a.host, a.port)
            statuses[sid] = (await c.call("volume", req, timeout_s=30))["status"]
            await c.close()
        assert statuses[cfg.primary] == "ok"  # it does not know it was deposed...
        assert any(s == "stale" for s in statuses.values()), statuses  # ...the others do
        assert await vc.read(0, 512) == b"B" * 512
        await vc.close()
        await store.close()

    asyncio.run(main())


def test_a_deposed_reader_gets_no_stale_bytes_from_its_old_primary(stack: Stack) -> None:
    """Reads are fenced: client A's primary dies; B takes the volume over (the fence cannot
    reach the dead primary, so B rewires it away) and overwrites a block; the primary comes
    back with A's epoch and A's bytes. A, which has not learned it is deposed, reads that
    block: the old primary alone would serve the stale bytes; the other replicas' epoch
    check makes the read fail as Deposed instead."""
    async def main() -> None:
        store = stack.store()
        cfg = await create_volume(store, "vol-r", GIB, stack.servers, rng=random.Random(11))
        a = VolumeClient("vol-r", store, stack.servers, client_id="host-a")
        await a.attach()
        await a.write(8192, b"A" * 512)
        old = a.core.config
        assert old is not None and old.primary == cfg.primary
        stack.kill9(cfg.primary)
        b = VolumeClient("vol-r", store, stack.servers, client_id="host-b")
        await b.attach()  # fences every replica but the dead one, then rewires it away
        await b.write(8192, b"B" * 512)
        assert b.core.config is not None and cfg.primary not in b.core.config.replicas
        stack.start_server(cfg.primary, stack.servers[cfg.primary].labels)  # A's epoch, A's bytes
        with pytest.raises(Deposed):
            await a.read(8192, 512)
        assert await b.read(8192, 512) == b"B" * 512
        await a.close()
        await b.close()
        await store.close()

    asyncio.run(main())


def test_a_client_whose_volume_was_taken_over_is_deposed(stack: Stack) -> None:
    async def main() -> None:
        store = stack.store()
        await create_volume(store, "vol-c", GIB, stack.servers, rng=random.Random(9))
        a = VolumeClient("vol-c", store, stack.servers, client_id="host-a")
        await a.attach()
        await a.write(4096, b"a" * 100)
        b = VolumeClient("vol-c", store, stack.servers, client_id="host-b")
        await b.attach()  # a is idle meanwhile (as if paused)
        await b.write(4096, b"b" * 100)
        with pytest.raises(Deposed):
            await a.write(4096, b"x" * 100)
        assert await b.read(4096, 100) == b"b" * 100
        with pytest.raises(Exception, match="past the end"):
            await b.write(GIB - 10, b"y" * 100)
        cfg = VolumeConfig.decode(await store.get("vol.vol-c", "config"))  # type: ignore[arg-type]
        assert cfg.attached_client == "host-b"
        await a.close()
        # Attaching an attached volume without force is refused; after a detach it works.
        c = VolumeClient("vol-c", store, stack.servers, client_id="host-c")
        with pytest.raises(VolumeAttached):
            await c.attach(force=False)
        await c.close()
        await b.detach()
        d = VolumeClient("vol-c", store, stack.servers, client_id="host-d")
        await d.attach(force=False)
        assert await d.read(4096, 100) == b"b" * 100
        await d.close()
        await store.close()

    asyncio.run(main())


def test_storage_server_keeps_its_epoch_across_a_restart(stack: Stack) -> None:
    async def main() -> None:
        store = stack.store()
        cfg = await create_volume(store, "vol-d", GIB, stack.servers, rng=random.Random(3))
        vc = VolumeClient("vol-d", store, stack.servers, client_id="host-1")
        now = await vc.attach()
        await vc.write(0, b"kept")
        await vc.close()
        sid = cfg.replicas[1]
        stack.kill9(sid)
        stack.start_server(sid, stack.servers[sid].labels)
        a = stack.servers[sid]
        c = transport.Client(a.host, a.port)
        req = {"op": "write", "volume": "vol-d", "epoch": cfg.epoch, "config": cfg.to_dict(),
               "offset": 0, "data": b"old!"}
        assert (await c.call("volume", req, timeout_s=30))["status"] == "stale"
        req = {"op": "read", "volume": "vol-d", "epoch": now.epoch, "config": now.to_dict(),
               "offset": 0, "length": 4}
        assert (await c.call("volume", req, timeout_s=30))["data"] == b"kept"
        await c.close()
        assert os.path.getsize(os.path.join(stack.dir, sid, "vol-d.img")) == GIB  # sparse
        await store.close()

    asyncio.run(main())


def test_store_partitioned_from_servers_io_goes_on_and_config_changes_wait(
        stack: Stack) -> None:
    """Static stability: with every store node stopped (SIGSTOP), attached volumes keep
    serving reads and writes; a server failure makes its volumes' writes wait for the store
    (the rewire is a compare-and-set), and they complete once the store is back."""
    store_nodes = list(stack.colony.node_ids())

    async def main() -> None:
        store = stack.store()
        vols = []
        for k in range(3):
            await create_volume(store, f"vol-p{k}", GIB, stack.servers, rng=random.Random(k))
            vc = VolumeClient(f"vol-p{k}", store, stack.servers, client_id="host-p")
            await vc.attach()
            vols.append(vc)
        for n in store_nodes:
            stack.signal(n, signal.SIGSTOP)
        try:
            for i in range(20):  # IO goes on without the store
                for vc in vols:
                    await vc.write(i * REC, record(i))
            for vc in vols:
                assert parse(await vc.read(19 * REC, REC)) == 19
            victim = vols[0].core.config.replicas[1]  # type: ignore[union-attr]
            stack.kill9(victim)
            hit = [vc for vc in vols if victim in vc.core.config.replicas]  # type: ignore[union-attr]
            writes = [asyncio.create_task(vc.write(20 * REC, record(20))) for vc in hit]
            deadline = time.monotonic() + 60
            while not all(vc.core.phase == "cas" for vc in hit):  # waiting on the store
                assert time.monotonic() < deadline, [vc.core.phase for vc in hit]
                await asyncio.sleep(0.05)
            assert not any(w.done() for w in writes)
        finally:
            for n in store_nodes:
                stack.signal(n, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*writes), 120)
        for vc in hit:
            assert victim not in vc.core.config.replicas  # type: ignore[union-attr]
            assert parse(await vc.read(20 * REC, REC)) == 20
        for vc in vols:
            await vc.close()
        await store.close()

    asyncio.run(main())


WRITER = """
import asyncio, random, struct, sys, zlib
from cellcloud.store.client import StoreClient
from cellcloud.volumes.client import VolumeClient, load_servers
HEADER = struct.Struct(">4sII")
async def main():
    store = StoreClient.from_file(sys.argv[1], attempt_timeout_ms=300, op_timeout_ms=8000)
    vc = VolumeClient(sys.argv[3], store, load_servers(sys.argv[2]), client_id="writer")
    await vc.attach()
    print("ATTACHED", flush=True)
    i = 0
    while True:
        payload = random.Random(i).randbytes(4096 - HEADER.size)
        await vc.write(i * 4096, HEADER.pack(b"REC1", i, zlib.crc32(payload)) + payload)
        await vc.flush()
        print("ACK", i, flush=True)
        i += 1
asyncio.run(main())
"""


def test_a_writer_killed_mid_write_leaves_the_acknowledged_prefix_intact(stack: Stack) -> None:
    """kill -9 of the writing process: after a new client takes the volume over, every record
    the writer saw acknowledged reads back intact; the one it was writing is whole or absent."""
    servers_path = os.path.join(stack.dir, "servers.json")
    with open(servers_path, "w") as f:
        json.dump({s.server_id: {"host": s.host, "port": s.port, "labels": s.labels}
                   for s in stack.servers.values()}, f)

    async def create() -> None:
        store = stack.store()
        await create_volume(store, "vol-w", GIB, stack.servers, rng=random.Random(11))
        await store.close()

    asyncio.run(create())
    p = subprocess.Popen([sys.executable, "-c", WRITER, stack.colony_path, servers_path,
                          "vol-w"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    last = -1
    try:
        while last < 30:
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            if line.startswith("ACK "):
                last = int(line.split()[1])
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    async def verify() -> None:
        store = stack.store()
        vc = VolumeClient("vol-w", store, stack.servers, client_id="after")
        await vc.attach()
        for i in range(last + 1):
            assert parse(await vc.read(i * REC, REC)) == i
        nxt = await vc.read((last + 1) * REC, REC)
        assert nxt == bytes(REC) or parse(nxt) == last + 1
        await vc.close()
        await store.close()

    asyncio.run(verify())


def test_attaching_a_volume_that_does_not_exist_fails(stack: Stack) -> None:
    async def main() -> None:
        store = stack.store()
        # A cell without a configuration record: the volume was deleted (or never made).
        await store.create_cell("vol.vol-none", replicas=3)
        vc = VolumeClient("vol-none", store, stack.servers, client_id="h")
        with pytest.raises(VolumeError, match="no such volume"):
            await vc.attach()
        await vc.close()
        await store.close()

    asyncio.run(main())
