"""The retry core with an injected clock and a seeded RNG: no sleeping, no wall time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import retry
from cellcloud.core.retry import AsyncPolicy, Fail, Outcome, Retry, RetryBudget, Succeed


@given(st.integers(0, 60), st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_a_capped_exponential(attempt: int, seed: int) -> None:
    d = retry.backoff_ms(attempt, random.Random(seed))
    assert 0 <= d <= min(retry.backoff_cap_ms, retry.backoff_base_ms * 2**attempt)


def test_backoff_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    draws = [retry.backoff_ms(3, rng) for _ in range(2000)]
    ceiling = retry.backoff_base_ms * 8
    assert min(draws) < ceiling * 0.1 and max(draws) > ceiling * 0.9  # full, not equal, jitter


def test_budget_refuses_when_empty_and_refills_with_time() -> None:
    b = RetryBudget(tokens_max=3, ratio=0.5, refill_per_s=1.0, now_ms=0)
    assert [b.try_spend(0) for _ in range(4)] == [True, True, True, False]
    b.on_first_attempt(0)
    b.on_first_attempt(0)  # two first attempts earn one token
    assert b.try_spend(0) and not b.try_spend(0)
    assert b.try_spend(1000)  # one second refills one token
    assert not b.try_spend(1000)
    b._refill(1_000_000)
    assert b.tokens == 3  # never above the maximum
    assert b.statistics()["refused"] == 3


def test_budget_limits_retries_to_a_fraction_of_first_attempts() -> None:
    b = RetryBudget(tokens_max=10, ratio=0.1, refill_per_s=0.0, now_ms=0)
    spent = 0
    for _ in range(1000):  # every first attempt fails and wants a retry, all at once
        b.on_first_attempt(0)
        spent += b.try_spend(0)
    assert spent <= 10 + 1000 * 0.1


def _decide(outcome: Outcome, attempts: int, now: int = 1000, policy: AsyncPolicy | None = None,
            budget: RetryBudget | None = None, platform: int = 0) -> retry.Decision:
    return retry.decide(outcome, attempts_done=attempts, accepted_ms=0, now_ms=now,
                        policy=policy or AsyncPolicy(on_success="s", on_failure="f"),
                        rng=random.Random(1), budget=budget, platform_retries=platform)


def test_success_goes_to_on_success() -> None:
    assert _decide(Outcome.SUCCESS, 0) == Succeed("s")


@pytest.mark.parametrize("max_retries", [0, 1, 2])
def test_function_errors_retry_max_retries_times_then_fail(max_retries: int) -> None:
    policy = AsyncPolicy(retry_attempts_max=max_retries, on_failure="dlq")
    for attempt in range(1, max_retries + 1):
        d = _decide(Outcome.FUNCTION_ERROR, attempt, policy=policy)
        assert isinstance(d, Retry) and d.counts_as_attempt
    assert _decide(Outcome.FUNCTION_ERROR, max_retries + 1, policy=policy) == \
        Fail("RetriesExhausted", "dlq")


def test_throttles_and_platform_errors_retry_until_the_event_is_too_old() -> None:
    policy = AsyncPolicy(event_age_ms_max=60_000, on_failure="dlq")
    for outcome in (Outcome.THROTTLED, Outcome.PLATFORM_ERROR):
        d = _decide(outcome, 0, now=1000, policy=policy, platform=50)
        assert isinstance(d, Retry) and not d.counts_as_attempt
        assert 1000 <= d.at_ms <= 1000 + retry.backoff_cap_ms
        assert _decide(outcome, 0, now=60_001, policy=policy) == Fail("EventAgeExceeded", "dlq")


def test_rejected_fails_at_once() -> None:
    assert _decide(Outcome.REJECTED, 0) == Fail("Rejected", "f")


def test_an_empty_budget_delays_a_retry_but_never_drops_it() -> None:
    empty = RetryBudget(tokens_max=1, ratio=0, refill_per_s=0, now_ms=0)
    empty.try_spend(0)
    d = _decide(Outcome.PLATFORM_ERROR, 0, now=1000, budget=empty)
    assert isinstance(d, Retry) and d.at_ms >= 1000 + retry.budget_empty_delay_ms


def test_lease_outlives_the_function_timeout() -> None:
    assert retry.lease_expiry_ms(5000, 3) == 5000 + 3000 + retry.lease_margin_ms


def test_an_event_is_discarded_for_age_only_once_it_is_older_than_the_maximum() -> None:
    # Issue #11: a retry whose backoff would land past the maximum age used to drop the event
    # at once, up to backoff_cap_ms early. Now it is planned for the moment the event reaches
    # its maximum age, and only an event older than that fails for age.
    policy = AsyncPolicy(event_age_ms_max=60_000, on_failure="dlq")
    now = 59_000
    delay = retry.backoff_ms(5, random.Random(1))
    assert now + delay > 60_000  # the seeded backoff lands past the limit
    d = retry.decide(Outcome.THROTTLED, attempts_done=0, accepted_ms=0, now_ms=now,
                     policy=policy, rng=random.Random(1), platform_retries=5)
    assert d == Retry(60_000, counts_as_attempt=False)
    d = retry.decide(Outcome.FUNCTION_ERROR, attempts_done=1, accepted_ms=0, now_ms=60_000,
                     policy=policy, rng=random.Random(1))
    assert isinstance(d, Retry) and d.at_ms == 60_000  # exactly at the maximum: not older
    assert not retry.too_old(accepted_ms=0, now_ms=60_000, policy=policy)
    assert retry.too_old(accepted_ms=0, now_ms=60_001, policy=policy)
    assert retry.decide(Outcome.THROTTLED, attempts_done=0, accepted_ms=0, now_ms=60_001,
                        policy=policy, rng=random.Random(1)) == Fail("EventAgeExceeded", "dlq")


def test_zero_reserved_concurrency_goes_to_on_failure_without_retries() -> None:
    for attempts, platform in ((0, 0), (0, 3)):
        assert _decide(Outcome.ZERO_CONCURRENCY, attempts, platform=platform) == \
            Fail("ZeroReservedConcurrency", "f")
