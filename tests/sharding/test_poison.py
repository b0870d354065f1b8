"""The poison-tenant detector, driven with an injected clock (plain integers)."""

from __future__ import annotations

from cellcloud.core.poison import PoisonDetector, PoisonParams, Throttle


def test_first_crash_throttles_with_k2_before_the_retry() -> None:
    d = PoisonDetector(PoisonParams.for_shard(2, cooldown_ms=1000))
    assert d.allowed("f", 0) is True
    t = d.on_env_crash("f", "w1", 10)
    assert isinstance(t, Throttle) and t.reason == "WorkersKilled" and t.retry_after_ms == 1000
    a = d.allowed("f", 20)  # the retry on w2 is refused: w2 survives
    assert isinstance(a, Throttle) and a.retry_after_ms == 990
    assert d.allowed("other", 20) is True


def test_k3_needs_two_distinct_workers() -> None:
    d = PoisonDetector(PoisonParams.for_shard(3))
    assert d.on_env_crash("f", "w1", 0) is None
    assert d.on_timeout("f", "w1", 1) is None  # same worker again
    assert d.allowed("f", 2) is True
    t = d.on_timeout("f", "w2", 3)
    assert isinstance(t, Throttle) and t.reason == "WorkersKilled"


def test_window_forgets_old_failures() -> None:
    d = PoisonDetector(PoisonParams.for_shard(3, window_ms=100))
    d.on_env_crash("f", "w1", 0)
    assert d.on_env_crash("f", "w2", 100) is None  # w1's crash fell out of the window
    assert d.on_env_crash("f", "w3", 150) is not None


def test_failure_rate_budget() -> None:
    p = PoisonParams(killed_workers_max=5, ratio_min_samples=10, failure_ratio_max=0.5)
    d = PoisonDetector(p)
    now = 0
    for _ in range(6):
        d.on_success("f", "w1", now)
        now += 1
    for _ in range(3):
        assert d.on_env_crash("f", "w1", now) is None
        now += 1
    t = d.on_env_crash("f", "w1", now)  # 4 of 10 < 50%
    assert t is None
    t = d.on_env_crash("f", "w1", now + 1)  # 5 of 11 < 50%
    assert t is None
    t = d.on_env_crash("f", "w1", now + 2)  # 6 of 12 ≥ 50%
    assert isinstance(t, Throttle) and t.reason == "FailureRate"


def test_cooldown_probation_backoff_and_recovery() -> None:
    p = PoisonParams(killed_workers_max=1, cooldown_ms=100, cooldown_max_ms=250,
                     probation_successes=2)
    d = PoisonDetector(p)
    d.on_env_crash("f", "w1", 0)
    assert isinstance(d.allowed("f", 99), Throttle)
    assert d.on_env_crash("f", "w2", 50) is None  # in-flight failures while throttled: ignored
    assert d.allowed("f", 100) is True and d.state("f") == "probation"
    t = d.on_env_crash("f", "w1", 110)  # fails again: cool-down doubles
    assert isinstance(t, Throttle) and t.reason == "ProbationFailure" and t.retry_after_ms == 200
    assert d.allowed("f", 310) is True
    t = d.on_env_crash("f", "w1", 311)  # doubled again, capped at 250
    assert t is not None and t.retry_after_ms == 250
    assert d.allowed("f", 561) is True
    d.on_success("f", "w1", 562)
    d.on_success("f", "w2", 563)
    assert d.state("f") == "ok"
    t = d.on_env_crash("f", "w1", 600)  # level reset: back to the base cool-down
    assert t is not None and t.retry_after_ms == 100


def test_memory_is_bounded() -> None:
    p = PoisonParams(killed_workers_max=1, functions_max=3, events_per_function_max=4)
    d = PoisonDetector(p)
    d.on_env_crash("poison", "w1", 0)
    for i in range(10):
        d.on_success(f"f{i}", "w1", i)
    s = d.statistics()
    assert s["functions"] == 3 and s["throttled"] == ["poison"] and s["evicted"] == 8
    for i in range(100):
        d.on_success("g", "w1", i)
    assert len(d._fns["g"].events) <= 4
