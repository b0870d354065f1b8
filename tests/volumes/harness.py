"""Real processes on loopback for volume tests: a store colony and storage servers, each
ready when it prints READY (a real signal, never a sleep)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from cellcloud.store.client import StoreClient
from cellcloud.store.colony import Colony, spawn_node, wait_ready
from cellcloud.volumes.client import ServerAddress


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Stack:
    def __init__(self, tmp: str, store_nodes: int = 3, servers: int = 4) -> None:
        self.dir = tmp
        os.makedirs(tmp, exist_ok=True)
        self.colony = Colony.local(store_nodes, 0)
        for spec, port in zip(self.colony.nodes.values(), free_ports(store_nodes), strict=True):
            spec.port = port
        self.colony_path = os.path.join(tmp, "colony.json")
        self.colony.save(self.colony_path)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        for n in self.colony.node_ids():
            p = spawn_node(self.colony_path, n, os.path.join(tmp, "store"))
            wait_ready(p)
            self.procs[n] = p
        self.servers: dict[str, ServerAddress] = {}
        for i in range(servers):
            self.start_server(f"s{i}", {"zone": "z0", "rack": f"r{i}"})

    def start_server(self, sid: str, labels: dict[str, str]) -> None:
        port = self.servers[sid].port if sid in self.servers else 0
        p = subprocess.Popen(
            [sys.executable, "-m", "cellcloud.volumes", "serve", "--id", sid, "--state-dir",
             os.path.join(self.dir, sid), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = wait_ready(p)
        _, host, got = line.split()
        self.procs[sid] = p
        self.servers[sid] = ServerAddress(sid, host, int(got), labels)

    def store(self, **kw: int) -> StoreClient:
        return StoreClient(self.colony, attempt_timeout_ms=kw.pop("attempt_ms", 300),
                           op_timeout_ms=kw.pop("op_ms", 8000), lanes_max=kw.pop("lanes", 64))

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill9(self, name: str) -> None:
        p = self.procs.pop(name)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    def revive(self) -> None:
        for sid, addr in self.servers.items():
            if sid in self.procs:
                os.kill(self.procs[sid].pid, signal.SIGCONT)
            else:
                self.start_server(sid, addr.labels)

    def stop_all(self) -> None:
        for n in list(self.procs):
            p = self.procs[n]
            os.kill(p.pid, signal.SIGCONT)
            self.kill9(n)
