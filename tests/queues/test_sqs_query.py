"""The SQS query protocol (``Action=...`` forms, XML answers), as older SDKs and tools send."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cellcloud.queues.store import md5_of_attributes
from tests.queues.conftest import ACCOUNT, REGION
from tests.queues.query_client import QueryClient, QueryError, all_of, attrs, text


@pytest.fixture
def q(server: Any) -> QueryClient:
    return QueryClient(server.endpoint, REGION, "AKIDEXAMPLE", "secret")


def arn(name: str) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"


def test_every_operation_in_the_query_protocol(q: QueryClient) -> None:
    r = q.call("CreateQueue", QueueName="qq", **{"Attribute.1.Name": "VisibilityTimeout",
                                                 "Attribute.1.Value": "40",
                                                 "Tag.1.Key": "team", "Tag.1.Value": "a"})
    url = text(r, "QueueUrl")
    assert url.endswith(f"/{ACCOUNT}/qq")
    assert text(q.call("GetQueueUrl", QueueName="qq"), "QueueUrl") == url
    assert [u.text for u in all_of(q.call("ListQueues"), "QueueUrl")] == [url]
    a = attrs(q.call("GetQueueAttributes", QueueUrl=url, **{"AttributeName.1": "All"}))
    assert a["VisibilityTimeout"] == "40" and a["QueueArn"] == arn("qq")
    q.call("SetQueueAttributes", QueueUrl=url, **{"Attribute.1.Name": "DelaySeconds",
                                                  "Attribute.1.Value": "0"})
    q.call("TagQueue", QueueUrl=url, **{"Tag.1.Key": "env", "Tag.1.Value": "dev"})
    q.call("UntagQueue", QueueUrl=url, **{"TagKey.1": "team"})
    assert attrs(q.call("ListQueueTags", QueueUrl=url), "Tag", "Key") == {"env": "dev"}
    user = {"Hello": {"DataType": "String", "StringValue": "There"},
            "b": {"DataType": "Binary", "BinaryValue": base64.b64encode(b"\x01").decode()}}
    r = q.call("SendMessage", QueueUrl=url, MessageBody="one", DelaySeconds=0, **{
        "MessageAttribute.1.Name": "Hello", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "There",
        "MessageAttribute.2.Name": "b", "MessageAttribute.2.Value.DataType": "Binary",
        "MessageAttribute.2.Value.BinaryValue": user["b"]["BinaryValue"]})
    assert text(r, "MD5OfMessageAttributes") == md5_of_attributes(user)
    r = q.call("SendMessageBatch", QueueUrl=url, **{
        f"SendMessageBatchRequestEntry.{i}.{k}": v for i in (1, 2)
        for k, v in (("Id", f"e{i}"), ("MessageBody", f"b{i}"))})
    assert [text(e, "Id") for e in all_of(r, "SendMessageBatchResultEntry")] == ["e1", "e2"]
    # an older client posts to the queue's own URL without naming it
    r = q.call("ReceiveMessage", url=url, MaxNumberOfMessages=10, **{
        "AttributeName.1": "All", "MessageAttributeName.1": "All"})
    msgs = all_of(r, "Message")
    assert sorted(text(m, "Body") for m in msgs) == ["b1", "b2", "one"]
    one = next(m for m in msgs if text(m, "Body") == "one")
    assert attrs(one)["SenderId"] == ACCOUNT
    ma = {text(x, "Name"): text(x, "Value/StringValue") or text(x, "Value/BinaryValue")
          for x in all_of(one, "MessageAttribute")}
    assert ma == {"Hello": "There", "b": user["b"]["BinaryValue"]}
    assert text(one, "MD5OfMessageAttributes") == md5_of_attributes(user)
    handles = [text(m, "ReceiptHandle") for m in msgs]
    q.call("ChangeMessageVisibility", QueueUrl=url, ReceiptHandle=handles[0],
           VisibilityTimeout=100)
    r = q.call("ChangeMessageVisibilityBatch", QueueUrl=url, **{
        f"ChangeMessageVisibilityBatchRequestEntry.{i + 1}.{k}": v for i, h in enumerate(handles)
        for k, v in (("Id", f"c{i}"), ("ReceiptHandle", h), ("VisibilityTimeout", "100"))})
    assert len(all_of(r, "ChangeMessageVisibilityBatchResultEntry")) == 3
    q.call("DeleteMessage", QueueUrl=url, ReceiptHandle=handles[0])
    r = q.call("DeleteMessageBatch", QueueUrl=url, **{
        f"DeleteMessageBatchRequestEntry.{i}.{k}": v for i, h in ((1, handles[1]),
                                                                  (2, "forged"))
        for k, v in (("Id", f"d{i}"), ("ReceiptHandle", h))})
    assert [text(e, "Id") for e in all_of(r, "DeleteMessageBatchResultEntry")] == ["d1"]
    [failed] = all_of(r, "BatchResultErrorEntry")
    assert (text(failed, "Code"), text(failed, "SenderFault")) == ("ReceiptHandleIsInvalid",
                                                                   "true")
    # redrive: a DLQ, its sources, a move task
    q.call("CreateQueue", QueueName="dlq")
    q.call("SetQueueAttributes", QueueUrl=url, **{
        "Attribute.1.Name": "RedrivePolicy", "Attribute.1.Value": json.dumps(
            {"deadLetterTargetArn": arn("dlq"), "maxReceiveCount": "3"})})
    dlq = url.rsplit("/", 1)[0] + "/dlq"
    assert [u.text for u in all_of(q.call("ListDeadLetterSourceQueues", QueueUrl=dlq),
                                   "QueueUrl")] == [url]
    handle = text(q.call("StartMessageMoveTask", SourceArn=arn("dlq")), "TaskHandle")
    [t] = all_of(q.call("ListMessageMoveTasks", SourceArn=arn("dlq")),
                 "ListMessageMoveTasksResultEntry")
    assert (text(t, "TaskHandle"), text(t, "Status")) == (handle, "COMPLETED")
    with pytest.raises(QueryError) as e:
        q.call("CancelMessageMoveTask", TaskHandle=handle)
    assert e.value.code == "FailedPrecondition"
    q.call("PurgeQueue", QueueUrl=url)
    q.call("DeleteQueue", QueueUrl=url)
    with pytest.raises(QueryError) as e:
        q.call("GetQueueUrl", QueueName="qq")
    assert (e.value.status, e.value.code) == (400, "AWS.SimpleQueueService.NonExistentQueue")


@pytest.mark.parametrize("form,code", [
    ({f"SendMessageBatchRequestEntry.{i}.{k}": v for i in (1, 2)
      for k, v in (("Id", "same"), ("MessageBody", "x"))},
     "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"),
    ({f"SendMessageBatchRequestEntry.{i}.{k}": v for i in range(1, 12)
      for k, v in (("Id", f"e{i}"), ("MessageBody", "x"))},
     "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"),
    ({f"SendMessageBatchRequestEntry.{i}.{k}": v for i in range(1, 11)
      for k, v in (("Id", f"e{i}"), ("MessageBody", "x" * 30_000))},
     "AWS.SimpleQueueService.BatchRequestTooLong"),
    ({"SendMessageBatchRequestEntry.1.Id": "a", "SendMessageBatchRequestEntry.1.MessageBody": "x",
      "SendMessageBatchRequestEntry.1.MessageAttribute.1.Name": "AWS.bad",
      "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.DataType": "String",
      "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.StringValue": "v"}, None),
])
def test_query_batch_errors(q: QueryClient, form: dict[str, str], code: str | None) -> None:
    url = text(q.call("CreateQueue", QueueName="qb"), "QueueUrl")
    if code is None:  # an entry's own fault: that entry fails, the batch answers
        r = q.call("SendMessageBatch", QueueUrl=url, **form)
        assert text(all_of(r, "BatchResultErrorEntry")[0], "Code") == "InvalidParameterValue"
    else:
        with pytest.raises(QueryError) as e:
            q.call("SendMessageBatch", QueueUrl=url, **form)
        assert e.value.code == code
    a = attrs(q.call("GetQueueAttributes", QueueUrl=url, **{"AttributeName.1": "All"}))
    assert a["ApproximateNumberOfMessages"] == "0"


@pytest.mark.parametrize("form,code", [
    ({"Action": "NoSuchThing"}, "AWS.SimpleQueueService.UnsupportedOperation"),
    ({"QueueName": "x", "Attribute.1.Name": "Colour", "Attribute.1.Value": "red"},
     "InvalidAttributeName"),
    ({"QueueName": "x", "Attribute.1.Name": "FifoQueue", "Attribute.1.Value": "true"},
     "InvalidParameterValue"),
    ({"QueueName": "x", "Attribute.0.Name": "DelaySeconds", "Attribute.0.Value": "1"},
     "InvalidParameterValue"),
])
def test_query_bad_input(q: QueryClient, form: dict[str, str], code: str) -> None:
    action = form.pop("Action", "CreateQueue")
    with pytest.raises(QueryError) as e:
        q.call(action, **form)
    assert (e.value.status, e.value.code) == (400, code)
