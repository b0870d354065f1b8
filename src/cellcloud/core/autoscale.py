"""Target-tracking scaling, sans-IO (issue #17): Application Auto Scaling's
``TargetTrackingScaling`` for an ECS service's ``desiredCount``, with time passed in.

``Scaler.handle(stimulus, now_ms) -> [SetDesiredCount]``. The shell (not built yet) feeds one
:class:`Datapoint` per metric period (60 s, as the CloudWatch alarms AAS creates use): the
service's average CPU (``ECSServiceAverageCPUUtilization``) or requests per task
(``ALBRequestCountPerTarget``'s role, from the router's counts), with the service's current
desired count; and :class:`Demand` when requests wait for a service at zero.

- **Scale out fast**: ``scale_out_datapoints`` (3) periods in a row over the target → the
  capacity that brings the metric back to the target, ``ceil(current × metric / target)``,
  within [min, max]. During the scale-out cooldown a further scale-out happens only to a
  larger capacity than the last one asked for (AAS: capacity added by the last scale-out
  counts towards the next).
- **Scale in slowly**: ``scale_in_datapoints`` (15) periods in a row under
  ``scale_in_ratio`` (90 %) of the target → ``ceil(current × metric / target)`` (never under
  min); not during either cooldown (a scale-out ends a scale-in cooldown early; a scale-in
  waits out a scale-out's), never with ``disable_scale_in``.
- A missing datapoint (no tasks report, the metric has no value) breaks both streaks: nothing
  is decided on absent data.
- **From zero**: with ``min_capacity`` 0 a service can scale to zero (its metric then has no
  value: requests per task is 0 over 0 tasks); a request waiting at the router (``Demand``)
  brings it to ``max(1, min)`` at once, without waiting for datapoints (Knative's activator
  idea: the router holds the request meanwhile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .limits import DEFAULT_LIMITS

# The Application Auto Scaling API's JSON target prefix (control/autoscaling.py)
TARGET_PREFIX = "AnyScaleFrontendService."


@dataclass(frozen=True)
class TargetTracking:
    target_value: float
    min_capacity: int
    max_capacity: int
    scale_out_cooldown_ms: int = 300_000  # AAS's default for ECS services
    scale_in_cooldown_ms: int = 300_000
    disable_scale_in: bool = False
    scale_out_datapoints: int = 3  # the high alarm: 3 of 3 one-minute periods
    scale_in_datapoints: int = 15  # the low alarm: 15 of 15
    scale_in_ratio: float = 0.9  # the low alarm's threshold, a fraction of the target

    def __post_init__(self) -> None:
        assert self.target_value > 0, self
        assert 0 <= self.min_capacity <= self.max_capacity, self
        assert self.scale_out_cooldown_ms >= 0 and self.scale_in_cooldown_ms >= 0, self
        assert self.scale_out_datapoints >= 1 and self.scale_in_datapoints >= 1, self
        assert 0 < self.scale_in_ratio <= 1, self


@dataclass(frozen=True)
class Datapoint:
    value: float | None  # the period's metric; None: missing
    current: int  # the service's desired count now


@dataclass(frozen=True)
class Demand:
    waiting: int  # requests held at the router for this service
    current: int


@dataclass(frozen=True)
class SetDesiredCount:
    count: int
    reason: str


@dataclass
class Scaler:
    policy: TargetTracking
    high_streak: int = 0
    low_streak: int = 0
    last_scale_out_ms: int | None = None
    last_scale_out_to: int = 0
    last_scale_in_ms: int | None = None
    history: list[tuple[int, int, str]] = field(default_factory=list)  # (ms, count, reason)

    def handle(self, stimulus: Datapoint | Demand, now_ms: int) -> list[SetDesiredCount]:
        p = self.policy
        if isinstance(stimulus, Demand):
            if stimulus.current == 0 and stimulus.waiting > 0 and p.max_capacity > 0:
                return self._set(max(1, p.min_capacity), now_ms, out=True,
                                 reason=f"{stimulus.waiting} requests waiting at zero tasks")
            return []
        current, value = stimulus.current, stimulus.value
        if current < p.min_capacity or current > p.max_capacity:  # the range moved
            return self._set(min(max(current, p.min_capacity), p.max_capacity), now_ms,
                             out=current < p.min_capacity, reason="capacity out of range")
        if value is None:
            self.high_streak = self.low_streak = 0
            return []
        self.high_streak = self.high_streak + 1 if value > p.target_value else 0
        self.low_streak = (self.low_streak + 1
                           if value < p.target_value * p.scale_in_ratio else 0)
        wanted = min(max(math.ceil(current * value / p.target_value), p.min_capacity),
                     p.max_capacity)
        if self.high_streak >= p.scale_out_datapoints and wanted > current:
            in_cooldown = (self.last_scale_out_ms is not None
                           and now_ms - self.last_scale_out_ms < p.scale_out_cooldown_ms)
            if not in_cooldown or wanted > self.last_scale_out_to:
                return self._set(wanted, now_ms, out=True,
                                 reason=f"metric {value:g} over target {p.target_value:g}")
            return []
        if (self.low_streak >= p.scale_in_datapoints and wanted < current
                and not p.disable_scale_in):
            if self.last_scale_out_ms is not None and \
                    now_ms - self.last_scale_out_ms < p.scale_out_cooldown_ms:
                return []
            if self.last_scale_in_ms is not None and \
                    now_ms - self.last_scale_in_ms < p.scale_in_cooldown_ms:
                return []
            return self._set(wanted, now_ms, out=False,
                             reason=f"metric {value:g} under target {p.target_value:g}")
        return []

    def _set(self, count: int, now_ms: int, *, out: bool, reason: str) -> list[SetDesiredCount]:
        if out:
            self.last_scale_out_ms, self.last_scale_out_to = now_ms, count
            self.last_scale_in_ms = None  # a scale-out ends a scale-in cooldown
        else:
            self.last_scale_in_ms = now_ms
        self.high_streak = self.low_streak = 0
        self.history.append((now_ms, count, reason))
        del self.history[:-DEFAULT_LIMITS.ecs_service_events_max]
        return [SetDesiredCount(count, reason)]
