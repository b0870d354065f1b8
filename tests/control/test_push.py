"""The constant-work push schedule, driven with an injected clock."""

from __future__ import annotations

import pytest

from cellcloud.control.push import PushScheduler


def doc(v: int) -> dict[str, object]:
    return {"version": v, "cells": {}, "assignments": {}, "overrides": {}}


def test_constant_work_whole_map_every_interval() -> None:
    s = PushScheduler(push_interval_ms=1000, start_ms=0)
    for r in ("r2", "r1", "r3"):
        s.add_router(r, 0)
    counts = []
    for tick in range(5):
        now = tick * 1000
        d = doc(7)  # the map does not change: still one whole push per router per round
        pushes = s.on_tick(now, d)
        counts.append(len(pushes))
        assert [p.router_id for p in pushes] == ["r1", "r2", "r3"]
        assert all(p.doc is d and p.version == 7 for p in pushes)
        assert s.on_tick(now + 999, d) == []  # not due again before the interval
        for p in pushes:
            s.on_ack(p.router_id, p.version, now + 10)
    assert counts == [3, 3, 3, 3, 3]


def test_missed_rounds_are_skipped_not_bursted() -> None:
    s = PushScheduler(push_interval_ms=100, start_ms=0)
    s.add_router("r", 0)
    assert len(s.on_tick(0, doc(1))) == 1
    s.on_ack("r", 1, 1)
    assert len(s.on_tick(550, doc(1))) == 1
    assert s.next_push_ms == 600 and s.statistics()["rounds_missed"] == 4
    assert s.on_tick(599, doc(1)) == []


def test_in_flight_push_is_not_doubled_and_failures_are_counted() -> None:
    s = PushScheduler(push_interval_ms=100, start_ms=0, push_timeout_ms=250)
    s.add_router("slow", 0)
    s.add_router("ok", 0)
    assert len(s.on_tick(0, doc(1))) == 2
    s.on_ack("ok", 1, 5)
    assert [p.router_id for p in s.on_tick(100, doc(1))] == ["ok"]  # "slow" still in flight
    s.on_ack("ok", 1, 105)
    assert s.statistics()["skipped_in_flight"] == 1
    assert [p.router_id for p in s.on_tick(300, doc(1))] == ["ok", "slow"]  # timed out: again
    s.on_push_failed("slow", 310, "connection refused")
    st = {r.router_id: r for r in s.status(310)}
    assert st["slow"].failures == 1 and st["slow"].stale  # 310 ms > 3 intervals


def test_stale_routers_and_min_acked_version() -> None:
    s = PushScheduler(push_interval_ms=100, start_ms=0, stale_after_ms=300)
    assert s.min_acked_version() is None
    s.add_router("a", 0)
    s.add_router("b", 0)
    for p in s.on_tick(0, doc(1)):
        s.on_ack(p.router_id, 1, 1)
    assert s.min_acked_version() == 1
    now = 100
    while now <= 1000:
        for p in s.on_tick(now, doc(2)):
            if p.router_id == "a":
                s.on_ack("a", p.version, now + 1)
            else:
                s.on_push_failed("b", now + 1, "timeout")
        now += 100
    assert s.min_acked_version() == 1
    st = {r.router_id: r for r in s.status(1001)}
    assert not st["a"].stale and st["a"].acked_version == 2
    assert st["b"].stale and "no acknowledgement" in st["b"].reason and "timeout" in st["b"].reason
    s.on_ack("b", 1, 1002)  # it answers, but with an old version
    st = {r.router_id: r for r in s.status(1003)}
    assert st["b"].stale and "at version 1" in st["b"].reason
    s.on_ack("b", 2, 1004)
    assert not any(r.stale for r in s.status(1005)) and s.min_acked_version() == 2


def test_version_may_not_go_back() -> None:
    s = PushScheduler(push_interval_ms=10, start_ms=0)
    s.on_tick(0, doc(5))
    with pytest.raises(ValueError, match="went back"):
        s.on_tick(10, doc(4))
