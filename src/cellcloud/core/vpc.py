"""A function's network setting, carried by the Lambda API's ``VpcConfig`` (issue #12).

The mapping (docs/lambda-api.md):

- no ``VpcConfig``, or ``SubnetIds: []``: the region's default policy (``network = ""``);
- ``SubnetIds: ["cellcloud-none"]``: the function's environments get no network at all (an empty
  network namespace: only loopback), whatever the region's default;
- ``SubnetIds: ["cellcloud-egress"]``: the region's egress policy, stated explicitly;
- ``SecurityGroupIds``: per-function allow-lists are not enforced yet, so only ``[]`` is accepted
  (core/params.py refuses anything else); ``Ipv6AllowedForDualStack``: only ``false``.

Any other ``SubnetIds`` entry, or more than one, is refused naming the entry. Echoed as AWS
does: ``VpcConfig {SubnetIds, SecurityGroupIds, VpcId, Ipv6AllowedForDualStack}``, with
``VpcId`` ``cellcloud-<setting>`` for a function that names one, and an empty one otherwise.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

#: the settings a function may name (the region default is "")
SETTINGS = ("egress", "none")
SUBNET_PREFIX = "cellcloud-"


class VpcError(ValueError):
    """A VpcConfig that does not name a setting this region enforces."""


def parse(vpc: Any) -> str:
    """The function's network setting from the request's ``VpcConfig`` ("" = region default)."""
    if vpc is None:
        return ""
    if not isinstance(vpc, dict):
        raise VpcError("VpcConfig must be an object")
    subnets = vpc.get("SubnetIds")
    if subnets is None:
        subnets = []
    if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
        raise VpcError("VpcConfig.SubnetIds must be a list of strings")
    if len(subnets) > 1:
        raise VpcError(f"VpcConfig.SubnetIds names more than one network setting: {subnets!r}; "
                       f"name exactly one of "
                       f"{', '.join(SUBNET_PREFIX + s for s in SETTINGS)}")
    if not subnets:
        return ""
    entry = subnets[0]
    setting = entry[len(SUBNET_PREFIX):] if entry.startswith(SUBNET_PREFIX) else ""
    if setting not in SETTINGS:
        raise VpcError(f"VpcConfig.SubnetIds entry {entry!r} is not a network setting of this "
                       f"region; name one of {', '.join(SUBNET_PREFIX + s for s in SETTINGS)}")
    return setting


def echo(setting: str) -> dict[str, Any]:
    """The ``VpcConfig`` a function's configuration shows for its setting."""
    if not setting:
        return {"SubnetIds": [], "SecurityGroupIds": [], "VpcId": "",
                "Ipv6AllowedForDualStack": False}
    return {"SubnetIds": [SUBNET_PREFIX + setting], "SecurityGroupIds": [],
            "VpcId": SUBNET_PREFIX + setting, "Ipv6AllowedForDualStack": False}
