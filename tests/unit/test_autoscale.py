"""Target-tracking scaling (core/autoscale.py): per-second samples, a stable window (60 s) and
a panic window (6 s), cooldowns, min/max, DisableScaleIn, missing data, several policies on
one target, a restored scaler, and from zero on demand. Time is passed in: one sample a
second, as the shell takes them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core.autoscale import (
    Datapoint,
    Demand,
    Scaler,
    SetDesiredCount,
    TargetTracking,
    decide,
)

S = 1_000


def _policy(**over: object) -> TargetTracking:
    kw: dict[str, object] = {"target_value": 50.0, "min_capacity": 1, "max_capacity": 20,
                             "scale_out_cooldown_ms": 0, "scale_in_cooldown_ms": 30 * S}
    kw.update(over)
    return TargetTracking(**kw)  # type: ignore[arg-type]


def _run(sc: Scaler, loads: list[float | None], current: int, start_s: int = 0
         ) -> tuple[list[tuple[int, int]], int]:
    """One sample a second of a total load (None: not measured), spread over every task:
    [(second, count)] of the decisions, and the capacity at the end."""
    out = []
    for i, load in enumerate(loads):
        t = start_s + i
        value = None if load is None else load / max(current, 1)
        for d in sc.handle(Datapoint(value, current), t * S):
            out.append((t, d.count))
            current = d.count
    return out, current


def test_a_step_panics_and_reaches_the_wanted_capacity_within_seconds() -> None:
    sc = Scaler(_policy())
    got, cur = _run(sc, [30.0] * 60, current=1)
    assert got == [] and cur == 1  # 30 per task, target 50: steady
    # a step to 500 (10 tasks' worth): the panic window (6 s) is over 2x at once
    got, cur = _run(sc, [500.0] * 6, current=1, start_s=60)
    assert got[0] == (60, 3)  # ceil((5 × 30 + 500) / 6 / 50): the first second
    assert cur == 10 and got[-1][0] <= 65  # the whole need within the panic window
    assert [c for _, c in got] == sorted(c for _, c in got)  # only up while panicking


def test_no_scale_in_while_panicking_then_back_to_min_within_cooldown_plus_a_window() -> None:
    sc = Scaler(_policy(scale_in_cooldown_ms=30 * S))
    _run(sc, [30.0] * 60, current=1)
    _, cur = _run(sc, [500.0] * 30, current=1, start_s=60)
    assert cur == 10 and sc.panic_until_ms is not None
    panic_until = sc.panic_until_ms // S  # a stable window after its last sample over 2x
    got, cur = _run(sc, [0.0] * 200, current=cur, start_s=90)
    assert cur == 1
    first, last = got[0][0], got[-1][0]
    assert first >= panic_until  # no scale-in while panicking
    assert last - 90 <= 30 + 60  # the goal: back at min within the cooldown plus a minute
    assert all(b - a >= 30 for (a, _), (b, _) in zip(got, got[1:], strict=False))


def test_stable_window_scales_out_without_panic_and_in_after_the_cooldown() -> None:
    sc = Scaler(_policy(scale_in_cooldown_ms=30 * S))
    got, cur = _run(sc, [120.0] * 5, current=2)  # 60 per task: over, not 2x
    assert got == [(0, 3)] and cur == 3  # ceil(120 / 50)
    # the load halves: stable average falls; a scale-in only once under 90 % (45 per task:
    # 135 in all) and 30 s after the scale-out
    got, cur = _run(sc, [60.0] * 120, current=3, start_s=5)
    assert got and got[0][0] >= 30 and cur == 2  # ceil(60 / 50)
    # 44 per task of 2 (88 < 90): not 10 % under the target; 46 of 2 tasks: neither
    sc2 = Scaler(_policy())
    assert _run(sc2, [92.0] * 200, current=2)[0] == []


def test_scale_out_cooldown_allows_only_a_larger_step() -> None:
    sc = Scaler(_policy(scale_out_cooldown_ms=60 * S))
    got, _ = _run(sc, [150.0] * 3, current=2)  # 75 per task: ceil(150 / 50) = 3
    assert got == [(0, 3)]
    # the count not applied yet (still 2 tasks): within the cooldown, the same 3: nothing
    assert sc.handle(Datapoint(75.0, 2), 4 * S) == []
    # a larger need within the cooldown: at once
    assert sc.handle(Datapoint(200.0, 2), 5 * S)[0].count > 3


def test_disable_scale_in_min_and_max() -> None:
    sc = Scaler(_policy(disable_scale_in=True))
    assert _run(sc, [1.0] * 200, current=6)[0] == []
    sc = Scaler(_policy(min_capacity=3))
    assert _run(sc, [1.0] * 100, current=6)[1] == 3
    sc = Scaler(_policy(max_capacity=4))
    assert _run(sc, [5000.0] * 10, current=2)[1] == 4


def test_missing_data_decides_nothing_and_a_new_scaler_waits_a_window_to_scale_in() -> None:
    sc = Scaler(_policy())
    assert _run(sc, [None] * 100, current=2)[0] == []
    sc = Scaler(_policy(scale_in_cooldown_ms=0))
    got, _ = _run(sc, [10.0] * 70, current=4)
    assert got == [(60, 1)]  # a whole stable window observed first


def test_several_policies_out_if_any_in_only_if_all() -> None:
    cpu, req = Scaler(_policy(scale_in_cooldown_ms=0)), Scaler(_policy(target_value=100.0,
                                                                       scale_in_cooldown_ms=0))
    for t in range(61):  # cpu: 10 per task of 4 (wants 1); requests: 380 of 4 (wants 4)
        cpu.observe(Datapoint(10.0, 4), t * S)
        req.observe(Datapoint(95.0, 4), t * S)
    assert decide([cpu, req], 4, 60 * S) is None  # requests want no scale-in: none
    # requests low too: the larger of the two wishes
    cpu2, req2 = Scaler(_policy(scale_in_cooldown_ms=0)), Scaler(_policy(
        target_value=100.0, scale_in_cooldown_ms=0))
    for t in range(61):
        cpu2.observe(Datapoint(10.0, 4), t * S)  # wants ceil(40 / 50) = 1
        req2.observe(Datapoint(60.0, 4), t * S)  # wants ceil(240 / 100) = 3
    assert decide([cpu2, req2], 4, 60 * S) == SetDesiredCount(3, "metric 60 under target 100")
    # cpu high: out, whatever requests say; both policies' cooldowns start
    for t in range(61, 67):  # 150 per task: the panic window goes over 2x within 6 s
        cpu.observe(Datapoint(150.0, 4), t * S)
        req.observe(Datapoint(10.0, 4), t * S)
        d = decide([cpu, req], 4, t * S)
        if d is not None:
            break
    assert d is not None and d.count > 4
    assert cpu.last_scale_out_ms == req.last_scale_out_ms == t * S


def test_a_restored_scaler_keeps_its_cooldowns_and_panic() -> None:
    sc = Scaler(_policy(scale_in_cooldown_ms=600 * S))
    _run(sc, [30.0] * 60, current=1)
    _run(sc, [500.0] * 10, current=1, start_s=60)
    back = Scaler.restored(sc.policy, sc.snapshot())
    assert back.snapshot() == sc.snapshot() and back.last_scale_out_ms is not None
    # low load for 5 minutes: the scale-in cooldown (10 min from the last scale-out) holds
    assert _run(back, [0.0] * 300, current=10, start_s=70)[0] == []
    assert Scaler.restored(sc.policy, None).snapshot()["last_scale_out_ms"] is None


def test_scale_to_zero_and_back_on_demand() -> None:
    sc = Scaler(_policy(min_capacity=0, scale_in_cooldown_ms=0))
    assert _run(sc, [0.0] * 61, current=1)[1] == 0
    assert sc.handle(Demand(waiting=0, current=0), 100 * S) == []
    assert sc.handle(Demand(waiting=3, current=0), 100 * S) == [
        SetDesiredCount(1, "3 requests waiting at zero tasks")]
    assert sc.handle(Demand(waiting=3, current=1), 100 * S) == []


def test_a_capacity_outside_the_range_is_brought_back() -> None:
    sc = Scaler(_policy(min_capacity=2, max_capacity=4))
    assert sc.handle(Datapoint(50, 7), 0) == [SetDesiredCount(4, "capacity out of range")]
    assert sc.handle(Datapoint(50, 0), S) == [SetDesiredCount(2, "capacity out of range")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 2000)), max_size=150),
       st.integers(0, 5), st.integers(0, 12), st.booleans(), st.integers(0, 90),
       st.integers(0, 90))
def test_decisions_stay_in_range_and_scale_in_waits(
        loads: list[float | None], lo: int, span: int, disable_in: bool, in_cool_s: int,
        out_cool_s: int) -> None:
    p = _policy(min_capacity=lo, max_capacity=lo + span, disable_scale_in=disable_in,
                scale_in_cooldown_ms=in_cool_s * S, scale_out_cooldown_ms=out_cool_s * S)
    sc = Scaler(p)
    current, last_any, last_out, last_out_to, panic_until = lo, None, None, 0, -1
    for i, load in enumerate(loads):
        now = i * S
        value = None if load is None else load / max(current, 1)
        for d in sc.handle(Datapoint(value, current), now):
            assert p.min_capacity <= d.count <= p.max_capacity
            assert d.count != current
            if d.count < current:
                assert not disable_in
                assert now >= panic_until  # never while panicking
                assert last_any is None or now - last_any >= p.scale_in_cooldown_ms
                assert now >= p.stable_window_ms  # a whole window observed
            elif last_out is not None and now - last_out < p.scale_out_cooldown_ms:
                assert d.count > last_out_to  # within the cooldown, only further
            if d.count > current:
                last_out, last_out_to = now, d.count
            last_any = now
            current = d.count
        if sc.panic_until_ms is not None:
            panic_until = sc.panic_until_ms
