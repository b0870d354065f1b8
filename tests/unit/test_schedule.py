"""core/schedule.py: expressions, next-fire times (DST, L/W/#, leap years) against a brute-force
minute-by-minute oracle, and the firing decisions."""

from __future__ import annotations

import calendar
import datetime as dt
import random
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import schedule as core
from cellcloud.core.schedule import (
    At,
    Claim,
    Complete,
    Cron,
    Idle,
    Pending,
    Rate,
    RetryPolicy,
    Schedule,
    ScheduleError,
    Send,
    SendOutcome,
    Wait,
    parse_expression,
)

MIN = 60_000
UTC = dt.UTC


def ms(*a: int, tz: str = "UTC") -> int:
    return int(dt.datetime(*a, tzinfo=UTC if tz == "UTC" else ZoneInfo(tz)).timestamp() * 1000)


def when(t: int | None, tz: str = "UTC") -> str:
    assert t is not None
    z = UTC if tz == "UTC" else ZoneInfo(tz)
    return dt.datetime.fromtimestamp(t / 1000, z).strftime("%Y-%m-%d %H:%M %a")


def nxt(expr: str, after: int, tz: str = "UTC") -> int | None:
    return core.next_tick_ms(parse_expression(expr), tz, after, anchor_ms=0,
                             anchor_inclusive=False)


def fires(expr: str, after: int, n: int, tz: str = "UTC") -> list[str]:
    out, t = [], after
    for _ in range(n):
        t2 = nxt(expr, t, tz)
        if t2 is None:
            break
        out.append(when(t2, tz))
        t = t2
    return out


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "rate(0 minutes)", "rate(1 minutes)", "rate(5 minute)", "rate(5 weeks)", "rate(5minutes)",
    "rate(-1 minutes)", "rate( 5 minutes)", "cron(0 12 * * * *)", "cron(0 12 ? * ? *)",
    "cron(0 12 * * ?)", "cron(60 12 * * ? *)", "cron(0 24 * * ? *)", "cron(0 0 32 * ? *)",
    "cron(0 0 ? * 8 *)", "cron(0 0 ? * 2#6 *)", "cron(0 0 * 13 ? *)", "cron(0 0 * * ? 1969)",
    "cron(0 0 * * ? 2200)", "cron(0 0 5-1 * ? *)", "cron(*/0 0 * * ? *)", "cron(0 0 * FOO ? *)",
    "cron(0  0 * * ? *)", "cron(a 0 * * ? *)", "at(2026-02-30T00:00:00)",
    "at(2026-01-01 00:00:00)", "at(2026-01-01T25:00:00)", "every 5 minutes", "", "cron()",
])
def test_malformed_expressions_are_refused(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_expression(text)


def test_parses_aws_examples() -> None:
    assert parse_expression("rate(1 minute)") == Rate(1, "minute")
    assert parse_expression("rate(5 minutes)").period_ms == 5 * MIN  # type: ignore[union-attr]
    assert parse_expression("rate(2 days)").period_ms == 2 * 86_400_000  # type: ignore[union-attr]
    c = parse_expression("cron(0/15 8-10,20 ? JAN-MAR MON-FRI 2026-2027)")
    assert isinstance(c, Cron)
    assert c.minutes == (0, 15, 30, 45) and c.hours == (8, 9, 10, 20)
    assert c.months == (1, 2, 3) and c.dow == (2, 3, 4, 5, 6) and c.dom is None
    assert c.years == (2026, 2027)
    assert parse_expression("at(2026-03-08T02:30:00)") == At(dt.datetime(2026, 3, 8, 2, 30))
    with pytest.raises(ScheduleError):
        core.zone("Mars/Olympus_Mons")


# -- next-fire examples --------------------------------------------------------------------------
def test_daily_noon_and_steps() -> None:
    assert fires("cron(0 12 * * ? *)", ms(2026, 1, 1), 2) == [
        "2026-01-01 12:00 Thu", "2026-01-02 12:00 Fri"]
    assert fires("cron(*/20 * * * ? *)", ms(2026, 1, 1, 0, 5), 3) == [
        "2026-01-01 00:20 Thu", "2026-01-01 00:40 Thu", "2026-01-01 01:00 Thu"]
    # strictly after: a tick at `after` itself is not the next one
    assert fires("cron(0 12 * * ? *)", ms(2026, 1, 1, 12), 1) == ["2026-01-02 12:00 Fri"]


def test_last_day_of_month_and_leap_years() -> None:
    assert fires("cron(0 0 L * ? *)", ms(2027, 1, 15), 3) == [
        "2027-01-31 00:00 Sun", "2027-02-28 00:00 Sun", "2027-03-31 00:00 Wed"]
    assert fires("cron(0 0 L 2 ? *)", ms(2027, 3, 1), 2) == [
        "2028-02-29 00:00 Tue", "2029-02-28 00:00 Wed"]
    assert fires("cron(0 0 29 2 ? *)", ms(2026, 1, 1), 2) == [
        "2028-02-29 00:00 Tue", "2032-02-29 00:00 Sun"]
    # 2100 is not a leap year
    assert fires("cron(0 0 29 2 ? 2096-2104)", ms(2097, 1, 1), 1) == ["2104-02-29 00:00 Fri"]
    assert nxt("cron(0 0 30 2 ? *)", ms(2026, 1, 1)) is None  # never: no tick, and it ends


def test_weekday_nearest_w_and_lw() -> None:
    # 2026-02-15 is a Sunday -> Monday the 16th; 2026-08-01 is a Saturday -> Monday the 3rd
    # (not July 31st); 2026-05-31 is a Sunday and the month's last day -> Friday the 29th.
    assert fires("cron(0 9 15W * ? 2026)", ms(2026, 2, 1), 1) == ["2026-02-16 09:00 Mon"]
    assert fires("cron(0 9 1W 8 ? 2026)", ms(2026, 7, 1), 1) == ["2026-08-03 09:00 Mon"]
    assert fires("cron(0 9 31W 5 ? 2026)", ms(2026, 5, 1), 1) == ["2026-05-29 09:00 Fri"]
    assert fires("cron(0 9 14W 2 ? 2026)", ms(2026, 2, 1), 1) == ["2026-02-13 09:00 Fri"]
    # the last weekday: 2026-05-31 is a Sunday
    assert fires("cron(0 9 LW 5 ? 2026)", ms(2026, 5, 1), 1) == ["2026-05-29 09:00 Fri"]
    # 31W in a 30-day month never fires
    assert fires("cron(0 9 31W 4,5 ? 2026)", ms(2026, 4, 1), 1) == ["2026-05-29 09:00 Fri"]


def test_last_and_nth_weekday() -> None:
    assert fires("cron(15 10 ? * 6L 2026)", ms(2026, 1, 1), 3) == [
        "2026-01-30 10:15 Fri", "2026-02-27 10:15 Fri", "2026-03-27 10:15 Fri"]
    assert fires("cron(0 9 ? * MON#1 *)", ms(2026, 1, 1), 3) == [
        "2026-01-05 09:00 Mon", "2026-02-02 09:00 Mon", "2026-03-02 09:00 Mon"]
    assert fires("cron(0 9 ? * 5#5 2026)", ms(2026, 1, 1), 2) == [
        "2026-01-29 09:00 Thu", "2026-04-30 09:00 Thu"]
    assert fires("cron(0 0 ? * L 2026)", ms(2026, 1, 1), 1) == ["2026-01-03 00:00 Sat"]
    assert fires("cron(0 8 ? * MON-FRI *)", ms(2026, 1, 2, 9), 2) == [
        "2026-01-05 08:00 Mon", "2026-01-06 08:00 Tue"]


def test_dst_spring_forward_fires_at_the_gap_end_once() -> None:
    ny = "America/New_York"  # 2026-03-08 02:00 EST -> 03:00 EDT
    assert fires("cron(30 2 * * ? *)", ms(2026, 3, 7, 12, tz=ny), 3, ny) == [
        "2026-03-08 03:00 Sun", "2026-03-09 02:30 Mon", "2026-03-10 02:30 Tue"]
    # every quarter hour: the four skipped wall times fire once, at 03:00, then 03:15
    assert fires("cron(*/15 * * * ? *)", ms(2026, 3, 8, 1, 40, tz=ny), 4, ny) == [
        "2026-03-08 01:45 Sun", "2026-03-08 03:00 Sun", "2026-03-08 03:15 Sun",
        "2026-03-08 03:30 Sun"]
    t = nxt("at(2026-03-08T02:30:00)", 0, ny)
    assert t == ms(2026, 3, 8, 7, 0)  # 03:00 EDT


def test_dst_fall_back_fires_once_at_the_first_occurrence() -> None:
    ny = "America/New_York"  # 2026-11-01 02:00 EDT -> 01:00 EST
    first = nxt("cron(30 1 * * ? *)", ms(2026, 11, 1, 0, 0, tz=ny), ny)
    assert first == ms(2026, 11, 1, 5, 30)  # 01:30 EDT = 05:30 UTC
    assert when(nxt("cron(30 1 * * ? *)", first, ny), ny) == "2026-11-02 01:30 Mon"
    hourly = fires("cron(0 * * * ? *)", ms(2026, 11, 1, 4, 30), 3)  # in UTC: 05:00, 06:00...
    assert hourly == ["2026-11-01 05:00 Sun", "2026-11-01 06:00 Sun", "2026-11-01 07:00 Sun"]
    # in New York the hourly cron's 01:00 fires once (05:00 UTC), then 02:00 EST (07:00 UTC)
    t1 = nxt("cron(0 * * * ? *)", ms(2026, 11, 1, 4, 30), ny)
    t2 = nxt("cron(0 * * * ? *)", t1 or 0, ny)
    assert (t1, t2) == (ms(2026, 11, 1, 5, 0), ms(2026, 11, 1, 7, 0))


def test_rate_anchors() -> None:
    r = parse_expression("rate(5 minutes)")
    assert core.next_tick_ms(r, "UTC", 0, anchor_ms=1_000, anchor_inclusive=True) == 1_000
    assert core.next_tick_ms(r, "UTC", 0, anchor_ms=1_000, anchor_inclusive=False) == 301_000
    assert core.next_tick_ms(r, "UTC", 301_000, anchor_ms=1_000,
                             anchor_inclusive=True) == 601_000
    assert core.next_tick_ms(r, "UTC", 300_999, anchor_ms=1_000,
                             anchor_inclusive=True) == 301_000


# -- the oracle: minute by minute ----------------------------------------------------------------
def _aws_dow(d: dt.date) -> int:
    return d.isoweekday() % 7 + 1  # SUN=1 ... SAT=7


def _month_days(d: dt.date) -> list[dt.date]:
    return [dt.date(d.year, d.month, i) for i in range(1, calendar.monthrange(d.year, d.month)[1]
                                                      + 1)]


def _oracle_day(c: Cron, d: dt.date) -> bool:
    days = _month_days(d)
    weekdays = [x for x in days if _aws_dow(x) not in (1, 7)]
    if c.dom is not None:
        for t in c.dom:
            if t == d.day or (t == "L" and d == days[-1]) or (t == "LW" and d == weekdays[-1]):
                return True
            if isinstance(t, tuple) and t[1] <= len(days):
                if d == min(weekdays, key=lambda x: abs(x.day - t[1])):
                    return True
        return False
    assert c.dow is not None
    for t in c.dow:
        if t == _aws_dow(d):
            return True
        if isinstance(t, tuple) and t[0] == "L" and d == [x for x in days
                                                          if _aws_dow(x) == t[1]][-1]:
            return True
        if isinstance(t, tuple) and t[0] == "#":
            same = [x for x in days if _aws_dow(x) == t[1]]
            if len(same) >= t[2] and same[t[2] - 1] == d:
                return True
    return False


def _oracle_wall(c: Cron, w: dt.datetime) -> bool:
    return (w.minute in c.minutes and w.hour in c.hours and w.month in c.months
            and w.year in c.years and _oracle_day(c, w.date()))


def oracle_fires(c: Cron, tz: str, after: int, horizon_min: int) -> list[int]:
    """Every instant in (after, after + horizon] at which the cron fires, found by looking at
    each minute: a wall time fires at its first occurrence; wall times a clock jump skipped
    fire at the first minute after the jump."""
    z = ZoneInfo(tz)
    days: dict[dt.date, bool] = {}

    def matches(w: dt.datetime) -> bool:
        if w.date() not in days:
            days[w.date()] = _oracle_day(c, w.date())
        return (days[w.date()] and w.minute in c.minutes and w.hour in c.hours
                and w.month in c.months and w.year in c.years)

    def wall(t: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(t / 1000, z).replace(tzinfo=None)

    out = []
    t = after - after % MIN + MIN
    prev = wall(t - MIN)
    for _ in range(horizon_min):
        w = wall(t)
        first = int(w.replace(tzinfo=z, fold=0).timestamp() * 1000) == t
        hit = first and matches(w)
        skipped = prev + dt.timedelta(minutes=1)
        while not hit and skipped < w:  # a gap: wall times the clock jumped over fire here
            hit = matches(skipped)
            skipped += dt.timedelta(minutes=1)
        if hit:
            out.append(t)
        prev = w
        t += MIN
    return out


def _field(draw: st.DrawFn, lo: int, hi: int) -> str:
    kind = draw(st.sampled_from(["*", "n", "list", "range", "step"]))
    if kind == "*":
        return "*"
    a = draw(st.integers(lo, hi))
    if kind == "n":
        return str(a)
    if kind == "list":
        return ",".join(str(x) for x in sorted(draw(st.sets(st.integers(lo, hi), min_size=1,
                                                             max_size=4))))
    b = draw(st.integers(a, hi))
    if kind == "range":
        return f"{a}-{b}"
    return f"{a}/{draw(st.integers(1, 20))}"


ZONES = ["UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata",
         "Pacific/Chatham", "America/Sao_Paulo"]
HORIZON_MIN = 2 * 24 * 60


def _transitions(tz: str, year: int) -> list[int]:
    """The instants a zone's UTC offset changes in a year (scanned hour by hour)."""
    z, out = ZoneInfo(tz), []
    t = ms(year, 1, 1)
    prev = dt.datetime.fromtimestamp(t / 1000, z).utcoffset()
    while t < ms(year + 1, 1, 1):
        t += 3_600_000
        off = dt.datetime.fromtimestamp(t / 1000, z).utcoffset()
        if off != prev:
            out.append(t)
            prev = off
    return out


#: where a search starts: just before each zone's DST changes, and before month ends (L, W, #)
STARTS = sorted({t for z in ZONES for t in _transitions(z, 2026)}
                | {ms(2026, m, 1) - 8 * 86_400_000 for m in range(2, 13)}
                | {ms(2028, 3, 1) - 3 * 86_400_000})


@st.composite
def crons(draw: st.DrawFn) -> str:
    minutes = draw(st.sampled_from(["0", "30", "*/15", "0,45", "*", "59"])) if draw(
        st.booleans()) else _field(draw, 0, 59)
    hours = draw(st.sampled_from(["*", "0-3", "1", "2", "1,2,3", "2/6"])) if draw(
        st.booleans()) else _field(draw, 0, 23)
    month = draw(st.sampled_from(["*", "*", "2", "3,11", "10-12", "1/2"]))
    if draw(st.booleans()):
        dom = draw(st.sampled_from(["*", "L", "LW", "1W", "15W", "31W", "29", "30", "31",
                                    "1-7", "8,15,L", "1/3", "28-31", "30W"]))
        dow = "?"
    else:
        dom = "?"
        dow = draw(st.sampled_from(["*", "1", "MON-FRI", "7", "6L", "5L", "L", "1#1", "2#5",
                                    "SAT,SUN", "3#2,5L", "1/2", "4#4", "2L"]))
    return f"cron({minutes} {hours} {dom} {month} {dow} *)"


TRANSITIONS = {z: _transitions(z, 2026) for z in ZONES}
#: a day (L, LW, 1W, 30W, 31W, #5) and a week (nL) before the months' ends, and a leap day
MONTH_ENDS = [ms(y + m // 12, m % 12 + 1, 1) - days * 86_400_000 for y in (2026, 2027)
              for m in range(1, 13) for days in (1, 7)] + [ms(2028, 3, 1) - 86_400_000]


@st.composite
def searches(draw: st.DrawFn) -> tuple[str, int]:
    tz = draw(st.sampled_from(ZONES))
    start = draw(st.sampled_from(TRANSITIONS[tz] + MONTH_ENDS if TRANSITIONS[tz] and draw(
        st.booleans()) else MONTH_ENDS + TRANSITIONS[tz]))
    return tz, start - draw(st.integers(0, 24 * 60)) * MIN + 17_000


@settings(max_examples=100, deadline=None)
@given(expr=crons(), search=searches())
def test_next_fire_matches_the_minute_by_minute_oracle(expr: str,
                                                       search: tuple[str, int]) -> None:
    """Every fire in two days from a start up to a day before a DST change (northern and
    southern, 30-minute Lord Howe, 45-minute Chatham), a month's last week, or a leap day."""
    tz, after = search
    c = parse_expression(expr)
    assert isinstance(c, Cron)
    end = after + HORIZON_MIN * MIN
    got, t = [], after
    while True:
        t2 = nxt(expr, t, tz)
        if t2 is None or t2 > end - end % MIN:
            break
        got.append(t2)
        t = t2
    want = oracle_fires(c, tz, after, HORIZON_MIN)
    assert got == want, (expr, tz, when(after, tz), [when(x, tz) for x in got[:5]],
                         [when(x, tz) for x in want[:5]])


def test_the_oracle_can_fail() -> None:
    """A planted bug (a gap's skipped wall times ignored) is caught by the oracle."""
    c = parse_expression("cron(30 2 * * ? *)")
    assert isinstance(c, Cron)
    ny = "America/New_York"
    after = ms(2026, 3, 7, 12, tz=ny)
    buggy = int(dt.datetime(2026, 3, 9, 2, 30, tzinfo=ZoneInfo(ny)).timestamp() * 1000)
    fires_ = oracle_fires(c, ny, after, HORIZON_MIN)
    assert fires_[0] != buggy and fires_[0] == nxt("cron(30 2 * * ? *)", after, ny)


# -- decisions -----------------------------------------------------------------------------------
def sched(expr: str = "rate(1 minute)", **kw: object) -> Schedule:
    base = dict(account="111122223333", group="default", name="s", uid="u1", expression=expr,
                timezone="UTC", target_arn="arn:aws:lambda:cc-local-1:111122223333:function:f",
                role_arn="arn:aws:iam::111122223333:role/r", created_ms=ms(2026, 1, 1),
                modified_ms=ms(2026, 1, 1), cursor_ms=ms(2026, 1, 1))
    base.update(kw)
    return Schedule(**base)  # type: ignore[arg-type]


def run_ticks(s: Schedule, now: int, *, fail: bool = False) -> tuple[Schedule, list[int]]:
    """Drive decide/on_sent as the shell does; returns the ticks sent successfully."""
    sent: list[int] = []
    for _ in range(1000):
        d = core.decide(s, now)
        if isinstance(d, Claim):
            s = d.schedule
        elif isinstance(d, Send):
            after = core.on_sent(s, SendOutcome(not fail), now, random.Random(1),
                                 backoff_base_ms=1000, backoff_cap_ms=60_000)
            if not fail:
                sent.append(d.nominal_ms)
            s = after.schedule
        else:
            return s, sent
    raise AssertionError("no progress")


def test_catch_up_fires_every_missed_tick_once_in_order() -> None:
    t0 = ms(2026, 1, 1)
    s, sent = run_ticks(sched(), t0 + 5 * MIN + 30_000)
    assert sent == [t0 + k * MIN for k in range(1, 6)]
    assert s.cursor_ms == t0 + 5 * MIN and s.fired == 5
    assert core.decide(s, t0 + 5 * MIN + 30_000) == Wait(t0 + 6 * MIN)
    s2, again = run_ticks(s, t0 + 5 * MIN + 40_000)
    assert again == [] and s2 == s


def test_start_date_in_the_past_and_end_date() -> None:
    t0 = ms(2026, 1, 1)
    s = sched(start_ms=t0 - 3 * MIN, cursor_ms=t0 - 3 * MIN - 1, end_ms=t0 + 2 * MIN)
    s, sent = run_ticks(s, t0 + 10 * MIN)
    assert sent == [t0 - 3 * MIN, t0 - 2 * MIN, t0 - MIN, t0, t0 + MIN]  # EndDate: before it
    assert core.decide(s, t0 + 10 * MIN) == Complete(delete=False)
    ended = replace(s, action_after_completion="DELETE")  # AWS: also after an EndDate
    assert core.decide(ended, t0 + 10 * MIN) == Complete(delete=True)


def test_a_claimed_tick_is_resent_with_the_same_event_id_after_a_crash() -> None:
    t0 = ms(2026, 1, 1)
    d = core.decide(sched(), t0 + MIN)
    assert isinstance(d, Claim) and d.schedule.pending == Pending(t0 + MIN)
    # the shell wrote the claim, sent, and died before clearing it: the next one reads the claim
    reloaded = Schedule.from_json(d.schedule.to_json())
    assert reloaded == d.schedule
    send = core.decide(reloaded, t0 + MIN + 5_000)
    assert send == Send(t0 + MIN, core.tick_event_id("u1", t0 + MIN), 1)
    assert core.decide(reloaded, t0 + 9 * MIN) == send  # the claimed tick, not a later one


def test_event_ids_differ_per_tick_and_per_schedule_uid() -> None:
    ids = {core.tick_event_id(u, t) for u in ("a", "b") for t in (1, 2)}
    assert len(ids) == 4 and core.tick_event_id("a", 1) == core.tick_event_id("a", 1)


def test_ticks_older_than_maximum_event_age_are_dropped() -> None:
    t0 = ms(2026, 1, 1)
    s = sched(retry=RetryPolicy(185, 120))  # 2 minutes
    s, sent = run_ticks(s, t0 + 10 * MIN)
    assert sent == [t0 + 8 * MIN, t0 + 9 * MIN, t0 + 10 * MIN]
    assert s.expired == 7
    c = sched("cron(* * * * ? *)", retry=RetryPolicy(185, 60))
    c, sent = run_ticks(c, t0 + 10 * MIN + 30_000)
    assert sent == [t0 + 10 * MIN] and c.expired == 9


def test_flexible_window_offset_is_seeded_and_inside_the_window() -> None:
    t0 = ms(2026, 1, 1)
    s = sched(flexible_window_min=10)
    offsets = [s.fire_ms(t0 + k * MIN) - (t0 + k * MIN) for k in range(200)]
    assert all(0 <= o < 10 * MIN for o in offsets)
    assert len(set(offsets)) > 100  # spread, not one value
    assert offsets == [s.fire_ms(t0 + k * MIN) - (t0 + k * MIN) for k in range(200)]
    d = core.decide(s, t0 + MIN)
    assert d == Wait(s.fire_ms(t0 + MIN)) or s.fire_ms(t0 + MIN) == t0 + MIN
    assert isinstance(core.decide(s, s.fire_ms(t0 + MIN)), Claim)


def test_retries_back_off_then_the_dead_letter_queue() -> None:
    t0 = ms(2026, 1, 1)
    s = sched(retry=RetryPolicy(2, 3600))
    d = core.decide(s, t0 + MIN)
    assert isinstance(d, Claim)
    s = d.schedule
    rng = random.Random(7)
    now = t0 + MIN
    for attempt in (1, 2):
        out = core.on_sent(s, SendOutcome(False, True, "TooManyRequestsException: x"), now, rng,
                           backoff_base_ms=1000, backoff_cap_ms=60_000)
        assert not out.dead_letter and out.schedule.pending is not None
        assert out.schedule.pending.attempts == attempt
        assert now <= out.schedule.pending.next_try_ms <= now + 1000 * 2 ** attempt
        s = out.schedule
        assert core.decide(s, now) == Wait(s.pending.next_try_ms) or (
            s.pending.next_try_ms == now)
        now = s.pending.next_try_ms
        assert isinstance(core.decide(s, now), Send)
    out = core.on_sent(s, SendOutcome(False, True, "x"), now, rng, backoff_base_ms=1000,
                       backoff_cap_ms=60_000)
    assert out.dead_letter and out.exhausted == "MaximumRetryAttempts"
    assert out.schedule.pending is None and out.schedule.dead_lettered == 1
    nr = core.on_sent(replace(s, pending=Pending(t0 + MIN)), SendOutcome(False, False, "404"),
                      now, rng, backoff_base_ms=1000, backoff_cap_ms=60_000)
    assert nr.dead_letter and nr.exhausted == "NonRetryable"
    old = core.on_sent(replace(s, pending=Pending(t0 + MIN)), SendOutcome(False, True, "x"),
                       t0 + MIN + 3600_000, rng, backoff_base_ms=1000, backoff_cap_ms=60_000)
    assert old.dead_letter and old.exhausted == "MaximumEventAgeInSeconds"


def test_disabled_idles_and_at_completes() -> None:
    t0 = ms(2026, 1, 1)
    assert core.decide(sched(state="DISABLED"), t0 + 9 * MIN) == Idle()
    at = sched("at(2026-01-01T00:00:30)", action_after_completion="DELETE")
    assert core.decide(at, t0) == Wait(t0 + 30_000)
    at, sent = run_ticks(at, t0 + MIN)
    assert sent == [t0 + 30_000]
    assert core.decide(at, t0 + MIN) == Complete(delete=True)
    # StartDate/EndDate do not apply to at() (as on AWS)
    at2 = sched("at(2026-01-01T00:00:30)", start_ms=t0 + 5 * MIN, end_ms=t0 + 6 * MIN)
    assert run_ticks(at2, t0 + MIN)[1] == [t0 + 30_000]


def test_render_input_fills_context_attributes() -> None:
    out = core.render_input('{"id": "<aws.scheduler.execution-id>", "t": '
                            '"<aws.scheduler.scheduled-time>", "n": <aws.scheduler.attempt-number>,'
                            ' "a": "<aws.scheduler.schedule-arn>"}', schedule_arn="arn:x",
                            nominal_ms=ms(2026, 1, 1, 0, 1), event_id="e1", attempt=2)
    assert out == b'{"id": "e1", "t": "2026-01-01T00:01:00Z", "n": 2, "a": "arn:x"}'
    assert core.render_input(None, schedule_arn="", nominal_ms=0, event_id="", attempt=1) == b"{}"
