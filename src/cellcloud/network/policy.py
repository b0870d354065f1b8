"""The outbound-network policy as data: names, addresses and the nftables ruleset text.

Pure (no I/O): the network helper (``helper.py``) executes what this module computes. One agent
owns one *plan*: a bridge, a subnet of the region's pool, and an nftables table of each family
(``inet`` filter, ``ip`` NAT, ``bridge`` anti-spoofing), all named with the agent's prefix so two
regions (or test runs) on one host never touch each other's objects. Every environment is a
*slot*: one host address of the subnet, one veth whose host end is a port of the bridge, and one
chain of its own that counts and rate-limits its new connections. The policy is keyed by the
interface (the bridge port) and the address the anti-spoofing table ties to it, so a later
microVM backend's tap devices can take the same slots.

Enforced on the host, outside every environment (its veth peer is all it has):

- always denied: every address local to the host when the packet is sent (``fib daddr type
  local``: the bridge's address, 127/8, every interface's addresses, including ones created after
  the region started), hence every region port on this host; the region's own ranges (the pool,
  so other environments of any agent, and ``region_cidrs``: other hosts of the region);
  link-local and metadata (169.254/16), and the special-purpose ranges below; IPv6 altogether
  (environments get no IPv6 address, so fe80::/10 and everything else v6 is dropped at the
  bridge port);
- no east-west traffic: frames between two bridge ports are dropped (layer 2), and a routed
  packet to another agent's environment is in the pool (layer 3);
- no ingress: only replies (``ct state established,related``) are forwarded to an environment;
  from the host itself, a task's address (``slot_ingress``) may be opened on its mapped ports
  only (other environments listen on nothing the platform relies on);
- exactly one resolver address (the bridge's), port 53 (UDP and TCP), served by the helper's
  forwarder;
- anti-spoofing: a bridge port may only send IPv4 and ARP from its own address;
- per environment: new connections at most ``conn_rate_per_s`` (burst ``conn_burst``) and at most
  ``conns_max`` tracked at once, so one function cannot fill the host's conntrack table.

Egress leaves through whichever interface the host's routes choose and is masqueraded there.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.limits import DEFAULT_LIMITS

MODES = ("egress", "none")
# A denied destination fails fast (TCP reset / ICMP administratively prohibited), not by timeout.
REJECT = "reject with icmpx type admin-prohibited"

# Denied whatever the policy says (destinations, IPv4). RFC 6890's special-purpose ranges that a
# function has no business reaching, plus link-local/metadata and multicast/broadcast.
ALWAYS_DENIED_V4 = (
    "0.0.0.0/8",  # "this network"
    "127.0.0.0/8",  # loopback (the host's, if ever routed)
    "169.254.0.0/16",  # link-local, including the 169.254.169.254 metadata address
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # TEST-NET-1 (RFC 5737)
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # TEST-NET-2 (RFC 5737)
    "203.0.113.0/24",  # TEST-NET-3 (RFC 5737)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255
)

DEFAULT_POOL = "100.64.0.0/16"  # inside 100.64.0.0/10 (RFC 6598), outside RFC 1918
DEFAULT_SUBNET_PREFIXLEN = 22  # per agent: 1,021 environment addresses (envs_per_agent_max 1000)
RFC1918 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")

IFNAME_BYTES_MAX = 15  # the kernel's IFNAMSIZ - 1
PREFIX_CHARS = 8  # "cc" + 6 hex digits


class PolicyError(ValueError):
    """A policy or plan that cannot be enforced as given."""


@dataclass(frozen=True)
class Policy:
    """The region's default policy for every environment of an agent."""

    mode: str = "egress"  # egress | none
    # Extra destinations denied, besides ALWAYS_DENIED_V4 and the pool: the region's own
    # addresses on other hosts (region-internal ports on *this* host are local: always denied).
    region_cidrs: tuple[str, ...] = ()
    # Non-empty: egress only to these destinations (still minus everything denied above).
    allow_cidrs: tuple[str, ...] = ()
    conn_rate_per_s: int = DEFAULT_LIMITS.env_net_conn_rate_per_s
    conn_burst: int = DEFAULT_LIMITS.env_net_conn_burst
    conns_max: int = DEFAULT_LIMITS.env_net_conns_max

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"network mode {self.mode!r}: one of {', '.join(MODES)}")
        for c in self.region_cidrs + self.allow_cidrs:
            _v4net(c)
        for name in ("conn_rate_per_s", "conn_burst", "conns_max"):
            if getattr(self, name) < 1:
                raise PolicyError(f"{name} must be at least 1")


def _v4net(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise PolicyError(f"not a CIDR: {cidr!r}") from e
    if not isinstance(net, ipaddress.IPv4Network):
        raise PolicyError(f"IPv4 only: {cidr!r}")
    return net


def check_pool(pool: str, subnet_prefixlen: int = DEFAULT_SUBNET_PREFIXLEN) -> ipaddress.IPv4Network:
    """The pool must be at most a /16, must not cover any RFC 1918 range (the host would route
    a private range into the bridges) and must hold at least one agent subnet."""
    net = _v4net(pool)
    if net.prefixlen < 16:
        raise PolicyError(f"pool {pool} is larger than a /16")
    for r in RFC1918:
        if net.overlaps(ipaddress.ip_network(r)):
            raise PolicyError(f"pool {pool} overlaps the private range {r}")
    if not net.prefixlen <= subnet_prefixlen <= 29:
        raise PolicyError(f"agent subnets of /{subnet_prefixlen} do not fit pool {pool}")
    return net


def prefix_for(key: str) -> str:
    """An agent's object-name prefix, from something unique per region and agent."""
    import hashlib

    return "cc" + hashlib.sha256(key.encode()).hexdigest()[: PREFIX_CHARS - 2]


_OBJECT_PREFIX = re.compile(rf"^(?:cellcloud_)?(cc[0-9a-f]{{{PREFIX_CHARS - 2}}})(?:br)?$")


def prefixes_of(names: Iterable[str]) -> set[str]:
    """The agent prefixes that bridges (``<prefix>br``) and nft tables (``cellcloud_<prefix>``)
    among ``names`` belong to: whose objects a helper may find left behind by a killed one."""
    out = set()
    for name in names:
        m = _OBJECT_PREFIX.match(name)
        if m and (name.endswith("br") or name.startswith("cellcloud_")):
            out.add(m.group(1))
    return out


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one agent's network; a slot is a host number in the subnet."""

    prefix: str
    subnet: ipaddress.IPv4Network
    pool: ipaddress.IPv4Network
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self) -> None:
        if len(self.prefix) != PREFIX_CHARS or not self.prefix.isalnum():
            raise PolicyError(f"prefix {self.prefix!r}: {PREFIX_CHARS} letters and digits")
        if not self.subnet.subnet_of(self.pool):
            raise PolicyError(f"subnet {self.subnet} is not inside pool {self.pool}")
        if self.subnet.num_addresses < 8:
            raise PolicyError(f"subnet {self.subnet} is too small")

    @property
    def bridge(self) -> str:
        return self.prefix + "br"

    @property
    def bridge_mac(self) -> str:
        """Locally administered, unicast, derived from the prefix (never a port's)."""
        digits = self.prefix[2:]  # 6 hex digits
        return "02:cc:00:" + ":".join(digits[i:i + 2] for i in (0, 2, 4))

    @property
    def table(self) -> str:
        return "cellcloud_" + self.prefix

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def resolver(self) -> ipaddress.IPv4Address:
        return self.gateway

    @property
    def slots(self) -> range:
        """Host numbers environments may take (.0 network, .1 gateway, last broadcast)."""
        return range(2, self.subnet.num_addresses - 1)

    def address(self, slot: int) -> ipaddress.IPv4Address:
        if slot not in self.slots:
            raise PolicyError(f"slot {slot} outside {self.subnet}")
        return self.subnet.network_address + slot

    def veth(self, slot: int) -> str:
        name = f"{self.prefix}v{slot:x}"
        assert len(name) <= IFNAME_BYTES_MAX, name
        return name

    def vm_mac(self, slot: int) -> str:
        """A microVM guest's NIC (``acquire(tap=True)``): locally administered, unicast, the
        slot's IPv4 address in its last four bytes, so unique on the bridge as the address is
        (and never the bridge's own: no pool address starts with 0)."""
        return "02:cc:" + ":".join(f"{b:02x}" for b in self.address(slot).packed)

    def owns(self, name: str) -> bool:
        """Whether an interface, netns or table name is one of this plan's."""
        return name.startswith(self.prefix) or name == self.table

    def env_info(self, slot: int) -> dict[str, Any]:
        """What the environment is told (EnvSpec.network)."""
        return {"address": str(self.address(slot)), "prefixlen": self.subnet.prefixlen,
                "gateway": str(self.gateway), "resolver": str(self.resolver),
                "interface": self.veth(slot), "mode": self.policy.mode}


def _elements(cidrs: tuple[str, ...] | list[str]) -> str:
    nets = sorted({_v4net(c) for c in cidrs}, key=lambda n: (int(n.network_address), n.prefixlen))
    # nft refuses overlapping interval elements: keep only the outermost.
    out: list[ipaddress.IPv4Network] = []
    for n in sorted(nets, key=lambda n: n.prefixlen):
        if not any(n.subnet_of(o) for o in out):
            out.append(n)
    return ", ".join(str(n) for n in sorted(out, key=lambda n: int(n.network_address)))


def ruleset(plan: Plan) -> str:
    """The agent's three tables, as one ``nft -f`` script that replaces them atomically."""
    p, br, t = plan.policy, plan.bridge, plan.table
    ports = f'"{plan.prefix}v*"'
    denied = _elements(list(ALWAYS_DENIED_V4) + [str(plan.pool)] + list(p.region_cidrs))
    if p.mode == "none":
        egress = [REJECT]
    elif p.allow_cidrs:
        egress = [f"ip daddr {{ {_elements(p.allow_cidrs)} }} accept", REJECT]
    else:
        egress = ["accept"]
    lines = [
        # Declaring then deleting makes the script work whether or not the tables exist.
        f"table inet {t} {{}}", f"delete table inet {t}",
        f"table ip {t} {{}}", f"delete table ip {t}",
        f"table bridge {t} {{}}", f"delete table bridge {t}",
        f"table inet {t} {{",
        "  set denied4 { type ipv4_addr; flags interval; elements = { " + denied + " } }",
        "  map env_tx { type ipv4_addr : verdict; }",
        "  map env_rx { type ipv4_addr : counter; }",
        # Tasks (agent/tasks.py): the host (its router included) may open connections to a
        # task's address on its mapped ports only; other environments are not limited here.
        "  set ingress_limited { type ipv4_addr; }",
        "  set ingress_open { type ipv4_addr . inet_proto . inet_service; }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        # The one resolver: the bridge's address, UDP 53, served by the helper's forwarder.
        f'    iifname "{br}" ip daddr {plan.resolver} meta l4proto {{ tcp, udp }} th dport 53 accept',
        # Replies to what the host itself opened (its probes, the forwarder's answers).
        f'    iifname "{br}" ct state established,related accept',
        f'    iifname "{br}" counter {REJECT}',  # the host itself, every region port on it
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{br}" jump from_env',
        f'    oifname "{br}" jump to_env',
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f'    oifname "{br}" ip daddr @ingress_limited jump host_to_task',
        "  }",
        "  chain host_to_task {",
        "    ct state established,related accept",
        "    ip daddr . meta l4proto . th dport @ingress_open accept",
        f"    {REJECT}",
        "  }",
        "  chain from_env {",
        "    ip saddr vmap @env_tx",  # the environment's own chain: counters, rate limits
        "    meta nfproto ipv6 drop",
        f"    fib daddr type local {REJECT}",
        f"    ip daddr @denied4 {REJECT}",
        *(f"    {rule}" for rule in egress),
        "  }",
        "  chain to_env {",
        "    counter name ip daddr map @env_rx",
        "    ct state established,related accept",
        "    drop",  # no ingress
        "  }",
        "}",
        f"table ip {t} {{",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {plan.subnet} oifname != "{br}" masquerade',
        "  }",
        "}",
        f"table bridge {t} {{",
        "  set env_src { type ifname . ipv4_addr; }",
        # A microVM's slot (slot_vm): its guest's kernel writes the frames, so their source
        # MAC is pinned too (a forged one would teach the bridge another port's address).
        "  set vm_ports { type ifname; }",
        "  set vm_src { type ifname . ether_addr; }",
        "  chain prerouting {",
        "    type filter hook prerouting priority filter; policy accept;",
        f"    iifname != {ports} accept",
        "    iifname @vm_ports iifname . ether saddr != @vm_src counter drop",
        "    ether type arp iifname . arp saddr ip @env_src accept",
        "    ether type ip iifname . ip saddr @env_src accept",
        "    counter drop",  # spoofed sources, IPv6 (fe80::/10 included), anything else
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    iifname {ports} drop",  # no east-west between bridge ports
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _chain(slot: int) -> str:
    return f"env_{slot:x}"


def _slot_chain_rules(plan: Plan, slot: int) -> list[str]:
    p, t, c = plan.policy, plan.table, _chain(slot)
    return [
        f'add rule inet {t} {c} counter name "{c}_tx"',
        f'add rule inet {t} {c} ct state new counter name "{c}_new"',
        f"add rule inet {t} {c} ct state new limit rate over {p.conn_rate_per_s}/second "
        f'burst {p.conn_burst} packets counter name "{c}_limited" drop',
        f'add rule inet {t} {c} ct state new ct count over {p.conns_max} '
        f'counter name "{c}_limited" drop',
    ]


def slot_rules(plan: Plan, slot: int) -> str:
    """Admit one slot: its chain (counters and connection limits) and map entries."""
    t, c = plan.table, _chain(slot)
    addr, veth = plan.address(slot), plan.veth(slot)
    return "\n".join([
        *(f"add counter inet {t} {c}_{k}" for k in COUNTERS),
        f"add chain inet {t} {c}",
        *_slot_chain_rules(plan, slot),
        f"add element inet {t} env_tx {{ {addr} : jump {c} }}",
        f'add element inet {t} env_rx {{ {addr} : "{c}_rx" }}',
        f'add element bridge {t} env_src {{ "{veth}" . {addr} }}',
    ]) + "\n"


def slot_vm(plan: Plan, slot: int, add: bool = True) -> str:
    """A microVM's slot: frames from its port must carry its guest's MAC (``Plan.vm_mac``).
    ``add=False``: the elements removed (on release; the slot's next tenant may be a jail)."""
    t, veth, verb = plan.table, plan.veth(slot), "add" if add else "delete"
    return (f'{verb} element bridge {t} vm_ports {{ "{veth}" }}\n'
            f'{verb} element bridge {t} vm_src {{ "{veth}" . {plan.vm_mac(slot)} }}\n')


def parse_allow(entry: str) -> tuple[str, int]:
    """An allow entry "CIDR:port" as (CIDR, port)."""
    cidr, sep, port = entry.rpartition(":")
    if not sep or not port.isdigit():
        raise PolicyError(f"allow entry {entry!r}: CIDR:port")
    return cidr, int(port)


def check_allow(allow: tuple[tuple[str, int], ...] | list[tuple[str, int]]
                ) -> tuple[tuple[str, int], ...]:
    """Canonical (IPv4 network, port) pairs, or PolicyError."""
    out = []
    for cidr, port in allow:
        if not 1 <= int(port) <= 65535:
            raise PolicyError(f"allow entry {cidr}:{port}: port 1-65535")
        out.append((str(_v4net(cidr)), int(port)))
    return tuple(dict.fromkeys(out))


def slot_allow(plan: Plan, slot: int, allow: tuple[tuple[str, int], ...]) -> str:
    """Restrict an acquired slot to its environment's allow-list: appended to the slot's own
    chain (which ``from_env`` jumps to first), a listed destination and TCP/UDP port returns
    to ``from_env`` (where the always-denied set, the pool and the region's ranges are still
    rejected: they win over any entry), anything else is rejected here. The resolver is not
    forwarded traffic (the input chain serves it), so DNS still works. ``slot_refresh`` (on
    release) rebuilds the chain without these rules."""
    t, c = plan.table, _chain(slot)
    allow = check_allow(allow)
    if not allow:
        raise PolicyError("an empty allow-list: use the none mode instead")
    return "\n".join([
        *(f"add rule inet {t} {c} ip daddr {cidr} meta l4proto {{ tcp, udp }} "
          f"th dport {port} return" for cidr, port in allow),
        f"add rule inet {t} {c} {REJECT}",
    ]) + "\n"


def slot_no_egress(plan: Plan, slot: int) -> str:
    """A task without egress (ECS ``assignPublicIp`` DISABLED): its slot's chain rejects
    every connection it opens through the bridge (the resolver is served by the input chain,
    so DNS still answers; the host still reaches its mapped ports: that is ``ingress``).
    ``slot_refresh`` (on release) rebuilds the chain without it."""
    return f"add rule inet {plan.table} {_chain(slot)} {REJECT}\n"


def parse_ingress(entry: str) -> tuple[str, int]:
    """An ingress entry "tcp:8080" as ("tcp", 8080)."""
    proto, sep, port = entry.partition(":")
    if not sep or proto not in ("tcp", "udp") or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise PolicyError(f"ingress entry {entry!r}: tcp|udp:port")
    return proto, int(port)


def slot_ingress(plan: Plan, slot: int, ports: tuple[tuple[str, int], ...],
                 add: bool = True) -> str:
    """A task's slot: the host may open connections to its address on ``ports`` only (a
    task without ports: on none). ``add=False``: the same elements removed (on release)."""
    t, addr, verb = plan.table, plan.address(slot), "add" if add else "delete"
    lines = [f"{verb} element inet {t} ingress_limited {{ {addr} }}"]
    if ports:
        lines.append(f"{verb} element inet {t} ingress_open {{ "
                     + ", ".join(f"{addr} . {proto} . {port}" for proto, port in ports) + " }")
    return "\n".join(lines) + "\n"


def slot_refresh(plan: Plan, slot: int) -> str:
    """Make an admitted slot as new for its next environment: counters at zero and fresh
    rules, so the rate limit's bucket and the tracked-connection count (which would still hold
    the previous environment's connections) start empty. Map entries stay: the slot keeps its
    address and interface name."""
    t, c = plan.table, _chain(slot)
    return "\n".join([
        f"flush chain inet {t} {c}",
        *(f"reset counter inet {t} {c}_{k}" for k in COUNTERS),
        *_slot_chain_rules(plan, slot),
    ]) + "\n"


COUNTERS = ("tx", "rx", "new", "limited")


def teardown(plan: Plan) -> str:
    t = plan.table
    return "\n".join(f"table {fam} {t} {{}}\ndelete table {fam} {t}"
                     for fam in ("inet", "ip", "bridge")) + "\n"


def parse_counters(nft_json: str | dict[str, Any]) -> dict[int, dict[str, int]]:
    """``nft -j list counters table inet <table>`` -> {slot: {tx_bytes, tx_packets, rx_bytes,
    rx_packets, connections, connections_limited}}."""
    doc = json.loads(nft_json) if isinstance(nft_json, str) else nft_json
    out: dict[int, dict[str, int]] = {}
    names = {"tx": ("tx_bytes", "tx_packets"), "rx": ("rx_bytes", "rx_packets"),
             "new": (None, "connections"), "limited": (None, "connections_limited")}
    for item in doc.get("nftables", []):
        c = item.get("counter")
        if not c or not str(c.get("name", "")).startswith("env_"):
            continue
        base, _, kind = c["name"][4:].partition("_")
        if kind not in names:
            continue
        slot = int(base, 16)
        entry = out.setdefault(slot, {"tx_bytes": 0, "tx_packets": 0, "rx_bytes": 0,
                                      "rx_packets": 0, "connections": 0,
                                      "connections_limited": 0})
        bytes_key, packets_key = names[kind]
        if bytes_key:
            entry[bytes_key] = int(c.get("bytes", 0))
        entry[packets_key] = int(c.get("packets", 0))
    return out


def resolvers_from(resolv_conf: str) -> list[str]:
    """The IPv4 nameservers of a resolv.conf text, in order."""
    out = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                if isinstance(ipaddress.ip_address(parts[1]), ipaddress.IPv4Address):
                    out.append(parts[1])
            except ValueError:
                continue
    return out


def subnets(pool: ipaddress.IPv4Network, prefixlen: int) -> list[ipaddress.IPv4Network]:
    """Candidate agent subnets of a pool, in order."""
    return list(pool.subnets(new_prefix=prefixlen))
