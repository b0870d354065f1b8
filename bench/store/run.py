"""Store benchmarks. ``python -m bench.store [--quick] [--only latency,throughput,cells]``.

1. One 7-replica cell at a fixed 1,000 ops/s (half reads, half writes), open loop: p50/p99.
2. Saturation throughput of 3- and 7-member groups: cellcloud vs etcd (gRPC, spread over its
   members as etcd's benchmark tool does; ``etcd-http``: the HTTP/JSON gateway, one member) vs
   PySyncObj, same Python closed-loop load generator, same value size and concurrency.
3. Many cells: create N cells of 7 replicas on a 7-node colony (batched, group commit) and
   measure resident memory and disk per idle replica.

Benchmarks are never timed tests; the figures go to docs/store.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from cellcloud.store.client import StoreClient
from cellcloud.store.colony import Colony, spawn_node, wait_ready
from cellcloud.store.wire import read_frame, seal, unseal

VALUE = b"v" * 100
CONCURRENCY = 32


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


# ---- systems under test ------------------------------------------------------------------


class CellcloudSut:
    name = "cellcloud"

    def __init__(self, members: int, nodes: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-store-")
        nodes = nodes or members
        self.colony = Colony.local(nodes, 0)
        for spec, port in zip(self.colony.nodes.values(), free_ports(nodes), strict=True):
            spec.port = port
        self.path = os.path.join(self.dir, "colony.json")
        self.colony.save(self.path)
        self.procs = [spawn_node(self.path, n, self.dir) for n in self.colony.node_ids()]
        for p in self.procs:
            wait_ready(p)
        self.members = members
        self.client: StoreClient | None = None

    async def setup(self) -> None:
        self.client = StoreClient(self.colony, lanes_max=256, attempt_timeout_ms=2000)
        await self.client.create_cell("bench", self.colony.node_ids()[: self.members])
        await self.client.put("bench", "warm", 1)

    async def put(self, key: str, value: bytes) -> None:
        assert self.client is not None
        await self.client.put("bench", key, value)

    async def get(self, key: str) -> Any:
        assert self.client is not None
        return await self.client.get("bench", key)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class _FrameConn:
    def __init__(self, host: str, port: int, key: bytes) -> None:
        self.host, self.port, self.key = host, port, key
        self.rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.rid = 0

    async def call(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.rw is None:
            self.rw = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.rw
        self.rid += 1
        writer.write(seal(self.key, dict(body, request_id=self.rid)))
        reply = unseal(self.key, await read_frame(reader))
        return reply


class PySyncObjSut:
    name = "pysyncobj"

    def __init__(self, members: int) -> None:
        from bench.store.peers import KEY

        self.dir = tempfile.mkdtemp(prefix="bench-pso-")
        raft = free_ports(members)
        self.ports = free_ports(members)
        addrs = [f"127.0.0.1:{p}" for p in raft]
        self.procs = []
        for i in range(members):
            cmd = [
                sys.executable,
                "-m",
                "bench.store.peers",
                addrs[i],
                str(self.ports[i]),
                os.path.join(self.dir, f"j{i}"),
                *[a for a in addrs if a != addrs[i]],
            ]
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().startswith("READY")
        self.key = KEY
        self.free: asyncio.Queue[_FrameConn] = asyncio.Queue()

    async def setup(self) -> None:
        for i in range(CONCURRENCY * 2):
            self.free.put_nowait(_FrameConn("127.0.0.1", self.ports[i % len(self.ports)], self.key))
        while True:  # until a leader is elected
            r = await self._call({"op": "put", "key": "warm", "value": b"1"})
            if r["status"] == "ok":
                return

    async def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        conn = await self.free.get()
        try:
            return await conn.call(body)
        finally:
            self.free.put_nowait(conn)

    async def put(self, key: str, value: bytes) -> None:
        r = await self._call({"op": "put", "key": key, "value": value})
        assert r["status"] == "ok", r

    async def get(self, key: str) -> Any:
        return (await self._call({"op": "get", "key": key}))["result"]

    async def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdHttpSut:
    """etcd through its HTTP/JSON gateway, every put to one member (the old comparison)."""

    name = "etcd-http"

    def __init__(self, members: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-etcd-")
        client_ports, peer_ports = free_ports(members), free_ports(members)
        cluster = ",".join(f"e{i}=http://127.0.0.1:{peer_ports[i]}" for i in range(members))
        self.procs = []
        for i in range(members):
            cmd = [
                "etcd",
                "--name",
                f"e{i}",
                "--data-dir",
                os.path.join(self.dir, f"e{i}"),
                "--listen-client-urls",
                f"http://127.0.0.1:{client_ports[i]}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{client_ports[i]}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_ports[i]}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_ports[i]}",
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new",
                "--log-level",
                "error",
            ]
            self.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        self.urls = [f"http://127.0.0.1:{p}" for p in client_ports]
        self.http: Any = None

    async def setup(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=CONCURRENCY * 2), timeout=10
        )
        deadline = time.monotonic() + 30
        while True:  # a real readiness signal: /health answers true
            try:
                r = await self.http.get(self.urls[0] + "/health")
                if r.status_code == 200 and r.json().get("health") == "true":
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "etcd never became healthy"
            await asyncio.sleep(0.1)
        await self.put("warm", b"1")

    async def put(self, key: str, value: bytes) -> None:
        body = {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(value).decode(),
        }
        r = await self.http.post(random.choice(self.urls[:1]) + "/v3/kv/put", json=body)
        assert r.status_code == 200, r.text

    async def get(self, key: str) -> Any:
        body = {"key": base64.b64encode(key.encode()).decode()}
        r = await self.http.post(self.urls[0] + "/v3/kv/range", json=body)
        return r.json()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdSut(EtcdHttpSut):
    """etcd through its gRPC API, requests spread round-robin over every member with one
    multiplexed channel each, as etcd's own benchmark tool does (bench/store/etcd_grpc.py)."""

    name = "etcd"

    async def setup(self) -> None:
        from bench.store.etcd_grpc import EtcdGrpcClient

        self.grpc = EtcdGrpcClient([u.removeprefix("http://") for u in self.urls])
        await super().setup()  # healthy, per /health
        deadline = time.monotonic() + 30
        while True:  # every member answers over gRPC
            try:
                for _ in self.urls:
                    await self.grpc.put(b"warm", b"1")
                break
            except Exception:
                assert time.monotonic() < deadline, "etcd gRPC never answered"
                await asyncio.sleep(0.1)

    async def put(self, key: str, value: bytes) -> None:
        await self.grpc.put(key.encode(), value)

    async def get(self, key: str) -> Any:
        return await self.grpc.get(key.encode())

    async def close(self) -> None:
        if getattr(self, "grpc", None) is not None:
            await self.grpc.close()
        await super().close()


# ---- load generators ----------------------------------------------------------------------


async def closed_loop(
    op: Callable[[int], Awaitable[Any]], concurrency: int, duration_s: float
) -> tuple[int, list[float]]:
    stop = time.monotonic() + duration_s
    lat: list[float] = []
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            await op(next(counter))
            lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return int(len(lat) / (time.monotonic() - t0)), lat


async def open_loop(sut: Any, rate: int, duration_s: float) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {"read": [], "write": []}
    interval = 1.0 / rate
    tasks = []

    async def one(i: int) -> None:
        kind = "read" if i % 2 else "write"
        t0 = time.perf_counter()
        if kind == "read":
            await sut.get(f"k{i % 100}")
        else:
            await sut.put(f"k{i % 100}", VALUE)
        lat[kind].append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    for i in range(int(rate * duration_s)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return lat


# ---- benchmarks -------------------------------------------------------------------------


async def bench_latency(duration_s: float) -> list[str]:
    sut = CellcloudSut(7)
    try:
        await sut.setup()
        await open_loop(sut, 1000, 1.0)  # warm up
        lat = await open_loop(sut, 1000, duration_s)
    finally:
        await sut.close()
    rows = ["| op | p50 ms | p99 ms | goal p99 |", "|---|---|---|---|"]
    for kind, goal in (("read", 10), ("write", 50)):
        xs = lat[kind]
        rows.append(
            f"| {kind} ({len(xs)} ops) | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | ≤ {goal} ms |"
        )
    return rows


async def bench_throughput(duration_s: float, systems: list[str]) -> list[str]:
    rows = [
        "| members | system | ops/s | p50 ms | p99 ms | vs cellcloud |",
        "|---|---|---|---|---|---|",
    ]
    for members in (3, 7):
        base = None
        for name in systems:
            if name.startswith("etcd") and shutil.which("etcd") is None:
                rows.append(f"| {members} | {name} | not installed | | | |")
                continue
            sut: Any = {
                "cellcloud": CellcloudSut,
                "pysyncobj": PySyncObjSut,
                "etcd": EtcdSut,
                "etcd-http": EtcdHttpSut,
            }[name](members)
            try:
                await sut.setup()
                await closed_loop(lambda i, s=sut: s.put(f"k{i % 1000}", VALUE), CONCURRENCY, 1.0)
                ops, lat = await closed_loop(
                    lambda i, s=sut: s.put(f"k{i % 1000}", VALUE), CONCURRENCY, duration_s
                )
            finally:
                await sut.close()
            base = base or ops
            rows.append(
                f"| {members} | {name} | {ops} | {pct(lat, 50):.1f} | {pct(lat, 99):.1f} "
                f"| {ops / base:.2f}× |"
            )
            print(rows[-1], flush=True)
    return rows


async def bench_cells(cells: int) -> list[str]:
    sut = CellcloudSut(7)
    try:
        await sut.setup()
        assert sut.client is not None
        client = sut.client
        nodes = sut.colony.node_ids()
        pids = [psutil.Process(p.pid) for p in sut.procs]
        rss0 = [p.memory_info().rss for p in pids]
        t0 = time.monotonic()
        batch = 10_000
        for start in range(0, cells, batch):
            chunk = [[f"c{i}", nodes] for i in range(start, min(cells, start + batch))]
            for n in nodes:
                r = await client._admin(n, {"t": "create_cells", "cells": chunk})
                assert r and r.get("ok"), r
        dt = time.monotonic() - t0
        rss1 = [p.memory_info().rss for p in pids]
        # Touch a sample: idle cells wake up (load from SQLite, elect, commit).
        rng = random.Random(1)
        sample = rng.sample(range(cells), 20)
        t1 = time.monotonic()
        for i in sample:
            await client.put(f"c{i}", "k", i)
            assert await client.get(f"c{i}", "k") == i
        wake_ms = (time.monotonic() - t1) * 1000 / len(sample)
        db_bytes = sum(
            os.path.getsize(os.path.join(sut.dir, f))
            for f in os.listdir(sut.dir)
            if ".sqlite3" in f
        )
    finally:
        await sut.close()
    per_node = [(b - a) / cells for a, b in zip(rss0, rss1, strict=True)]
    replicas = cells * len(nodes)
    return [
        "| figure | value |",
        "|---|---|",
        f"| cells created (7 replicas each) | {cells:,} ({replicas:,} replicas) |",
        f"| creation time (batched, group commit) | {dt:.1f} s ({replicas / dt:,.0f} replicas/s) |",
        f"| RSS growth per idle replica (mean of 7 nodes) | {sum(per_node) / len(per_node):.1f} B |",
        f"| SQLite bytes per idle replica | {db_bytes / replicas:.0f} B |",
        f"| first op on an idle cell (load, elect, put + get) | {wake_ms:.1f} ms |",
        f"| extrapolated disk for 1,000,000 cells per node | {db_bytes / replicas * 1e6 / 1e6:.0f} MB |",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store")
    ap.add_argument("--only", default="latency,throughput,cells")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--systems", default="cellcloud,pysyncobj,etcd")  # also: etcd-http
    args = ap.parse_args(argv)
    which = args.only.split(",")
    cpu = platform.processor() or platform.machine()
    print(
        f"# machine: {os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total >> 30} GiB, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )
    out: list[str] = []
    if "latency" in which:
        out += [
            "",
            "## one 7-replica cell at 1,000 ops/s (50% reads)",
            *asyncio.run(bench_latency(args.duration)),
        ]
        print("\n".join(out), flush=True)
    if "throughput" in which:
        out += [
            "",
            f"## saturation throughput, puts of {len(VALUE)} B, {CONCURRENCY} concurrent",
            *asyncio.run(bench_throughput(args.duration, args.systems.split(","))),
        ]
        print("\n".join(out[-12:]), flush=True)
    if "cells" in which:
        out += ["", "## many cells on a 7-node colony", *asyncio.run(bench_cells(args.cells))]
    print("\n".join(out))
    return 0
