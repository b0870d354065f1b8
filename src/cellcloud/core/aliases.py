"""Aliases: validation of a routing configuration and the weighted choice between two versions.

Pure: the randomness source is passed in (a seeded ``random.Random`` in tests), so the split
over many invokes can be checked exactly and replayed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

from .errors import LambdaError, invalid

ALIAS_NAME = re.compile(r"^(?!^[0-9]+$)[a-zA-Z0-9-_]{1,128}$")
VERSION = re.compile(r"^[0-9]{1,10}$")
additional_versions_max = 1  # Lambda routes an alias between at most two versions


def check_alias_name(name: object) -> str:
    if not isinstance(name, str) or not ALIAS_NAME.match(name):
        raise LambdaError(
            400, "ValidationException",
            f"1 validation error detected: Value '{name}' at 'name' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: "
            "(?!^[0-9]+$)([a-zA-Z0-9-_]+) and have length between 1 and 128")
    return name


def check_routing(primary: str, routing: object) -> dict[str, float]:
    """``RoutingConfig`` -> {version: weight}; Lambda's rules: at most one additional version,
    a published one other than the primary (which must be published too), weight in [0, 1]."""
    if routing is None:
        return {}
    if not isinstance(routing, Mapping):
        raise invalid("RoutingConfig must be an object")
    weights = routing.get("AdditionalVersionWeights")
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise invalid("RoutingConfig.AdditionalVersionWeights must be a map of version to weight")
    if len(weights) > additional_versions_max:
        raise invalid(f"Number of items in AdditionalVersionWeights cannot be greater than "
                      f"{additional_versions_max}")
    out: dict[str, float] = {}
    for version, weight in weights.items():
        if not isinstance(version, str) or not VERSION.match(version):
            raise invalid(f"Invalid version {version!r} in AdditionalVersionWeights: "
                          "only published versions can be routed to")
        if isinstance(weight, bool) or not isinstance(weight, int | float) \
                or not 0.0 <= float(weight) <= 1.0:
            raise LambdaError(
                400, "ValidationException",
                f"1 validation error detected: Value '{weight}' at "
                f"'routingConfig.additionalVersionWeights' failed to satisfy constraint: Map "
                "value must satisfy constraint: [Member must have value less than or equal to "
                "1.0, Member must have value greater than or equal to 0.0]")
        if version == primary:
            raise invalid(f"Invalid function version {version}. Function version {version} is "
                          "already included in routing configuration.")
        out[version] = float(weight)
    if out and not VERSION.match(primary):
        raise invalid("$LATEST is not supported for an alias pointing to more than 1 version")
    return out


def pick_version(primary: str, weights: Mapping[str, float], rng: random.Random) -> str:
    """The version one invoke of the alias runs: each additional version with its weight, the
    primary with the rest."""
    x = rng.random()
    acc = 0.0
    for version, weight in sorted(weights.items()):
        acc += weight
        if x < acc:
            return version
    return primary
