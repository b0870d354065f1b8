"""The control plane's schedules shell (control/schedules.py) over a real SQLite configuration
store, a fake cell and an injected clock: the API's shapes and errors, and exactly-once ticks
across a control plane that dies after every possible store write."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cellcloud.control.configstore import ConfigStore, Entry, SqliteConfigStore
from cellcloud.control.schedules import SCHEDULES, Schedules
from cellcloud.core import schedule as core
from cellcloud.frontend.events import EventStore, Intake
from cellcloud.transport import TransportError

ACCOUNT = "111122223333"
REGION = "cc-local-1"
FN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:tick"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/scheduler"
MIN = 60_000
T0 = 1_800_000_000_000  # a fixed "now"


class Crash(BaseException):
    """The control plane dies here (nothing catches a BaseException on the way out)."""


class CrashingStore:
    """A configuration store that dies after ``writes_left`` more writes."""

    def __init__(self, inner: ConfigStore, writes_left: int | None) -> None:
        self.inner = inner
        self.writes_left = writes_left

    def _write(self) -> None:
        if self.writes_left is not None:
            if self.writes_left == 0:
                raise Crash()
            self.writes_left -= 1

    async def get(self, key: str) -> Entry | None:
        return await self.inner.get(key)

    async def list(self, prefix: str) -> list[Entry]:
        return await self.inner.list(prefix)

    async def put(self, key: str, value: bytes) -> int:
        self._write()
        return await self.inner.put(key, value)

    async def cas(self, key: str, expected_revision: int, value: bytes) -> int | None:
        self._write()
        return await self.inner.cas(key, expected_revision, value)

    async def delete(self, key: str) -> bool:
        self._write()
        return await self.inner.delete(key)

    async def close(self) -> None:
        return None


class FakeCell:
    """A cell's async intake as the frontend's ``http`` op answers it: ids accepted once
    (``dedup`` False plants the bug the design guards against)."""

    def __init__(self, dedup: bool = True) -> None:
        self.dedup = dedup
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.sends = 0
        self.lose_reply_after_accept = False
        self.refuse: tuple[int, str] | None = None
        self.sqs: list[dict[str, Any]] = []

    async def call(self, op: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if op == "sqs":
            self.sqs.append(json.loads(body["b"]))
            return {"s": 200, "h": {}, "b": b"{}"}
        assert op == "http" and body["headers"]["x-amz-invocation-type"] == "Event"
        self.sends += 1
        if self.refuse is not None:
            status, etype = self.refuse
            return {"s": status, "h": {"x-amzn-errortype": etype},
                    "b": json.dumps({"message": "no"}).encode()}
        eid = body["headers"]["x-cellcloud-event-id"]
        if not self.dedup or eid not in {e for e, _ in self.accepted}:
            self.accepted.append((eid, json.loads(body["body"])))
        if self.lose_reply_after_accept:
            raise TransportError("link lost after the cell accepted")
        return {"s": 202, "h": {"x-amzn-requestid": eid}, "b": b""}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make(store: ConfigStore, cell: FakeCell, now: list[int]) -> Schedules:
    return Schedules(store, REGION, lambda account: cell,  # type: ignore[arg-type,return-value]
                     clock=lambda: now[0], seed=1)


async def api(s: Schedules, m: str, p: str, body: Any = None, q: str = "") -> tuple[int, Any]:
    resp = await s.op({"m": m, "p": p, "q": q, "a": ACCOUNT,
                       "b": json.dumps(body).encode() if body is not None else b""})
    return resp["s"], (json.loads(resp["b"]) if resp["b"] else None) | (
        {"__type": resp["h"]["x-amzn-errortype"]} if "x-amzn-errortype" in resp["h"] else {})


def body(expr: str = "rate(1 minute)", **kw: Any) -> dict[str, Any]:
    target = {"Arn": FN, "RoleArn": ROLE,
              "Input": '{"tick": "<aws.scheduler.execution-id>", '
                       '"at": "<aws.scheduler.scheduled-time>"}'}
    target.update(kw.pop("Target", {}))
    return {"ScheduleExpression": expr, "FlexibleTimeWindow": {"Mode": "OFF"},
            "Target": target, **kw}


@pytest.fixture
def store(tmp_path: Path) -> SqliteConfigStore:
    return SqliteConfigStore(str(tmp_path / "config.db"))


def test_api_shapes_and_errors(store: SqliteConfigStore) -> None:
    now = [T0]
    s = make(store, FakeCell(), now)

    async def go() -> None:
        st, doc = await api(s, "POST", "/schedules/every-minute",
                            body(StartDate=(T0 + MIN) / 1000, Description="d"))
        assert st == 200
        assert doc == {"ScheduleArn": f"arn:aws:scheduler:{REGION}:{ACCOUNT}:"
                                      "schedule/default/every-minute"}
        st, doc = await api(s, "POST", "/schedules/every-minute", body())
        assert (st, doc["__type"]) == (409, "ConflictException")
        # a create retried with its idempotency token answers as the first one did
        assert (await api(s, "POST", "/schedules/tok", body(ClientToken="t-1")))[0] == 200
        assert (await api(s, "POST", "/schedules/tok", body(ClientToken="t-1")))[0] == 200
        st, doc = await api(s, "POST", "/schedules/tok", body(ClientToken="t-2"))
        assert (st, doc["__type"]) == (409, "ConflictException")
        assert (await api(s, "DELETE", "/schedules/tok", q="clientToken=d-1"))[0] == 200
        assert (await api(s, "DELETE", "/schedules/tok", q="clientToken=d-1"))[0] == 200
        assert (await api(s, "DELETE", "/schedules/tok", q="clientToken=d-2"))[0] == 404
        now[0] += 3_600_000  # the token is forgotten after schedule_client_token_ms
        assert (await api(s, "DELETE", "/schedules/tok", q="clientToken=d-1"))[0] == 404
        st, doc = await api(s, "GET", "/schedules/every-minute")
        assert st == 200 and doc["ScheduleExpression"] == "rate(1 minute)"
        assert doc["StartDate"] == (T0 + MIN) / 1000 and doc["State"] == "ENABLED"
        assert doc["Target"]["RetryPolicy"] == {"MaximumRetryAttempts": 185,
                                                "MaximumEventAgeInSeconds": 86400}
        assert doc["FlexibleTimeWindow"] == {"Mode": "OFF"} and doc["GroupName"] == "default"
        st, doc = await api(s, "GET", "/schedules/nope")
        assert (st, doc["__type"]) == (404, "ResourceNotFoundException")
        for bad in (body("rate(1 minutes)"), body("cron(0 12 * * * *)"),
                    body(ScheduleExpressionTimezone="Nowhere/Else"),
                    body(Target={"Arn": "arn:aws:sqs:cc-local-1:111122223333:q"}),
                    body(Target={"Arn": f"arn:aws:lambda:{REGION}:999999999999:function:f"}),
                    body(Target={"RoleArn": "nope"}),
                    body(Target={"SqsParameters": {"MessageGroupId": "g"}}),
                    body(Target={"RetryPolicy": {"MaximumRetryAttempts": 186}}),
                    body(Target={"DeadLetterConfig": {"Arn": f"arn:aws:sqs:{REGION}:999999999999:"
                                                              "q"}}),
                    body(FlexibleTimeWindow={"Mode": "FLEXIBLE"}),
                    body(FlexibleTimeWindow={"Mode": "FLEXIBLE", "MaximumWindowInMinutes": 1441}),
                    body(StartDate=(T0 + 2 * MIN) / 1000, EndDate=(T0 + MIN) / 1000),
                    body(State="PAUSED"), body(KmsKeyId="x"), body(Target={"Input": "not json"}), body(KmsKeyArn="arn:aws:kms:x"),
                    {"Target": {}}):
            st, doc = await api(s, "POST", "/schedules/bad", bad)
            assert (st, doc["__type"]) == (400, "ValidationException"), bad
        st, doc = await api(s, "PUT", "/schedules/every-minute",
                            body("cron(0 9 ? * MON-FRI *)", State="DISABLED",
                                 ScheduleExpressionTimezone="Europe/Paris"))
        assert st == 200
        st, doc = await api(s, "GET", "/schedules/every-minute")
        assert doc["State"] == "DISABLED" and doc["ScheduleExpressionTimezone"] == "Europe/Paris"
        assert "StartDate" not in doc  # an update replaces the whole definition, as on AWS
        st, doc = await api(s, "PUT", "/schedules/nope", body())
        assert (st, doc["__type"]) == (404, "ResourceNotFoundException")
        # groups
        st, doc = await api(s, "POST", "/schedules/x", body(GroupName="team"))
        assert (st, doc["__type"]) == (404, "ResourceNotFoundException")
        st, doc = await api(s, "POST", "/schedule-groups/team",
                            {"Tags": [{"Key": "k", "Value": "v"}]})
        assert st == 200 and doc["ScheduleGroupArn"].endswith(":schedule-group/team")
        st, doc = await api(s, "POST", "/schedule-groups/team", {})
        assert (st, doc["__type"]) == (409, "ConflictException")
        assert (await api(s, "POST", "/schedules/x", body(GroupName="team")))[0] == 200
        st, doc = await api(s, "GET", "/schedule-groups")
        assert [g["Name"] for g in doc["ScheduleGroups"]] == ["default", "team"]
        st, doc = await api(s, "GET", "/schedules", q="ScheduleGroup=team")
        assert [x["Name"] for x in doc["Schedules"]] == ["x"]
        st, doc = await api(s, "GET", "/schedules", q="State=DISABLED")
        assert [x["Name"] for x in doc["Schedules"]] == ["every-minute"]
        st, doc = await api(s, "GET", "/schedules", q="MaxResults=1")
        assert len(doc["Schedules"]) == 1 and doc["NextToken"] == "1"
        arn = f"arn:aws:scheduler:{REGION}:{ACCOUNT}:schedule-group/team"
        assert (await api(s, "POST", f"/tags/{arn}", {"Tags": [{"Key": "a", "Value": "b"}]}))[
            0] == 200
        st, doc = await api(s, "GET", f"/tags/{arn}")
        assert doc == {"Tags": [{"Key": "a", "Value": "b"}, {"Key": "k", "Value": "v"}]}
        assert (await api(s, "DELETE", f"/tags/{arn}", q="TagKeys=k"))[0] == 200
        assert (await api(s, "GET", f"/tags/{arn}"))[1] == {"Tags": [{"Key": "a",
                                                                      "Value": "b"}]}
        st, doc = await api(s, "DELETE", "/schedule-groups/default")
        assert (st, doc["__type"]) == (400, "ValidationException")
        assert (await api(s, "DELETE", "/schedule-groups/team"))[0] == 200
        st, doc = await api(s, "GET", "/schedules/x", q="groupName=team")
        assert (st, doc["__type"]) == (404, "ResourceNotFoundException")
        assert (await api(s, "DELETE", "/schedules/every-minute"))[0] == 200
        st, doc = await api(s, "DELETE", "/schedules/every-minute")
        assert (st, doc["__type"]) == (404, "ResourceNotFoundException")

    run(go())


async def _fire_until_quiet(s: Schedules) -> None:
    for _ in range(50):
        if await s.fire_due() == 0:
            return
    raise AssertionError("the schedules never settled")


def _setup(store: ConfigStore, catch_up: int) -> None:
    """A rate(1 minute) schedule started ``catch_up`` minutes ago: that many ticks are due, and
    two at() schedules a few seconds apart."""
    s = make(store, FakeCell(), [T0 - catch_up * MIN - 1_000])

    async def go() -> None:
        assert (await api(s, "POST", "/schedules/minutely",
                          body(StartDate=(T0 - catch_up * MIN) / 1000)))[0] == 200
        for i, sec in enumerate((5, 10)):
            at = core.local(T0 - catch_up * MIN + sec * 1000, core.zone("UTC"))
            assert (await api(s, "POST", f"/schedules/once-{i}",
                              body(f"at({at.isoformat()})",
                                   ActionAfterCompletion="DELETE")))[0] == 200

    run(go())


def _due_ticks(store: SqliteConfigStore) -> set[str]:
    out = set()
    for e in run(store.list(SCHEDULES)):
        sc = core.Schedule.from_json(e.value)
        t = sc.next_nominal_ms(sc.created_ms - 1 if sc.start_ms is None else sc.start_ms - 1)
        while t is not None and t <= T0:
            out.add(core.tick_event_id(sc.uid, t))
            t = sc.next_nominal_ms(t)
    return out


@pytest.mark.parametrize("dedup", [True, False])
def test_each_due_tick_once_across_a_crash_after_every_store_write(tmp_path: Path,
                                                                   dedup: bool) -> None:
    """For every N: a control plane dies after its N-th store write (claims, sends' outcomes,
    deletions), a new one takes over on the same store; the cell accepted each due tick exactly
    once. Without the cell's id check (``dedup`` False, a planted bug) some crash point sends a
    tick twice: the test can fail."""
    catch_up = 3
    reference = SqliteConfigStore(str(tmp_path / "ref.db"))
    _setup(reference, catch_up)
    want = _due_ticks(reference)
    assert len(want) == catch_up + 3  # ticks at -3, -2, -1, 0 min and two at()s
    total_writes = 0
    cell = FakeCell()
    s = make(reference, cell, [T0])
    for _ in range(20):
        n = run(s.fire_due())
        total_writes += n
        if n == 0:
            break
    assert {e for e, _ in cell.accepted} == want and len(cell.accepted) == len(want)
    assert run(reference.list(SCHEDULES))[0].key.endswith("/minutely")  # at()s deleted
    duplicates_seen = False
    for crash_after in range(total_writes + 1):
        inner = SqliteConfigStore(str(tmp_path / f"c{crash_after}-{dedup}.db"))
        _setup(inner, catch_up)
        due = _due_ticks(inner)
        cell = FakeCell(dedup=dedup)
        with pytest.raises(Crash) if crash_after < total_writes else _nothing():
            run(_fire_until_quiet(make(CrashingStore(inner, crash_after), cell, [T0])))
        run(_fire_until_quiet(make(inner, cell, [T0])))  # the restarted control plane
        ids = [e for e, _ in cell.accepted]
        assert set(ids) == due, crash_after
        if dedup:
            assert len(ids) == len(set(ids)) == catch_up + 3, crash_after
        else:
            duplicates_seen |= len(ids) > len(set(ids))
        for _, event in cell.accepted:  # the Input's context attributes were filled in
            assert event["tick"] in ids and event["at"].endswith("Z")
    assert duplicates_seen != dedup


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_store_limits_and_outages_are_answered_by_name(store: SqliteConfigStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cellcloud.control import configstore

    s = make(store, FakeCell(), [T0])
    monkeypatch.setattr(configstore, "config_value_bytes_max", 1000)  # as small as a store's
    st, doc = run(api(s, "POST", "/schedules/big", body(Target={"Input": json.dumps("x" * 2000)})))
    assert (st, doc["__type"]) == (400, "ValidationException")
    assert "configuration store" in doc["Message"]

    async def down(*a: object) -> None:
        raise configstore.ConfigStoreUnavailable("gone")

    monkeypatch.setattr(store, "get", down)
    st, doc = run(api(s, "GET", "/schedules/big"))
    assert (st, doc["__type"]) == (500, "InternalServerException")


def test_a_lost_reply_is_resent_and_accepted_once(store: SqliteConfigStore) -> None:
    _setup(store, 2)
    cell = FakeCell()
    cell.lose_reply_after_accept = True
    s = make(store, cell, [T0])
    run(s.fire_due())  # each schedule's first due tick: accepted, but the reply is lost
    assert len(cell.accepted) == 3 and s.counters["send_failed"] == 3
    cell.lose_reply_after_accept = False
    s2 = make(store, cell, [T0 + 5_000])  # a new control plane, past the backoff (<= 2 s)
    run(_fire_until_quiet(s2))
    ids = [e for e, _ in cell.accepted]
    assert len(ids) == len(set(ids)) == 5  # ticks at -2, -1, 0 min and two at()s
    assert cell.sends == 3 + 3 + 2  # three re-sends answered as already accepted


def test_refused_ticks_retry_then_reach_the_dead_letter_queue(store: SqliteConfigStore) -> None:
    now = [T0]
    cell = FakeCell()
    s = make(store, cell, now)
    dlq = f"arn:aws:sqs:{REGION}:{ACCOUNT}:dlq"
    run(api(s, "POST", "/schedules/r", body(Target={
        "RetryPolicy": {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 3600},
        "DeadLetterConfig": {"Arn": dlq}})))
    cell.refuse = (429, "TooManyRequestsException")
    now[0] = T0 + MIN
    run(s.fire_due())
    assert cell.sends == 1 and not cell.sqs
    for _ in range(2):  # each round: the tick's retry is due again (backoff <= 4 s)
        now[0] += 10 * MIN
        run(s.fire_due())
    # three tries of the first tick (then the DLQ), and the next tick's first try
    assert cell.sends == 4 and len(cell.sqs) == 1
    first = cell.sqs[0]
    assert first["QueueUrl"].endswith(f"/{ACCOUNT}/dlq")
    attrs = first["MessageAttributes"]
    assert attrs["EXHAUSTED_RETRY_CONDITION"]["StringValue"] == "MaximumRetryAttempts"
    assert attrs["ERROR_CODE"]["StringValue"] == "TooManyRequestsException"
    assert attrs["RETRY_ATTEMPTS"]["StringValue"] == "2"
    assert attrs["TARGET_ARN"]["StringValue"] == FN
    cell.refuse = (404, "ResourceNotFoundException")  # not retryable: straight to the DLQ
    before = len(cell.sqs)
    now[0] += MIN
    run(s.fire_due())
    assert len(cell.sqs) > before  # the pending tick and every later one due by now
    assert {m["MessageAttributes"]["EXHAUSTED_RETRY_CONDITION"]["StringValue"]
            for m in cell.sqs[before:]} == {"NonRetryable"}


def test_the_cell_intake_accepts_a_supplied_event_id_once(tmp_path: Path) -> None:
    """Regression for the exactly-once design: before, an async invoke's id was always a new
    uuid4, so a re-sent tick was a second event."""
    intake = Intake(EventStore(str(tmp_path)))
    a = intake.accept(ACCOUNT, "f", "$LATEST", b"{}", 3, event_id="tick-1")
    b = intake.accept(ACCOUNT, "f", "$LATEST", b"{}", 3, event_id="tick-1")
    c = intake.accept(ACCOUNT, "f", "$LATEST", b"{}", 3)
    assert a == b == "tick-1" and c != a
    assert intake.store.depth(ACCOUNT, "f") == 2
    assert intake.counters["deduplicated"] == 1
    # delivered (the row is gone): still remembered
    intake.store.db.execute("DELETE FROM events WHERE id='tick-1'")
    intake.accept(ACCOUNT, "f", "$LATEST", b"{}", 3, event_id="tick-1")
    assert intake.store.depth(ACCOUNT, "f") == 1


def test_quotas_are_service_quota_exceeded(store: SqliteConfigStore) -> None:
    from dataclasses import replace

    from cellcloud.core.limits import DEFAULT_LIMITS

    s = Schedules(store, REGION, lambda account: None, clock=lambda: T0,
                  limits=replace(DEFAULT_LIMITS, schedules_per_tenant_max=2,
                                 schedules_per_region_max=3, schedule_groups_per_tenant_max=1))

    async def go() -> None:
        for i in range(2):
            assert (await api(s, "POST", f"/schedules/s{i}", body()))[0] == 200
        st, doc = await api(s, "POST", "/schedules/s2", body())
        assert (st, doc["__type"]) == (402, "ServiceQuotaExceededException")
        assert "schedules_per_tenant_max" in doc["Message"]
        other = await s.op({"m": "POST", "p": "/schedules/o", "q": "", "a": "444455556666",
                            "b": json.dumps(body(Target={
                                "Arn": f"arn:aws:lambda:{REGION}:444455556666:function:f"})
                                            ).encode()})
        assert other["s"] == 200
        other = await s.op({"m": "POST", "p": "/schedules/o2", "q": "", "a": "444455556666",
                            "b": json.dumps(body(Target={
                                "Arn": f"arn:aws:lambda:{REGION}:444455556666:function:f"})
                                            ).encode()})
        assert other["s"] == 402 and b"schedules_per_region_max" in other["b"]
        assert (await api(s, "POST", "/schedule-groups/g1", {}))[0] == 200
        assert (await api(s, "POST", "/schedule-groups/g2", {}))[0] == 402

    run(go())
