"""Blast-radius math, and the issue's experiment run on the pure sharders: n = 8 workers,
k = 2 and k = 3, 50 tenants; the tenants left without capacity are exactly those whose shard
lies inside the dead workers."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core.blast import (
    blast_report,
    expected_lost_others,
    lost_tenants,
    p_lost_one_per_zone,
    p_lost_plain,
    p_lost_shuffle,
    p_overlap_shuffle,
    plain_groups,
)
from cellcloud.core.sharding import (
    PlainSharder,
    ShardExhausted,
    SignatureSharder,
    StatefulSharder,
    Worker,
)


def test_formulas() -> None:
    assert p_lost_shuffle(8, 2) == Fraction(1, 28)
    assert p_lost_shuffle(8, 3) == Fraction(1, 56)
    assert p_lost_shuffle(8, 2, dead_count=4) == Fraction(6, 28)
    assert p_lost_shuffle(8, 3, dead_count=2) == 0
    assert p_lost_plain(8, 2) == Fraction(1, 4)  # k/n
    assert p_lost_plain(8, 3) == Fraction(1, 3)  # 1/ceil(8/3)
    assert plain_groups(8, 3) == 3
    assert expected_lost_others(50, p_lost_shuffle(8, 2)) == Fraction(49, 28)
    assert p_lost_one_per_zone({"a": 2, "b": 2, "c": 4}, 2, ["a", "c"]) == Fraction(1, 3 * 8)
    with pytest.raises(ValueError):
        p_lost_one_per_zone({"a": 2}, 1, ["b"])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.data())
def test_overlap_distribution_matches_enumeration(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n))
    dist = p_overlap_shuffle(n, k)
    assert sum(dist) == 1
    a = set(range(k))
    counts = [0] * (k + 1)
    for b in itertools.combinations(range(n), k):
        counts[len(a & set(b))] += 1
    assert dist == [Fraction(c, math.comb(n, k)) for c in counts]
    assert dist[k] == p_lost_shuffle(n, k)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.sets(st.integers(0, 9), max_size=4), max_size=20),
       st.sets(st.integers(0, 9)))
def test_report_partitions_tenants(shards: dict[str, set[int]], dead: set[int]) -> None:
    sh = {t: [str(w) for w in s] for t, s in shards.items()}
    d = [str(w) for w in dead]
    r = blast_report(sh, d)
    assert r.lost == lost_tenants(sh, d)
    assert r.lost | r.degraded | r.untouched == set(sh)
    assert not (r.lost & r.degraded or r.lost & r.untouched or r.degraded & r.untouched)
    for t in r.degraded:
        assert set(sh[t]) & set(d) and not set(sh[t]) <= set(d)


def _capacity_lost(shards: dict[str, tuple[str, ...]], dead: set[str]) -> set[str]:
    """What a placement restricted to shards sees: tenants with no live worker to run on."""
    return {t for t, s in shards.items() if not [w for w in s if w not in dead]}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", ["signature", "stateful", "plain"])
def test_blast_experiment(kind: str, k: int) -> None:
    n, tenants = 8, 50
    workers = [Worker(f"agent-{i}") for i in range(n)]
    names = [f"tenant-{i:02d}" for i in range(tenants)]
    shards: dict[str, tuple[str, ...]] = {}
    if kind == "signature":
        sig = SignatureSharder(workers, k, seed=b"cell-1")
        shards = {t: sig.shard(t) for t in names}
    elif kind == "plain":
        plain = PlainSharder(workers, k, seed=b"cell-1")
        shards = {t: plain.shard(t) for t in names}
    else:
        st_ = StatefulSharder(workers, k, k - 1, random.Random(1))
        for t in names:
            try:
                shards[t] = st_.assign(t)
            except ShardExhausted:
                # k = 2: only C(8,2) = 28 distinct shards exist, so 50 tenants cannot all have
                # one with overlap ≤ 1; the sharder says so instead of doubling up.
                assert k == 2 and len(shards) == math.comb(8, 2)
                break
    for poison in list(shards)[:10]:
        dead = set(shards[poison])  # the poison tenant kills its whole shard
        lost = _capacity_lost(shards, dead)
        assert lost == lost_tenants(shards, dead)
        assert poison in lost
        if kind == "stateful":
            assert lost == {poison}
        if kind == "plain":
            assert lost == {t for t, s in shards.items() if s == shards[poison]}
