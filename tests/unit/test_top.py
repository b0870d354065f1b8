"""``cellcloud top``'s arithmetic (top_cli.py): histogram quantiles, rates between two
scrapes, agents' failed state."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cellcloud import top_cli


def _exposition(invocations: int, errors: int, durations: list[float]) -> str:
    reg = CollectorRegistry()
    inv = Counter("cellcloud_invocations", "", ["account", "function"], registry=reg)
    err = Counter("cellcloud_function_errors", "", ["account", "function"], registry=reg)
    dur = Histogram("cellcloud_invocation_duration_seconds", "", ["account", "function"],
                    registry=reg)
    inv.labels("1", "f").inc(invocations)
    err.labels("1", "f").inc(errors)
    for d in durations:
        dur.labels("1", "f").observe(d)
    return generate_latest(reg).decode()


def test_quantile_interpolates_within_a_bucket_like_histogram_quantile() -> None:
    buckets = {0.1: 0.0, 0.2: 100.0, 0.5: 100.0, math.inf: 100.0}
    assert math.isclose(top_cli.quantile(0.5, buckets) or 0, 0.15)
    assert math.isclose(top_cli.quantile(0.99, buckets) or 0, 0.199)
    assert top_cli.quantile(0.5, {math.inf: 0.0}) is None
    assert top_cli.quantile(0.99, {1.0: 1.0, math.inf: 2.0}) == 1.0  # the +Inf bucket: its floor


def test_rates_and_window_quantiles_between_two_scrapes() -> None:
    before = top_cli.parse_metrics(_exposition(10, 1, [0.01] * 10), at_s=100.0)
    now = top_cli.parse_metrics(_exposition(30, 2, [0.01] * 10 + [0.2] * 20), at_s=110.0)
    (row,) = top_cli.function_rows(now, before)
    assert (row.account, row.function, row.invocations, row.errors) == ("1", "f", 30, 2)
    assert row.rate_per_s == 2.0
    # the window saw only 0.2 s invocations: both quantiles in (0.1, 0.25]
    assert row.p50_s is not None and 0.1 < row.p50_s <= 0.25
    assert row.p99_s is not None and row.p50_s <= row.p99_s <= 0.25
    (first,) = top_cli.function_rows(before, None)
    assert first.rate_per_s is None and first.p50_s is not None and first.p50_s <= 0.025


def test_agents_failed_when_unreachable_or_lost() -> None:
    status = {"cells": {
        "c1": {"shards": {"failed_agents": {"a2": {"error": "gone"}}},
               "agents": {"a1": {"envs": [{"busy": True}, {"busy": False}]},
                          "a2": {"envs": []},
                          "a3": {"error": "connection refused"}}},
        "c2": {"cell_id": "c2", "error": "timed out"}}}
    rows = {(r.cell, r.agent): r for r in top_cli.agent_rows(status)}
    assert (rows["c1", "a1"].state, rows["c1", "a1"].envs, rows["c1", "a1"].busy) == ("ok", 2, 1)
    assert rows["c1", "a2"].state == "failed" and rows["c1", "a2"].detail == "gone"
    assert rows["c1", "a3"].state == "failed" and "refused" in rows["c1", "a3"].detail
    assert rows["c2", "-"].state == "failed"
