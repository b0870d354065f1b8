"""The agent's side of the network helper: started before the lock-down, then reached only over
the socketpair made then (``helper.py`` describes the operations)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..core.limits import DEFAULT_LIMITS
from . import policy as P

ready_timeout_s = 60.0
call_timeout_s = 30.0


@dataclass
class NetConfig:
    """How an agent's environments reach the network (``cellcloud up --network ...``)."""

    mode: str = "egress"  # egress | none (loopback only, no helper)
    pool: str = P.DEFAULT_POOL
    subnet_prefixlen: int = P.DEFAULT_SUBNET_PREFIXLEN
    subnet: str | None = None
    deny: list[str] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)
    dns_upstreams: list[str] = field(default_factory=list)
    pool_ready: int = DEFAULT_LIMITS.net_pool_ready
    conn_rate_per_s: int = P.Policy.conn_rate_per_s
    conn_burst: int = P.Policy.conn_burst
    conns_max: int = P.Policy.conns_max

    def __post_init__(self) -> None:
        P.Policy(mode=self.mode, region_cidrs=tuple(self.deny), allow_cidrs=tuple(self.allow),
                 conn_rate_per_s=self.conn_rate_per_s, conn_burst=self.conn_burst,
                 conns_max=self.conns_max)
        P.check_pool(self.pool, self.subnet_prefixlen)


@dataclass
class Lease:
    slot: int
    info: dict[str, Any]
    netns_fd: int


class NetHelperClient:
    def __init__(self, prefix: str, config: NetConfig) -> None:
        self.prefix = prefix
        self.config = config
        self.info: dict[str, Any] = {}
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> dict[str, Any]:
        """Fork+exec the helper and wait until its network is up (before the lock-down)."""
        c = self.config
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "cellcloud.network.helper", str(theirs.fileno()),
                "--prefix", self.prefix, "--pool", c.pool, "--mode", c.mode,
                "--subnet-prefixlen", str(c.subnet_prefixlen), "--pool-ready", str(c.pool_ready),
                "--conn-rate", str(c.conn_rate_per_s), "--conn-burst", str(c.conn_burst),
                "--conns-max", str(c.conns_max)]
        if c.subnet:
            argv += ["--subnet", c.subnet]
        for flag, values in (("--deny", c.deny), ("--allow", c.allow),
                             ("--dns-upstream", c.dns_upstreams)):
            for v in values:
                argv += [flag, v]
        self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL,
                                      start_new_session=True)
        theirs.close()
        self._ctl = ours
        ours.settimeout(ready_timeout_s)
        try:
            doc = msgpack.unpackb(ours.recv(P_MSG_MAX), raw=False)
        except (TimeoutError, ValueError) as e:
            self.close()
            raise RuntimeError(f"the network helper did not start: {e!r}") from e
        finally:
            ours.settimeout(call_timeout_s)
        if "error" in doc:
            self.close()
            raise RuntimeError(f"the network helper failed: {doc['error']}")
        self.info = doc
        return doc

    def _call(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if self._ctl is None:
            raise RuntimeError("the network helper is not running")
        with self._lock:
            self._ctl.sendall(msgpack.packb(msg, use_bin_type=True))
            data, fds, _flags, _addr = socket.recv_fds(self._ctl, P_MSG_MAX, 1)
        if not data:
            raise RuntimeError("the network helper is gone")
        doc: dict[str, Any] = msgpack.unpackb(data, raw=False)
        if "error" in doc:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(str(doc["error"]))
        return doc, fds

    def acquire(self, env_id: str, allow: list[str] | None = None,
                ingress: list[str] | None = None, tap: bool = False,
                egress: bool = True) -> Lease:
        """A wired namespace for ``env_id``; ``allow`` ("CIDR:port" entries): its interface may
        reach only those (plus the resolver), still minus everything the policy denies.
        ``ingress`` ("tcp:8080" entries; a task's): the host may open connections to its
        address on those ports only. ``tap``: a microVM's namespace, its address for the guest
        behind a tap (``helper._wire_for_vm``). ``egress`` False: it may open none at all (an
        address the host reaches, nothing else)."""
        msg: dict[str, Any] = {"op": "acquire", "env_id": env_id}
        if tap:
            msg["tap"] = True
        if allow:
            msg["allow"] = list(allow)
        if not egress:
            msg["egress"] = False
        if ingress is not None:
            msg["ingress"] = list(ingress)
        doc, fds = self._call(msg)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("the network helper sent no namespace")
        return Lease(int(doc["slot"]), dict(doc["info"]), fds[0])

    def release(self, env_id: str) -> None:
        self._call({"op": "release", "env_id": env_id})

    def counters(self) -> dict[str, Any]:
        doc, _ = self._call({"op": "counters"})
        return doc

    def detach(self) -> int:
        """Live update: the helper stops dying with this agent (it lives as long as its
        channel) and the channel's fd is returned, for the successor (SCM_RIGHTS)."""
        self._call({"op": "detach"})
        assert self._ctl is not None
        return self._ctl.fileno()

    def forget(self) -> None:
        """After a handover: drop this process's end without waiting for or stopping the
        helper; the successor's copy of the channel keeps it."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self._proc = None

    @classmethod
    def adopt(cls, ctl: socket.socket, prefix: str, config: NetConfig) -> NetHelperClient:
        """The successor's side of a handover: the running helper, over the channel given."""
        c = cls(prefix, config)
        c._ctl = ctl
        ctl.setblocking(True)
        ctl.settimeout(call_timeout_s)
        c.info, _ = c._call({"op": "info"})
        return c

    def alive(self) -> bool:
        if self._proc is None:  # adopted: alive as long as it answers on its channel
            return self._ctl is not None
        return self._proc.poll() is None

    def close(self) -> None:
        """The helper removes everything it made, answers, and exits (also when it is not
        this process's child: adopted in a live update)."""
        if self._ctl is not None:
            try:
                self._call({"op": "shutdown"})
            except (OSError, RuntimeError, ValueError):
                pass  # already gone; its own exit path removes what it made
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=call_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


P_MSG_MAX = 64 * 1024
