"""Blast radius: which tenants a set of dead workers takes out, and what chance predicts.

Pure functions. The *actual* prediction (:func:`lost_tenants`) uses the real shard assignment:
a tenant loses all capacity exactly when every worker of its shard is dead (shard ⊆ dead). The
*expected* values are exact fractions for a second tenant whose shard was drawn independently
of the poison tenant's (what the sharders do, see ``core/sharding.py``):

- shuffle sharding, shard uniform over the C(n,k) k-subsets, dead set of d workers:
  ``P(lost) = C(d,k) / C(n,k)``; the poison tenant kills its own shard (d = k): ``1 / C(n,k)``.
  (n=8: k=2 → 1/28, k=3 → 1/56.)
- overlap of two independent shuffle shards is hypergeometric:
  ``P(|A ∩ B| = j) = C(k,j) · C(n-k,k-j) / C(n,k)``.
- shuffle sharding one worker per zone, z zones, k zones drawn uniformly, then one worker
  uniformly in each: ``P(same shard as S) = 1/C(z,k) · Π_{zone of S} 1/size(zone)``.
- the stateful sharder with ``max_overlap_t < k``: 0 — no other shard equals the poison's.
- plain sharding, g = ceil(n/k) fixed groups each chosen with probability 1/g, the poison kills
  its group: ``P(lost) = 1/g`` (= k/n when k divides n; n=8: k=2 → 1/4, k=3 → 1/3).

The expected number of *other* tenants lost among T tenants is ``(T - 1) · P(lost)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction


def lost_tenants(shards: Mapping[str, Collection[str]], dead: Collection[str]) -> frozenset[str]:
    """Tenants with no live worker left: shard ⊆ dead (an empty shard counts as lost)."""
    d = set(dead)
    return frozenset(t for t, s in shards.items() if set(s) <= d)


@dataclass(frozen=True)
class BlastReport:
    lost: frozenset[str]  # every worker of the shard dead
    degraded: frozenset[str]  # some, not all, workers of the shard dead
    untouched: frozenset[str]  # no worker of the shard dead

    def fraction_lost(self) -> Fraction:
        total = len(self.lost) + len(self.degraded) + len(self.untouched)
        return Fraction(len(self.lost), total) if total else Fraction(0)


def blast_report(shards: Mapping[str, Collection[str]], dead: Collection[str]) -> BlastReport:
    d = set(dead)
    lost, degraded, untouched = set(), set(), set()
    for t, s in shards.items():
        hit = len(d.intersection(s))
        if hit == len(set(s)):
            lost.add(t)
        elif hit:
            degraded.add(t)
        else:
            untouched.add(t)
    return BlastReport(frozenset(lost), frozenset(degraded), frozenset(untouched))


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"need 1 ≤ k ≤ n, got n={n} k={k}")


def p_lost_shuffle(n: int, k: int, dead_count: int | None = None) -> Fraction:
    """P(an independent uniform k-of-n shard lies inside ``dead_count`` dead workers);
    ``dead_count`` defaults to k (the poison tenant killed exactly its own shard)."""
    _check(n, k)
    d = k if dead_count is None else dead_count
    if not 0 <= d <= n:
        raise ValueError(f"dead_count must be in 0..{n}")
    return Fraction(math.comb(d, k), math.comb(n, k))


def p_overlap_shuffle(n: int, k: int) -> list[Fraction]:
    """``[P(|A ∩ B| = j) for j in 0..k]`` for two independent uniform k-of-n shards."""
    _check(n, k)
    return [Fraction(math.comb(k, j) * math.comb(n - k, k - j), math.comb(n, k))
            for j in range(k + 1)]


def p_lost_one_per_zone(zone_sizes: Mapping[str, int], k: int,
                        poison_zones: Collection[str]) -> Fraction:
    """P(an independent one-per-zone shard equals the poison's shard, which spans
    ``poison_zones``): 1/C(z,k) · Π 1/size(zone)."""
    z = len(zone_sizes)
    _check(z, k)
    if len(set(poison_zones)) != k or not set(poison_zones) <= set(zone_sizes):
        raise ValueError("poison_zones must be k distinct known zones")
    return Fraction(1, math.comb(z, k) * math.prod(zone_sizes[q] for q in poison_zones))


def plain_groups(n: int, k: int) -> int:
    _check(n, k)
    return -(-n // k)


def p_lost_plain(n: int, k: int, dead_groups: int = 1) -> Fraction:
    """P(a tenant's fixed group is among ``dead_groups`` whole dead groups) = dead_groups / g."""
    g = plain_groups(n, k)
    if not 0 <= dead_groups <= g:
        raise ValueError(f"dead_groups must be in 0..{g}")
    return Fraction(dead_groups, g)


def expected_lost_others(tenants: int, p_lost: Fraction) -> Fraction:
    """Expected number of tenants, besides the poison one, that lose all capacity."""
    if tenants < 1:
        raise ValueError("tenants must be ≥ 1")
    return (tenants - 1) * p_lost
