"""The agent's layer-cache eviction decision (core/layer_cache.py): least recently used
layers no environment uses go first, until the cache fits its limit; layers in use or
protected never go, and what cannot be freed is reported."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.layer_cache import CachedLayer, evictions


def _l(h: str, size: int, used: int, users: int = 0) -> CachedLayer:
    return CachedLayer(h, size, used, users)


def test_a_cache_within_its_limit_forgets_nothing() -> None:
    d = evictions([_l("a", 40, 1), _l("b", 60, 2)], budget_bytes=100)
    assert d.evict == () and d.over_bytes == 0


def test_least_recently_used_go_first_until_it_fits() -> None:
    layers = [_l("new", 50, 30), _l("old", 50, 10), _l("mid", 50, 20), _l("older", 10, 5)]
    assert evictions(layers, budget_bytes=150).evict == ("older",)
    assert evictions(layers, budget_bytes=100).evict == ("older", "old")
    d = evictions(layers, budget_bytes=60)
    assert d.evict == ("older", "old", "mid") and d.over_bytes == 0


def test_layers_in_use_are_never_evicted_and_the_excess_is_reported() -> None:
    layers = [_l("busy-old", 80, 1, users=2), _l("idle", 30, 50), _l("busy", 40, 2, users=1)]
    d = evictions(layers, budget_bytes=100)
    assert d.evict == ("idle",)
    assert d.over_bytes == 20  # 120 held by live environments, limit 100


def test_a_protected_layer_stays_even_when_it_is_the_oldest() -> None:
    layers = [_l("just-unpacked", 70, 1), _l("other", 70, 2)]
    d = evictions(layers, budget_bytes=100, protect=frozenset({"just-unpacked"}))
    assert d.evict == ("other",) and d.over_bytes == 0


def test_ties_in_recency_break_by_digest() -> None:
    layers = [_l("b", 10, 7), _l("a", 10, 7), _l("c", 10, 7)]
    assert evictions(layers, budget_bytes=15).evict == ("a", "b")


_layer = st.builds(CachedLayer, st.text("0123456789abcdef", min_size=4, max_size=4),
                   st.integers(0, 1000), st.integers(0, 100), st.integers(0, 2))


@given(st.lists(_layer, max_size=20, unique_by=lambda layer: layer.hex),
       st.integers(0, 5000), st.frozensets(st.text("0123456789abcdef", min_size=4, max_size=4),
                                          max_size=3))
def test_properties(layers: list[CachedLayer], budget: int, protect: frozenset[str]) -> None:
    d = evictions(layers, budget_bytes=budget, protect=protect)
    by_hex = {layer.hex: layer for layer in layers}
    assert len(set(d.evict)) == len(d.evict)
    for h in d.evict:  # only unused, unprotected layers go
        assert by_hex[h].users == 0 and h not in protect
    kept = [layer for layer in layers if layer.hex not in d.evict]
    kept_bytes = sum(layer.size_bytes for layer in kept)
    assert d.over_bytes == max(0, kept_bytes - budget)
    if d.over_bytes:  # over only when every evictable layer is gone
        assert all(layer.users or layer.hex in protect for layer in kept)
    if d.evict:  # nothing more than needed: without the last one chosen it would not fit
        last = by_hex[d.evict[-1]]
        assert kept_bytes + last.size_bytes > budget
        # least recently used first: every kept evictable layer is at least as recent
        for layer in kept:
            if not layer.users and layer.hex not in protect:
                assert (layer.last_used_ms, layer.hex) > (last.last_used_ms, last.hex)
