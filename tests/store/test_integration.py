"""Real node processes on loopback: kill -9 a minority and a majority during writes.

Readiness is a real signal: each node prints READY on its stdout pipe once it listens.
"""

import asyncio
import os
import signal
import socket
import subprocess

import pytest
from typer.testing import CliRunner

from cellcloud.store.cli import app
from cellcloud.store.client import StoreClient, StoreUnavailable
from cellcloud.store.colony import Colony, spawn_node, wait_ready
from cellcloud.store.wire import seal

pytestmark = pytest.mark.integration


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LiveColony:
    def __init__(self, tmp, count):
        self.dir = str(tmp)
        self.colony = Colony.local(count, 0)
        for spec, port in zip(self.colony.nodes.values(), free_ports(count), strict=True):
            spec.port = port
        self.path = os.path.join(self.dir, "colony.json")
        self.colony.save(self.path)
        self.procs: dict[str, subprocess.Popen] = {}
        for n in self.colony.node_ids():
            self.start(n)

    def start(self, node):
        p = spawn_node(self.path, node, self.dir)
        wait_ready(p)
        self.procs[node] = p

    def kill9(self, node):
        p = self.procs.pop(node)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    def stop_all(self):
        for n in list(self.procs):
            self.kill9(n)


@pytest.fixture
def colony(tmp_path):
    c = LiveColony(tmp_path, 5)
    yield c
    c.stop_all()


def client(c, **kw):
    return StoreClient(c.colony, attempt_timeout_ms=300, op_timeout_ms=kw.pop("op_ms", 8000), **kw)


async def writer(cl, cell, name, acked, stop):
    i = 0
    while not stop.is_set():
        i += 1
        key = f"{name}-{i}"
        try:
            await cl.put(cell, key, i)
            acked[key] = i
        except StoreUnavailable:
            pass


async def wait_for(cond, timeout_s=20):
    """Poll a real condition until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await cond():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


def test_kill9_minority_during_writes_loses_nothing(colony):
    async def go():
        async with client(colony) as cl:
            members = await cl.create_cell("cfg", replicas=5)
            acked: dict[str, int] = {}
            stop = asyncio.Event()
            tasks = [asyncio.create_task(writer(cl, "cfg", f"w{i}", acked, stop)) for i in range(3)]
            await wait_for(lambda: asyncio.sleep(0, len(acked) >= 30))
            status = await cl.cell_status("cfg")
            leader = next(n for n, s in status.items() if s and s["role"] == "leader")
            victims = [leader] + [m for m in members if m != leader][:1]  # 2 of 5, incl. leader
            for v in victims:
                colony.kill9(v)
            before = len(acked)
            await wait_for(lambda: asyncio.sleep(0, len(acked) >= before + 30))
            stop.set()
            await asyncio.gather(*tasks)
            for key, value in acked.items():
                assert await cl.get("cfg", key) == value, key
            # The killed nodes recover from SQLite and rejoin.
            for v in victims:
                colony.start(v)
            await cl.put("cfg", "after", 1)

            async def caught_up():
                st = await cl.cell_status("cfg")
                top = max(s["commit_index"] for s in st.values() if s)
                return all(st[v] and st[v]["commit_index"] >= top - 1 for v in victims)

            await wait_for(caught_up)

    asyncio.run(go())


def test_kill9_majority_stops_writes_and_loses_nothing(colony):
    async def go():
        async with client(colony, op_ms=1500) as cl:
            members = await cl.create_cell("cfg", replicas=5)
            for i in range(20):
                await cl.put("cfg", f"k{i}", i)
            victims = members[:3]
            for v in victims:
                colony.kill9(v)
            with pytest.raises(StoreUnavailable):
                await cl.put("cfg", "during", 1)
            for v in victims:
                colony.start(v)
        async with client(colony) as cl:
            for i in range(20):
                assert await cl.get("cfg", f"k{i}") == i
            await cl.put("cfg", "after", 2)
            assert await cl.get("cfg", "after") == 2

    asyncio.run(go())


def test_unauthenticated_frames_are_dropped_and_counted(colony):
    async def go():
        host, port = colony.colony.address("n1")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(seal(b"wrong key" * 4, {"t": "ping", "request_id": 1}))
        writer.write(seal(colony.colony.key, {"t": "ping", "request_id": 2}))
        await writer.drain()
        from cellcloud.store.wire import read_frame, unseal

        reply = unseal(colony.colony.key, await read_frame(reader))
        assert reply["request_id"] == 2  # the forged ping got no answer
        writer.close()
        async with client(colony) as cl:
            stats = await cl.node_stats("n1")
            assert stats["counters"]["frames_unauthenticated"] == 1

    asyncio.run(go())


def test_replace_replica_while_writing_and_stale_discovery(colony):
    async def go():
        async with client(colony) as cl:
            members = await cl.create_cell("cfg", replicas=3)
            outsiders = [n for n in colony.colony.node_ids() if n not in members]
            acked: dict[str, int] = {}
            stop = asyncio.Event()
            task = asyncio.create_task(writer(cl, "cfg", "w", acked, stop))
            await wait_for(lambda: asyncio.sleep(0, len(acked) >= 10))
            assert await cl.add_replica("cfg", members[0], outsiders[0])
            n = len(acked)
            await wait_for(lambda: asyncio.sleep(0, len(acked) >= n + 60))  # past alpha slots
            stop.set()
            await task
            new_members = sorted(members[1:] + [outsiders[0]])

            async def moved():
                st = await cl.cell_status("cfg")
                return st.get(outsiders[0]) and st[outsiders[0]]["members"] == new_members

            await wait_for(moved)
            colony.kill9(members[0])  # the removed node is not needed any more
        # A client whose discovery cache is stale still gets the right answers.
        async with client(colony) as stale:
            stale.members_cache["cfg"] = [outsiders[1]]  # wrong: it never hosted the cell
            for key, value in list(acked.items())[-5:]:
                assert await stale.get("cfg", key) == value
            assert stale.counters["not_here"] >= 1

    asyncio.run(go())


def test_cli_put_get_cas_members(colony):
    runner = CliRunner()
    r = runner.invoke(
        app, ["create-cell", "-c", colony.path, "cli", "--replicas", "3", "--near", "z0"]
    )
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["put", "-c", colony.path, "cli", "k", "int:4"]).exit_code == 0
    r = runner.invoke(app, ["get", "-c", colony.path, "cli", "k"])
    assert "4" in r.output
    r = runner.invoke(app, ["cas", "-c", colony.path, "cli", "k", "int:4", "hello"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["get", "-c", colony.path, "cli", "k"])
    assert "hello" in r.output
    r = runner.invoke(app, ["members", "-c", colony.path, "cli"])
    assert "leader" in r.output
    r = runner.invoke(app, ["health", "-c", colony.path])
    assert r.exit_code == 0 and "n5" in r.output
