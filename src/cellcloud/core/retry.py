"""Retry policy as pure functions and small state machines: no clock, no randomness of its own.

Everything here takes ``now_ms`` and a seeded ``random.Random`` from the caller, so tests drive
it with an injected clock and never sleep.

- :func:`backoff_ms`: capped exponential backoff with full jitter (Builders' Library,
  "Timeouts, retries and backoff with jitter").
- :class:`RetryBudget`: a token bucket that lets retries add at most a fixed fraction of load;
  a retry that finds the bucket empty waits instead of adding to an overload.
- :class:`AsyncPolicy` and :func:`decide`: what the dispatcher does with the outcome of one
  delivery attempt of an async event (Lambda's semantics for ``MaximumRetryAttempts`` and
  ``MaximumEventAgeInSeconds``).
- :func:`lease_expiry_ms`: how long a dispatcher may hold an in-flight event before another
  may take it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

retry_attempts_max = 2
retry_attempts_default = 2
event_age_s_min = 60
event_age_s_max = 21_600
event_age_s_default = 21_600
backoff_base_ms = 1_000
backoff_cap_ms = 30_000
#: extra wait for a retry that found the retry budget empty
budget_empty_delay_ms = 5_000
#: an in-flight event's lease outlives the function's timeout by this much
lease_margin_ms = 30_000  # > the dispatcher's invoke slack + destination timeouts


def backoff_ms(attempt: int, rng: random.Random, *, base_ms: int = backoff_base_ms,
               cap_ms: int = backoff_cap_ms) -> int:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]. ``attempt`` counts from 0."""
    assert attempt >= 0 and base_ms > 0 and cap_ms >= base_ms
    ceiling = min(cap_ms, base_ms * (1 << min(attempt, 32)))
    return rng.randint(0, ceiling)


class RetryBudget:
    """A token bucket: each first attempt earns ``ratio`` tokens, each retry spends one; tokens
    also refill at ``refill_per_s`` and never exceed ``tokens_max``. With ``ratio=0.1`` retries
    add at most ~10 % load on top of first attempts, however bad things get."""

    def __init__(self, *, tokens_max: float = 50.0, ratio: float = 0.1,
                 refill_per_s: float = 1.0, now_ms: int = 0) -> None:
        assert tokens_max > 0 and ratio >= 0 and refill_per_s >= 0
        self.tokens_max = tokens_max
        self.ratio = ratio
        self.refill_per_s = refill_per_s
        self.tokens = tokens_max
        self._at_ms = now_ms
        self.spent = 0
        self.refused = 0

    def _refill(self, now_ms: int) -> None:
        if now_ms > self._at_ms:
            self.tokens = min(self.tokens_max,
                              self.tokens + (now_ms - self._at_ms) / 1000 * self.refill_per_s)
            self._at_ms = now_ms

    def on_first_attempt(self, now_ms: int) -> None:
        self._refill(now_ms)
        self.tokens = min(self.tokens_max, self.tokens + self.ratio)

    def try_spend(self, now_ms: int) -> bool:
        """Take one token for a retry; False (and nothing taken) when the bucket is empty."""
        self._refill(now_ms)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.spent += 1
            return True
        self.refused += 1
        return False

    def statistics(self) -> dict[str, float]:
        return {"tokens": round(self.tokens, 2), "spent": self.spent, "refused": self.refused}


@dataclass(frozen=True)
class AsyncPolicy:
    """A function's async settings (PutFunctionEventInvokeConfig)."""

    retry_attempts_max: int = retry_attempts_default
    event_age_ms_max: int = event_age_s_default * 1000
    on_success: str | None = None
    on_failure: str | None = None


class Outcome(Enum):
    SUCCESS = "success"  # the handler returned
    FUNCTION_ERROR = "function_error"  # the handler raised or timed out: counts as an attempt
    THROTTLED = "throttled"  # 429 from the cell: not the function's fault, retried within age
    PLATFORM_ERROR = "platform_error"  # 5xx or transport failure: retried within age
    REJECTED = "rejected"  # 4xx other than 429 (function deleted, bad payload): no retry
    #: the function's reserved concurrency is 0: it may not run at all, so (as Lambda) the
    #: event goes to the on-failure destination at once, without retries
    ZERO_CONCURRENCY = "zero_concurrency"


@dataclass(frozen=True)
class Succeed:
    destination: str | None


@dataclass(frozen=True)
class Retry:
    at_ms: int
    counts_as_attempt: bool


@dataclass(frozen=True)
class Fail:
    condition: str  # RetriesExhausted | EventAgeExceeded | Rejected | ZeroReservedConcurrency
    destination: str | None


Decision = Succeed | Retry | Fail


def decide(outcome: Outcome, *, attempts_done: int, accepted_ms: int, now_ms: int,
           policy: AsyncPolicy, rng: random.Random, budget: RetryBudget | None = None,
           platform_retries: int = 0) -> Decision:
    """The next step for an event after one delivery attempt.

    ``attempts_done`` counts the function-error attempts so far including this one;
    ``platform_retries`` counts throttles/platform failures so far (for the backoff exponent).

    An event is discarded for age only once it is older than ``event_age_ms_max``: a retry
    whose backoff would land past that is planned for the moment the event reaches it (where
    :func:`too_old` then discards it unless it has run by then), not dropped early.
    """
    if outcome is Outcome.SUCCESS:
        return Succeed(policy.on_success)
    if outcome is Outcome.REJECTED:
        return Fail("Rejected", policy.on_failure)
    if outcome is Outcome.ZERO_CONCURRENCY:
        return Fail("ZeroReservedConcurrency", policy.on_failure)
    if outcome is Outcome.FUNCTION_ERROR:
        if attempts_done > policy.retry_attempts_max:
            return Fail("RetriesExhausted", policy.on_failure)
        exponent = attempts_done - 1
    else:
        exponent = platform_retries
    delay = backoff_ms(exponent, rng)
    if budget is not None and not budget.try_spend(now_ms):
        # No token: the retry still happens (an accepted event is never dropped), but only
        # after the cap, so a sick cell is not hammered.
        delay = budget_empty_delay_ms + delay
    if too_old(accepted_ms=accepted_ms, now_ms=now_ms, policy=policy):
        return Fail("EventAgeExceeded", policy.on_failure)
    at = min(now_ms + delay, accepted_ms + policy.event_age_ms_max)
    return Retry(at, counts_as_attempt=outcome is Outcome.FUNCTION_ERROR)


def too_old(*, accepted_ms: int, now_ms: int, policy: AsyncPolicy) -> bool:
    """Whether an event is older than its maximum age (then it is not attempted again)."""
    return now_ms - accepted_ms > policy.event_age_ms_max


def lease_expiry_ms(now_ms: int, function_timeout_s: int) -> int:
    """An in-flight event may be taken by another dispatcher after this."""
    return now_ms + function_timeout_s * 1000 + lease_margin_ms
