"""Schedules end to end (issue #15): boto3's ``scheduler`` client through the router, ticks
fired by the control plane into the tenant's cell, a handler that writes each tick to a ledger
OUTSIDE the region (experiment/ledger.py: its own network namespace, reached through the
function's egress), and the control plane SIGKILLed while ticks are due: every due tick reaches
the ledger exactly once."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from cellcloud.experiment.ledger import World

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

ROLE = "arn:aws:iam::000000000000:role/scheduler"
wait_s = 90.0  # a bound on every wait below, never a sleep standing in for one
HANDLER = '''
import json, os, time, urllib.request
def handler(event, context):
    rec = {"s": event["s"], "tick": event["tick"], "at": event["at"],
           "rid": context.aws_request_id, "ran": time.time()}
    req = urllib.request.Request(os.environ["LEDGER"], data=json.dumps(rec).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    return rec
'''


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    w.start()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "schedules") as r:
        yield r


def _client(region: Region, service: str) -> Any:
    return boto3.client(service, endpoint_url=region.endpoint,
                        region_name=str(region.doc["region"]),
                        aws_access_key_id=str(region.doc["access_key_id"]),
                        aws_secret_access_key=str(region.doc["secret_access_key"]),
                        config=Config(retries={"max_attempts": 1}, read_timeout=60))


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def _wait(cond: Any, what: str, bound_s: float = wait_s) -> Any:
    deadline = time.monotonic() + bound_s
    while True:
        out = cond()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling a condition, bounded by the deadline above


def _control_pid(region: Region) -> int:
    return int(region.region_json()["components"]["control"]["pid"])  # type: ignore[index]


def test_scheduler_api_through_boto3(region: Region) -> None:
    sch = _client(region, "scheduler")
    acct, reg = region.doc["account_id"], region.doc["region"]
    fn = f"arn:aws:lambda:{reg}:{acct}:function:nothing"
    target = {"Arn": fn, "RoleArn": ROLE}
    out = sch.create_schedule(Name="nightly", ScheduleExpression="cron(0 2 * * ? *)",
                              ScheduleExpressionTimezone="Europe/Paris", Target=target,
                              FlexibleTimeWindow={"Mode": "FLEXIBLE",
                                                  "MaximumWindowInMinutes": 15})
    assert out["ScheduleArn"] == f"arn:aws:scheduler:{reg}:{acct}:schedule/default/nightly"
    got = sch.get_schedule(Name="nightly")
    assert got["ScheduleExpressionTimezone"] == "Europe/Paris"
    assert got["FlexibleTimeWindow"] == {"Mode": "FLEXIBLE", "MaximumWindowInMinutes": 15}
    assert isinstance(got["CreationDate"], dt.datetime)
    with pytest.raises(sch.exceptions.ConflictException):
        sch.create_schedule(Name="nightly", ScheduleExpression="rate(1 day)", Target=target,
                            FlexibleTimeWindow={"Mode": "OFF"})
    with pytest.raises(sch.exceptions.ValidationException):
        sch.create_schedule(Name="bad", ScheduleExpression="cron(0 2 * * * *)", Target=target,
                            FlexibleTimeWindow={"Mode": "OFF"})
    with pytest.raises(sch.exceptions.ValidationException):
        sch.create_schedule(Name="bad", ScheduleExpression="rate(5 fortnights)", Target=target,
                            FlexibleTimeWindow={"Mode": "OFF"})
    with pytest.raises(sch.exceptions.ResourceNotFoundException):
        sch.get_schedule(Name="absent")
    sch.update_schedule(Name="nightly", ScheduleExpression="rate(2 hours)", Target=target,
                        FlexibleTimeWindow={"Mode": "OFF"}, State="DISABLED")
    assert sch.get_schedule(Name="nightly")["State"] == "DISABLED"
    group = sch.create_schedule_group(Name="team", Tags=[{"Key": "owner", "Value": "ops"}])
    sch.tag_resource(ResourceArn=group["ScheduleGroupArn"], Tags=[{"Key": "k", "Value": "v"}])
    assert sch.list_tags_for_resource(ResourceArn=group["ScheduleGroupArn"])["Tags"] == [
        {"Key": "k", "Value": "v"}, {"Key": "owner", "Value": "ops"}]
    sch.untag_resource(ResourceArn=group["ScheduleGroupArn"], TagKeys=["owner"])
    assert sch.list_tags_for_resource(ResourceArn=group["ScheduleGroupArn"])["Tags"] == [
        {"Key": "k", "Value": "v"}]
    assert sch.get_schedule_group(Name="team")["State"] == "ACTIVE"
    assert [g["Name"] for g in sch.list_schedule_groups()["ScheduleGroups"]] == ["default",
                                                                                 "team"]
    assert [s["Name"] for s in sch.list_schedules(State="DISABLED")["Schedules"]] == ["nightly"]
    sch.delete_schedule(Name="nightly")
    sch.delete_schedule_group(Name="team")
    with pytest.raises(sch.exceptions.ResourceNotFoundException):
        sch.delete_schedule(Name="nightly")
    # another tenant sees none of it
    out_b = region.cli("tenant", "create", "sched-b").stdout
    fields = dict(line.split(None, 1) for line in out_b.splitlines() if line.strip())
    sch_b = boto3.client("scheduler", endpoint_url=region.endpoint, region_name=str(reg),
                         aws_access_key_id=fields["aws_access_key_id"].strip(),
                         aws_secret_access_key=fields["aws_secret_access_key"].strip())
    sch.create_schedule(Name="mine", ScheduleExpression="rate(1 day)", Target=target,
                        FlexibleTimeWindow={"Mode": "OFF"}, State="DISABLED")
    assert sch_b.list_schedules()["Schedules"] == []
    with pytest.raises(sch_b.exceptions.ResourceNotFoundException):
        sch_b.get_schedule(Name="mine")
    sch.delete_schedule(Name="mine")


def test_each_due_tick_reaches_the_ledger_once_across_control_plane_kills(
        region: Region, world: World) -> None:
    lam, sch = _client(region, "lambda"), _client(region, "scheduler")
    acct, reg = region.doc["account_id"], region.doc["region"]
    lam.create_function(FunctionName="ledger", Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Timeout=15, Code={"ZipFile": _zip(
                            {"app.py": HANDLER})},
                        Environment={"Variables": {"LEDGER": world.url}})
    fn = f"arn:aws:lambda:{reg}:{acct}:function:ledger"

    def target(name: str) -> dict[str, Any]:
        return {"Arn": fn, "RoleArn": ROLE, "Input": json.dumps(
            {"s": name, "tick": "<aws.scheduler.execution-id>",
             "at": "<aws.scheduler.scheduled-time>"})}

    now = int(time.time())
    start = now - 150  # rate(1 minute) from 150 s ago: ticks at -150, -90 and -30 s are due
    sch.create_schedule(Name="catch-up", ScheduleExpression="rate(1 minute)",
                        StartDate=dt.datetime.fromtimestamp(start, dt.UTC),
                        EndDate=dt.datetime.fromtimestamp(now + 10, dt.UTC),
                        Target=target("catch-up"), FlexibleTimeWindow={"Mode": "OFF"})
    ats = {}
    for name, ahead_s in (("once-a", 12), ("once-b", 18)):
        when = dt.datetime.fromtimestamp(now + ahead_s, dt.UTC).replace(tzinfo=None)
        ats[name] = when
        sch.create_schedule(Name=name, ScheduleExpression=f"at({when.isoformat()})",
                            Target=target(name), FlexibleTimeWindow={"Mode": "OFF"},
                            ActionAfterCompletion="DELETE")
    want = {("catch-up", _utc(start + 60 * k)) for k in range(3)} | {
        (name, when.strftime("%Y-%m-%dT%H:%M:%SZ")) for name, when in ats.items()}

    # Kill the control plane as soon as the first tick is in the ledger (mid catch-up), and
    # again once the restarted one has fired the first at() — before the second is due.
    _wait(world.records, "the first tick in the ledger")
    first_pid = _control_pid(region)
    os.kill(first_pid, signal.SIGKILL)
    _wait(lambda: _control_pid(region) != first_pid, "the supervisor to restart the control")
    _wait(lambda: any(r["s"] == "once-a" for r in world.records()), "the first at() tick")
    second_pid = _control_pid(region)
    os.kill(second_pid, signal.SIGKILL)
    _wait(lambda: _control_pid(region) != second_pid, "the control plane's second restart")

    def settled() -> bool:
        seen = {(r["s"], r["at"]) for r in world.records()}
        if not want <= seen:
            return False
        # the at() schedules delete themselves once their tick is handed over
        return {s["Name"] for s in sch.list_schedules()["Schedules"]} == {"catch-up"}

    _wait(settled, "every due tick in the ledger")
    records = world.records()
    counts = Counter((r["s"], r["at"]) for r in records)
    assert set(counts) == want
    assert all(n == 1 for n in counts.values()), counts
    # the event id the cell deduplicates on is the tick's execution id and the request id
    assert all(r["tick"] == r["rid"] for r in records)
    assert len({r["tick"] for r in records}) == len(records)


def _utc(epoch_s: int) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.slow
def test_a_minute_rate_fires_on_time_while_the_control_plane_is_killed_between_ticks(
        region: Region, world: World) -> None:
    """rate(1 minute) as AWS runs it (the first tick a minute after creation), for three ticks,
    the control plane SIGKILLed after each: every tick once, and how late each ran (printed)."""
    lam, sch = _client(region, "lambda"), _client(region, "scheduler")
    acct, reg = region.doc["account_id"], region.doc["region"]
    try:
        lam.get_function(FunctionName="ledger")
    except lam.exceptions.ResourceNotFoundException:
        lam.create_function(FunctionName="ledger", Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Timeout=15, Code={"ZipFile": _zip(
                                {"app.py": HANDLER})},
                            Environment={"Variables": {"LEDGER": world.url}})
    sch.create_schedule(Name="minutely", ScheduleExpression="rate(1 minute)",
                        Target={"Arn": f"arn:aws:lambda:{reg}:{acct}:function:ledger",
                                "RoleArn": ROLE, "Input": json.dumps(
                                    {"s": "minutely", "tick": "<aws.scheduler.execution-id>",
                                     "at": "<aws.scheduler.scheduled-time>"})},
                        FlexibleTimeWindow={"Mode": "OFF"})
    for n in (1, 2, 3):  # a tick a minute: each wait is bounded by more than that
        _wait(lambda n=n: sum(r["s"] == "minutely" for r in world.records()) >= n,
              f"tick {n}", bound_s=150.0)
        pid = _control_pid(region)
        os.kill(pid, signal.SIGKILL)
        _wait(lambda pid=pid: _control_pid(region) != pid, "the control plane's restart")
    sch.delete_schedule(Name="minutely")
    mine = [r for r in world.records() if r["s"] == "minutely"]
    counts = Counter(r["at"] for r in mine)
    assert all(n == 1 for n in counts.values()), counts
    ats = sorted(counts)
    steps = [dt.datetime.fromisoformat(b[:-1]) - dt.datetime.fromisoformat(a[:-1])
             for a, b in zip(ats, ats[1:], strict=False)]
    assert all(s == dt.timedelta(minutes=1) for s in steps), ats  # none missed
    late = [r["ran"] - dt.datetime.fromisoformat(r["at"][:-1]).replace(
        tzinfo=dt.UTC).timestamp() for r in mine]
    print(f"schedule lateness (handler start - scheduled time), s: "
          f"{', '.join(f'{x:.2f}' for x in late)}")
