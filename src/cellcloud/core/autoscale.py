"""Target-tracking scaling, sans-IO (issue #17): Application Auto Scaling's
``TargetTrackingScaling`` for an ECS service's ``desiredCount``, decided the way Knative's
autoscaler does (a stable and a panic window over per-second samples), with time passed in.

The shell (frontend/services.py) feeds each policy's :class:`Scaler` one :class:`Datapoint`
per ``ecs_autoscale_sample_interval_ms`` (a second): the metric per task (the service's average
CPU, ``ECSServiceAverageCPUUtilization``, or its requests per task, ``ALBRequestCountPerTarget``,
a per-minute count as CloudWatch's), the tasks it was averaged over and the service's desired
count; then :func:`decide` asks every policy of the target and answers one
:class:`SetDesiredCount` or none. :class:`Demand` comes when requests wait for a service at
zero.

- **The load** is kept as a total (metric × the tasks measured), so a sample taken before a
  scale-out does not count twice: wanted = ``ceil(total / target)`` — AAS's
  ``ceil(current × metric / target)`` when every task is measured — within [min, max].
- **Stable window** (``stable_window_ms``, 60 s): the average of the samples in it; over the
  target (wanted > current) → scale out; under ``scale_in_ratio`` (90 %) of the target per
  task, with a whole window observed, → scale in to the wanted capacity, never under min,
  never with ``disable_scale_in``, never within ``scale_in_cooldown_ms`` of the last scaling
  activity (out or in: a scale-out is not undone in a cooldown).
- **Panic window** (``panic_window_ms``, 6 s): when its average per task exceeds
  ``panic_ratio`` (2×) the target, scale out at once to the panic window's wanted capacity,
  and panic for a stable window from then (each such sample extends it): meanwhile the
  capacity only grows (never a scale-in).
- **Scale-out cooldown**: within ``scale_out_cooldown_ms`` of the last scale-out, a further one
  only to a larger capacity than it asked for (AAS: capacity just added counts towards the
  next).
- **Several policies on one target** (:func:`decide`): out if any policy wants out (the largest
  capacity), in only if all want in (the largest of their capacities); a decision starts the
  cooldowns of every policy of the target.
- A missing sample (no task measured) adds nothing: the windows average what they have; a
  window with nothing decides nothing.
- **From zero**: with ``min_capacity`` 0 a service can scale to zero; a request waiting at the
  router (``Demand``) brings it to ``max(1, min)`` at once (Knative's activator idea: the
  router holds the request meanwhile).
- :meth:`Scaler.snapshot` / :meth:`Scaler.restored`: the cooldowns and the panic (not the
  samples: a restored scaler observes a whole stable window again before it scales in).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .limits import DEFAULT_LIMITS

# The Application Auto Scaling API's JSON target prefix (control/autoscaling.py)
TARGET_PREFIX = "AnyScaleFrontendService."
_EPS = 1e-9  # ceil(40.000000001 / 20) is 2, not 3


@dataclass(frozen=True)
class TargetTracking:
    target_value: float
    min_capacity: int
    max_capacity: int
    scale_out_cooldown_ms: int = 300_000  # AAS's default for ECS services
    scale_in_cooldown_ms: int = 300_000
    disable_scale_in: bool = False
    stable_window_ms: int = DEFAULT_LIMITS.ecs_autoscale_stable_window_ms
    panic_window_ms: int = DEFAULT_LIMITS.ecs_autoscale_panic_window_ms
    panic_ratio: float = 2.0  # Knative's panic threshold: 200 % of the target
    scale_in_ratio: float = 0.9  # AAS's low alarm: 90 % of the target

    def __post_init__(self) -> None:
        assert self.target_value > 0, self
        assert 0 <= self.min_capacity <= self.max_capacity, self
        assert self.scale_out_cooldown_ms >= 0 and self.scale_in_cooldown_ms >= 0, self
        assert 0 < self.panic_window_ms <= self.stable_window_ms, self
        assert self.panic_ratio > 1 and 0 < self.scale_in_ratio <= 1, self


@dataclass(frozen=True)
class Datapoint:
    value: float | None  # the metric per task now; None: missing
    current: int  # the service's desired count now
    tasks: int | None = None  # the tasks the value averages (None: ``current``)


@dataclass(frozen=True)
class Demand:
    waiting: int  # requests held at the router for this service
    current: int


@dataclass(frozen=True)
class SetDesiredCount:
    count: int
    reason: str
    by: str = ""  # the policy whose wish it is (its Scaler's name)


@dataclass(frozen=True)
class Proposal:
    count: int  # the capacity this policy wants (!= current)
    reason: str
    by: str = ""


@dataclass
class Scaler:
    policy: TargetTracking
    name: str = ""  # the policy's name (SetDesiredCount.by)
    samples: deque[tuple[int, float]] = field(default_factory=deque)  # (ms, total load)
    first_ms: int | None = None  # the first sample this scaler saw
    panic_until_ms: int | None = None
    last_scale_out_ms: int | None = None
    last_scale_out_to: int = 0
    last_scale_in_ms: int | None = None
    history: list[tuple[int, int, str]] = field(default_factory=list)  # (ms, count, reason)

    # -- samples -------------------------------------------------------------------------------
    def observe(self, dp: Datapoint, now_ms: int) -> None:
        if self.first_ms is None:
            self.first_ms = now_ms
        if dp.value is not None:
            tasks = dp.current if dp.tasks is None else dp.tasks
            self.samples.append((now_ms, max(dp.value, 0.0) * max(tasks, 0)))
        while self.samples and self.samples[0][0] <= now_ms - self.policy.stable_window_ms:
            self.samples.popleft()

    def _average(self, window_ms: int, now_ms: int) -> float | None:
        got = [v for t, v in self.samples if t > now_ms - window_ms]
        return sum(got) / len(got) if got else None

    def _wanted(self, total: float) -> int:
        p = self.policy
        return min(max(math.ceil(total / p.target_value - _EPS), p.min_capacity),
                   p.max_capacity)

    # -- one policy's wish ---------------------------------------------------------------------
    def propose(self, current: int, now_ms: int) -> Proposal | None:
        """The capacity this policy wants now (None: it keeps the current one)."""
        p = self.policy
        if current < p.min_capacity or current > p.max_capacity:  # the range moved
            return Proposal(min(max(current, p.min_capacity), p.max_capacity),
                            "capacity out of range", self.name)
        stable = self._average(p.stable_window_ms, now_ms)
        panic = self._average(p.panic_window_ms, now_ms)
        if stable is None or panic is None:
            return None
        per_task = panic / max(current, 1)
        if per_task > p.panic_ratio * p.target_value:
            self.panic_until_ms = now_ms + p.stable_window_ms
        panicking = self.panic_until_ms is not None and now_ms < self.panic_until_ms
        wanted = self._wanted(stable)
        reason = f"metric {stable / max(current, 1):g} over target {p.target_value:g}"
        if panicking and self._wanted(panic) > wanted:
            wanted = self._wanted(panic)
            reason = (f"metric {per_task:g} over {p.panic_ratio:g}x target "
                      f"{p.target_value:g} in the last {p.panic_window_ms / 1000:g} s (panic)")
        if wanted > current:
            in_cooldown = (self.last_scale_out_ms is not None
                           and now_ms - self.last_scale_out_ms < p.scale_out_cooldown_ms)
            if in_cooldown and wanted <= self.last_scale_out_to:
                return None
            return Proposal(wanted, reason, self.name)
        if wanted >= current or panicking or p.disable_scale_in:
            return None
        if stable >= p.target_value * p.scale_in_ratio * current:
            return None  # under the target, but not by 10 %
        assert self.first_ms is not None
        if now_ms - self.first_ms < p.stable_window_ms:
            return None  # not a whole window observed yet (a new or restored scaler)
        last = max(self.last_scale_in_ms or -1, self.last_scale_out_ms or -1)
        if last >= 0 and now_ms - last < p.scale_in_cooldown_ms:
            return None
        return Proposal(wanted, f"metric {stable / max(current, 1):g} under target "
                                f"{p.target_value:g}", self.name)

    def applied(self, count: int, current: int, now_ms: int, reason: str) -> None:
        """The target's capacity was set from ``current`` to ``count``."""
        if count > current:
            self.last_scale_out_ms, self.last_scale_out_to = now_ms, count
        else:
            self.last_scale_in_ms = now_ms
        self.history.append((now_ms, count, reason))
        del self.history[:-DEFAULT_LIMITS.ecs_service_events_max]

    # -- one policy alone ----------------------------------------------------------------------
    def handle(self, stimulus: Datapoint | Demand, now_ms: int) -> list[SetDesiredCount]:
        if isinstance(stimulus, Demand):
            return demand([self], stimulus, now_ms)
        self.observe(stimulus, now_ms)
        out = decide([self], stimulus.current, now_ms)
        return [out] if out is not None else []

    # -- kept across a restart -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"panic_until_ms": self.panic_until_ms,
                "last_scale_out_ms": self.last_scale_out_ms,
                "last_scale_out_to": self.last_scale_out_to,
                "last_scale_in_ms": self.last_scale_in_ms}

    @classmethod
    def restored(cls, policy: TargetTracking, snap: dict[str, Any] | None, name: str = ""
                 ) -> Scaler:
        sc = cls(policy, name)
        if snap:
            sc.panic_until_ms = _opt_int(snap.get("panic_until_ms"))
            sc.last_scale_out_ms = _opt_int(snap.get("last_scale_out_ms"))
            sc.last_scale_out_to = int(snap.get("last_scale_out_to") or 0)
            sc.last_scale_in_ms = _opt_int(snap.get("last_scale_in_ms"))
        return sc


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def decide(scalers: Sequence[Scaler], current: int, now_ms: int) -> SetDesiredCount | None:
    """The target's decision from all its policies (each has observed this instant's sample):
    out if any wants out (the largest), in only if all want in (the largest); applied to
    every policy's cooldowns."""
    wishes = [s.propose(current, now_ms) for s in scalers]
    outs = [w for w in wishes if w is not None and w.count > current]
    if outs:
        best = max(outs, key=lambda w: w.count)
    elif wishes and all(w is not None and w.count < current for w in wishes):
        best = max((w for w in wishes if w is not None), key=lambda w: w.count)
    else:
        return None
    for s in scalers:
        s.applied(best.count, current, now_ms, best.reason)
    return SetDesiredCount(best.count, best.reason, best.by)


def demand(scalers: Sequence[Scaler], stimulus: Demand, now_ms: int) -> list[SetDesiredCount]:
    """Requests held at the router for a service at zero: ``max(1, min)`` at once."""
    if stimulus.current != 0 or stimulus.waiting <= 0 or not scalers:
        return []
    p = scalers[0].policy
    if p.max_capacity <= 0:
        return []
    count = max(1, p.min_capacity)
    reason = f"{stimulus.waiting} requests waiting at zero tasks"
    for s in scalers:
        s.applied(count, 0, now_ms, reason)
    return [SetDesiredCount(count, reason, scalers[0].name)]
