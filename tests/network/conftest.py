"""An "outside world" for environments' egress, built on this machine only, and an in-process
agent whose environments get interfaces from a real network helper.

The world is a network namespace the test creates, linked to the host by a veth the test creates
(``10.X.Y.1`` host side, ``10.X.Y.2`` world side, X/Y random per run). It serves:

- HTTP on port 8080 (every address), answering with a token the test chose;
- DNS on port 53: ``upstream.test`` -> ``10.X.Y.2``, every other name NXDOMAIN. The agent's
  helper is told to forward to it (``--dns-upstream``), as it would forward to the host's
  /etc/resolv.conf resolvers; so a name resolves inside an environment only through the
  helper's forwarder and the host's routing, and nothing leaves this machine;
- a second address ``10.X.(Y+1).2`` (the test denies its /24 as "region-internal") and the
  metadata address ``169.254.169.254``, both routed by the host to the world.

Everything is removed in ``finally`` blocks, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cellcloud.agent.server import Agent
from cellcloud.network import policy
from cellcloud.network.client import NetConfig, NetHelperClient
from cellcloud.sandbox import cgroups
from cellcloud.sandbox.backend import JailBackend
from tests.conftest import make_zip

if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
    pytest.skip("needs root, nft and ip", allow_module_level=True)

WORLD_SERVER = r'''
import socket, struct, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
token, answer = sys.argv[1], socket.inet_aton(sys.argv[2])

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = token.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def reply(q):
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode().lower())
        i += 1 + q[i]
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    found = ".".join(labels) == "upstream.test"
    if found and qtype == 1:
        ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + answer
        head = q[:2] + b"\x84\x00" + struct.pack("!HHHH", 1, 1, 0, 0)
    else:
        ans = b""
        head = q[:2] + (b"\x84\x00" if found else b"\x84\x03") + struct.pack("!HHHH", 1, 0, 0, 0)
    return head + question + ans

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 53))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 53))
tcp.listen(16)

def dns(s=udp):
    while True:
        q, peer = s.recvfrom(4096)
        if len(q) >= 12:
            s.sendto(reply(q), peer)

def dns_tcp(s=tcp):
    while True:
        c, _ = s.accept()
        with c:
            n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            a = reply(c.recv(n, socket.MSG_WAITALL))
            c.sendall(struct.pack("!H", len(a)) + a)

threading.Thread(target=dns, daemon=True).start()
threading.Thread(target=dns_tcp, daemon=True).start()
ThreadingHTTPServer.request_queue_size = 128  # bursts of connections are part of the tests
srv = ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("ready", flush=True)
srv.serve_forever()
'''


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


class World:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.netns = f"ccw{tag}"
        self.veth = f"ccw{tag}h"
        x, y = random.randrange(100, 250), random.randrange(0, 250, 2)
        self.net = f"10.{x}.{y}"
        self.host_addr = f"{self.net}.1"
        self.addr = f"{self.net}.2"
        self.denied_net = f"10.{x}.{y + 1}.0/24"
        self.denied_addr = f"10.{x}.{y + 1}.2"
        self.metadata_addr = "169.254.169.254"
        self.token = uuid.uuid4().hex
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
           "netns", self.netns)
        sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        w = ("ip", "netns", "exec", self.netns)
        sh(*w, "ip", "link", "set", "lo", "up")
        sh(*w, "ip", "addr", "add", f"{self.addr}/24", "dev", "eth0")
        sh(*w, "ip", "addr", "add", f"{self.denied_addr}/32", "dev", "eth0")
        sh(*w, "ip", "addr", "add", f"{self.metadata_addr}/32", "dev", "lo")
        sh(*w, "ip", "link", "set", "eth0", "up")
        sh(*w, "ip", "route", "add", "default", "via", self.host_addr)
        sh("ip", "route", "add", self.denied_net, "via", self.addr)
        sh("ip", "route", "add", f"{self.metadata_addr}/32", "via", self.addr)
        self.proc = subprocess.Popen(
            [*w, sys.executable, "-c", WORLD_SERVER, self.token, self.addr],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        sh("ip", "route", "del", self.denied_net, check=False)
        sh("ip", "route", "del", f"{self.metadata_addr}/32", check=False)
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.netns, check=False)


class NetSandbox:
    """An in-process agent + zygote + network helper (as tests/escape's Sandbox)."""

    def __init__(self, state_dir: str, world: World | None, mode: str = "egress",
                 backend: Any = None, create_timeout_ms: int = 60_000, **net: Any) -> None:
        self.group = f"net-{uuid.uuid4().hex[:6]}"
        self.prefix = policy.prefix_for(self.group)
        # ``backend``: another (not started) backend than the jail, the microvm one.
        self.backend = backend or JailBackend(os.path.join(state_dir, "jailroot"))
        self.create_timeout_ms = create_timeout_ms
        self.backend.start()
        self.network: NetHelperClient | None = None
        if mode != "none":
            assert world is not None
            self.network = NetHelperClient(self.prefix, NetConfig(
                mode=mode, deny=[world.denied_net], dns_upstreams=[world.addr], **net))
            try:
                self.network.start()
            except BaseException:
                self.backend.close()
                raise
        self.agent = Agent(self.group, state_dir, self.backend, uid_base=410_000, pids_max=64,
                           network=self.network)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def table(self) -> str:
        return "cellcloud_" + self.prefix

    def _run(self, coro: Any, timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def create(self, code: str, memory_mb: int = 256, **function: Any) -> str:
        data = make_zip({"app.py": code})
        sha = hashlib.sha256(data).hexdigest()
        self.agent._bundle(sha, data)
        env_id = f"e-{uuid.uuid4().hex[:8]}"
        self._run(self.agent.create_env({
            "env_id": env_id, "bundle_sha256": sha,
            "function": {"name": "net", "arn": "arn:aws:lambda:cc-local-1:1:function:net",
                         "handler": "app.handler", "runtime": "python3.11",
                         "memory_mb": memory_mb, "timeout_s": 30, "ephemeral_mb": 16,
                         **function},
            "create_timeout_ms": self.create_timeout_ms,
        }), timeout_s=self.create_timeout_ms / 1000 + 60)
        return env_id

    def invoke(self, env_id: str, event: dict[str, Any]) -> Any:
        res = self._run(self.agent.invoke({
            "env_id": env_id, "request_id": uuid.uuid4().hex,
            "payload": json.dumps(event).encode(), "timeout_ms": 30_000}))
        assert res["function_error"] is None, res
        return json.loads(res["payload"])

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._run(self.agent.status({}))
        return doc

    def address(self, env_id: str) -> str:
        return str(self.agent.envs[env_id].spec.network["address"])

    def destroy(self, env_id: str) -> None:
        self._run(self.agent.destroy({"env_id": env_id}))

    def close(self) -> None:
        async def _close() -> None:
            self.agent.close()

        self._run(_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        cgroups.sweep(self.group)


def leftovers(prefix: str) -> list[str]:
    """Every host object named with ``prefix``: links, named netns, nftables tables."""
    out = [line.split()[1].split("@")[0] for line in sh("ip", "-o", "link").stdout.splitlines()
           if line.split()[1].startswith(prefix)]
    out += [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
            if n.startswith(prefix)]
    out += [line for line in sh("nft", "list", "tables").stdout.splitlines() if prefix in line]
    return out


@contextlib.contextmanager
def policy_lifted(sb: NetSandbox) -> Iterator[None]:
    """Negative controls only: remove the agent's filter tables (inet + bridge; NAT stays) for
    the block, then load them back exactly as they were. First the helper's pool must be
    settled, or a slot it admits meanwhile would miss from the copy put back."""
    assert wait_until(lambda: pool_settled(sb)), "the helper's pool did not settle"
    saved = sh("nft", "list", "table", "inet", sb.table).stdout + \
        sh("nft", "list", "table", "bridge", sb.table).stdout
    sh("nft", "delete", "table", "inet", sb.table)
    sh("nft", "delete", "table", "bridge", sb.table)
    try:
        yield
    finally:
        r = subprocess.run(["nft", "-f", "-"], input=saved, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr


def pool_settled(sb: NetSandbox) -> bool:
    h = sb.status()["network"]["helper"]
    return bool(h["ready"] == sb.network.config.pool_ready  # type: ignore[union-attr]
                and h["to_destroy"] == 0)


def rules_text(sb: NetSandbox) -> str:
    """The agent's rules without counter values (they move with traffic)."""
    doc = json.loads(sh("nft", "-j", "list", "ruleset").stdout)
    items = []
    for item in doc["nftables"]:
        kind, body = next(iter(item.items()))
        if not isinstance(body, dict) or body.get("table") != sb.table:
            continue
        body = {k: v for k, v in body.items() if k not in ("packets", "bytes", "handle")}
        if kind == "rule":
            body["expr"] = [e for e in body.get("expr", []) if "counter" not in e]
        items.append(json.dumps([kind, body], sort_keys=True))
    return "\n".join(sorted(items))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    try:
        w.start()
        yield w
    finally:
        w.close()


@contextlib.contextmanager
def net_sandbox(make: Callable[[str], NetSandbox], prefix: str = "cellcloud-net-"
                ) -> Iterator[NetSandbox]:
    """``make(state_dir)`` over a fresh state directory (environments traverse it); after:
    closed, whatever its helper left swept (:func:`_sweep`), the directory removed."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    sb = None
    try:
        sb = make(d)
        yield sb
    finally:
        left = sb.prefix if sb else None
        if sb is not None:
            sb.close()
        if left:
            _sweep(left)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def net(world: World) -> Iterator[NetSandbox]:
    with net_sandbox(lambda d: NetSandbox(d, world, conn_rate_per_s=5, conn_burst=10,
                                          conns_max=64)) as sb:
        yield sb


def _sweep(prefix: str) -> None:
    """Belt and braces after a failed test: remove whatever the helper left."""
    for name in leftovers(prefix):
        if name.startswith("table "):
            sh("nft", "delete", *name.split()[1:], check=False)
        elif os.path.exists(f"/run/netns/{name}"):
            sh("ip", "netns", "del", name, check=False)
        else:
            sh("ip", "link", "del", name, check=False)


def wait_until(pred: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


def host_addresses() -> list[str]:
    out = []
    for line in sh("ip", "-o", "-4", "addr").stdout.splitlines():
        addr = line.split()[3].split("/")[0]
        out.append(addr)
    return out


def free_tcp_server() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(64)
    return s, s.getsockname()[1]


__all__ = ["NetSandbox", "World", "free_tcp_server", "host_addresses", "leftovers",
           "policy_lifted", "rules_text", "sh", "struct", "wait_until"]
