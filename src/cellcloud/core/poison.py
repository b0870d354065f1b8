"""Poison-tenant defence, sans-IO: a function whose invocations keep crashing or timing out
environments is throttled before it can take out every worker of its shard.

Events carry the time (``now_ms``); nothing here reads a clock. Per function:

    ok ──(a rule trips)──> throttled ──(cool-down over; next allowed())──> probation
    probation ──(probation_successes successes)──> ok       (cool-down level reset)
    probation ──(any crash/timeout)──> throttled            (cool-down doubled, ≤ cooldown_max_ms)

Rules, evaluated on every crash/timeout over the events of the last ``window_ms``:

1. *workers*: crashes/timeouts happened on ≥ ``killed_workers_max`` distinct workers. Set it to
   at most k-1 (:meth:`PoisonParams.for_shard`) so that at least one worker of a k-shard has not
   been hit when the function is stopped; the frontend asks :meth:`PoisonDetector.allowed`
   before every attempt, retries included, so with k = 2 a crash followed by a retry cannot
   reach the second worker.
2. *failure budget*: at least ``ratio_min_samples`` invocations ended in the window and the
   share of crashes/timeouts among them is ≥ ``failure_ratio_max``.

While throttled, further crashes/timeouts (invocations still in flight) are ignored. Memory is
bounded: ≤ ``events_per_function_max`` events per function (oldest dropped) and ≤
``functions_max`` functions (the least recently seen function that is not throttled goes first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

PoisonState = Literal["ok", "throttled", "probation"]


@dataclass(frozen=True)
class PoisonParams:
    window_ms: int = 60_000
    killed_workers_max: int = 1
    failure_ratio_max: float = 0.5
    ratio_min_samples: int = 10
    cooldown_ms: int = 30_000
    cooldown_max_ms: int = 600_000
    probation_successes: int = 3
    events_per_function_max: int = 256
    functions_max: int = 100_000

    @classmethod
    def for_shard(cls, k: int, **overrides: Any) -> PoisonParams:
        """Parameters for shards of k workers: throttle after k-1 distinct workers were hit."""
        return cls(killed_workers_max=max(1, k - 1), **overrides)

    def __post_init__(self) -> None:
        assert self.window_ms > 0 and self.killed_workers_max >= 1
        assert 0.0 < self.failure_ratio_max <= 1.0 and self.ratio_min_samples >= 1
        assert 0 < self.cooldown_ms <= self.cooldown_max_ms
        assert self.probation_successes >= 1
        assert self.events_per_function_max >= 1 and self.functions_max >= 1


@dataclass(frozen=True)
class Throttle:
    reason: str  # "WorkersKilled" | "FailureRate" | "ProbationFailure"
    retry_after_ms: int
    message: str = ""


@dataclass
class _Function:
    # (now_ms, worker_id, failed)
    events: deque[tuple[int, str, bool]] = field(default_factory=deque)
    state: PoisonState = "ok"
    until_ms: int = 0
    level: int = 0  # cool-down doublings
    reason: str = ""
    message: str = ""
    probation_ok: int = 0


@dataclass
class PoisonStats:
    throttles: int = 0
    refused: int = 0
    evicted: int = 0


class PoisonDetector:
    def __init__(self, params: PoisonParams | None = None) -> None:
        self.params = params or PoisonParams()
        self._fns: OrderedDict[str, _Function] = OrderedDict()
        self.stats = PoisonStats()

    # -- events ------------------------------------------------------------------------------
    def on_env_crash(self, function_key: str, worker_id: str, now_ms: int) -> Throttle | None:
        """An environment of the function died mid-invocation (crash, OOM, lost channel).
        Returns the throttle this event started, if any."""
        return self._failure(function_key, worker_id, now_ms, "crashed")

    def on_timeout(self, function_key: str, worker_id: str, now_ms: int) -> Throttle | None:
        return self._failure(function_key, worker_id, now_ms, "timed out")

    def on_success(self, function_key: str, worker_id: str, now_ms: int) -> None:
        fn = self._touch(function_key)
        self._record(fn, now_ms, worker_id, False)
        if fn.state == "probation":
            fn.probation_ok += 1
            if fn.probation_ok >= self.params.probation_successes:
                fn.state, fn.level, fn.probation_ok = "ok", 0, 0
                fn.events.clear()

    # -- the question the frontend asks before every attempt ----------------------------------
    def allowed(self, function_key: str, now_ms: int) -> bool | Throttle:
        fn = self._fns.get(function_key)
        if fn is None or fn.state != "throttled":
            return True
        if now_ms >= fn.until_ms:
            fn.state, fn.probation_ok = "probation", 0
            return True
        self.stats.refused += 1
        return Throttle(fn.reason, fn.until_ms - now_ms, fn.message)

    def state(self, function_key: str) -> PoisonState:
        fn = self._fns.get(function_key)
        return "ok" if fn is None else fn.state

    def statistics(self) -> dict[str, object]:
        throttled = sorted(k for k, f in self._fns.items() if f.state == "throttled")
        return {"functions": len(self._fns), "throttled": throttled,
                "throttles": self.stats.throttles, "refused": self.stats.refused,
                "evicted": self.stats.evicted}

    # -- inside --------------------------------------------------------------------------------
    def _touch(self, key: str) -> _Function:
        fn = self._fns.get(key)
        if fn is not None:
            self._fns.move_to_end(key)
            return fn
        if len(self._fns) >= self.params.functions_max:
            victim = next((k for k, f in self._fns.items() if f.state != "throttled"),
                          next(iter(self._fns)))
            del self._fns[victim]
            self.stats.evicted += 1
        fn = self._fns[key] = _Function()
        return fn

    def _record(self, fn: _Function, now_ms: int, worker_id: str, failed: bool) -> None:
        fn.events.append((now_ms, worker_id, failed))
        if len(fn.events) > self.params.events_per_function_max:
            fn.events.popleft()
        horizon = now_ms - self.params.window_ms
        while fn.events and fn.events[0][0] <= horizon:
            fn.events.popleft()

    def _failure(self, key: str, worker_id: str, now_ms: int, what: str) -> Throttle | None:
        p = self.params
        fn = self._touch(key)
        if fn.state == "throttled":
            return None
        self._record(fn, now_ms, worker_id, True)
        if fn.state == "probation":
            fn.level += 1
            return self._throttle(fn, now_ms, "ProbationFailure",
                                  f"the function {what} again on {worker_id} after its cool-down")
        workers = {w for _, w, failed in fn.events if failed}
        if len(workers) >= p.killed_workers_max:
            return self._throttle(
                fn, now_ms, "WorkersKilled",
                f"the function's invocations crashed or timed out on {len(workers)} distinct "
                f"workers within {p.window_ms} ms (limit {p.killed_workers_max})")
        failures = sum(1 for e in fn.events if e[2])
        total = len(fn.events)
        if total >= p.ratio_min_samples and failures >= p.failure_ratio_max * total:
            return self._throttle(
                fn, now_ms, "FailureRate",
                f"{failures} of the last {total} invocations crashed or timed out "
                f"(limit {p.failure_ratio_max:.0%})")
        return None

    def _throttle(self, fn: _Function, now_ms: int, reason: str, message: str) -> Throttle:
        cooldown = min(self.params.cooldown_ms << min(fn.level, 32), self.params.cooldown_max_ms)
        fn.state, fn.until_ms, fn.reason, fn.message = "throttled", now_ms + cooldown, reason, message
        fn.events.clear()
        self.stats.throttles += 1
        return Throttle(reason, cooldown, message)
