"""SQS event source mappings through a real region, driven by boto3 (issue #15).

The end-to-end test judges by an oracle outside the region: the mapped function reports each
batch it handled (the ids it succeeded with and the ids it failed deliberately) to a ledger
server in a network namespace of its own (experiment/ledger.py), over the environment's
ordinary egress. Every message sent must end processed successfully exactly once, or — the
deliberate failures — in the queue's dead-letter queue (RedrivePolicy), never both, none
lost; the source queue ends empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cellcloud.experiment.ledger import World
from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, lambda_client, new_name

pytestmark = pytest.mark.integration

needs_net = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                               reason="needs root and ip (the ledger's network namespace)")

#: the mapped handler: message n (body {"n": n}) fails when n % 7 == 0, every time; each batch
#: is reported to the ledger before the handler answers
HANDLER = '''
import json, urllib.request

def handler(event, context):
    ok, fail = [], []
    for r in event["Records"]:
        n = json.loads(r["body"])["n"]
        (fail if n % 7 == 0 else ok).append((n, r["messageId"]))
    first = event["Records"][0]
    rec = {"rid": context.aws_request_id, "ok": [n for n, _ in ok],
           "fail": [n for n, _ in fail], "size": len(event["Records"]),
           "keys": sorted(first), "attrs": sorted(first["attributes"]),
           "source": first["eventSource"], "arn": first["eventSourceARN"],
           "region": first["awsRegion"], "mattrs": first["messageAttributes"]}
    data = json.dumps(rec).encode()
    for _ in range(20):
        try:
            urllib.request.urlopen(urllib.request.Request(LEDGER, data=data, method="POST"),
                                   timeout=5).read()
            break
        except OSError:
            pass
    else:
        raise RuntimeError("ledger unreachable")
    return {"batchItemFailures": [{"itemIdentifier": m} for _, m in fail]}
'''


def _sqs(region: Region, key: str | None = None, secret: str | None = None) -> Any:
    return boto3.client(
        "sqs", endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
        aws_access_key_id=key or str(region.doc["access_key_id"]),
        aws_secret_access_key=secret or str(region.doc["secret_access_key"]),
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=60))


def _arn(region: Region, name: str, account: str | None = None) -> str:
    return f"arn:aws:sqs:{region.doc['region']}:{account or region.doc['account_id']}:{name}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip (the ledger's network namespace)")
    w = World()
    w.start()
    try:
        yield w
    finally:
        w.close()


def _wait(cond: Any, what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _state(lam: Any, uuid: str) -> str:
    return str(lam.get_event_source_mapping(UUID=uuid)["State"])


def run_mapping(region: Region, world: World, n: int, batch_size: int,
                timeout_s: float) -> dict[str, Any]:
    """Send ``n`` messages to a queue mapped to the ledger handler; judge by the ledger."""
    lam, sqs = lambda_client(region), _sqs(region)
    fn = new_name("esm")
    code = HANDLER.replace("LEDGER", repr(world.url))
    lam.create_function(FunctionName=fn, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                        Code={"ZipFile": make_zip({"app.py": code})}, Timeout=5)
    dlq = new_name("dlq")
    sqs.create_queue(QueueName=dlq)
    src = new_name("src")
    # maxReceiveCount as a string, as SQS accepts it; a failed message reappears after 10 s
    url = sqs.create_queue(QueueName=src, Attributes={
        "VisibilityTimeout": "10",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": _arn(region, dlq),
                                     "maxReceiveCount": "1"})})["QueueUrl"]
    before = len(world.records())
    kw: dict[str, Any] = {"MaximumBatchingWindowInSeconds": 1} if batch_size > 10 else {}
    m = lam.create_event_source_mapping(
        FunctionName=fn, EventSourceArn=_arn(region, src), BatchSize=batch_size,
        FunctionResponseTypes=["ReportBatchItemFailures"], **kw)
    assert m["State"] == "Creating"
    _wait(lambda: _state(lam, m["UUID"]) == "Enabled", "the mapping to be Enabled")
    t0 = time.monotonic()
    for i in range(0, n, 10):
        r = sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(j), "MessageBody": json.dumps({"n": i + j}),
             **({"MessageAttributes": {"k": {"DataType": "String", "StringValue": "v"}}}
                if i + j == 0 else {})}
            for j in range(min(10, n - i))])
        assert not r.get("Failed"), r
    failing = {i for i in range(n) if i % 7 == 0}
    dlq_url = sqs.get_queue_url(QueueName=dlq)["QueueUrl"]

    def settled() -> bool:
        a = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]
        s = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) == len(failing) and int(
            s["ApproximateNumberOfMessages"]) + int(
            s["ApproximateNumberOfMessagesNotVisible"]) == 0

    _wait(settled, "every message processed or dead-lettered", timeout_s)
    elapsed = time.monotonic() - t0
    records = world.records()[before:]
    dead: list[int] = []
    while True:
        got = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10,
                                  VisibilityTimeout=600).get("Messages", [])
        if not got:
            break
        dead += [json.loads(x["Body"])["n"] for x in got]
    lam.delete_event_source_mapping(UUID=m["UUID"])
    return {"records": records, "dead": dead, "failing": failing, "elapsed_s": elapsed,
            "fn": fn, "src": src}


def judge(n: int, out: dict[str, Any]) -> None:
    ok = Counter(i for r in out["records"] for i in r["ok"])
    failed = Counter(i for r in out["records"] for i in r["fail"])
    dead = Counter(out["dead"])
    assert [i for i, c in ok.items() if c > 1] == [], "processed successfully twice"
    assert set(dead) == out["failing"] and max(dead.values()) == 1, "the DLQ is wrong"
    assert set(ok) == set(range(n)) - out["failing"], "messages lost"
    assert set(failed) == out["failing"] and not set(ok) & set(dead)
    assert min(failed.values()) >= 1


@needs_net
def test_every_message_processed_once_or_dead_lettered(region: Region, world: World) -> None:
    n = 500
    out = run_mapping(region, world, n, batch_size=10, timeout_s=180)
    judge(n, out)
    r0 = next(r for r in out["records"] if 0 in r["fail"])
    assert r0["keys"] == sorted(["messageId", "receiptHandle", "body", "attributes",
                                 "messageAttributes", "md5OfBody", "md5OfMessageAttributes",
                                 "eventSource", "eventSourceARN", "awsRegion"])
    assert r0["attrs"] == sorted(["ApproximateReceiveCount", "SentTimestamp", "SenderId",
                                  "ApproximateFirstReceiveTimestamp"])
    assert r0["mattrs"] == {"k": {"stringValue": "v", "stringListValues": [],
                                  "binaryListValues": [], "dataType": "String"}}
    assert (r0["source"], r0["arn"], r0["region"]) == (
        "aws:sqs", _arn(region, out["src"]), region.doc["region"])
    assert max(r["size"] for r in out["records"]) <= 10


@pytest.mark.slow
@pytest.mark.timeout(1500)
@needs_net
def test_ten_thousand_messages_batches_of_100(region: Region, world: World) -> None:
    n = 10_000
    out = run_mapping(region, world, n, batch_size=100, timeout_s=1200)
    judge(n, out)
    assert max(r["size"] for r in out["records"]) > 10  # batches beyond one receive
    print(f"{n} messages in {out['elapsed_s']:.1f} s")


def test_mapping_api_and_states(region: Region) -> None:
    lam, sqs = lambda_client(region), _sqs(region)
    fn = new_name("esmapi")
    lam.create_function(FunctionName=fn, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                        Code={"ZipFile": make_zip({"app.py": "def handler(e, c):\n  return 1\n"})})
    q = new_name("q")
    sqs.create_queue(QueueName=q)
    pattern = json.dumps({"body": {"kind": ["order"]}})
    m = lam.create_event_source_mapping(
        FunctionName=fn, EventSourceArn=_arn(region, q), BatchSize=5, Enabled=False,
        FilterCriteria={"Filters": [{"Pattern": pattern}]},
        ScalingConfig={"MaximumConcurrency": 2})
    uuid = m["UUID"]
    assert (m["BatchSize"], m["MaximumBatchingWindowInSeconds"], m["State"]) == (5, 0,
                                                                               "Creating")
    assert m["FunctionArn"].endswith(f":function:{fn}")
    assert m["EventSourceMappingArn"].endswith(f":event-source-mapping:{uuid}")
    assert m["FilterCriteria"] == {"Filters": [{"Pattern": pattern}]}
    assert m["ScalingConfig"] == {"MaximumConcurrency": 2}
    _wait(lambda: _state(lam, uuid) == "Disabled", "Disabled")
    with pytest.raises(ClientError) as e:  # one mapping per function and queue
        lam.create_event_source_mapping(FunctionName=fn, EventSourceArn=_arn(region, q))
    assert e.value.response["Error"]["Code"] == "ResourceConflictException"
    up = lam.update_event_source_mapping(UUID=uuid, Enabled=True)
    assert up["State"] == "Enabling"
    _wait(lambda: _state(lam, uuid) == "Enabled", "Enabled")
    assert lam.update_event_source_mapping(UUID=uuid, BatchSize=3)["State"] == "Updating"
    _wait(lambda: _state(lam, uuid) == "Enabled", "Enabled after the update")
    assert lam.get_event_source_mapping(UUID=uuid)["BatchSize"] == 3
    listed = lam.list_event_source_mappings(FunctionName=fn)["EventSourceMappings"]
    assert [x["UUID"] for x in listed] == [uuid]
    assert lam.list_event_source_mappings(EventSourceArn=_arn(region, q))[
        "EventSourceMappings"][0]["UUID"] == uuid
    assert lam.list_event_source_mappings(EventSourceArn=_arn(region, "nothing"))[
        "EventSourceMappings"] == []
    assert lam.delete_event_source_mapping(UUID=uuid)["State"] == "Deleting"

    def gone() -> bool:
        try:
            lam.get_event_source_mapping(UUID=uuid)
        except ClientError as err:
            return err.response["Error"]["Code"] == "ResourceNotFoundException"
        return False

    _wait(gone, "the mapping to be deleted")


def _other_tenant(region: Region) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "cellcloud", "tenant", "create", new_name("t"),
                          "--state-dir", region.state_dir], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {k: v.strip() for k, v in (line.split(None, 1) for line in out.strip().splitlines())}


def test_bad_mappings_are_refused(region: Region) -> None:
    lam, sqs = lambda_client(region), _sqs(region)
    fn = new_name("esmbad")
    lam.create_function(FunctionName=fn, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                        Code={"ZipFile": make_zip({"app.py": "def handler(e, c):\n  return 1\n"})},
                        Timeout=60)
    fast = new_name("esmfast")
    lam.create_function(FunctionName=fast, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler",
                        Code={"ZipFile": make_zip({"app.py": "def handler(e, c):\n  return 1\n"})})
    q = new_name("q")
    sqs.create_queue(QueueName=q)  # visibility 30 s < the function's 60 s
    fq = new_name("f") + ".fifo"
    sqs.create_queue(QueueName=fq, Attributes={"FifoQueue": "true"})
    other = _other_tenant(region)
    osqs = _sqs(region, other["aws_access_key_id"], other["aws_secret_access_key"])
    oq = new_name("oq")
    osqs.create_queue(QueueName=oq)
    olam = lambda_client(region, access_key_id=other["aws_access_key_id"],
                         secret=other["aws_secret_access_key"])
    other_account = osqs.get_queue_attributes(
        QueueUrl=osqs.get_queue_url(QueueName=oq)["QueueUrl"],
        AttributeNames=["QueueArn"])["Attributes"]["QueueArn"].split(":")[4]

    raw = lambda_client(region, validate=False)  # the server must judge, not botocore

    def refused(code: str, **kw: Any) -> str:
        with pytest.raises(ClientError) as e:
            raw.create_event_source_mapping(**{"FunctionName": fast,
                                               "EventSourceArn": _arn(region, q), **kw})
        assert e.value.response["Error"]["Code"] == code, (kw, e.value.response)
        return str(e.value.response["Error"]["Message"])

    msg = refused("InvalidParameterValueException", FunctionName=fn)
    assert "visibility timeout" in msg
    assert "NonExistentQueue" in refused("InvalidParameterValueException",
                                         EventSourceArn=_arn(region, oq, other_account))
    assert "NonExistentQueue" in refused("InvalidParameterValueException",
                                         EventSourceArn=_arn(region, "no-such-queue"))
    refused("InvalidParameterValueException",
            EventSourceArn=f"arn:aws:kinesis:{region.doc['region']}:1:stream/x")
    refused("InvalidParameterValueException", BatchSize=11)
    refused("InvalidParameterValueException", BatchSize=11, EventSourceArn=_arn(region, fq),
            MaximumBatchingWindowInSeconds=1)
    refused("InvalidParameterValueException", ScalingConfig={"MaximumConcurrency": 1})
    assert "filter" in refused("InvalidParameterValueException", FilterCriteria={
        "Filters": [{"Pattern": '{"body": {"kind": [{"wildcard": "x"}]}}'}]}).lower()
    refused("InvalidParameterValueException", StartingPosition="LATEST")
    refused("InvalidParameterValueException", FunctionResponseTypes=["Other"])
    refused("ResourceNotFoundException", FunctionName="no-such-function")
    with pytest.raises(ClientError) as e:
        lam.get_event_source_mapping(UUID="00000000-0000-0000-0000-000000000000")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    # a mapping is its tenant's alone
    ok = lam.create_event_source_mapping(FunctionName=fast, EventSourceArn=_arn(region, q),
                                         BatchSize=10_000, MaximumBatchingWindowInSeconds=1)
    with pytest.raises(ClientError) as e:
        olam.get_event_source_mapping(UUID=ok["UUID"])
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert olam.list_event_source_mappings()["EventSourceMappings"] == []
    lam.delete_event_source_mapping(UUID=ok["UUID"])
