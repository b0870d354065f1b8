"""Async invokes against a real region: boto3's lambda and sqs clients, a dispatcher killed
mid-delivery, and a cell driven past its capacity. Every wait is for a condition, bounded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

pytestmark = pytest.mark.integration

ROLE = "arn:aws:iam::123456789012:role/cellcloud-test"
CODE = '''import time
def handler(event, context):
    print("run", context.aws_request_id)
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        raise ValueError("planned failure")
    return {"request_id": context.aws_request_id, "event": event}
'''


def wait_for(cond: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling interval of a bounded wait


def clients(region: Region) -> tuple[Any, Any]:
    kw = dict(endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
              aws_access_key_id=str(region.doc["access_key_id"]),
              aws_secret_access_key=str(region.doc["secret_access_key"]),
              config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                            read_timeout=60, connect_timeout=10, max_pool_connections=32))
    return boto3.client("lambda", **kw), boto3.client("sqs", **kw)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "async-region", "--agents-per-cell", "2") as r:
        yield r


def deploy(lam: Any, **kw: Any) -> str:
    name = f"a-{uuid.uuid4().hex[:10]}"
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                        Code={"ZipFile": make_zip({"app.py": CODE})}, **kw)
    return name


def drain(sqs: Any, url: str, want: int, timeout_s: float = 90.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    def more() -> bool:
        resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for m in resp.get("Messages", []):
            got.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        return len(got) >= want

    wait_for(more, timeout_s, f"{want} messages on {url}")
    return got


def test_dlq_round_trip_with_boto3(region: Region) -> None:
    lam, sqs = clients(region)
    acct, reg = region.doc["account_id"], region.doc["region"]
    name = deploy(lam)
    q = uuid.uuid4().hex[:8]
    ok_url = sqs.create_queue(QueueName=f"ok-{q}")["QueueUrl"]
    dlq_url = sqs.create_queue(QueueName=f"dlq-{q}")["QueueUrl"]
    assert sqs.get_queue_url(QueueName=f"dlq-{q}")["QueueUrl"] == dlq_url
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    assert dlq_arn == f"arn:aws:sqs:{reg}:{acct}:dlq-{q}"
    cfg = lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=1, MaximumEventAgeInSeconds=600,
        DestinationConfig={"OnSuccess": {"Destination": f"arn:aws:sqs:{reg}:{acct}:ok-{q}"},
                           "OnFailure": {"Destination": dlq_arn}})
    assert cfg["MaximumRetryAttempts"] == 1
    assert lam.get_function_event_invoke_config(FunctionName=name)[
        "DestinationConfig"]["OnFailure"]["Destination"] == dlq_arn
    lam.update_function_event_invoke_config(FunctionName=name, MaximumEventAgeInSeconds=900)
    [listed] = lam.list_function_event_invoke_configs(FunctionName=name)[
        "FunctionEventInvokeConfigs"]
    assert listed["MaximumEventAgeInSeconds"] == 900 and listed["MaximumRetryAttempts"] == 1
    with pytest.raises(lam.exceptions.ClientError):
        lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=3)

    good = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"n": 1}')
    bad = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"fail": true}')
    assert good["StatusCode"] == bad["StatusCode"] == 202
    good_id, bad_id = (r["ResponseMetadata"]["RequestId"] for r in (good, bad))

    [ok] = drain(sqs, ok_url, 1)
    assert ok["requestContext"]["requestId"] == good_id
    assert ok["requestContext"]["condition"] == "Success"
    assert ok["responsePayload"] == {"request_id": good_id, "event": {"n": 1}}  # stable id
    [failed] = drain(sqs, dlq_url, 1)
    assert failed["requestContext"]["requestId"] == bad_id
    assert failed["requestContext"]["condition"] == "RetriesExhausted"
    assert failed["requestContext"]["approximateInvokeCount"] == 2  # 1 + MaximumRetryAttempts
    assert failed["requestPayload"] == {"fail": True}
    assert failed["responsePayload"]["errorType"] == "ValueError"
    lam.delete_function_event_invoke_config(FunctionName=name)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_event_invoke_config(FunctionName=name)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_url(QueueName=f"missing-{q}")


def test_killed_dispatcher_redelivers_with_the_same_request_id(region: Region) -> None:
    lam, sqs = clients(region)
    acct, reg = region.doc["account_id"], region.doc["region"]
    name = deploy(lam, Timeout=30)
    q = f"ok-{uuid.uuid4().hex[:8]}"
    url = sqs.create_queue(QueueName=q)["QueueUrl"]
    lam.put_function_event_invoke_config(
        FunctionName=name, DestinationConfig={
            "OnSuccess": {"Destination": f"arn:aws:sqs:{reg}:{acct}:{q}"}})
    resp = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"sleep": 3}')
    event_id = resp["ResponseMetadata"]["RequestId"]
    db = sqlite3.connect(os.path.join(region.state_dir, "cells", "cell-1", "frontend",
                                      "events.db"))

    def leased() -> bool:
        row = db.execute("SELECT lease_owner FROM events WHERE id=?", (event_id,)).fetchone()
        return row is not None and row[0] is not None

    wait_for(leased, 30, "the dispatcher to lease the event")
    assert not region.client.logs(name)  # the first delivery has not finished
    pid = region.region_json()["components"]["cell-1-dispatcher"]["pid"]  # type: ignore[index]
    os.kill(int(pid), signal.SIGKILL)  # mid-delivery: the handler is still sleeping

    [rec] = drain(sqs, url, 1, timeout_s=120)
    assert rec["requestContext"]["requestId"] == event_id
    assert rec["responsePayload"]["request_id"] == event_id
    restarted = region.region_json()["components"]["cell-1-dispatcher"]  # type: ignore[index]
    assert restarted["pid"] != pid and restarted["restarts"] >= 1

    # It ran twice (at least once delivery), both times as the same request id.
    def runs() -> int:
        return sum(e["requestId"] == event_id and "run" in e["message"]
                   for e in region.client.logs(name))

    wait_for(lambda: runs() >= 2, 30, "both runs in the function's log")
    assert db.execute("SELECT COUNT(*) FROM events WHERE id=?", (event_id,)).fetchone()[0] == 0


def test_async_events_of_a_deleted_function_go_to_no_one_and_do_not_stick(
        region: Region) -> None:
    lam, _ = clients(region)
    name = deploy(lam)
    lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"sleep": 0}')
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=f"{name}-nope", InvocationType="Event", Payload=b"{}")
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName=name, InvocationType="Event", Payload=b"{not json")
    db = sqlite3.connect(os.path.join(region.state_dir, "cells", "cell-1", "frontend",
                                      "events.db"))
    wait_for(lambda: db.execute("SELECT COUNT(*) FROM events WHERE name=?",
                                (name,)).fetchone()[0] == 0, 60, "the queue to drain")


@pytest.fixture(scope="module")
def small_region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "small-region", "--agents-per-cell", "1",
                        "--envs-per-agent-max", "2") as r:
        yield r


def test_over_capacity_sync_invokes_get_429_with_retry_after(small_region: Region) -> None:
    lam, _ = clients(small_region)
    name = deploy(lam, Timeout=30)
    sent = 8

    def call(_: int) -> tuple[int, dict[str, str]]:
        try:
            r = lam.invoke(FunctionName=name, Payload=b'{"sleep": 5}')
            return r["StatusCode"], r["ResponseMetadata"]["HTTPHeaders"]
        except lam.exceptions.TooManyRequestsException as e:
            return 429, e.response["ResponseMetadata"]["HTTPHeaders"]

    with ThreadPoolExecutor(sent) as pool:
        results = list(pool.map(call, range(sent)))
    ok = [h for s, h in results if s == 200]
    throttled = [h for s, h in results if s == 429]
    assert len(ok) + len(throttled) == sent  # nothing else: no 5xx, no hang
    assert 1 <= len(ok) <= 2  # the cell admits two environments
    assert len(throttled) >= sent - 2
    assert all(int(h["retry-after"]) >= 1 for h in throttled)


def test_native_async_api_and_queue_cli_inspect_replay_purge(region: Region) -> None:
    lam, sqs = clients(region)
    acct, reg = region.doc["account_id"], region.doc["region"]
    name = deploy(lam)
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=dlq)["QueueUrl"]
    lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=0,
        DestinationConfig={"OnFailure": {"Destination": f"arn:aws:sqs:{reg}:{acct}:{dlq}"}})
    status, headers, body = region.client.request(
        "POST", f"/cellcloud/v1/functions/{name}/events", b'{"fail": true, "k": 7}',
        {"content-type": "application/json"})
    assert status == 202
    event_id = json.loads(body)["RequestId"]
    assert headers["x-amzn-requestid"] == event_id

    def depth() -> int:
        a = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"])

    wait_for(lambda: depth() == 1, 60, "the failure record in the DLQ")
    shown = region.cli("queue", "inspect", dlq).stdout
    assert event_id in shown and "RetriesExhausted" in shown
    assert depth() == 1  # inspect only peeks
    assert dlq in region.cli("queue", "ls").stdout
    out = region.cli("queue", "replay", dlq).stdout
    assert "replayed 1" in out
    # The replayed event fails again (it is planned to) and comes back as a new event.
    [again] = drain(sqs, dlq_url, 1)
    assert again["requestPayload"] == {"fail": True, "k": 7}
    assert again["requestContext"]["requestId"] != event_id
    sqs.send_message(QueueUrl=dlq_url, MessageBody="not a record")
    region.cli("queue", "purge", dlq)
    assert depth() == 0


def test_async_payload_limit_is_one_mb_through_the_router(region: Region) -> None:
    # Issue #11: Event invokes take up to 1 MB (1,048,576 bytes); one byte more is 413.
    lam, _ = clients(region)
    name = deploy(lam)
    limit = 1_048_576
    ok = lam.invoke(FunctionName=name, InvocationType="Event",
                    Payload=b'{"pad": "' + b"x" * (limit - 11) + b'"}')
    assert ok["StatusCode"] == 202
    with pytest.raises(lam.exceptions.ClientError) as e:
        lam.invoke(FunctionName=name, InvocationType="Event",
                   Payload=b'{"pad": "' + b"x" * (limit - 10) + b'"}')
    r = e.value.response
    assert (r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"]) == (
        413, "RequestEntityTooLargeException")


def test_zero_reserved_concurrency_sends_events_to_on_failure_without_retries(
        region: Region) -> None:
    # Issue #11: with reserved concurrency 0 an async event goes to the on-failure destination
    # at once (it used to be retried as a throttle for up to MaximumEventAgeInSeconds, 6 h).
    lam, sqs = clients(region)
    acct, reg = region.doc["account_id"], region.doc["region"]
    name = deploy(lam)
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=dlq)["QueueUrl"]
    lam.put_function_event_invoke_config(
        FunctionName=name,
        DestinationConfig={"OnFailure": {"Destination": f"arn:aws:sqs:{reg}:{acct}:{dlq}"}})
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    resp = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"k": 1}')
    assert resp["StatusCode"] == 202
    [rec] = drain(sqs, dlq_url, 1, timeout_s=60)
    assert rec["requestContext"]["requestId"] == resp["ResponseMetadata"]["RequestId"]
    assert rec["requestContext"]["condition"] == "ZeroReservedConcurrency"
    assert rec["requestContext"]["approximateInvokeCount"] == 1
    assert rec["requestPayload"] == {"k": 1}
    assert not [e for e in region.client.logs(name) if "run" in e["message"]]  # never ran


def test_dead_letter_config_receives_exhausted_events(region: Region) -> None:
    lam, sqs = clients(region)
    acct, reg = region.doc["account_id"], region.doc["region"]
    q = uuid.uuid4().hex[:8]
    dlq_url = sqs.create_queue(QueueName=f"fdlq-{q}")["QueueUrl"]
    dest_url = sqs.create_queue(QueueName=f"fdest-{q}")["QueueUrl"]
    dlq_arn = f"arn:aws:sqs:{reg}:{acct}:fdlq-{q}"
    name = deploy(lam, DeadLetterConfig={"TargetArn": dlq_arn})
    assert lam.get_function_configuration(FunctionName=name)["DeadLetterConfig"] == {
        "TargetArn": dlq_arn}
    for bad in (f"arn:aws:sqs:{reg}:210987654321:fdlq-{q}",  # another account's
                f"arn:aws:sqs:{reg}:{acct}:missing-{q}"):  # no such queue
        with pytest.raises(lam.exceptions.InvalidParameterValueException):
            lam.update_function_configuration(FunctionName=name,
                                              DeadLetterConfig={"TargetArn": bad})
    assert lam.get_function_configuration(FunctionName=name)["DeadLetterConfig"] == {
        "TargetArn": dlq_arn}
    # both the dead-letter queue and an on-failure destination receive the failed event
    lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=0, DestinationConfig={
            "OnFailure": {"Destination": f"arn:aws:sqs:{reg}:{acct}:fdest-{q}"}})
    bad_id = lam.invoke(FunctionName=name, InvocationType="Event",
                        Payload=b'{"fail": true}')["ResponseMetadata"]["RequestId"]

    def one(url: str) -> dict[str, Any]:
        msgs = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1,
                                   MessageAttributeNames=["All"]).get("Messages", [])
        return msgs[0] if msgs else {}

    dead = wait_for(lambda: one(dlq_url), 90, "the dead-letter message")
    assert json.loads(dead["Body"]) == {"fail": True}
    attrs = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attrs == {"RequestID": bad_id, "ErrorCode": "200",
                     "ErrorMessage": "planned failure"}
    assert dead["MessageAttributes"]["ErrorCode"]["DataType"] == "Number"
    rec = json.loads(wait_for(lambda: one(dest_url), 90, "the destination record")["Body"])
    assert rec["requestContext"]["requestId"] == bad_id
    lam.update_function_configuration(FunctionName=name, DeadLetterConfig={"TargetArn": ""})
    assert "DeadLetterConfig" not in lam.get_function_configuration(FunctionName=name)
