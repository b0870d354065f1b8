"""Where a new cell's replicas go: close to the client, spread across failure domains.

Rules: prefer nodes in the client's zone, then the rest (by fewest cells hosted); never put a
majority of the cell in one rack or one power domain. If the rules cannot be met the caller
gets ``PlacementError`` saying which, never a silently weaker placement.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DOMAINS = ("rack", "power")


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Candidate:
    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
    cells_hosted: int = 0


def place_cell(
    candidates: list[Candidate], client_zone: str | None, replicas: int = 7
) -> list[str]:
    if replicas < 1 or replicas % 2 == 0:
        raise PlacementError(f"replicas must be a positive odd number, got {replicas}")
    if len(candidates) < replicas:
        raise PlacementError(f"need {replicas} nodes, colony has {len(candidates)}")
    cap = replicas // 2  # most replicas any one rack or power domain may hold
    order = sorted(
        candidates,
        key=lambda c: (c.labels.get("zone") != client_zone, c.cells_hosted, c.node_id),
    )
    chosen: list[Candidate] = []
    counts = {d: Counter[str]() for d in DOMAINS}
    for c in order:
        if len(chosen) == replicas:
            break
        doms = {d: c.labels.get(d, f"?{c.node_id}") for d in DOMAINS}
        if any(counts[d][v] >= cap for d, v in doms.items()) and replicas > 1:
            continue
        chosen.append(c)
        for d, v in doms.items():
            counts[d][v] += 1
    if len(chosen) < replicas:
        worst = {d: counts[d].most_common(1) for d in DOMAINS}
        raise PlacementError(
            f"cannot place {replicas} replicas with at most {cap} per rack and per power "
            f"domain: only {len(chosen)} fit (fullest domains: {worst})"
        )
    return sorted(c.node_id for c in chosen)
