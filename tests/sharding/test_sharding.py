"""The sharders: properties (Hypothesis) and the exact behaviours the docs promise."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core.sharding import (
    PlainSharder,
    ShardExhausted,
    ShardingError,
    SignatureSharder,
    StatefulSharder,
    Worker,
    retry_order,
    stateful_exhaustive_candidates_max,
)

PROPS = settings(max_examples=60, deadline=None)


def flat(n: int) -> list[Worker]:
    return [Worker(f"w{i}") for i in range(n)]


def zoned(zones: int, per_zone: int) -> list[Worker]:
    return [Worker(f"z{z}w{i}", f"zone-{z}") for z in range(zones) for i in range(per_zone)]


keys = st.text(min_size=1, max_size=20)
seeds = st.one_of(st.integers(0, 2**64), st.binary(min_size=0, max_size=80))


@st.composite
def n_and_k(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(1, 24))
    return n, draw(st.integers(1, n))


# -- SignatureSharder ---------------------------------------------------------------------
@PROPS
@given(n_and_k(), seeds, st.lists(keys, min_size=1, max_size=10))
def test_signature_size_distinct_deterministic(nk: tuple[int, int], seed: bytes | int,
                                               ks: list[str]) -> None:
    n, k = nk
    a = SignatureSharder(flat(n), k, seed)
    b = SignatureSharder(list(reversed(flat(n))), k, seed)  # order of the list does not matter
    ids = {w.id for w in flat(n)}
    for key in ks:
        s = a.shard(key)
        assert len(s) == k and len(set(s)) == k and set(s) <= ids
        assert s == a.shard(key) == b.shard(key)


@PROPS
@given(st.integers(1, 5), st.integers(1, 5), seeds, st.lists(keys, min_size=1, max_size=10),
       st.data())
def test_signature_one_per_zone(zones: int, per_zone: int, seed: bytes | int, ks: list[str],
                                data: st.DataObject) -> None:
    k = data.draw(st.integers(1, zones))
    sharder = SignatureSharder(zoned(zones, per_zone), k, seed)  # auto: all workers labelled
    assert sharder.one_per_zone
    zone_of = {w.id: w.zone for w in zoned(zones, per_zone)}
    for key in ks:
        s = sharder.shard(key)
        assert len(s) == k and len({zone_of[w] for w in s}) == k


@PROPS
@given(n_and_k(), seeds, st.lists(keys, min_size=1, max_size=20, unique=True))
def test_signature_adding_a_worker_moves_at_most_one_member(nk: tuple[int, int],
                                                          seed: bytes | int,
                                                          ks: list[str]) -> None:
    n, k = nk
    sharder = SignatureSharder(flat(n), k, seed)
    before = {key: sharder.shard(key) for key in ks}
    sharder.add_worker(Worker("new"))
    for key in ks:
        after = sharder.shard(key)
        if "new" not in after:
            assert after == before[key]
        else:
            assert len(set(before[key]) - set(after)) == 1


@PROPS
@given(n_and_k(), seeds, st.lists(keys, min_size=1, max_size=20, unique=True), st.data())
def test_signature_removing_a_worker_replaces_only_it(nk: tuple[int, int], seed: bytes | int,
                                                    ks: list[str], data: st.DataObject) -> None:
    n, k = nk
    if n == k:
        return  # nothing could replace it
    sharder = SignatureSharder(flat(n), k, seed)
    before = {key: sharder.shard(key) for key in ks}
    gone = data.draw(st.sampled_from([w.id for w in flat(n)]))
    sharder.remove_worker(gone)
    for key in ks:
        after = sharder.shard(key)
        if gone not in before[key]:
            assert after == before[key]
        else:
            assert set(before[key]) - {gone} <= set(after) and gone not in after


def test_signature_seed_matters_and_spreads_uniformly() -> None:
    ks = [f"fn-{i}" for i in range(2000)]
    a, b = SignatureSharder(flat(8), 2, 1), SignatureSharder(flat(8), 2, 2)
    assert [a.shard(x) for x in ks] != [b.shard(x) for x in ks]
    counts: dict[frozenset[str], int] = {}
    for x in ks:
        s = frozenset(a.shard(x))
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == math.comb(8, 2)  # every one of the 28 shards is used
    assert max(counts.values()) < 3 * 2000 / 28


def test_signature_rejects_impossible_configs() -> None:
    with pytest.raises(ShardingError):
        SignatureSharder(flat(3), 4, 0)
    with pytest.raises(ShardingError):
        SignatureSharder(zoned(2, 3), 3, 0)  # 3 per zone needs 3 zones
    with pytest.raises(ShardingError):
        SignatureSharder([Worker("a", "z1"), Worker("b")], 1, 0, one_per_zone=True)
    with pytest.raises(ShardingError):
        SignatureSharder([Worker("a"), Worker("a")], 1, 0)
    assert not SignatureSharder([Worker("a", "z1"), Worker("b")], 2, 0).one_per_zone
    assert not SignatureSharder(zoned(2, 2), 3, 0, one_per_zone=False).one_per_zone


# -- StatefulSharder ----------------------------------------------------------------------
@PROPS
@given(n_and_k(), st.data(), st.integers(0, 2**32), st.integers(1, 60))
def test_stateful_overlap_bound_and_exhaustion(nk: tuple[int, int], data: st.DataObject,
                                               rng_seed: int, tenants: int) -> None:
    n, k = nk
    t = data.draw(st.integers(0, k))
    sharder = StatefulSharder(flat(n), k, t, random.Random(rng_seed))
    for i in range(tenants):
        try:
            s = sharder.assign(f"t{i}")
        except ShardExhausted:
            if math.comb(n, k) <= stateful_exhaustive_candidates_max:
                # exhaustive search: truly no k-subset fits
                shards = list(sharder.shards().values())
                for c in itertools.combinations([w.id for w in flat(n)], k):
                    assert any(len(set(c) & set(o)) > t for o in shards)
            break
        assert len(s) == k and len(set(s)) == k
        assert sharder.assign(f"t{i}") == s  # idempotent
    shards = list(sharder.shards().values())
    for a, b in itertools.combinations(shards, 2):
        assert len(set(a) & set(b)) <= t


@PROPS
@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_stateful_deterministic_for_a_seeded_rng(seed: int, other: int) -> None:
    def run(s: int) -> dict[str, tuple[str, ...]]:
        sh = StatefulSharder(flat(10), 3, 1, random.Random(s))
        out = {}
        for i in range(12):
            try:
                out[f"t{i}"] = sh.assign(f"t{i}")
            except ShardExhausted:
                break
        return out

    assert run(seed) == run(seed)


def test_stateful_exhausts_with_a_clear_error_and_release_frees() -> None:
    sharder = StatefulSharder(flat(8), 2, 1, random.Random(7))
    for i in range(28):  # every 2-subset of 8 workers, each used once
        sharder.assign(f"t{i}")
    with pytest.raises(ShardExhausted) as e:
        sharder.assign("t28")
    assert "no shard of 2 workers" in str(e.value) and e.value.exhaustive
    sharder.release("t3")
    assert sharder.assign("t28")


def test_stateful_one_per_zone() -> None:
    workers = zoned(3, 3)
    sharder = StatefulSharder(workers, 3, 1, random.Random(1))
    zone_of = {w.id: w.zone for w in workers}
    got = []
    while True:
        try:
            got.append(sharder.assign(f"t{len(got)}"))
        except ShardExhausted:
            break
    assert len(got) >= 6
    for s in got:
        assert len({zone_of[w] for w in s}) == 3


@PROPS
@given(st.integers(0, 2**32), st.integers(4, 12), st.integers(2, 3), st.data())
def test_stateful_remove_worker(seed: int, n: int, k: int, data: st.DataObject) -> None:
    t = k - 1
    sharder = StatefulSharder(flat(n), k, t, random.Random(seed))
    for i in range(data.draw(st.integers(1, 30))):
        try:
            sharder.assign(f"t{i}")
        except ShardExhausted:
            break
    before = sharder.shards()
    gone = data.draw(st.sampled_from([w.id for w in flat(n)]))
    result = sharder.remove_worker(gone)
    assert set(result.affected) == {key for key, s in before.items() if gone in s}
    assert set(result.resharded) | set(result.degraded) == set(result.affected)
    after = sharder.shards()
    for key, s in after.items():
        assert gone not in s
        if key not in result.affected:
            assert s == before[key]
        elif key in result.resharded:
            assert len(s) == k
        else:
            assert s == tuple(w for w in before[key] if w != gone)
    for a, b in itertools.combinations(after.values(), 2):
        assert len(set(a) & set(b)) <= t
    assert gone not in {w.id for w in sharder.workers}


def test_stateful_remove_prefers_swapping_the_dead_worker_only() -> None:
    sharder = StatefulSharder(flat(8), 3, 2, random.Random(3))
    s = sharder.assign("solo")
    result = sharder.remove_worker(s[0])
    assert result.affected == ("solo",)
    new = result.resharded["solo"]
    assert set(s[1:]) <= set(new) and s[0] not in new


def test_stateful_degraded_then_repaired() -> None:
    sharder = StatefulSharder(flat(4), 2, 1, random.Random(0))
    for i in range(6):  # all 6 pairs of 4 workers
        sharder.assign(f"t{i}")
    result = sharder.remove_worker("w0")
    assert len(result.affected) == 3 and not result.resharded
    assert all(len(s) == 1 for s in result.degraded.values())
    sharder.add_worker(Worker("w9"))
    repaired = sharder.repair()
    assert repaired and all(len(s) == 2 for s in repaired.values())
    for a, b in itertools.combinations(sharder.shards().values(), 2):
        assert len(set(a) & set(b)) <= 1


# -- PlainSharder -------------------------------------------------------------------------
def test_plain_groups() -> None:
    p = PlainSharder(flat(8), 2)
    assert p.groups == (("w0", "w1"), ("w2", "w3"), ("w4", "w5"), ("w6", "w7"))
    p3 = PlainSharder(flat(8), 3)
    assert [len(g) for g in p3.groups] == [3, 3, 2]
    shards = {p.shard(f"t{i}") for i in range(200)}
    assert shards == set(p.groups)
    assert p.shard("x") == PlainSharder(flat(8), 2).shard("x")


# -- retries ------------------------------------------------------------------------------
@PROPS
@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=8, unique=True), keys)
def test_retries_visit_distinct_workers(shard: list[str], key: str) -> None:
    firsts = [retry_order(shard, a, key)[0] for a in range(len(shard))]
    assert sorted(firsts) == sorted(shard)
    tried: list[str] = []
    for a in range(len(shard)):
        order = retry_order(shard, a, key, failed=tried)
        assert sorted(order) == sorted(shard)
        assert order[0] not in tried
        tried.append(order[0])
    assert sorted(tried) == sorted(shard)


@PROPS
@given(st.integers(2, 4), st.integers(1, 3), seeds, st.lists(keys, min_size=1, max_size=15,
                                                              unique=True), st.data())
def test_signature_zoned_add_and_remove_move_one_member(zones: int, per_zone: int,
                                                        seed: bytes | int, ks: list[str],
                                                        data: st.DataObject) -> None:
    k = data.draw(st.integers(1, zones))
    sharder = SignatureSharder(zoned(zones, per_zone), k, seed)
    before = {key: sharder.shard(key) for key in ks}
    new_zone = data.draw(st.sampled_from([f"zone-{z}" for z in range(zones + 1)]))
    sharder.add_worker(Worker("new", new_zone))
    for key in ks:
        after = sharder.shard(key)
        assert after == before[key] if "new" not in after else \
            len(set(before[key]) - set(after)) == 1
    sharder.remove_worker("new")
    assert {key: sharder.shard(key) for key in ks} == before
