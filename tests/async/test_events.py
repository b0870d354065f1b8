"""The event file's claim/lease/complete rules and its fairness, against real SQLite."""

from __future__ import annotations

import pytest

from cellcloud.core import errors
from cellcloud.core.retry import lease_margin_ms
from cellcloud.frontend import events
from cellcloud.frontend.events import Event, EventStore, Intake


def _ev(i: int, fn: str = "f", at: int = 0) -> Event:
    return Event(f"e{fn}{i}", "111111111111", fn, "$LATEST", b"{}", at, 3, 0, 0)


def test_claimed_events_are_leased_until_completed_or_expired(tmp_path: object) -> None:
    s = EventStore(str(tmp_path))
    s.insert(_ev(1))
    [ev] = s.claim("a", 10, 16, 4, {})
    assert s.claim("b", 11, 16, 4, {}) == []  # leased by a
    expiry = 10 + 3000 + lease_margin_ms
    [again] = s.claim("b", expiry, 16, 4, {})  # a's lease ran out: b takes it over
    assert again.id == ev.id
    assert not s.complete(ev.id, "a")  # a lost its lease: it cannot complete
    assert s.complete(ev.id, "b") and s.depth() == 0


def test_reschedule_and_release_all(tmp_path: object) -> None:
    s = EventStore(str(tmp_path))
    s.insert(_ev(1))
    [ev] = s.claim("a", 0, 16, 4, {})
    assert s.reschedule(ev.id, "a", 500, 1, 0, "boom")
    assert s.claim("a", 499, 16, 4, {}) == []
    [ev] = s.claim("a", 500, 16, 4, {})
    assert ev.attempts == 1
    assert s.release_all_leases() == 1  # a new dispatcher (holding the lock) takes them back
    assert [e.id for e in s.claim("b", 501, 16, 4, {})] == [ev.id]


def test_one_functions_backlog_does_not_starve_another(tmp_path: object) -> None:
    s = EventStore(str(tmp_path))
    for i in range(500):
        s.insert(_ev(i, "hog"))
    s.insert(_ev(0, "quiet", at=10))
    picked = s.claim("a", 10, 8, 4, {})
    assert [e.name for e in picked].count("quiet") == 1
    assert [e.name for e in picked].count("hog") == 4  # capped per function
    backlog = {b["function"]: b for b in s.backlog(20)}
    assert backlog["hog"]["queued"] == 500 and backlog["hog"]["oldest_age_ms"] == 20


def test_intake_sheds_with_429_when_a_function_queue_is_full(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "events_per_function_max", 3)
    intake = Intake(EventStore(str(tmp_path)))
    for _ in range(3):
        intake.accept("111111111111", "f", "$LATEST", b"{}", 3)
    with pytest.raises(errors.LambdaError) as e:
        intake.accept("111111111111", "f", "$LATEST", b"{}", 3)
    assert e.value.status == 429 and e.value.headers()["retry-after"]
    intake.accept("111111111111", "g", "$LATEST", b"{}", 3)  # another function still gets in
    assert intake.counters == {"accepted": 4, "shed": 1, "deduplicated": 0}


def test_config_validation() -> None:
    region, acct = "cc-local-1", "111111111111"
    doc = events.check_config({"MaximumRetryAttempts": 1, "DestinationConfig": {
        "OnFailure": {"Destination": f"arn:aws:sqs:{region}:{acct}:dlq"}}}, region, acct)
    p = events.policy_of(doc)
    assert p.retry_attempts_max == 1 and p.on_failure.endswith(":dlq") and p.on_success is None
    for bad in ({"MaximumRetryAttempts": 3}, {"MaximumEventAgeInSeconds": 59},
                {"DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sns:x"}}},
                {"DestinationConfig": {"OnFailure": {
                    "Destination": f"arn:aws:sqs:{region}:222222222222:q"}}}):
        with pytest.raises(errors.LambdaError):
            events.check_config(bad, region, acct)


def test_intake_takes_async_payloads_up_to_one_mb(tmp_path: object) -> None:
    # Issue #11: Lambda's asynchronous payload quota is 1 MB (1,048,576 bytes), not 256 KB.
    intake = Intake(EventStore(str(tmp_path)))
    limit = 1_048_576
    intake.accept("111111111111", "f", "$LATEST", b'"' + b"x" * (limit - 2) + b'"', 3)
    with pytest.raises(errors.LambdaError) as e:
        intake.accept("111111111111", "f", "$LATEST", b'"' + b"x" * (limit - 1) + b'"', 3)
    assert (e.value.status, e.value.type) == (413, "RequestEntityTooLargeException")
    assert intake.counters["accepted"] == 1
