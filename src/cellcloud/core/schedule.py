"""Schedules (an EventBridge Scheduler subset): expressions, next-fire times and the firing
decisions, with no I/O and no clock (``now_ms`` is passed in; chance is seeded).

Expressions (AWS's syntax):

- ``rate(value unit)``: unit ``minute|minutes|hour|hours|day|days`` (singular iff value is 1).
  Ticks at ``anchor + k * period``: anchor = ``StartDate`` (k ≥ 0), else the creation time
  (k ≥ 1).
- ``cron(minutes hours day-of-month month day-of-week year)``: AWS's six fields with
  ``, - * / ? L W #`` (``?`` in exactly one of the two day fields; day-of-week 1-7 = SUN-SAT or
  names; month 1-12 or JAN-DEC; year 1970-2199), evaluated in ``ScheduleExpressionTimezone``.
- ``at(yyyy-mm-ddThh:mm:ss)``: one tick, in ``ScheduleExpressionTimezone``; StartDate and
  EndDate do not apply (as on AWS).

Wall times and daylight saving: an ambiguous wall time (clocks fall back) fires once, at its
first occurrence; a wall time that does not exist (clocks spring forward) fires at the end of
the gap, and several skipped times that match fire there once.

A tick is named by its *nominal* time (ms since the epoch); ``tick_event_id`` derives the
async event's id from (schedule uid, nominal time), so a re-sent tick is the same event.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import json
import random
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MINUTE_MS = 60_000
_UNIT_MS = {"minute": MINUTE_MS, "hour": 60 * MINUTE_MS, "day": 24 * 60 * MINUTE_MS}
YEAR_MIN, YEAR_MAX = 1970, 2199
_MONTHS = {n: i + 1 for i, n in enumerate(
    "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {n: i + 1 for i, n in enumerate("SUN MON TUE WED THU FRI SAT".split())}  # 1 = SUN
_UTC = dt.UTC
_EVENT_NS = uuid.UUID("7b1f4a53-1c1e-4f61-9a7e-5c8d2e0b6a10")


class ScheduleError(ValueError):
    """A malformed expression or request field (the API answers ValidationException)."""


# -- expressions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rate:
    value: int
    unit: str

    @property
    def period_ms(self) -> int:
        return self.value * _UNIT_MS[self.unit]


@dataclass(frozen=True)
class Cron:
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: tuple[int, ...]
    years: tuple[int, ...]
    #: day-of-month terms (None: ``?``): ints, "L", "LW", ("W", n)
    dom: tuple[Any, ...] | None
    #: day-of-week terms (None: ``?``): ints 1-7, ("L", d) last d of month, ("#", d, n)
    dow: tuple[Any, ...] | None


@dataclass(frozen=True)
class At:
    wall: dt.datetime  # naive, in the schedule's time zone


Expression = Rate | Cron | At

_RATE = re.compile(r"^rate\((\d+) (minutes?|hours?|days?)\)$")
_AT = re.compile(r"^at\((\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\)$")
_CRON = re.compile(r"^cron\((.*)\)$")


def parse_expression(text: str) -> Expression:
    if not isinstance(text, str):
        raise ScheduleError("ScheduleExpression must be a string")
    m = _RATE.match(text)
    if m:
        value, unit = int(m[1]), m[2]
        if value < 1:
            raise ScheduleError(f"Invalid Schedule Expression {text}: the value must be >= 1")
        if (value == 1) != (not unit.endswith("s")):
            raise ScheduleError(f"Invalid Schedule Expression {text}: use a singular unit for 1 "
                                "and a plural one otherwise")
        return Rate(value, unit.rstrip("s"))
    m = _AT.match(text)
    if m:
        try:
            y, mo, d, h, mi, sec = (int(g) for g in m.groups())
            wall = dt.datetime(y, mo, d, h, mi, sec)
        except ValueError as e:
            raise ScheduleError(f"Invalid Schedule Expression {text}: {e}") from None
        return At(wall)
    m = _CRON.match(text)
    if m:
        return _parse_cron(m[1], text)
    raise ScheduleError(f"Invalid Schedule Expression {text}: use rate(...), cron(...) or at(...)")


def _number(tok: str, lo: int, hi: int, names: dict[str, int] | None, text: str) -> int:
    if names is not None and tok.upper() in names:
        return names[tok.upper()]
    if not tok.isdigit():
        raise ScheduleError(f"Invalid Schedule Expression {text}: {tok!r}")
    n = int(tok)
    if not lo <= n <= hi:
        raise ScheduleError(f"Invalid Schedule Expression {text}: {n} is outside {lo}-{hi}")
    return n


def _plain(part: str, lo: int, hi: int, names: dict[str, int] | None, text: str) -> set[int]:
    """One comma-separated term of ``* a a-b a/s a-b/s */s``."""
    step = 1
    if "/" in part:
        part, _, s = part.partition("/")
        if not s.isdigit() or int(s) < 1:
            raise ScheduleError(f"Invalid Schedule Expression {text}: step {s!r}")
        step = int(s)
    if part == "*":
        a, b = lo, hi
    elif "-" in part:
        x, _, y = part.partition("-")
        a, b = _number(x, lo, hi, names, text), _number(y, lo, hi, names, text)
        if a > b:
            raise ScheduleError(f"Invalid Schedule Expression {text}: range {part!r}")
    else:
        a = _number(part, lo, hi, names, text)
        b = hi if step > 1 else a
    return set(range(a, b + 1, step))


def _field(spec: str, lo: int, hi: int, names: dict[str, int] | None, text: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in spec.split(","):
        out |= _plain(part, lo, hi, names, text)
    return tuple(sorted(out))


def _parse_cron(body: str, text: str) -> Cron:
    f = body.split(" ")
    if len(f) != 6 or any(not x for x in f):
        raise ScheduleError(f"Invalid Schedule Expression {text}: a cron expression has six "
                            "fields separated by single spaces")
    mi, ho, dom_s, mo, dow_s, ye = f
    if (dom_s == "?") == (dow_s == "?"):
        raise ScheduleError(f"Invalid Schedule Expression {text}: exactly one of day-of-month "
                            "and day-of-week must be '?'")
    dom: tuple[Any, ...] | None = None
    dow: tuple[Any, ...] | None = None
    if dom_s != "?":
        terms: list[Any] = []
        for part in dom_s.split(","):
            if part in ("L", "LW"):
                terms.append(part)
            elif part.endswith("W"):
                terms.append(("W", _number(part[:-1], 1, 31, None, text)))
            else:
                terms.extend(_plain(part, 1, 31, None, text))
        dom = tuple(sorted(terms, key=repr))
    if dow_s != "?":
        dterms: list[Any] = []
        for part in dow_s.split(","):
            if part == "L":
                dterms.append(7)  # alone: the last day of the week (SAT)
            elif part.endswith("L"):
                dterms.append(("L", _number(part[:-1], 1, 7, _DAYS, text)))
            elif "#" in part:
                d, _, n = part.partition("#")
                dterms.append(("#", _number(d, 1, 7, _DAYS, text), _number(n, 1, 5, None, text)))
            else:
                dterms.extend(_plain(part, 1, 7, _DAYS, text))
        dow = tuple(sorted(dterms, key=repr))
    return Cron(minutes=_field(mi, 0, 59, None, text), hours=_field(ho, 0, 23, None, text),
                months=_field(mo, 1, 12, _MONTHS, text),
                years=_field(ye, YEAR_MIN, YEAR_MAX, None, text), dom=dom, dow=dow)


def _weekday(d: dt.date) -> int:
    """1 = SUN ... 7 = SAT."""
    return (d.weekday() + 1) % 7 + 1


def _nearest_weekday(year: int, month: int, day: int) -> int | None:
    last = calendar.monthrange(year, month)[1]
    if day > last:
        return None
    wd = _weekday(dt.date(year, month, day))
    if wd == 7:  # SAT -> FRI, or MON when the 1st is a Saturday
        return day - 1 if day > 1 else day + 2
    if wd == 1:  # SUN -> MON, or FRI when it is the month's last day
        return day + 1 if day < last else day - 2
    return day


def day_matches(c: Cron, d: dt.date) -> bool:
    last = calendar.monthrange(d.year, d.month)[1]
    if c.dom is not None:
        for t in c.dom:
            if isinstance(t, int) and t == d.day:
                return True
            if t == "L" and d.day == last:
                return True
            if t == "LW":
                lw = last
                while _weekday(dt.date(d.year, d.month, lw)) in (1, 7):
                    lw -= 1
                if d.day == lw:
                    return True
            if isinstance(t, tuple) and t[0] == "W" and _nearest_weekday(
                    d.year, d.month, t[1]) == d.day:
                return True
        return False
    assert c.dow is not None
    wd = _weekday(d)
    for t in c.dow:
        if isinstance(t, int) and t == wd:
            return True
        if isinstance(t, tuple) and t[0] == "L" and t[1] == wd and d.day + 7 > last:
            return True
        if isinstance(t, tuple) and t[0] == "#" and t[1] == wd and (d.day - 1) // 7 + 1 == t[2]:
            return True
    return False


# -- wall time <-> instants ----------------------------------------------------------------------
def zone(name: str) -> dt.tzinfo:
    if name == "UTC":
        return _UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"Invalid time zone: {name}") from None


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def wall_to_ms(wall: dt.datetime, tz: dt.tzinfo) -> int:
    """The instant of a naive wall time: the first occurrence when ambiguous, the end of the gap
    when it does not exist."""
    first = wall.replace(tzinfo=tz, fold=0)
    ms = _ms(first)
    back = dt.datetime.fromtimestamp(ms / 1000, tz).replace(tzinfo=None)
    if back == wall:
        return ms
    # In a gap: fold=1 reads it with the offset after the change (an instant before the gap),
    # fold=0 with the one before (after it); the gap ends at the first minute past the wall time.
    lo, hi = sorted((_ms(wall.replace(tzinfo=tz, fold=1)), ms))
    t = lo - lo % MINUTE_MS
    while t <= hi:
        if dt.datetime.fromtimestamp(t / 1000, tz).replace(tzinfo=None) > wall:
            return t
        t += MINUTE_MS
    return ms  # a zone whose rules do not move whole minutes: the fold=0 reading


def local(ms: int, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz).replace(tzinfo=None)


def _cron_next(c: Cron, tz: dt.tzinfo, after_ms: int) -> int | None:
    # wall_to_ms is non-decreasing in the wall time, and the wall time ``after`` shows maps to
    # an instant <= after (its first occurrence): earlier wall times need no look.
    start = local(after_ms, tz)
    start_day = start.date()
    first = (start.hour, start.minute)
    for year in c.years:
        if year < start_day.year:
            continue
        for month in c.months:
            if (year, month) < (start_day.year, start_day.month):
                continue
            last = calendar.monthrange(year, month)[1]
            first_day = start_day.day if (year, month) == (start_day.year, start_day.month) else 1
            for day in range(first_day, last + 1):
                d = dt.date(year, month, day)
                if not day_matches(c, d):
                    continue
                for h in c.hours:
                    if d == start_day and h < first[0]:
                        continue
                    for mi in c.minutes:
                        if d == start_day and (h, mi) < first:
                            continue
                        t = wall_to_ms(dt.datetime(year, month, day, h, mi), tz)
                        if t > after_ms:
                            return t
    return None


def next_tick_ms(expr: Expression, tz_name: str, after_ms: int, *, anchor_ms: int,
                 anchor_inclusive: bool) -> int | None:
    """The first tick strictly after ``after_ms`` (None: no more ticks). ``anchor_ms`` is where
    a rate's ticks are counted from (tick 0 counts only when ``anchor_inclusive``)."""
    if isinstance(expr, Rate):
        p = expr.period_ms
        k_min = 0 if anchor_inclusive else 1
        if after_ms < anchor_ms:
            k = k_min
        else:
            k = max(k_min, (after_ms - anchor_ms) // p + 1)
        return anchor_ms + k * p
    tz = zone(tz_name)
    if isinstance(expr, At):
        t = wall_to_ms(expr.wall, tz)
        return t if t > after_ms else None
    return _cron_next(expr, tz, after_ms)


# -- a schedule and its firing state -------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    maximum_retry_attempts: int = 185
    maximum_event_age_s: int = 86_400

    def __post_init__(self) -> None:
        assert 0 <= self.maximum_retry_attempts <= 185
        assert 60 <= self.maximum_event_age_s <= 86_400


@dataclass(frozen=True)
class Pending:
    """A tick claimed in the store and not yet handed to the cell's async queue."""

    nominal_ms: int
    attempts: int = 0  # sends tried so far
    next_try_ms: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Schedule:
    account: str
    group: str
    name: str
    uid: str  # new for every CreateSchedule: event ids of a re-created schedule never collide
    expression: str
    timezone: str
    target_arn: str
    role_arn: str
    created_ms: int
    modified_ms: int
    state: str = "ENABLED"
    description: str = ""
    start_ms: int | None = None
    end_ms: int | None = None
    input: str | None = None
    flexible_window_min: int = 0  # 0 = OFF
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dead_letter_arn: str = ""
    action_after_completion: str = "NONE"
    kms_key_arn: str = ""
    #: CreateSchedule's idempotency token (botocore fills one in): a retried create with the
    #: same token answers as the first did
    client_token: str = ""
    #: the nominal time of the last tick claimed (every tick up to it is decided)
    cursor_ms: int = 0
    pending: Pending | None = None
    #: counters: ticks handed to the cell, dropped as too old, sent to the DLQ
    fired: int = 0
    expired: int = 0
    dead_lettered: int = 0

    @property
    def parsed(self) -> Expression:
        return parse_expression(self.expression)

    def next_nominal_ms(self, after_ms: int) -> int | None:
        expr = self.parsed
        if isinstance(expr, At):
            return next_tick_ms(expr, self.timezone, after_ms, anchor_ms=0,
                                anchor_inclusive=False)
        anchor = self.start_ms if self.start_ms is not None else self.created_ms
        if self.start_ms is not None:
            after_ms = max(after_ms, self.start_ms - 1)
        t = next_tick_ms(expr, self.timezone, after_ms, anchor_ms=anchor,
                         anchor_inclusive=self.start_ms is not None)
        if t is None or (self.end_ms is not None and t >= self.end_ms):
            return None
        return t

    def fire_ms(self, nominal_ms: int) -> int:
        """When a tick is sent: its nominal time, plus a seeded offset inside a flexible
        window (the same for every control plane and every restart)."""
        if not self.flexible_window_min:
            return nominal_ms
        seed = hashlib.sha256(f"{self.uid}/{nominal_ms}".encode()).digest()
        return nominal_ms + random.Random(seed).randrange(self.flexible_window_min * MINUTE_MS)

    def to_json(self) -> bytes:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["retry"] = {"a": self.retry.maximum_retry_attempts, "s": self.retry.maximum_event_age_s}
        doc["pending"] = None if self.pending is None else self.pending.__dict__
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Schedule:
        doc = json.loads(raw)
        doc["retry"] = RetryPolicy(doc["retry"]["a"], doc["retry"]["s"])
        doc["pending"] = None if doc.get("pending") is None else Pending(**doc["pending"])
        return cls(**doc)


def tick_event_id(uid: str, nominal_ms: int) -> str:
    """The async event id of one tick (stable across re-sends and control-plane restarts)."""
    return str(uuid.uuid5(_EVENT_NS, f"{uid}/{nominal_ms}"))


# -- decisions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """Write ``schedule`` (the tick claimed as pending) by compare-and-set, then send it."""

    schedule: Schedule
    expired: int  # ticks skipped as older than MaximumEventAgeInSeconds


@dataclass(frozen=True)
class Send:
    """Hand the pending tick to the cell (its event id: ``tick_event_id``)."""

    nominal_ms: int
    event_id: str
    attempt: int  # 1-based


@dataclass(frozen=True)
class Wait:
    until_ms: int


@dataclass(frozen=True)
class Complete:
    """No tick will come again: delete the schedule (ActionAfterCompletion DELETE) or keep it."""

    delete: bool


@dataclass(frozen=True)
class Idle:
    """Nothing to do until the schedule changes (DISABLED)."""


Decision = Claim | Send | Wait | Complete | Idle


def decide(s: Schedule, now_ms: int, *, count_max: int = 2_000) -> Decision:
    """What to do with a schedule now: the whole firing rule, pure."""
    if s.pending is not None:
        p = s.pending
        if p.next_try_ms > now_ms:
            return Wait(p.next_try_ms)
        return Send(p.nominal_ms, tick_event_id(s.uid, p.nominal_ms), p.attempts + 1)
    if s.state != "ENABLED":
        return Idle()
    nxt = s.next_nominal_ms(s.cursor_ms)
    if nxt is None:
        # after an at()'s tick, or a recurring schedule's last tick before its EndDate (AWS)
        return Complete(delete=s.action_after_completion == "DELETE")
    if s.fire_ms(nxt) > now_ms:
        return Wait(s.fire_ms(nxt))
    expired = 0
    oldest_ms = now_ms - s.retry.maximum_event_age_s * 1000
    if nxt < oldest_ms:
        # Missed ticks older than MaximumEventAgeInSeconds are dropped (counted), in one step.
        after = s.next_nominal_ms(oldest_ms - 1)
        expired = 1 + _count_between(s, nxt, oldest_ms, count_max)
        if after is None or s.fire_ms(after) > now_ms:
            last_expired = _last_before(s, nxt, oldest_ms, count_max)
            return Claim(replace(s, cursor_ms=last_expired, expired=s.expired + expired),
                         expired)
        nxt = after
    return Claim(replace(s, cursor_ms=nxt, pending=Pending(nxt, 0, 0),
                         expired=s.expired + expired), expired)


def _count_between(s: Schedule, first: int, before_ms: int, count_max: int) -> int:
    """Ticks strictly after ``first`` and before ``before_ms`` (bounded: a rate is counted by
    arithmetic, a cron by walking at most ``count_max`` ticks)."""
    expr = s.parsed
    if isinstance(expr, Rate):
        return max(0, (before_ms - 1 - first) // expr.period_ms)
    n, t = 0, first
    while n < count_max:
        nt = s.next_nominal_ms(t)
        if nt is None or nt >= before_ms:
            break
        n, t = n + 1, nt
    return n


def _last_before(s: Schedule, first: int, before_ms: int, count_max: int) -> int:
    expr = s.parsed
    if isinstance(expr, Rate):
        return first + _count_between(s, first, before_ms, count_max) * expr.period_ms
    t = first
    for _ in range(count_max):
        nt = s.next_nominal_ms(t)
        if nt is None or nt >= before_ms:
            break
        t = nt
    return t


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    retryable: bool = True
    error: str = ""


@dataclass(frozen=True)
class AfterSend:
    schedule: Schedule
    #: the tick goes to the dead-letter queue (retries or age exhausted, or not retryable)
    dead_letter: bool
    #: why (for the DLQ message's attributes): "" | MaximumRetryAttempts |
    #: MaximumEventAgeInSeconds | NonRetryable
    exhausted: str = ""


def on_sent(s: Schedule, outcome: SendOutcome, now_ms: int, rng: random.Random, *,
            backoff_base_ms: int, backoff_cap_ms: int) -> AfterSend:
    """The pending tick's send ended: cleared on success; otherwise retried with capped
    exponential backoff and full jitter, until the retry policy is spent (then the DLQ)."""
    p = s.pending
    assert p is not None, "on_sent without a pending tick"
    if outcome.ok:
        return AfterSend(replace(s, pending=None, fired=s.fired + 1), False)
    attempts = p.attempts + 1
    age_ms = now_ms - p.nominal_ms
    exhausted = ""
    if not outcome.retryable:
        exhausted = "NonRetryable"
    elif attempts > s.retry.maximum_retry_attempts:
        exhausted = "MaximumRetryAttempts"
    elif age_ms >= s.retry.maximum_event_age_s * 1000:
        exhausted = "MaximumEventAgeInSeconds"
    if exhausted:
        return AfterSend(replace(s, pending=None, dead_lettered=s.dead_lettered + 1),
                         True, exhausted)
    delay = rng.uniform(0, min(backoff_cap_ms, backoff_base_ms * 2 ** min(attempts, 30)))
    return AfterSend(replace(s, pending=Pending(p.nominal_ms, attempts, now_ms + int(delay),
                                                outcome.error[:500])), False)


def render_input(template: str | None, *, schedule_arn: str, nominal_ms: int, event_id: str,
                 attempt: int) -> bytes:
    """The event a tick delivers: the target's Input with EventBridge Scheduler's context
    attributes filled in (``<aws.scheduler.schedule-arn>``, ``<aws.scheduler.scheduled-time>``,
    ``<aws.scheduler.execution-id>``, ``<aws.scheduler.attempt-number>``); ``{}`` without one."""
    if template is None:
        return b"{}"
    when = dt.datetime.fromtimestamp(nominal_ms / 1000, _UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = (template.replace("<aws.scheduler.schedule-arn>", schedule_arn)
           .replace("<aws.scheduler.scheduled-time>", when)
           .replace("<aws.scheduler.execution-id>", event_id)
           .replace("<aws.scheduler.attempt-number>", str(attempt)))
    return out.encode()
