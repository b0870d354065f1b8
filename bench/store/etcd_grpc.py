"""etcd through its gRPC API, driven the way etcd's own benchmark tool drives it.

``tools/benchmark`` (etcd-io/etcd) opens ``--conns`` gRPC connections, round-robin over every
endpoint, and runs ``--clients`` concurrent requests multiplexed over them (HTTP/2 streams:
pipelined on each connection). ``EtcdGrpcSut`` does the same: one grpc.aio channel per member,
the load generator's concurrent workers spread round-robin over the channels, so each member
takes its share of puts (followers forward them to the leader, as in etcd's benchmark).

The stubs are generated from ``etcd_kv.proto`` (the subset of etcd's rpc.proto the benchmark
calls) with grpcio-tools at start-up into a temporary directory: ``pip install
'cellcloud[bench]'`` brings grpcio and grpcio-tools.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import tempfile
from types import ModuleType
from typing import Any

PROTO = os.path.join(os.path.dirname(__file__), "etcd_kv.proto")


def generate_stubs() -> tuple[ModuleType, ModuleType]:
    """Compile etcd_kv.proto with grpcio-tools; return (messages, grpc stubs) modules."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = tempfile.mkdtemp(prefix="etcd-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{os.path.dirname(PROTO)}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
    )
    assert rc == 0, f"protoc failed ({rc}) on {PROTO}"
    sys.path.insert(0, out)
    try:
        pb2 = importlib.import_module("etcd_kv_pb2")
        pb2_grpc = importlib.import_module("etcd_kv_pb2_grpc")
    finally:
        sys.path.remove(out)
    return pb2, pb2_grpc


class EtcdGrpcClient:
    """Round-robin over one channel per endpoint, like etcd's benchmark ``--conns=N``."""

    def __init__(self, endpoints: list[str]) -> None:
        import grpc  # type: ignore[import-untyped]

        self.pb2, pb2_grpc = generate_stubs()
        self.channels = [grpc.aio.insecure_channel(e) for e in endpoints]
        self.stubs = [pb2_grpc.KVStub(c) for c in self.channels]
        self.rr = itertools.cycle(range(len(self.stubs)))

    async def put(self, key: bytes, value: bytes) -> Any:
        stub = self.stubs[next(self.rr)]
        return await stub.Put(self.pb2.PutRequest(key=key, value=value), timeout=10)

    async def get(self, key: bytes) -> bytes | None:
        stub = self.stubs[next(self.rr)]
        r = await stub.Range(self.pb2.RangeRequest(key=key), timeout=10)
        return r.kvs[0].value if r.kvs else None

    async def close(self) -> None:
        for c in self.channels:
            await c.close()
