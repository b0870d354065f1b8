"""A microVM's network device (issue #18, docs/microvm.md "Network"), end to end under TCG: a
real agent on the microvm backend with a real network helper; the "outside world" is the
conftest's network namespace. A Python function in a QEMU guest with egress reaches the world's
server through its virtio-net NIC (the tap in its namespace, bridged onto the slot's veth),
resolves a name through the helper's forwarder, and is refused what the policy forbids (the
region's denied range, the host itself) — with the negative control of the same probe
succeeding once the agent's filter tables are lifted. A function without egress gets no NIC.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core
from cellcloud.microvm.backend import MicrovmBackend

from .conftest import NetSandbox, World, leftovers, net_sandbox, policy_lifted, sh, wait_until

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(900),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
    pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                       is None, reason="no Debian cloud kernel (scripts/setup.sh)"),
]

PROBE = r'''
import os, socket, urllib.request

def probe(host, port, timeout=10):
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e}"

def handler(event, context):
    op = event["op"]
    if op == "nics":
        return {"nics": sorted(os.listdir("/sys/class/net")), "kernel": os.uname().release}
    if op == "http":
        try:
            return urllib.request.urlopen(event["url"], timeout=20).read().decode()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    if op == "probe":
        return {t: probe(*t.rsplit(":", 1), event.get("timeout", 10)) for t in event["targets"]}
    if op == "resolve":
        try:
            return socket.gethostbyname(event["name"])
        except OSError as e:
            return f"{type(e).__name__}: {e}"
'''


@pytest.fixture(scope="module")
def vm_net(world: World) -> Iterator[NetSandbox]:
    with net_sandbox(lambda d: NetSandbox(
            d, world, backend=MicrovmBackend(d),
            create_timeout_ms=DEFAULT_LIMITS.microvm_create_timeout_ms),
            prefix="cellcloud-vmnet-") as sb:
        yield sb


def _host_release() -> str:
    return os.uname().release


def test_a_guest_with_egress_reaches_the_world_and_is_refused_what_the_policy_forbids(
        vm_net: NetSandbox, world: World) -> None:
    env = vm_net.create(PROBE)
    try:
        seen = vm_net.invoke(env, {"op": "nics"})
        assert seen["kernel"] != _host_release()  # inside the VM: the guest's kernel
        assert len(seen["nics"]) == 2 and "lo" in seen["nics"], seen  # one NIC and loopback
        assert vm_net.invoke(env, {"op": "http", "url": f"http://{world.addr}:8080/"}) \
            == world.token
        assert vm_net.invoke(env, {"op": "resolve", "name": "upstream.test"}) == world.addr
        denied = f"{world.denied_addr}:8080"  # the region's range (the agent's --deny)
        host = f"{world.host_addr}:8080"  # an address of the host itself
        metadata = f"{world.metadata_addr}:8080"  # link-local, the metadata address
        got = vm_net.invoke(env, {"op": "probe", "targets": [denied, host, metadata]})
        # The policy's reject (icmpx admin-prohibited): EHOSTUNREACH at once, not a timeout.
        unreachable = f"[Errno {errno.EHOSTUNREACH}]"
        assert all(unreachable in v for v in got.values()), got
        # The negative control: the same probe, the agent's filter tables lifted, gets through
        # (so the refusal above is the policy's, applied to the guest's traffic).
        with policy_lifted(vm_net):
            lifted = vm_net.invoke(env, {"op": "probe", "targets": [denied]})
        assert lifted[denied] == "ok", lifted
    finally:
        vm_net.destroy(env)
    # The slot's veth is gone with the environment (its namespace, tap and bridge with QEMU).
    assert wait_until(lambda: vm_net.status()["network"]["helper"]["leased"] == 0)


@pytest.mark.slow  # another guest: ~10 s under TCG
def test_the_guests_mac_is_pinned_on_its_port(vm_net: NetSandbox, world: World) -> None:
    env = vm_net.create(PROBE)
    try:
        world_http = f"{world.addr}:8080"
        assert vm_net.invoke(env, {"op": "probe", "targets": [world_http]})[world_http] == "ok"
        # The guest's MAC is pinned on its port: with the pinned pair gone, its frames are
        # dropped (and so the traffic above carried exactly the helper's MAC).
        pinned = vm_net.agent.envs[env].spec.network
        elem = f'{{ "{pinned["interface"]}" . {pinned["mac"]} }}'
        sh("nft", "delete", "element", "bridge", vm_net.table, "vm_src", elem)
        try:
            dropped = vm_net.invoke(env, {"op": "probe", "targets": [world_http], "timeout": 3})
        finally:
            sh("nft", "add", "element", "bridge", vm_net.table, "vm_src", elem)
        assert dropped[world_http] != "ok", dropped
        assert vm_net.invoke(env, {"op": "probe", "targets": [world_http]})[world_http] == "ok"
    finally:
        vm_net.destroy(env)


def test_a_guest_without_egress_has_no_network_device(vm_net: NetSandbox) -> None:
    env = vm_net.create(PROBE, network="none")
    try:
        assert vm_net.invoke(env, {"op": "nics"})["nics"] == ["lo"]
        assert "network" not in next(e for e in vm_net.status()["envs"]
                                     if e["env_id"] == env)
    finally:
        vm_net.destroy(env)


@pytest.mark.slow  # a second agent on the microvm backend: ~26 s under TCG
def test_nothing_is_left_behind(world: World) -> None:
    d = tempfile.mkdtemp(prefix="cellcloud-vmnet-")
    os.chmod(d, 0o755)
    sb = NetSandbox(d, world, backend=MicrovmBackend(d),
                    create_timeout_ms=DEFAULT_LIMITS.microvm_create_timeout_ms)
    prefix = sb.prefix
    try:
        env = sb.create(PROBE)
        assert sb.invoke(env, {"op": "resolve", "name": "upstream.test"}) == world.addr
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)
    assert wait_until(lambda: not leftovers(prefix)), leftovers(prefix)
