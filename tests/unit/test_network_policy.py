"""The network policy core (network/policy.py): names, addresses, the nftables text. Pure; the
ruleset is also checked by the real ``nft -c`` where it is installed (root)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from cellcloud.network import policy as P

POOL = ipaddress.IPv4Network("100.64.0.0/16")


def plan(**kw: object) -> P.Plan:
    return P.Plan("cc0a1b2c", ipaddress.IPv4Network("100.64.4.0/22"), POOL, P.Policy(**kw))  # type: ignore[arg-type]


def test_pool_rules() -> None:
    assert P.check_pool("100.64.0.0/16") == POOL
    with pytest.raises(P.PolicyError, match="larger than a /16"):
        P.check_pool("100.64.0.0/10")
    for private in ("10.200.0.0/16", "172.16.0.0/16", "192.168.0.0/16"):
        with pytest.raises(P.PolicyError, match="private range"):
            P.check_pool(private)
    with pytest.raises(P.PolicyError, match="IPv4 only"):
        P.check_pool("fd00::/64")
    with pytest.raises(P.PolicyError):
        P.check_pool("100.64.0.0/24", 22)  # an agent subnet must fit


def test_policy_validation() -> None:
    with pytest.raises(P.PolicyError, match="network mode"):
        P.Policy(mode="open")
    with pytest.raises(P.PolicyError, match="not a CIDR"):
        P.Policy(region_cidrs=("nope",))
    with pytest.raises(P.PolicyError, match="conn_rate_per_s"):
        P.Policy(conn_rate_per_s=0)


def test_plan_names_and_addresses() -> None:
    p = plan()
    assert p.gateway == p.resolver == ipaddress.IPv4Address("100.64.4.1")
    assert p.slots == range(2, 1023)  # .0, the gateway and the broadcast are never handed out
    assert p.address(2) == ipaddress.IPv4Address("100.64.4.2")
    assert p.address(1022) == ipaddress.IPv4Address("100.64.7.254")
    with pytest.raises(P.PolicyError):
        p.address(1)
    assert all(len(n) <= P.IFNAME_BYTES_MAX for n in (p.bridge, p.veth(1022)))
    assert p.bridge_mac == "02:cc:00:0a:1b:2c"
    assert p.veth(2).startswith(p.prefix) and p.bridge.startswith(p.prefix)
    info = p.env_info(7)
    assert info["address"] == "100.64.4.7" and info["resolver"] == "100.64.4.1"
    with pytest.raises(P.PolicyError, match="not inside pool"):
        P.Plan("cc0a1b2c", ipaddress.IPv4Network("100.65.0.0/22"), POOL)
    assert P.prefix_for("a") != P.prefix_for("b") and len(P.prefix_for("a")) == 8


def test_ruleset_denies_host_region_and_special_ranges() -> None:
    text = P.ruleset(plan(region_cidrs=("10.9.0.0/16",)))
    # The host: whatever is local when the packet is sent, never a list of addresses.
    assert "fib daddr type local" in text
    assert ('iifname "cc0a1b2cbr" ip daddr 100.64.4.1 meta l4proto { tcp, udp } th dport 53 '
            'accept') in text
    assert 'iifname "cc0a1b2cbr" counter reject' in text
    denied = next(line for line in text.splitlines() if "set denied4" in line)
    for cidr in ("169.254.0.0/16", "0.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24",
                 "203.0.113.0/24", "240.0.0.0/4", "224.0.0.0/4", "100.64.0.0/16",
                 "10.9.0.0/16"):
        assert cidr in denied, cidr
    # Private ranges other than the region's are allowed by default.
    assert "10.0.0.0/8" not in denied and "192.168.0.0/16" not in denied
    assert "meta nfproto ipv6 drop" in text  # no IPv6 at all (fe80::/10 included)
    assert 'ip saddr 100.64.4.0/22 oifname != "cc0a1b2cbr" masquerade' in text
    assert 'iifname "cc0a1b2cv*" drop' in text  # no east-west across the bridge
    assert "iifname . ip saddr @env_src accept" in text  # anti-spoofing
    from_env = text.split("chain from_env {")[1].split("\n  }")[0]
    assert from_env.strip().splitlines()[-1].strip() == "accept"


def test_modes_and_allow_list() -> None:
    none = P.ruleset(plan(mode="none")).split("chain from_env {")[1].split("\n  }")[0]
    assert none.strip().splitlines()[-1].strip().startswith("reject")
    allow = P.ruleset(plan(allow_cidrs=("203.0.113.0/24", "8.8.8.0/24", "8.8.8.8/32")))
    from_env = allow.split("chain from_env {")[1].split("\n  }")[0]
    assert "ip daddr { 8.8.8.0/24, 203.0.113.0/24 } accept" in from_env  # nested ones merged
    # Denials come before the allow-list: a denied range stays denied even if allowed.
    assert from_env.index("@denied4") < from_env.index("8.8.8.0/24")


def test_slot_rules_are_keyed_by_interface_and_address() -> None:
    p = plan(conn_rate_per_s=7, conn_burst=9, conns_max=11)
    rules = P.slot_rules(p, 0x2A)
    assert "add chain inet cellcloud_cc0a1b2c env_2a" in rules
    assert "limit rate over 7/second burst 9 packets" in rules
    assert "ct count over 11" in rules
    assert "env_tx { 100.64.4.42 : jump env_2a }" in rules
    assert 'env_src { "cc0a1b2cv2a" . 100.64.4.42 }' in rules
    again = P.slot_refresh(p, 0x2A)
    assert again.startswith("flush chain inet cellcloud_cc0a1b2c env_2a\n")
    assert "reset counter inet cellcloud_cc0a1b2c env_2a_limited" in again
    assert "ct count over 11" in again and "element" not in again


def test_slot_allow_is_keyed_by_the_slots_chain() -> None:
    p = plan()
    rules = P.slot_allow(p, 0x2A, (("10.1.2.0/24", 5432), ("0.0.0.0/0", 443),
                                   ("10.1.2.0/24", 5432)))
    lines = rules.splitlines()
    assert lines == [
        "add rule inet cellcloud_cc0a1b2c env_2a ip daddr 10.1.2.0/24 "
        "meta l4proto { tcp, udp } th dport 5432 return",
        "add rule inet cellcloud_cc0a1b2c env_2a ip daddr 0.0.0.0/0 "
        "meta l4proto { tcp, udp } th dport 443 return",
        f"add rule inet cellcloud_cc0a1b2c env_2a {P.REJECT}",
    ]
    # a listed pair returns to from_env, whose always-denied checks follow the jump to the
    # slot's chain: they win over any allow entry
    ruleset = P.ruleset(p)
    from_env = ruleset[ruleset.index("chain from_env"):]
    assert from_env.index("vmap @env_tx") < from_env.index("fib daddr type local") \
        < from_env.index("@denied4")
    # release rebuilds the chain without the allow-list
    assert "dport" not in P.slot_refresh(p, 0x2A)
    for bad in ((("10.1.2.0/24", 0),), (("10.1.2.0/33", 80),), (("::/0", 80),), ()):
        with pytest.raises(P.PolicyError):
            P.slot_allow(p, 0x2A, bad)
    assert P.parse_allow("10.1.2.0/24:5432") == ("10.1.2.0/24", 5432)
    with pytest.raises(P.PolicyError):
        P.parse_allow("10.1.2.0/24")


def test_parse_counters() -> None:
    doc = {"nftables": [
        {"metainfo": {}},
        {"counter": {"name": "env_2a_tx", "packets": 3, "bytes": 300}},
        {"counter": {"name": "env_2a_rx", "packets": 2, "bytes": 900}},
        {"counter": {"name": "env_2a_new", "packets": 1, "bytes": 60}},
        {"counter": {"name": "env_2a_limited", "packets": 4, "bytes": 240}},
        {"counter": {"name": "other", "packets": 9, "bytes": 9}},
    ]}
    assert P.parse_counters(json.dumps(doc)) == {0x2A: {
        "tx_bytes": 300, "tx_packets": 3, "rx_bytes": 900, "rx_packets": 2,
        "connections": 1, "connections_limited": 4}}


def test_resolvers_from() -> None:
    text = "# c\nnameserver 10.0.0.2\nnameserver ::1\nnameserver bogus\nsearch x\nnameserver 1.1.1.1\n"
    assert P.resolvers_from(text) == ["10.0.0.2", "1.1.1.1"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
def test_a_tasks_slot_is_opened_to_the_host_on_its_ports_only() -> None:
    p = plan()
    addr = p.address(0x2A)
    assert P.slot_ingress(p, 0x2A, (("tcp", 8080), ("udp", 53))).splitlines() == [
        f"add element inet cellcloud_cc0a1b2c ingress_limited {{ {addr} }}",
        f"add element inet cellcloud_cc0a1b2c ingress_open {{ {addr} . tcp . 8080, "
        f"{addr} . udp . 53 }}"]
    assert P.slot_ingress(p, 0x2A, (), add=False).splitlines() == [
        f"delete element inet cellcloud_cc0a1b2c ingress_limited {{ {addr} }}"]
    ruleset = P.ruleset(p)
    host_to_task = ruleset[ruleset.index("chain host_to_task"):]
    assert host_to_task.index("ct state established,related accept") \
        < host_to_task.index("@ingress_open accept") < host_to_task.index(P.REJECT)
    assert 'oifname "cc0a1b2cbr" ip daddr @ingress_limited jump host_to_task' in ruleset
    assert P.parse_ingress("tcp:8080") == ("tcp", 8080)
    for bad in ("tcp", "sctp:80", "tcp:0", "udp:65536", "tcp:x"):
        with pytest.raises(P.PolicyError):
            P.parse_ingress(bad)


def test_a_microvms_slot_pins_its_guests_mac() -> None:
    p = plan()
    mac = p.vm_mac(0x2A)
    addr = p.address(0x2A)
    assert mac == "02:cc:" + ":".join(f"{b:02x}" for b in addr.packed)  # from the address
    assert p.vm_mac(0x2B) != mac and mac != p.bridge_mac
    veth = p.veth(0x2A)
    assert P.slot_vm(p, 0x2A).splitlines() == [
        f'add element bridge cellcloud_cc0a1b2c vm_ports {{ "{veth}" }}',
        f'add element bridge cellcloud_cc0a1b2c vm_src {{ "{veth}" . {mac} }}']
    assert P.slot_vm(p, 0x2A, add=False).startswith("delete element bridge")
    bridge = P.ruleset(p)
    bridge = bridge[bridge.index("table bridge"):]
    pre = bridge[bridge.index("chain prerouting"):]
    # only the VMs' ports are checked, before the address checks every port gets
    assert pre.index("iifname @vm_ports iifname . ether saddr != @vm_src counter drop") \
        < pre.index("ether type arp")


def test_nft_accepts_the_scripts() -> None:
    """Loaded for real under a prefix of the test's own, then removed."""
    p = P.Plan(P.prefix_for(f"unit-{os.getpid()}"), ipaddress.IPv4Network("100.64.4.0/22"),
               POOL, P.Policy(region_cidrs=("10.9.0.0/16",), allow_cidrs=("8.8.8.0/24",)))

    def nft(script: str) -> None:
        r = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr

    try:
        nft(P.ruleset(p) + P.slot_rules(p, 2) + P.slot_rules(p, 3))
        nft(P.slot_allow(p, 3, (("10.1.2.0/24", 5432), ("0.0.0.0/0", 443))))
        nft(P.slot_refresh(p, 2))  # a reset needs the counters to exist already
        nft(P.slot_refresh(p, 3))
        nft(P.slot_ingress(p, 2, (("tcp", 8080), ("udp", 53))))
        nft(P.slot_ingress(p, 2, (("tcp", 8080), ("udp", 53)), add=False))
        nft(P.slot_vm(p, 3))
        nft(P.slot_vm(p, 3, add=False))
        # a task without egress, and its release's rule removal with the refresh (one run)
        nft(P.slot_no_egress(p, 2) + P.slot_ingress(p, 2, (("tcp", 8080),)))
        nft(P.slot_ingress(p, 2, (("tcp", 8080),), add=False) + P.slot_refresh(p, 2))
        nft(P.ruleset(p))  # replacing the tables works whether or not they exist
    finally:
        nft(P.teardown(p))
    listing = subprocess.run(["nft", "list", "tables"], text=True, capture_output=True).stdout
    assert p.table not in listing
