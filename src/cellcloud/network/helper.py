"""The network helper: a privileged process per agent that builds and removes its environments'
links, addresses and nftables rules, and serves their DNS. The agent starts it before it locks
itself down and reaches it only over the SOCK_SEQPACKET socketpair made then (the agent opens
no connection, has no netlink and cannot execve; this process does all of that for it).

Operations (msgpack, one per datagram; the helper answers each in order):

- ``acquire(env_id) -> {slot, info} + [netns fd]``: a network namespace from the ready pool,
  already wired (veth into the agent's bridge, address, default route, loopback up) and admitted
  by the policy (its own chain, counters, anti-spoofing entry). The zygote's first child joins it
  with ``setns(fd, CLONE_NEWNET)`` instead of unsharing an empty one.
- ``acquire(env_id, tap=True)``: the same, for a microVM (``microvm/``): inside the namespace
  the address comes off ``eth0``, which is bridged with a persistent tap ``tap0`` that the VMM
  launcher opens for QEMU's virtio-net; the guest takes the slot's address, so its frames
  leave through the slot's veth and meet the same policy as a jailed environment's.
- ``release(env_id) -> {}``: the slot's netns, veth and rules are destroyed (never reused; a
  later environment on the same address gets a fresh namespace).
- ``counters() -> {env_id: {...}}``: bytes, packets, new and rate-limited connections.

When idle it tops the pool up to ``pool_ready`` namespaces. It dies with its agent (PDEATHSIG
SIGTERM) or when the socketpair closes, removing everything it made (bridge, veths, namespaces,
nftables tables); objects a killed helper left behind are swept by the next one with the same
prefix. Names and rules come from ``policy.py``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from .. import eventlog
from ..core.limits import DEFAULT_LIMITS
from . import policy as P

log = logging.getLogger("cellcloud.network")

LOCK_DIR = "/run/cellcloud/netpool"
message_bytes_max = 64 * 1024
dns_packet_bytes_max = DEFAULT_LIMITS.net_dns_packet_bytes_max
dns_inflight_max = DEFAULT_LIMITS.net_dns_inflight_max
dns_tcp_connections_max = DEFAULT_LIMITS.net_dns_tcp_connections_max
dns_upstream_timeout_s = DEFAULT_LIMITS.net_dns_upstream_timeout_ms / 1000
prefix_lock_timeout_s = 60.0
refill_quiet_s = DEFAULT_LIMITS.net_refill_quiet_ms / 1000
janitor_nice = 10  # the janitor thread's nice value (destroys yield the CPU to acquires)


_nft_lock = threading.Lock()  # one nft run at a time (the janitor runs beside the main loop)


def nft(script: str) -> None:
    """Apply an nftables script atomically (``nft -f -``: one transaction)."""
    with _nft_lock:
        r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True,
                           timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"nft failed: {r.stderr.decode(errors='replace')[-2000:]}")


def nft_json(*args: str) -> dict[str, Any]:
    with _nft_lock:
        r = subprocess.run(["nft", "-j", *args], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"nft failed: {r.stderr.decode(errors='replace')[-2000:]}")
    doc: dict[str, Any] = json.loads(r.stdout or b"{}")
    return doc


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed mid-message")
        out += chunk
    return out


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass


def lock_prefix(prefix: str, timeout_s: float = prefix_lock_timeout_s) -> int:
    """Hold the prefix for this process's life. A previous helper with the same prefix (its
    agent was restarted) still removing its objects holds it too: wait for it, so its teardown
    never removes what this one builds under the same names."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    fd = os.open(os.path.join(LOCK_DIR, prefix), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(f"another network helper holds {prefix} for over "
                                   f"{timeout_s:.0f} s") from None
            time.sleep(0.05)  # polling a lock held by a process that is exiting


def sweep_orphans(ipr: Any, own: str, pool: ipaddress.IPv4Network, pol: P.Policy,
                  prefixlen: int) -> list[str]:
    """Remove what killed helpers of *other* prefixes left (a SIGKILLed agent's helper cannot
    tear down): a prefix is orphaned when nobody holds its lock — a live helper holds its own
    for its whole life (``lock_prefix``). Without this, each kill leaks a bridge holding one
    of the pool's subnets until none is left."""
    names = [str(link.get_attr("IFLA_IFNAME") or "") for link in ipr.get_links()]
    try:
        tables = nft_json("list", "tables").get("nftables", [])
        names += [str(t["table"]["name"]) for t in tables if "table" in t]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        sys.stderr.write(f"network helper: listing nft tables: {e}\n")
    swept = []
    for prefix in sorted(P.prefixes_of(names) - {own}):
        fd = os.open(os.path.join(LOCK_DIR, prefix), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live helper's
            orphan = Helper(P.Plan(prefix, P.subnets(pool, prefixlen)[0], pool, pol), [])
            try:
                orphan.sweep()
                swept.append(prefix)
            finally:
                orphan.ipr.close()
        finally:
            os.close(fd)  # the lock goes with it
    return swept


def claim_subnet(pool: ipaddress.IPv4Network, prefixlen: int, taken: list[ipaddress.IPv4Network],
                 want: str | None = None) -> tuple[ipaddress.IPv4Network, int]:
    """Lock the first subnet of the pool that no other helper holds (a flock under
    /run/cellcloud/netpool, released when this process dies) and no host address is in.
    Returns the subnet and the lock's fd (keep it open)."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    candidates = [ipaddress.ip_network(want)] if want else P.subnets(pool, prefixlen)
    for net in candidates:
        assert isinstance(net, ipaddress.IPv4Network)
        if any(net.overlaps(t) for t in taken):
            continue
        fd = os.open(os.path.join(LOCK_DIR, str(net).replace("/", "_")),
                     os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return net, fd
    raise RuntimeError(f"no free /{prefixlen} left in the network pool {pool}")


class DnsForwarder:
    """UDP and TCP on the resolver address, port 53: each query is forwarded as it is (no
    parsing but the 16-bit id) to the host's resolvers in order, over the same transport (a
    truncated UDP answer makes the client retry over TCP); no answer -> SERVFAIL. TCP: one
    query per connection, at most ``dns_tcp_connections_max`` at once."""

    def __init__(self, address: str, upstreams: list[str]) -> None:
        if not upstreams:
            raise RuntimeError("no IPv4 nameserver to forward DNS to (/etc/resolv.conf)")
        self.upstreams = upstreams
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self._slots = threading.BoundedSemaphore(dns_inflight_max)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")
        self.counters = {"queries": 0, "answered": 0, "servfail": 0, "tcp_queries": 0,
                         "tcp_refused": 0}
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, 53))
        self.tcp.listen(64)
        self._tcp_slots = threading.BoundedSemaphore(dns_tcp_connections_max)
        threading.Thread(target=self._serve, name="dns", daemon=True).start()
        threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True).start()

    @staticmethod
    def servfail(query: bytes) -> bytes:
        if len(query) < 12:
            return b""
        flags = (query[2] | 0x80) & 0xFB, (query[3] & 0xF0) | 2  # QR=1, AA=0, RCODE=SERVFAIL
        return query[:2] + bytes(flags) + query[4:12] + query[12:]

    def _serve(self) -> None:
        while True:
            try:
                query, client = self.sock.recvfrom(dns_packet_bytes_max)
            except OSError:
                return
            self.counters["queries"] += 1
            if len(query) < 12:
                continue
            if not self._slots.acquire(blocking=False):  # over the limit: a clear answer
                self._reply(self.servfail(query), client)
                continue
            self._pool.submit(self._forward, query, client)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _peer = self.tcp.accept()
            except OSError:
                return
            if not self._tcp_slots.acquire(blocking=False):
                self.counters["tcp_refused"] += 1
                conn.close()
                continue
            threading.Thread(target=self._relay_tcp, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_message(s: socket.socket) -> bytes:
        head = _recv_exactly(s, 2)
        return _recv_exactly(s, int.from_bytes(head, "big"))

    def _relay_tcp(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(dns_upstream_timeout_s)
                query = self._read_message(conn)
                self.counters["tcp_queries"] += 1
                if len(query) < 12:
                    return
                answer = b""
                for upstream in self.upstreams:
                    try:
                        with socket.create_connection((upstream, 53),
                                                      timeout=dns_upstream_timeout_s) as up:
                            up.sendall(len(query).to_bytes(2, "big") + query)
                            answer = self._read_message(up)
                    except OSError:
                        continue
                    if answer[:2] == query[:2]:
                        self.counters["answered"] += 1
                        break
                else:
                    self.counters["servfail"] += 1
                    answer = self.servfail(query)
                conn.sendall(len(answer).to_bytes(2, "big") + answer)
        except OSError:
            pass
        finally:
            self._tcp_slots.release()

    def _reply(self, data: bytes, client: Any) -> None:
        try:
            self.sock.sendto(data, client)
        except OSError:
            pass

    def _forward(self, query: bytes, client: Any) -> None:
        try:
            for upstream in self.upstreams:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(dns_upstream_timeout_s)
                    try:
                        s.connect((upstream, 53))
                        s.send(query)
                        deadline = time.monotonic() + dns_upstream_timeout_s
                        while time.monotonic() < deadline:
                            answer = s.recv(dns_packet_bytes_max)
                            if answer[:2] == query[:2]:
                                self.counters["answered"] += 1
                                self._reply(answer, client)
                                return
                    except OSError:
                        continue
            self.counters["servfail"] += 1
            self._reply(self.servfail(query), client)
        finally:
            self._slots.release()

    def close(self) -> None:
        self.sock.close()
        self.tcp.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class Helper:
    def __init__(self, plan: P.Plan, dns_upstreams: list[str],
                 pool_ready: int = DEFAULT_LIMITS.net_pool_ready) -> None:
        from pyroute2 import IPRoute

        self.plan = plan
        self.dns_upstreams = dns_upstreams
        self.pool_ready = pool_ready
        self.ipr = IPRoute()
        self.free: collections.deque[int] = collections.deque(plan.slots)
        self.ready: collections.deque[int] = collections.deque()
        self.leased: dict[str, int] = {}  # env_id -> slot
        # Released slots go to the janitor thread: deleting a veth waits for the kernel
        # (~40 ms measured), which must not stall the next acquire.
        self.dead: queue.Queue[int | None] = queue.Queue()
        self._destroying = 0  # released and not yet destroyed (queued or in progress)
        self._destroying_lock = threading.Lock()
        self._janitor: threading.Thread | None = None
        self.dns: DnsForwarder | None = None
        self.netns_fds: dict[int, int] = {}  # slot -> its namespace, until acquired
        self.admitted: set[int] = set()  # slots whose chain and map entries exist
        self.ingress: dict[int, tuple[tuple[str, int], ...]] = {}  # a task's slot: its ports
        # A released task slot's ports: their rule goes with the janitor's refresh of the slot
        # (one nft run, off the channel's loop: the next acquire does not wait behind it).
        self.dead_ingress: dict[int, tuple[tuple[str, int], ...]] = {}
        self.vm_slots: set[int] = set()  # microVMs' slots: their guests' MACs pinned
        self.counters = {"acquired": 0, "released": 0, "made": 0, "made_on_demand": 0}
        self.ready_doc: dict[str, Any] = {}
        self.torn_down = False

    # -- set-up and teardown ----------------------------------------------------------------
    def sweep(self) -> int:
        """Remove every object with this plan's prefix (left by a killed helper)."""
        n = 0
        for link in self.ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name and name.startswith(self.plan.prefix):
                try:
                    self.ipr.link("del", index=link["index"])
                    n += 1
                except Exception:  # noqa: BLE001 - gone with its pair already
                    pass
        nft(P.teardown(self.plan))
        return n

    def setup(self) -> None:
        plan = self.plan
        _write("/proc/sys/net/ipv4/ip_forward", "1")
        self.ipr.link("add", ifname=plan.bridge, kind="bridge")
        br = self.ipr.link_lookup(ifname=plan.bridge)[0]
        # A fixed MAC: a bridge otherwise takes its lowest port's, which changes as
        # environments come and go, and environments' cached gateway entry goes stale.
        self.ipr.link("set", index=br, address=plan.bridge_mac)
        _write(f"/proc/sys/net/ipv6/conf/{plan.bridge}/disable_ipv6", "1")
        self.ipr.addr("add", index=br, address=str(plan.gateway), prefixlen=plan.subnet.prefixlen)
        self.ipr.link("set", index=br, state="up")
        self.bridge_index = br
        nft(P.ruleset(plan))
        if plan.policy.mode != "none":
            self.dns = DnsForwarder(str(plan.resolver), self.dns_upstreams)

    def start_janitor(self) -> None:
        self._janitor = threading.Thread(target=self._janitor_loop, name="janitor", daemon=True)
        self._janitor.start()

    def _janitor_loop(self) -> None:
        from pyroute2 import IPRoute

        # Below the channel's loop (acquires on a start path) in the CPU's order: a destroy
        # and its nft run wait, an acquire does not (the nice value is per thread on Linux,
        # and the nft processes it starts inherit it).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), janitor_nice)
        with IPRoute() as ipr:
            while (slot := self.dead.get()) is not None:
                try:
                    self._destroy(slot, ipr=ipr)
                except Exception:  # noqa: BLE001 - logged; the slot stays out of the free list
                    log.exception("destroy of slot %s failed", slot,
                                  extra=eventlog.fields(event="net_destroy_failed"))
                finally:
                    with self._destroying_lock:
                        self._destroying -= 1

    def teardown(self) -> None:
        if self.dns is not None:
            self.dns.close()
        if self._janitor is not None:
            self.dead.put(None)  # after every queued slot: they are destroyed first
            self._janitor.join(timeout=60)
            self._janitor = None
        for slot in list(self.ready) + list(self.leased.values()):
            self._destroy(slot, rules=False)
        self.ready.clear()
        self.leased.clear()
        try:
            self.ipr.link("del", index=self.bridge_index)
        except Exception:  # noqa: BLE001
            pass
        nft(P.teardown(self.plan))

    # -- slots -------------------------------------------------------------------------------
    def make_slot(self) -> int:
        """A fresh, unnamed network namespace, wired and admitted; held by an fd only, so it
        vanishes with its last holder (this process, or the environment that joined it)."""
        if not self.free:
            raise RuntimeError(f"all {len(self.plan.slots)} addresses of {self.plan.subnet} "
                               "are in use")
        slot = self.free.popleft()
        plan = self.plan
        veth = plan.veth(slot)
        fd = -1
        try:
            fd = _in_thread(_new_netns_fd)
            self.ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            idx = self.ipr.link_lookup(ifname=veth)[0]
            _write(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6", "1")
            self.ipr.link("set", index=idx, master=self.bridge_index, state="up")
            _in_thread(_configure_inside, fd, str(plan.address(slot)), plan.subnet.prefixlen,
                       str(plan.gateway))
            if slot not in self.admitted:
                self._admit(slot)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._destroy(slot, rules=False)
            raise
        self.netns_fds[slot] = fd
        self.counters["made"] += 1
        return slot

    def _admit(self, slot: int) -> None:
        """Admit ``slot`` and the next free slots not yet admitted, in one nft transaction:
        an nft run costs ~3.5 ms, so later slots come ready without one."""
        batch = [slot] + [s for s in list(self.free) if s not in self.admitted
                          ][:DEFAULT_LIMITS.net_admit_batch - 1]
        nft("".join(P.slot_rules(self.plan, s) for s in batch))
        self.admitted.update(batch)

    def _destroy(self, slot: int, rules: bool = True, ipr: Any = None) -> None:
        try:
            (ipr or self.ipr).link("del", ifname=self.plan.veth(slot))  # its peer goes too
        except Exception:  # noqa: BLE001 - never made, or gone with its namespace
            pass
        fd = self.netns_fds.pop(slot, -1)
        if fd >= 0:
            os.close(fd)
        ingress = self.dead_ingress.pop(slot, None)
        if rules and slot in self.admitted:
            nft((P.slot_ingress(self.plan, slot, ingress, add=False) if ingress else "")
                + P.slot_refresh(self.plan, slot))
        self.free.append(slot)  # at the end: an address is reused as late as possible

    def acquire(self, env_id: str, allow: tuple[tuple[str, int], ...] = (),
                ingress: tuple[tuple[str, int], ...] | None = None,
                tap: bool = False, egress: bool = True) -> tuple[int, int]:
        """Returns the slot and its namespace's fd, which the caller sends and closes: from
        then on only the environment holds the namespace. ``allow``: the environment's
        allow-list, added to its slot's chain (a released slot's chain is rebuilt without it).
        ``tap``: a microVM's namespace (``_wire_for_vm``). ``egress`` False: the slot's chain
        rejects whatever it opens (a task's ``assignPublicIp`` DISABLED)."""
        allow = P.check_allow(allow)
        if allow and not egress:
            raise P.PolicyError("an allow-list needs egress")
        if env_id in self.leased:
            raise RuntimeError(f"{env_id} already has a network")
        if self.ready:
            slot = self.ready.popleft()
        else:
            slot = self.make_slot()
            self.counters["made_on_demand"] += 1
        self.leased[env_id] = slot
        fd = self.netns_fds.pop(slot)
        try:
            if tap:
                _in_thread(_wire_for_vm, fd, str(self.plan.address(slot)),
                           self.plan.subnet.prefixlen)
                nft(P.slot_vm(self.plan, slot))
                self.vm_slots.add(slot)
            # One nft transaction for the slot's rules (each nft run is a process: ~3.5 ms
            # idle, tens of ms on a loaded host, on a task's start path).
            script = ""
            if allow:
                script += P.slot_allow(self.plan, slot, allow)
            if not egress:
                script += P.slot_no_egress(self.plan, slot)
            if ingress is not None:  # a task: the host reaches its mapped ports only
                script += P.slot_ingress(self.plan, slot, ingress)
            if script:
                nft(script)
            if ingress is not None:
                self.ingress[slot] = ingress
        except BaseException:
            os.close(fd)
            self.release(env_id)
            raise
        self.counters["acquired"] += 1
        return slot, fd

    def release(self, env_id: str) -> None:
        slot = self.leased.pop(env_id, None)
        ingress = self.ingress.pop(slot, None) if slot is not None else None
        if slot is not None and ingress is not None:
            # Removed by the janitor with the slot's refresh. Until then the slot is neither
            # free nor ready (no one gets its address), its environment is gone, and the
            # janitor deletes its veth before the rule: nothing answers on those ports.
            self.dead_ingress[slot] = ingress
        if slot is not None and slot in self.vm_slots:
            self.vm_slots.discard(slot)
            nft(P.slot_vm(self.plan, slot, add=False))
        if slot is not None:
            with self._destroying_lock:
                self._destroying += 1
            self.dead.put(slot)
            self.counters["released"] += 1

    def env_counters(self) -> dict[str, dict[str, int]]:
        by_slot = P.parse_counters(nft_json("list", "counters", "table", "inet", self.plan.table))
        return {env_id: by_slot.get(slot, {}) for env_id, slot in self.leased.items()}

    def idle_work(self) -> bool:
        """One unit of background work; False when there is none."""
        if len(self.ready) < self.pool_ready and self.free:
            try:
                self.ready.append(self.make_slot())
            except Exception:  # noqa: BLE001 - acquire will make one (and report) on demand
                log.exception("pool refill failed",
                              extra=eventlog.fields(event="net_pool_refill_failed"))
                return False
            return True
        return False

    # -- the channel --------------------------------------------------------------------------
    def handle(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = msg.get("op")
        if op == "acquire":
            allow = tuple(P.parse_allow(str(a)) for a in msg.get("allow") or ())
            ingress = (None if msg.get("ingress") is None else
                       tuple(P.parse_ingress(str(e)) for e in msg["ingress"]))
            tap = bool(msg.get("tap"))
            egress = msg.get("egress", True) is not False
            slot, fd = self.acquire(str(msg["env_id"]), allow, ingress, tap=tap, egress=egress)
            info = self.plan.env_info(slot)
            if tap:
                info["device"], info["mac"] = VM_TAP, self.plan.vm_mac(slot)
            if allow:
                info["allow"] = [f"{c}:{port}" for c, port in allow]
            if not egress:
                info["mode"] = "none"  # an address, reached by the host; no egress
            return {"slot": slot, "info": info}, [fd]
        if op == "release":
            self.release(str(msg["env_id"]))
            return {}, []
        if op == "info":
            return dict(self.ready_doc), []
        if op == "detach":
            # Live update: the agent is handing this channel to its successor and will exit;
            # from now on only the channel's end (EOF) ends this process.
            from ..sandbox import linux

            linux.prctl(linux.PR_SET_PDEATHSIG, 0)
            return {}, []
        if op == "counters":
            return {"envs": self.env_counters(),
                    "helper": {**self.counters, "ready": len(self.ready),
                               "leased": len(self.leased), "to_destroy": self._destroying},
                    "dns": dict(self.dns.counters) if self.dns else {}}, []
        raise ValueError(f"unknown op {op!r}")

    def serve(self, ctl: socket.socket) -> None:
        last_request = 0.0
        while True:
            # Refill only after a quiet spell: a refill right after an acquire would compete
            # for the CPU with the very cold start that acquire is part of.
            while len(self.ready) < self.pool_ready and self.free:
                quiet_left = last_request + refill_quiet_s - time.monotonic()
                if select.select([ctl], [], [], max(0.0, quiet_left))[0]:
                    break
                if quiet_left <= 0 and not self.idle_work():
                    break
            try:
                data, fds, _flags, _addr = socket.recv_fds(ctl, message_bytes_max, 1)
            except InterruptedError:
                continue
            for fd in fds:
                os.close(fd)
            if not data:
                return  # the agent is gone
            last_request = time.monotonic()
            send_fds: list[int] = []
            msg = msgpack.unpackb(data, raw=False)
            if isinstance(msg, dict) and msg.get("op") == "shutdown":
                self.teardown()  # answered once everything is gone; then this process ends
                self.torn_down = True
                # The agent may have stopped waiting for the answer (it is exiting): fine.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    ctl.sendall(msgpack.packb({}, use_bin_type=True))
                return
            try:
                reply, send_fds = self.handle(msg)
            except Exception as e:  # noqa: BLE001 - answered, the helper goes on
                reply = {"error": f"{type(e).__name__}: {e}"}
            try:
                socket.send_fds(ctl, [msgpack.packb(reply, use_bin_type=True)], send_fds)
            finally:
                for fd in send_fds:
                    os.close(fd)


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` on a thread of its own: setns/unshare of a network namespace change only the
    calling thread, so the helper's own threads stay in the host's namespace."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _new_netns_fd() -> int:
    from ..sandbox import linux

    linux.unshare(linux.CLONE_NEWNET)
    return os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net",
                   os.O_RDONLY | os.O_CLOEXEC)


def _configure_inside(fd: int, address: str, prefixlen: int, gateway: str) -> None:
    from pyroute2 import IPRoute

    from ..sandbox import linux

    linux.setns(fd, linux.CLONE_NEWNET)
    with IPRoute() as ns:
        found = ns.link_lookup(ifname="eth0")
        if not found:
            raise RuntimeError(f"no eth0 in the new namespace: "
                               f"{[lk.get_attr('IFLA_IFNAME') for lk in ns.get_links()]}")
        eth = found[0]
        ns.addr("add", index=eth, address=address, prefixlen=prefixlen)
        ns.link("set", index=eth, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=gateway)


# A microVM's namespace: eth0 (the slot's veth) and the tap QEMU's virtio-net uses, bridged.
VM_TAP = "tap0"
VM_BRIDGE = "br0"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _wire_for_vm(fd: int, address: str, prefixlen: int) -> None:
    """Turn a wired namespace into a microVM's: the address (and its route) off ``eth0``, a
    persistent tap ``tap0`` (it lives as long as the namespace, which the VM's QEMU then
    holds), both bridged on ``br0``. The namespace keeps no address: the guest has it, and
    nothing in the namespace answers or originates IP."""
    from pyroute2 import IPRoute

    from ..sandbox import linux

    linux.setns(fd, linux.CLONE_NEWNET)
    with IPRoute() as ns:
        eth = ns.link_lookup(ifname="eth0")[0]
        ns.addr("del", index=eth, address=address, prefixlen=prefixlen)
        tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", VM_TAP.encode(),
                                                    IFF_TAP | IFF_NO_PI))
            fcntl.ioctl(tun, TUNSETPERSIST, 1)
        finally:
            os.close(tun)
        ns.link("add", ifname=VM_BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=VM_BRIDGE)[0]
        tap = ns.link_lookup(ifname=VM_TAP)[0]
        for name in ("eth0", VM_TAP, VM_BRIDGE):  # this thread's namespace's sysctls
            _write(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
        ns.link("set", index=eth, master=br)
        ns.link("set", index=tap, master=br, state="up")
        ns.link("set", index=br, state="up")


def _host_networks(ipr: Any) -> list[ipaddress.IPv4Network]:
    out = []
    for a in ipr.get_addr(family=socket.AF_INET):
        out.append(ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}",
                                         strict=False))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud.network.helper")
    p.add_argument("ctl_fd", type=int)
    p.add_argument("--prefix", required=True)
    p.add_argument("--pool", default=P.DEFAULT_POOL)
    p.add_argument("--subnet-prefixlen", type=int, default=P.DEFAULT_SUBNET_PREFIXLEN)
    p.add_argument("--subnet", default=None, help="this agent's subnet (default: first free)")
    p.add_argument("--mode", default="egress", choices=P.MODES)
    p.add_argument("--deny", action="append", default=[], help="region CIDR to deny (repeat)")
    p.add_argument("--allow", action="append", default=[], help="egress only to these CIDRs")
    p.add_argument("--dns-upstream", action="append", default=[],
                   help="resolver to forward to (default: /etc/resolv.conf's)")
    p.add_argument("--pool-ready", type=int, default=DEFAULT_LIMITS.net_pool_ready)
    p.add_argument("--conn-rate", type=int, default=P.Policy.conn_rate_per_s)
    p.add_argument("--conn-burst", type=int, default=P.Policy.conn_burst)
    p.add_argument("--conns-max", type=int, default=P.Policy.conns_max)
    args = p.parse_args(argv)
    eventlog.setup("network", agent=args.prefix)
    from ..sandbox import linux

    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        sys.exit(1)
    ctl = socket.socket(fileno=args.ctl_fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    helper: Helper | None = None
    try:
        from pyroute2 import IPRoute

        pool = P.check_pool(args.pool, args.subnet_prefixlen)
        pol = P.Policy(mode=args.mode, region_cidrs=tuple(args.deny),
                       allow_cidrs=tuple(args.allow), conn_rate_per_s=args.conn_rate,
                       conn_burst=args.conn_burst, conns_max=args.conns_max)
        import shutil

        if shutil.which("nft") is None:
            raise RuntimeError("the nft tool is missing (Debian: apt-get install nftables); "
                               "or start the region with --network none")
        lock_prefix(args.prefix)
        with IPRoute() as ipr:
            # Our own leftovers first (their addresses would look taken).
            probe = Helper(P.Plan(args.prefix, P.subnets(pool, args.subnet_prefixlen)[0], pool,
                                  pol), [])
            probe.sweep()
            probe.ipr.close()
            sweep_orphans(ipr, args.prefix, pool, pol, args.subnet_prefixlen)
            taken = _host_networks(ipr)
        subnet, _lock_fd = claim_subnet(pool, args.subnet_prefixlen, taken, args.subnet)
        upstreams = args.dns_upstream or P.resolvers_from(open("/etc/resolv.conf").read())
        helper = Helper(P.Plan(args.prefix, subnet, pool, pol), upstreams, args.pool_ready)
        helper.setup()
        helper.start_janitor()
        ready = {"ready": True, "subnet": str(subnet), "bridge": helper.plan.bridge,
                 "table": helper.plan.table, "resolver": str(helper.plan.resolver),
                 "mode": pol.mode}
        helper.ready_doc = ready
    except Exception:  # noqa: BLE001 - reported to the agent, which refuses to start
        ready = {"error": traceback.format_exc()[-2000:]}
        if helper is not None:
            helper.teardown()
            helper = None
    ctl.sendall(msgpack.packb(ready, use_bin_type=True))
    if helper is None:
        sys.exit(1)
    try:
        helper.serve(ctl)
    finally:
        if not helper.torn_down:
            helper.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
