"""The SQS API through boto3 (JSON protocol, ``X-Amz-Target: AmazonSQS.*``)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cellcloud.queues.store import md5_of_attributes
from tests.queues.conftest import ACCOUNT, REGION


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def arn(name: str) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"


def test_md5_of_message_attributes_matches_a_published_vector() -> None:
    # the value AWS answers for these two attributes (LocalStack's serializer test records it)
    assert md5_of_attributes({"Hello": {"DataType": "String", "StringValue": "There"},
                              "General": {"DataType": "String", "StringValue": "Kenobi"}}) \
        == "fca026605781cb4126a1e9044df24232"


def test_batch_send_receive_attributes_change_visibility_delete(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="q1")["QueueUrl"]
    attrs = {"Hello": {"DataType": "String", "StringValue": "There"},
             "n": {"DataType": "Number.int", "StringValue": "42"},
             "b": {"DataType": "Binary", "BinaryValue": b"\x00\x01"}}
    out = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"e{i}", "MessageBody": f"m{i}", "MessageAttributes": attrs} for i in range(10)])
    assert len(out["Successful"]) == 10 and not out.get("Failed")
    wire = {"Hello": attrs["Hello"], "n": attrs["n"],
            "b": {"DataType": "Binary", "BinaryValue": base64.b64encode(b"\x00\x01").decode()}}
    assert {s["MD5OfMessageAttributes"] for s in out["Successful"]} == {md5_of_attributes(wire)}
    got: list[dict[str, Any]] = []
    while len(got) < 10:
        got += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   MessageAttributeNames=["All"],
                                   MessageSystemAttributeNames=["All"]).get("Messages", [])
    assert sorted(m["Body"] for m in got) == sorted(f"m{i}" for i in range(10))
    m = got[0]
    assert m["MessageAttributes"]["b"]["BinaryValue"] == b"\x00\x01"
    assert m["MD5OfMessageAttributes"] == md5_of_attributes(wire)
    assert m["Attributes"]["SenderId"] == ACCOUNT
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessagesNotVisible"] == "10"
    assert a["ApproximateNumberOfMessages"] == "0"
    # back to visible at once, then received again: the old handle no longer changes it
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                                  VisibilityTimeout=0)
    [again] = sqs.receive_message(QueueUrl=url)["Messages"]
    assert again["MessageId"] == m["MessageId"]
    with pytest.raises(ClientError) as e:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                                      VisibilityTimeout=5)
    assert code(e) == "InvalidParameterValue" and "expired" in str(e.value)
    handles = [again] + got[1:]
    r = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": f"c{i}", "ReceiptHandle": h["ReceiptHandle"], "VisibilityTimeout": 60}
        for i, h in enumerate(handles)])
    assert len(r["Successful"]) == 10
    d = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": f"d{i}", "ReceiptHandle": h["ReceiptHandle"]} for i, h in enumerate(handles)])
    assert len(d["Successful"]) == 10
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessagesNotVisible"] == "0"


@pytest.mark.parametrize("entries,error", [
    ([{"Id": "a", "MessageBody": "x"}, {"Id": "a", "MessageBody": "y"}],
     "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"),
    ([{"Id": f"e{i}", "MessageBody": "x"} for i in range(11)],
     "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"),
    ([{"Id": f"e{i}", "MessageBody": "x" * 30_000} for i in range(10)],
     "AWS.SimpleQueueService.BatchRequestTooLong"),
    ([{"Id": f"e{i}", "MessageBody": "x" * 20_000, "MessageAttributes": {
        "a": {"DataType": "String", "StringValue": "y" * 10_000}}} for i in range(10)],
     "AWS.SimpleQueueService.BatchRequestTooLong"),  # attribute values count
    ([{"Id": "bad id!", "MessageBody": "x"}], "AWS.SimpleQueueService.InvalidBatchEntryId"),
    ([], "AWS.SimpleQueueService.EmptyBatchRequest"),
    ([{"Id": "a", "MessageBody": "x", "MessageDeduplicationId": "d"}],
     "InvalidParameterValue"),
])
def test_bad_batch_is_refused_whole(raw_sqs: Any, entries: list[dict[str, Any]],
                                    error: str) -> None:
    url = raw_sqs.create_queue(QueueName="q2")["QueueUrl"]
    if error == "InvalidParameterValue":  # an entry's own fault: that entry fails
        r = raw_sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert r["Failed"][0]["Code"] == error and not r.get("Successful")
    else:
        with pytest.raises(ClientError) as e:
            raw_sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert code(e) == error
    a = raw_sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessages"] == "0"


@pytest.mark.parametrize("attrs", [
    {"AWS.x": {"DataType": "String", "StringValue": "v"}},
    {"a..b": {"DataType": "String", "StringValue": "v"}},
    {"n": {"DataType": "Number", "StringValue": "not-a-number"}},
    {"s": {"DataType": "Strung", "StringValue": "v"}},
    {"e": {"DataType": "String", "StringValue": ""}},
    {f"k{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)},
])
def test_bad_message_attributes_are_refused(raw_sqs: Any, attrs: dict[str, Any]) -> None:
    url = raw_sqs.create_queue(QueueName="q3")["QueueUrl"]
    with pytest.raises(ClientError) as e:
        raw_sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=attrs)
    assert code(e) == "InvalidParameterValue"


def test_receipt_handles_forged_or_of_another_queue_are_refused(sqs: Any) -> None:
    a = sqs.create_queue(QueueName="qa")["QueueUrl"]
    b = sqs.create_queue(QueueName="qb")["QueueUrl"]
    sqs.send_message(QueueUrl=a, MessageBody="x")
    [m] = sqs.receive_message(QueueUrl=a)["Messages"]
    for url, handle in ((b, m["ReceiptHandle"]), (a, "forged"),
                        (a, base64.urlsafe_b64encode(b"123456789012/qa/x/y" + b"0" * 16)
                         .decode())):
        with pytest.raises(ClientError) as e:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
        assert code(e) == "ReceiptHandleIsInvalid"
        with pytest.raises(ClientError) as e:
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle,
                                          VisibilityTimeout=1)
        assert code(e) == "ReceiptHandleIsInvalid"
    r = sqs.delete_message_batch(QueueUrl=b, Entries=[
        {"Id": "x", "ReceiptHandle": m["ReceiptHandle"]}])
    assert r["Failed"][0]["Code"] == "ReceiptHandleIsInvalid"
    sqs.delete_message(QueueUrl=a, ReceiptHandle=m["ReceiptHandle"])


def test_message_not_in_flight(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="q4")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    [m] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"]
    with pytest.raises(ClientError) as e:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                                      VisibilityTimeout=5)
    assert code(e) == "AWS.SimpleQueueService.MessageNotInflight"


def test_delay_per_message_and_set_attributes(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="q5")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=900)
    sqs.send_message(QueueUrl=url, MessageBody="now")
    [m] = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert m["Body"] == "now"
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessagesDelayed"] == "1"
    sqs.set_queue_attributes(QueueUrl=url, Attributes={
        "VisibilityTimeout": "5", "MessageRetentionPeriod": "60", "DelaySeconds": "3",
        "ReceiveMessageWaitTimeSeconds": "1", "MaximumMessageSize": "2048"})
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (a["VisibilityTimeout"], a["MessageRetentionPeriod"], a["DelaySeconds"],
            a["ReceiveMessageWaitTimeSeconds"], a["MaximumMessageSize"]) == \
        ("5", "60", "3", "1", "2048")
    with pytest.raises(ClientError) as e:
        sqs.send_message(QueueUrl=url, MessageBody="x" * 3000)
    assert code(e) == "InvalidParameterValue"
    with pytest.raises(ClientError) as e:  # nothing partial: VisibilityTimeout stays 5
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "7",
                                                           "DelaySeconds": "901"})
    assert code(e) == "InvalidAttributeValue"
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
    assert a["Attributes"]["VisibilityTimeout"] == "5"


def test_retention_expires_messages(server: Any, sqs: Any) -> None:
    now = [1_000_000_000]
    server.api.now_ms = lambda: now[0]
    url = sqs.create_queue(QueueName="q6", Attributes={"MessageRetentionPeriod": "60"})[
        "QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="old")
    now[0] += 61_000
    assert "Messages" not in sqs.receive_message(QueueUrl=url)


def test_tags(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="q7", tags={"team": "a"})["QueueUrl"]
    sqs.tag_queue(QueueUrl=url, Tags={"env": "dev", "team": "b"})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "b", "env": "dev"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "dev"}
    with pytest.raises(ClientError) as e:
        sqs.tag_queue(QueueUrl=url, Tags={"aws:x": "1"})
    assert code(e) == "InvalidParameterValue"


@pytest.mark.parametrize("count", ["2", 2])
def test_redrive_to_dlq_and_move_back(sqs: Any, count: Any) -> None:
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    src = sqs.create_queue(QueueName="src")["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": arn("dlq"), "maxReceiveCount": count})})
    pol = json.loads(sqs.get_queue_attributes(QueueUrl=src, AttributeNames=["All"])[
        "Attributes"]["RedrivePolicy"])
    assert pol == {"deadLetterTargetArn": arn("dlq"), "maxReceiveCount": 2}
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"] == [src]
    sqs.send_message(QueueUrl=src, MessageBody="poison")
    for _ in range(2):
        [m] = sqs.receive_message(QueueUrl=src, VisibilityTimeout=0)["Messages"]
    assert "Messages" not in sqs.receive_message(QueueUrl=src)
    [dead] = sqs.receive_message(QueueUrl=dlq, VisibilityTimeout=0,
                                 AttributeNames=["All"])["Messages"]
    assert dead["MessageId"] == m["MessageId"] and dead["Body"] == "poison"
    task = sqs.start_message_move_task(SourceArn=arn("dlq"))["TaskHandle"]
    [t] = sqs.list_message_move_tasks(SourceArn=arn("dlq"))["Results"]
    assert t["TaskHandle"] == task and t["Status"] == "COMPLETED"
    assert t["ApproximateNumberOfMessagesMoved"] == 1
    [back] = sqs.receive_message(QueueUrl=src)["Messages"]
    assert back["MessageId"] == m["MessageId"]
    with pytest.raises(ClientError) as e:
        sqs.cancel_message_move_task(TaskHandle=task)
    assert code(e) == "FailedPrecondition"


@pytest.mark.parametrize("policy", [
    {"deadLetterTargetArn": f"arn:aws:sqs:{REGION}:210987654321:dlq", "maxReceiveCount": 2},
    {"deadLetterTargetArn": arn("missing"), "maxReceiveCount": 2},
    {"deadLetterTargetArn": arn("dlq"), "maxReceiveCount": 0},
    {"deadLetterTargetArn": arn("dlq")},
])
def test_bad_redrive_policy_is_refused(sqs: Any, policy: dict[str, Any]) -> None:
    sqs.create_queue(QueueName="dlq")
    src = sqs.create_queue(QueueName="src")["QueueUrl"]
    with pytest.raises(ClientError) as e:
        sqs.set_queue_attributes(QueueUrl=src, Attributes={
            "RedrivePolicy": json.dumps(policy), "VisibilityTimeout": "9"})
    assert code(e) == "InvalidAttributeValue"
    a = sqs.get_queue_attributes(QueueUrl=src, AttributeNames=["All"])["Attributes"]
    assert "RedrivePolicy" not in a and a["VisibilityTimeout"] == "30"


def test_redrive_allow_policy_is_honoured(sqs: Any) -> None:
    sqs.create_queue(QueueName="dlq", Attributes={"RedriveAllowPolicy": json.dumps(
        {"redrivePermission": "byQueue", "sourceQueueArns": [arn("ok")]})})
    ok = sqs.create_queue(QueueName="ok")["QueueUrl"]
    other = sqs.create_queue(QueueName="other")["QueueUrl"]
    rp = {"RedrivePolicy": json.dumps({"deadLetterTargetArn": arn("dlq"),
                                       "maxReceiveCount": 3})}
    sqs.set_queue_attributes(QueueUrl=ok, Attributes=rp)
    with pytest.raises(ClientError) as e:
        sqs.set_queue_attributes(QueueUrl=other, Attributes=rp)
    assert code(e) == "InvalidAttributeValue"
