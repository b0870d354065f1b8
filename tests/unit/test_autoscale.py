"""Target-tracking scaling (core/autoscale.py): scale out after 3 high periods, in after 15
low ones, cooldowns, min/max, disableScaleIn, missing data, and from zero on demand."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.autoscale import Datapoint, Demand, Scaler, SetDesiredCount, TargetTracking

MIN = 60_000


def _policy(**over: object) -> TargetTracking:
    kw: dict[str, object] = {"target_value": 50.0, "min_capacity": 1, "max_capacity": 10}
    kw.update(over)
    return TargetTracking(**kw)  # type: ignore[arg-type]


def _feed(sc: Scaler, values: list[float | None], current: int, start_ms: int = 0
          ) -> list[tuple[int, SetDesiredCount]]:
    out = []
    for i, v in enumerate(values):
        now = start_ms + i * MIN
        for d in sc.handle(Datapoint(v, current), now):
            out.append((now, d))
            current = d.count
    return out


def test_scale_out_after_three_high_periods_to_the_proportional_capacity() -> None:
    sc = Scaler(_policy())
    got = _feed(sc, [90, 90, 90], current=2)
    assert got == [(2 * MIN, SetDesiredCount(4, "metric 90 over target 50"))]  # ceil(2*90/50)


def test_a_dip_resets_the_streak() -> None:
    sc = Scaler(_policy())
    assert _feed(sc, [90, 90, 40, 90, 90], current=2) == []


def test_scale_out_is_capped_at_max() -> None:
    sc = Scaler(_policy(max_capacity=3))
    assert _feed(sc, [500, 500, 500], current=2)[0][1].count == 3


def test_scale_out_cooldown_allows_only_a_larger_step() -> None:
    sc = Scaler(_policy(max_capacity=50))
    assert _feed(sc, [100, 100, 100], current=2)[0][1].count == 4  # at minute 2
    # Within the cooldown, still high and the count not applied yet: the same wish, nothing.
    assert _feed(sc, [100, 100, 100], current=2, start_ms=3 * MIN) == []
    sc = Scaler(_policy(max_capacity=50))
    _feed(sc, [100, 100, 100], current=2)
    # Within the cooldown, a larger capacity is wanted (4 tasks still at 100 %): at once.
    assert _feed(sc, [100, 100, 100], current=4, start_ms=3 * MIN) == [
        (5 * MIN, SetDesiredCount(8, "metric 100 over target 50"))]


def test_scale_in_needs_fifteen_low_periods_and_respects_cooldowns() -> None:
    sc = Scaler(_policy())
    assert _feed(sc, [20] * 14, current=8) == []
    got = _feed(sc, [20], current=8, start_ms=14 * MIN)
    assert got == [(14 * MIN, SetDesiredCount(4, "metric 20 under target 50"))]  # ceil(8*.4)
    # Another 15 low periods right away: the scale-in cooldown (5 min) is long over by then.
    again = _feed(sc, [20] * 15, current=4, start_ms=15 * MIN)
    assert again[0][1].count == 2
    # 44 is under the target but not under 90 % of it (45): no scale-in.
    sc2 = Scaler(_policy())
    assert _feed(sc2, [46] * 30, current=8) == []


def test_no_scale_in_during_a_scale_out_cooldown() -> None:
    sc = Scaler(_policy(scale_out_cooldown_ms=30 * MIN))
    _feed(sc, [90, 90, 90], current=2)  # scale-out at minute 2
    assert _feed(sc, [10] * 20, current=4, start_ms=3 * MIN) == []  # minutes 3..22: cooldown
    assert _feed(sc, [10] * 15, current=4, start_ms=33 * MIN)[0][1].count == 1


def test_disable_scale_in_and_min_capacity() -> None:
    sc = Scaler(_policy(disable_scale_in=True))
    assert _feed(sc, [1] * 40, current=6) == []
    sc = Scaler(_policy(min_capacity=3))
    assert _feed(sc, [1] * 15, current=6)[0][1].count == 3


def test_missing_data_decides_nothing() -> None:
    sc = Scaler(_policy())
    assert _feed(sc, [90, 90, None, 90, 90], current=2) == []
    assert _feed(sc, [None] * 30, current=2) == []


def test_scale_to_zero_and_back_on_demand() -> None:
    sc = Scaler(_policy(min_capacity=0))
    got = _feed(sc, [0.0] * 15, current=1)
    assert got[0][1].count == 0
    assert sc.handle(Demand(waiting=0, current=0), 20 * MIN) == []
    assert sc.handle(Demand(waiting=3, current=0), 20 * MIN) == [
        SetDesiredCount(1, "3 requests waiting at zero tasks")]
    assert sc.handle(Demand(waiting=3, current=1), 20 * MIN) == []


def test_a_capacity_outside_the_range_is_brought_back() -> None:
    sc = Scaler(_policy(min_capacity=2, max_capacity=4))
    assert sc.handle(Datapoint(50, 7), 0) == [SetDesiredCount(4, "capacity out of range")]
    assert sc.handle(Datapoint(50, 0), MIN) == [SetDesiredCount(2, "capacity out of range")]


@given(st.lists(st.one_of(st.none(), st.floats(0, 1000)), max_size=60),
       st.integers(0, 5), st.integers(0, 12), st.booleans())
def test_decisions_stay_in_range_and_scale_in_waits(values: list[float | None], lo: int,
                                                    span: int, disable_in: bool) -> None:
    p = _policy(min_capacity=lo, max_capacity=lo + span, disable_scale_in=disable_in)
    sc = Scaler(p)
    current = lo
    low = 0
    for i, v in enumerate(values):
        low = low + 1 if v is not None and v < p.target_value * p.scale_in_ratio else 0
        for d in sc.handle(Datapoint(v, current), i * MIN):
            assert p.min_capacity <= d.count <= p.max_capacity
            if d.count < current:
                assert not disable_in and low >= p.scale_in_datapoints
            current = d.count
