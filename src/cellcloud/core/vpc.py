"""A function's network setting, carried by the Lambda API's ``VpcConfig`` (issue #12).

The mapping (docs/lambda-api.md):

- no ``VpcConfig``, or ``SubnetIds: []``: the region's default policy (``mode = ""``);
- ``SubnetIds: ["cellcloud-none"]``: the function's environments get no network at all (an empty
  network namespace: only loopback), whatever the region's default;
- ``SubnetIds: ["cellcloud-egress"]``: the region's egress policy, stated explicitly;
- ``SecurityGroupIds: ["allow:<IPv4 CIDR>:<port>", ...]`` (with ``cellcloud-egress`` only):
  egress only to those destination networks and TCP/UDP ports (plus the region's resolver),
  still minus everything the region always denies;
- ``Ipv6AllowedForDualStack``: only ``false`` (core/params.py).

Any other entry is refused naming it, and so is an allow entry inside a region-internal range
(the caller passes them: the always-denied set, the pool, the hosts' own addresses). Echoed as
AWS does: ``VpcConfig {SubnetIds, SecurityGroupIds, VpcId, Ipv6AllowedForDualStack}``, with
``VpcId`` ``cellcloud-<mode>`` for a function that names a mode, and an empty one otherwise.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: the modes a function may name (the region default is "")
MODES = ("egress", "none")
SUBNET_PREFIX = "cellcloud-"
ALLOW_PREFIX = "allow:"
ALLOW_ENTRIES_MAX = 64  # allow entries of one function (nft rules in its slot's chain)


class VpcError(ValueError):
    """A VpcConfig that does not name a setting this region enforces."""


@dataclass(frozen=True)
class Setting:
    mode: str = ""  # "" region default | egress | none
    allow: tuple[str, ...] = ()  # "CIDR:port", canonical


def _allow_entry(entry: str, internal: list[ipaddress.IPv4Network]) -> str:
    bad = (f"VpcConfig.SecurityGroupIds entry {entry!r} is not of the form "
           f"allow:<IPv4 CIDR>:<port 1-65535>")
    if not entry.startswith(ALLOW_PREFIX):
        raise VpcError(bad)
    cidr, sep, port_text = entry[len(ALLOW_PREFIX):].rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise VpcError(bad)
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        raise VpcError(bad) from None
    if not isinstance(net, ipaddress.IPv4Network) or "/" not in cidr:
        raise VpcError(bad)
    for r in internal:
        if net.subnet_of(r):
            raise VpcError(f"VpcConfig.SecurityGroupIds entry {entry!r} names region-internal "
                           f"addresses ({r}), which environments may never reach")
    return f"{net}:{int(port_text)}"


def parse(vpc: Any, internal: Iterable[str] = ()) -> Setting:
    """The function's network setting from the request's ``VpcConfig``. ``internal``: the
    ranges (CIDRs) an allow entry may not fall inside."""
    if vpc is None:
        return Setting()
    if not isinstance(vpc, dict):
        raise VpcError("VpcConfig must be an object")
    subnets = vpc.get("SubnetIds")
    if subnets is None:
        subnets = []
    if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
        raise VpcError("VpcConfig.SubnetIds must be a list of strings")
    groups = vpc.get("SecurityGroupIds")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise VpcError("VpcConfig.SecurityGroupIds must be a list of strings")
    if len(subnets) > 1:
        raise VpcError(f"VpcConfig.SubnetIds names more than one network mode: {subnets!r}; "
                       f"name exactly one of {', '.join(SUBNET_PREFIX + m for m in MODES)}")
    mode = ""
    if subnets:
        entry = subnets[0]
        mode = entry[len(SUBNET_PREFIX):] if entry.startswith(SUBNET_PREFIX) else ""
        if mode not in MODES:
            raise VpcError(f"VpcConfig.SubnetIds entry {entry!r} is not a network mode of this "
                           f"region; name one of {', '.join(SUBNET_PREFIX + m for m in MODES)}")
    if groups and mode != "egress":
        raise VpcError(f"VpcConfig.SecurityGroupIds {groups!r}: an allow-list needs "
                       f"VpcConfig.SubnetIds [\"{SUBNET_PREFIX}egress\"]")
    if len(groups) > ALLOW_ENTRIES_MAX:
        raise VpcError(f"VpcConfig.SecurityGroupIds has {len(groups)} entries; at most "
                       f"{ALLOW_ENTRIES_MAX}")
    nets = [ipaddress.IPv4Network(c) for c in internal]
    allow = tuple(dict.fromkeys(_allow_entry(g, nets) for g in groups))
    return Setting(mode, allow)


def echo(setting: Setting) -> dict[str, Any]:
    """The ``VpcConfig`` a function's configuration shows for its setting."""
    return {"SubnetIds": [SUBNET_PREFIX + setting.mode] if setting.mode else [],
            "SecurityGroupIds": [ALLOW_PREFIX + a for a in setting.allow],
            "VpcId": SUBNET_PREFIX + setting.mode if setting.mode else "",
            "Ipv6AllowedForDualStack": False}


def split(entry: str) -> tuple[str, int]:
    """A stored allow entry ("CIDR:port") as (CIDR, port)."""
    cidr, _, port = entry.rpartition(":")
    return cidr, int(port)


def local_addresses(fib_trie: str) -> list[str]:
    """The host's own IPv4 addresses (as /32 CIDRs) from ``/proc/net/fib_trie``'s text."""
    out: list[str] = []
    last = ""
    for line in fib_trie.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "|--":
            last = parts[1]
        elif "/32 host LOCAL" in line and last:
            out.append(f"{last}/32")
    return sorted(set(out))
