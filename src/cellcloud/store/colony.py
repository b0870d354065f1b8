"""A colony file (JSON) names the store nodes, their addresses and failure-domain labels, and
holds the HMAC key that every frame carries. Also: start node processes and wait for them to
say READY on their stdout pipe (a real signal, never a sleep)."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeSpec:
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)  # zone, rack, power


@dataclass
class Colony:
    key: bytes
    nodes: dict[str, NodeSpec]

    def node_ids(self) -> list[str]:
        return sorted(self.nodes)

    def address(self, node_id: str) -> tuple[str, int]:
        spec = self.nodes[node_id]
        return spec.host, spec.port

    def to_json(self) -> dict[str, Any]:
        return {
            "hmac_key": self.key.hex(),
            "nodes": {
                n: {"host": s.host, "port": s.port, "labels": s.labels}
                for n, s in sorted(self.nodes.items())
            },
        }

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.chmod(tmp, 0o600)  # holds the HMAC key
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Colony:
        with open(path) as f:
            raw = json.load(f)
        nodes = {
            n: NodeSpec(s["host"], int(s["port"]), dict(s.get("labels", {})))
            for n, s in raw["nodes"].items()
        }
        return cls(bytes.fromhex(raw["hmac_key"]), nodes)

    @classmethod
    def local(cls, count: int, base_port: int, zones: int = 3, racks_per_zone: int = 3) -> Colony:
        """A loopback colony; nodes spread round-robin over zones, racks and power domains."""
        nodes = {}
        for i in range(count):
            zone = i % zones
            rack = (i // zones) % racks_per_zone
            nodes[f"n{i + 1}"] = NodeSpec(
                "127.0.0.1",
                base_port + i,
                {"zone": f"z{zone}", "rack": f"z{zone}-r{rack}", "power": f"p{i % 4}"},
            )
        return cls(secrets.token_bytes(32), nodes)


def spawn_node(
    colony_path: str, node_id: str, data_dir: str, extra: list[str] | None = None
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "cellcloud.store",
        "node",
        "--colony",
        colony_path,
        "--node",
        node_id,
        "--data-dir",
        data_dir,
        *(extra or []),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> str:
    """Block until the node prints its READY line (or fail if it exits or times out)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("node did not become ready")
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"node exited before READY: {err[-2000:]}")
                if line.startswith("READY "):
                    return line.strip()
    finally:
        sel.close()
