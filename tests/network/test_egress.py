"""Environments' outbound network (issue #12), end to end on this machine: a real agent, zygote,
jail and network helper; the "outside world" is a network namespace the test made (conftest).
Every denial has a negative control: the same probe, from the same environment, with the
agent's filter tables lifted, succeeds."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from cellcloud.transport import OpError

from .conftest import (
    NetSandbox,
    World,
    free_tcp_server,
    host_addresses,
    leftovers,
    policy_lifted,
    pool_settled,
    rules_text,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROBE = r'''
import json, os, socket, subprocess, threading, time, urllib.request

def probe(host, port):
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e}"

def serve(port):
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen(8)
    def loop():
        while True:
            c, _ = s.accept()
            c.close()
    threading.Thread(target=loop, daemon=True).start()

def run(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return f"rc={r.returncode} {r.stderr.strip()[:200]}"
    except OSError as e:
        return f"{type(e).__name__}: {e}"

def handler(event, context):
    op = event["op"]
    if op == "http":
        try:
            return urllib.request.urlopen(event["url"], timeout=10).read().decode()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    if op == "probe":
        return {t: probe(*t.rsplit(":", 1)) for t in event["targets"]}
    if op == "serve":
        serve(event["port"])
        return "listening"
    if op == "ifaces":
        return sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])
    if op == "resolve":
        try:
            return socket.gethostbyname(event["name"])
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    if op == "resolv":
        return open("/etc/resolv.conf").read()
    if op == "dns_tcp":
        resolver = open("/etc/resolv.conf").read().split()[1]
        q = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             + b"".join(bytes([len(p)]) + p.encode() for p in event["name"].split("."))
             + b"\x00\x00\x01\x00\x01")
        with socket.create_connection((resolver, 53), timeout=10) as s:
            s.sendall(len(q).to_bytes(2, "big") + q)
            n = int.from_bytes(s.recv(2, socket.MSG_WAITALL), "big")
            a = s.recv(n, socket.MSG_WAITALL)
        return {"id": a[:2].hex(), "rcode": a[3] & 15, "address": socket.inet_ntoa(a[-4:])}
    if op == "burst":
        socks, started = [], 0
        for _ in range(event["n"]):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((event["host"], event["port"]))
            except BlockingIOError:
                pass
            except OSError:
                continue
            socks.append(s)
            started += 1
        time.sleep(0)  # keep them open until the handler returns
        for s in socks:
            s.close()
        return started
    if op == "hold":
        import select
        socks = []
        for _ in range(event["n"]):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((event["host"], event["port"]))
            except BlockingIOError:
                pass
            socks.append(s)
        connected = set()
        deadline = time.monotonic() + event["wait_s"]
        while time.monotonic() < deadline and len(connected) < len(socks):
            _, w, _ = select.select([], [s for s in socks if s not in connected], [], 0.2)
            for s in w:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.add(s)
        for s in socks:
            s.close()
        return len(connected)
    if op == "tamper":
        out = {}
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            out["raw"] = "opened"
        except OSError as e:
            out["raw"] = f"{type(e).__name__}: {e}"
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
            out["netlink"] = "opened"
        except OSError as e:
            out["netlink"] = f"{type(e).__name__}: {e}"
        out["ip"] = run(["ip", "link", "set", "eth0", "down"])
        out["ip_addr"] = run(["ip", "addr", "add", "100.64.250.250/32", "dev", "eth0"])
        out["nft"] = run(["nft", "flush", "ruleset"])
        return out
    raise ValueError(op)
'''


def test_reaches_outside_by_address_and_by_name(net: NetSandbox, world: World) -> None:
    env = net.create(PROBE)
    assert net.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) == world.token
    # By name: the environment's only resolver is the helper's forwarder, which asks the
    # world's DNS server (the helper's --dns-upstream), through the host.
    resolv = net.invoke(env, {"op": "resolv"})
    assert resolv.startswith(f"nameserver {net.network.info['resolver']}\n")  # type: ignore[union-attr]
    assert net.invoke(env, {"op": "http", "url": "http://upstream.test:8080/"}) == world.token
    # DNS over TCP too (what a client does after a truncated UDP answer).
    assert net.invoke(env, {"op": "dns_tcp", "name": "upstream.test"}) == {
        "id": "1234", "rcode": 0, "address": world.addr}
    # Counters in the agent's status.
    st = net.status()
    mine = next(e for e in st["envs"] if e["env_id"] == env)["network"]
    assert mine["address"] == net.address(env)
    assert mine["tx_bytes"] > 0 and mine["rx_bytes"] > 0 and mine["connections"] >= 2
    assert st["network"]["subnet"] and st["network"]["dns"]["answered"] >= 1
    net.destroy(env)


def test_host_is_denied(net: NetSandbox, world: World) -> None:
    srv, port = free_tcp_server()
    try:
        env = net.create(PROBE)
        gateway = net.network.info["resolver"]  # type: ignore[union-attr]
        # Every address local to the host: the bridge's, the world-facing veth's, the host's
        # own; and the resolver address itself on any port but 53.
        targets = sorted({f"{a}:{port}" for a in host_addresses() if not a.startswith("127.")}
                         | {f"{gateway}:{port}", f"{world.host_addr}:{port}"})
        denied = net.invoke(env, {"op": "probe", "targets": targets})
        assert all(v != "ok" for v in denied.values()), denied
        with policy_lifted(net):
            allowed = net.invoke(env, {"op": "probe", "targets": targets})
        # The control: every address local before and after the probe answers without the
        # policy (another region on this host may add or remove a bridge meanwhile).
        still = {f"{a}:{port}" for a in host_addresses()} | {f"{gateway}:{port}",
                                                              f"{world.host_addr}:{port}"}
        assert all(v == "ok" for t, v in allowed.items() if t in still), allowed
        net.destroy(env)
    finally:
        srv.close()


def test_interface_created_after_start_is_denied_too(net: NetSandbox, world: World) -> None:
    """"The host" is whatever is local when the packet is sent, not a snapshot."""
    from .conftest import sh

    late = f"{net.prefix[:4]}late"
    addr = "10.254.77.1"
    srv, port = free_tcp_server()
    env = net.create(PROBE)
    try:
        # A new interface (a veth pair alone; no dummy driver here) with a new address.
        sh("ip", "link", "add", late, "type", "veth", "peer", "name", late + "p")
        sh("ip", "addr", "add", f"{addr}/32", "dev", late)
        sh("ip", "link", "set", late, "up")
        target = f"{addr}:{port}"
        assert net.invoke(env, {"op": "probe", "targets": [target]})[target] != "ok"
        with policy_lifted(net):
            assert net.invoke(env, {"op": "probe", "targets": [target]})[target] == "ok"
    finally:
        sh("ip", "link", "del", late, check=False)
        srv.close()
        net.destroy(env)


def test_no_east_west_traffic(net: NetSandbox) -> None:
    a, b = net.create(PROBE), net.create(PROBE)
    assert net.invoke(b, {"op": "serve", "port": 7000}) == "listening"
    target = f"{net.address(b)}:7000"
    # The host can reach b's listener (so it is up) ...
    import socket

    with socket.create_connection((net.address(b), 7000), timeout=10):
        pass
    # ... a cannot, neither across the bridge nor anywhere else in the pool.
    assert net.invoke(a, {"op": "probe", "targets": [target]})[target] != "ok"
    with policy_lifted(net):
        assert net.invoke(a, {"op": "probe", "targets": [target]})[target] == "ok"
    net.destroy(a)
    net.destroy(b)


def test_denied_ranges(net: NetSandbox, world: World) -> None:
    env = net.create(PROBE)
    targets = [f"{world.denied_addr}:8080",  # a region CIDR (--net-deny)
               f"{world.metadata_addr}:8080"]  # link-local / metadata
    denied = net.invoke(env, {"op": "probe", "targets": targets})
    assert all(v != "ok" for v in denied.values()), denied
    with policy_lifted(net):
        allowed = net.invoke(env, {"op": "probe", "targets": targets})
    assert all(v == "ok" for v in allowed.values()), allowed
    net.destroy(env)


def test_connection_rate_limit(net: NetSandbox, world: World) -> None:
    """The fixture's policy: 5 new connections/s, burst 10. 40 at once: most are dropped and
    counted as limited."""
    env = net.create(PROBE)
    started = net.invoke(env, {"op": "burst", "n": 40, "host": world.addr, "port": 8080})
    assert started == 40

    def limited() -> int:
        mine = next(e for e in net.status()["envs"] if e["env_id"] == env)["network"]
        return int(mine["connections_limited"])

    assert wait_until(lambda: limited() >= 20) and limited() >= 20
    net.destroy(env)


@pytest.mark.parametrize("conns_max,held", [(8, 8), (64, 20)])  # the cap, its control
def test_tracked_connections_cap(world: World, conns_max: int, held: int) -> None:
    """conns_max 8 (rate limit out of the way): of 20 connections held open at once only 8 are
    ever established; the other SYNs are dropped and counted as limited. With 64: all 20."""
    d = tempfile.mkdtemp(prefix="cellcloud-net-")
    os.chmod(d, 0o755)
    sb = NetSandbox(d, world, conn_rate_per_s=10_000, conn_burst=10_000, conns_max=conns_max)
    try:
        env = sb.create(PROBE)
        # wait_s bounds how long a connection past the cap would have to appear; none may.
        got = sb.invoke(env, {"op": "hold", "n": 20, "host": world.addr, "port": 8080,
                              "wait_s": 8})
        # Never past the cap. The kernel's count may briefly include an entry of a SYN it
        # dropped (collected lazily), so one fewer can get through.
        assert held - 1 <= got <= held
        mine = next(e for e in sb.status()["envs"] if e["env_id"] == env)["network"]
        if held < 20:
            assert mine["connections_limited"] >= 20 - got
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)


def test_policy_survives_tampering(net: NetSandbox, world: World) -> None:
    env = net.create(PROBE)
    assert wait_until(lambda: pool_settled(net))
    before = rules_text(net)
    out = net.invoke(env, {"op": "tamper"})
    assert out["raw"].startswith("PermissionError"), out
    assert "opened" not in out["netlink"], out
    assert not out["ip"].startswith("rc=0") and not out["nft"].startswith("rc=0"), out
    assert not out["ip_addr"].startswith("rc=0"), out
    # Still reaches the world, still denied the host.
    assert net.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) == world.token
    target = f"{world.host_addr}:8080"
    assert net.invoke(env, {"op": "probe", "targets": [target]})[target] != "ok"
    after = rules_text(net)
    assert before == after  # every table, chain, rule, set and map element as it was
    net.destroy(env)


def test_network_none_has_only_loopback(world: World) -> None:
    d = tempfile.mkdtemp(prefix="cellcloud-net-")
    os.chmod(d, 0o755)
    sb = NetSandbox(d, None, mode="none")
    try:
        env = sb.create(PROBE)
        assert sb.invoke(env, {"op": "ifaces"}) == ["lo"]
        target = f"{world.addr}:8080"
        assert sb.invoke(env, {"op": "probe", "targets": [target]})[target] != "ok"
        assert "network" not in next(e for e in sb.status()["envs"] if e["env_id"] == env)
        # a function that asks for egress (VpcConfig cellcloud-egress) is refused here, not
        # run without the network it asked for
        with pytest.raises(OpError) as e:
            sb.create(PROBE, network="egress")
        assert "--network none" in str(e.value)
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)


def test_env_with_network_has_eth0(net: NetSandbox) -> None:
    env = net.create(PROBE)
    assert net.invoke(env, {"op": "ifaces"}) == ["eth0", "lo"]
    net.destroy(env)


def test_agent_close_removes_everything(world: World) -> None:
    d = tempfile.mkdtemp(prefix="cellcloud-net-")
    os.chmod(d, 0o755)
    sb = NetSandbox(d, world)
    try:
        env = sb.create(PROBE)
        assert sb.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) == world.token
        assert leftovers(sb.prefix)  # a bridge, veths, namespaces, tables
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)
    assert leftovers(sb.prefix) == []


def test_gateway_mac_does_not_move(net: NetSandbox, world: World) -> None:
    """Regression: a Linux bridge takes its lowest port's MAC unless given one, so ports coming
    and going changed the gateway's MAC under environments that had it cached (their traffic
    then went nowhere: flaky timeouts). The helper pins it."""
    bridge = net.network.info["bridge"]  # type: ignore[union-attr]

    def mac() -> str:
        with open(f"/sys/class/net/{bridge}/address") as f:
            return f.read().strip()

    env = net.create(PROBE)
    assert net.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) == world.token
    before = mac()
    for _ in range(3):
        net.destroy(net.create(PROBE))
    assert wait_until(lambda: pool_settled(net))
    assert mac() == before == "02:cc:00:" + ":".join(net.prefix[i:i + 2] for i in (2, 4, 6))
    assert net.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) == world.token
    net.destroy(env)


def test_local_names_resolve_from_hosts_without_dns(net: NetSandbox, world: World) -> None:
    """With a network, `sandbox.localdomain` (the Telemetry API's host, in /etc/hosts) still
    resolves from /etc/hosts, without a query to the forwarder (glibc's default order without
    an nsswitch.conf is files, then DNS); other names go to the forwarder."""
    env = net.create(PROBE)

    def queries() -> int:
        return int(net.status()["network"]["dns"]["queries"])

    before = queries()
    assert net.invoke(env, {"op": "resolve", "name": "sandbox.localdomain"}) == "127.0.0.1"
    assert queries() == before  # no DNS query at all
    assert net.invoke(env, {"op": "resolve", "name": "upstream.test"}) == world.addr
    assert queries() > before  # while other names still go to the forwarder
    net.destroy(env)


def test_allow_list_is_enforced_per_interface(net: NetSandbox, world: World) -> None:
    """A function's allow-list (VpcConfig allow entries, issue #12): its environment reaches
    only the listed destination:port pairs (and the resolver), while a default environment
    of the same agent reaches the same host's other port; the denied ranges win over an
    entry that names them."""
    allowed = net.create(PROBE, network="egress",
                         net_allow=[f"{world.addr}/32:8080", f"{world.denied_net}:8080"])
    default = net.create(PROBE)
    try:
        other = f"{world.addr}:53"  # the world's DNS over TCP: another port, same host
        targets = [f"{world.addr}:8080", other, f"{world.denied_addr}:8080"]
        got = net.invoke(allowed, {"op": "probe", "targets": targets})
        assert got[f"{world.addr}:8080"] == "ok", got
        assert got[other] != "ok", got  # not listed
        assert got[f"{world.denied_addr}:8080"] != "ok", got  # listed, but denied wins
        # the resolver is still there: by name, to the listed port
        assert net.invoke(allowed, {"op": "http", "url": "http://upstream.test:8080/"}) \
            == world.token
        # negative control: the default environment reaches the other port
        got = net.invoke(default, {"op": "probe", "targets": targets})
        assert got[f"{world.addr}:8080"] == "ok" and got[other] == "ok", got
        assert got[f"{world.denied_addr}:8080"] != "ok", got
        mine = next(e for e in net.status()["envs"] if e["env_id"] == allowed)["network"]
        assert mine["allow"] == [f"{world.addr}/32:8080", f"{world.denied_net}:8080"]
    finally:
        net.destroy(allowed)
        net.destroy(default)


def test_function_network_none_joins_no_pooled_namespace(net: NetSandbox, world: World) -> None:
    env = net.create(PROBE, network="none")
    try:
        assert not net.agent.envs[env].spec.network
        assert net.invoke(env, {"op": "ifaces"}) == ["lo"]
    finally:
        net.destroy(env)
