"""FIFO queues: through boto3, and a property test of ordering and deduplication under
interleaved producers and consumers whose visibility timeout expires mid-batch."""

from __future__ import annotations

import asyncio
import json
import tempfile
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellcloud.core import fifo
from cellcloud.queues.api import QueueApi
from cellcloud.queues.store import QueueStore
from tests.queues.conftest import ACCOUNT, REGION

FIFO = {"FifoQueue": "true"}


def code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def test_order_per_group_one_batch_in_flight_and_sequence_numbers(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="o.fifo", Attributes=FIFO)["QueueUrl"]
    seqs = []
    for i in range(4):
        for g in ("a", "b"):
            r = sqs.send_message(QueueUrl=url, MessageBody=f"{g}{i}", MessageGroupId=g,
                                 MessageDeduplicationId=f"{g}{i}")
            seqs.append(int(r["SequenceNumber"]))
    assert seqs == sorted(seqs) and len(set(seqs)) == 8
    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=3,
                                AttributeNames=["All"])["Messages"]
    assert [m["Body"] for m in first] == ["a0", "b0", "a1"]
    assert first[0]["Attributes"]["MessageGroupId"] == "a"
    assert first[0]["Attributes"]["SequenceNumber"] == f"{seqs[0]:020d}"
    # both groups have messages in flight: nothing more until they are deleted
    assert "Messages" not in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first[1]["ReceiptHandle"])  # b0
    assert [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)[
        "Messages"]] == ["b1", "b2", "b3"]


def test_deduplication_explicit_and_content_based(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="d.fifo", Attributes=FIFO)["QueueUrl"]
    a = sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g",
                         MessageDeduplicationId="same")
    b = sqs.send_message(QueueUrl=url, MessageBody="y", MessageGroupId="g",
                         MessageDeduplicationId="same")
    assert (a["MessageId"], a["SequenceNumber"]) == (b["MessageId"], b["SequenceNumber"])
    with pytest.raises(ClientError) as e:  # neither an id nor content-based deduplication
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g")
    assert code(e) == "InvalidParameterValue"
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"ContentBasedDeduplication": "true"})
    c = sqs.send_message(QueueUrl=url, MessageBody="body", MessageGroupId="g")
    d = sqs.send_message(QueueUrl=url, MessageBody="body", MessageGroupId="h")
    assert c["MessageId"] == d["MessageId"]  # scope queue: the group does not matter
    a2 = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a2["ApproximateNumberOfMessages"] == "2"
    assert (a2["FifoQueue"], a2["ContentBasedDeduplication"], a2["DeduplicationScope"],
            a2["FifoThroughputLimit"]) == ("true", "true", "queue", "perQueue")


def test_dedup_scope_message_group_and_window(server: Any, sqs: Any) -> None:
    now = [1_000_000_000]
    server.api.now_ms = lambda: now[0]
    url = sqs.create_queue(QueueName="s.fifo", Attributes={
        **FIFO, "DeduplicationScope": "messageGroup",
        "FifoThroughputLimit": "perMessageGroupId"})["QueueUrl"]
    ids = {sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId=g,
                            MessageDeduplicationId="d")["MessageId"] for g in ("a", "b", "a")}
    assert len(ids) == 2
    now[0] += 300_000  # the 5-minute window has passed: the same id is a new message
    again = sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="a",
                             MessageDeduplicationId="d")["MessageId"]
    assert again not in ids


@pytest.mark.parametrize("call", [
    lambda s, u: s.send_message(QueueUrl=u, MessageBody="x"),  # no MessageGroupId
    lambda s, u: s.send_message(QueueUrl=u, MessageBody="x", MessageGroupId="g",
                                MessageDeduplicationId="d", DelaySeconds=5),
    lambda s, u: s.set_queue_attributes(QueueUrl=u, Attributes={
        "FifoThroughputLimit": "perMessageGroupId"}),  # needs scope messageGroup
    lambda s, u: s.set_queue_attributes(QueueUrl=u, Attributes={"FifoQueue": "false"}),
])
def test_fifo_bad_input(raw_sqs: Any, call: Any) -> None:
    url = raw_sqs.create_queue(QueueName="b.fifo", Attributes=FIFO)["QueueUrl"]
    with pytest.raises(ClientError) as e:
        call(raw_sqs, url)
    assert code(e) in ("MissingParameter", "InvalidParameterValue", "InvalidAttributeValue",
                       "InvalidAttributeName")
    a = raw_sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessages"] == "0" and a["FifoThroughputLimit"] == "perQueue"


def test_fifo_names_types_and_redrive_type(sqs: Any) -> None:
    with pytest.raises(ClientError):
        sqs.create_queue(QueueName="x.fifo")  # no FifoQueue true
    with pytest.raises(ClientError):
        sqs.create_queue(QueueName="x", Attributes=FIFO)
    std = sqs.create_queue(QueueName="std")["QueueUrl"]
    with pytest.raises(ClientError) as e:
        sqs.send_message(QueueUrl=std, MessageBody="x", MessageGroupId="g")
    assert code(e) == "InvalidParameterValue"
    sqs.create_queue(QueueName="dlq.fifo", Attributes=FIFO)
    with pytest.raises(ClientError) as e:  # a standard queue cannot use a FIFO DLQ
        sqs.set_queue_attributes(QueueUrl=std, Attributes={"RedrivePolicy": json.dumps({
            "deadLetterTargetArn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:dlq.fifo",
            "maxReceiveCount": 1})})
    assert code(e) == "InvalidAttributeValue"
    src = sqs.create_queue(QueueName="src.fifo", Attributes={
        **FIFO, "RedrivePolicy": json.dumps({
            "deadLetterTargetArn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:dlq.fifo",
            "maxReceiveCount": 1})})["QueueUrl"]
    sqs.send_message(QueueUrl=src, MessageBody="p", MessageGroupId="g",
                     MessageDeduplicationId="p")
    sqs.receive_message(QueueUrl=src, VisibilityTimeout=0)
    assert "Messages" not in sqs.receive_message(QueueUrl=src)
    dlq = src.replace("src.fifo", "dlq.fifo")
    assert sqs.receive_message(QueueUrl=dlq)["Messages"][0]["Body"] == "p"


def test_receive_request_attempt_id_returns_the_same_messages(sqs: Any) -> None:
    url = sqs.create_queue(QueueName="r.fifo", Attributes=FIFO)["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=str(i), MessageGroupId=str(i),
                         MessageDeduplicationId=str(i))
    a = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2,
                            ReceiveRequestAttemptId="try-1")["Messages"]
    b = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2,
                            ReceiveRequestAttemptId="try-1")["Messages"]
    assert [m["ReceiptHandle"] for m in a] == [m["ReceiptHandle"] for m in b]
    c = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2,
                            ReceiveRequestAttemptId="try-2")["Messages"]
    assert [m["Body"] for m in c] == ["2"]


# -- the property: interleaved producers and consumers, a clock that jumps past the visibility
# timeout while a consumer still holds its batch

VIS_S = 30
step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 2), st.sampled_from("abc"), st.integers(0, 7)),
    st.tuples(st.just("recv"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("ack"), st.integers(0, 2), st.integers(1, 3)),
    st.tuples(st.just("tick"), st.sampled_from([1, 10, VIS_S + 1, 200, 301])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, max_size=60), st.booleans())
def test_fifo_order_and_dedup_property(steps: list[tuple[Any, ...]], by_content: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        _run_property(d, steps, by_content)


def _run_property(state: str, steps: list[tuple[Any, ...]], by_content: bool) -> None:
    now = [1_000_000_000]
    api = QueueApi(QueueStore(state), REGION, now_ms=lambda: now[0])
    loop = asyncio.new_event_loop()

    def call(op: str, **doc: Any) -> dict[str, Any]:
        r = loop.run_until_complete(api.handle({"target": f"AmazonSQS.{op}", "a": ACCOUNT,
                                                "b": json.dumps(doc).encode()}))
        assert r["s"] == 200, r["b"]
        out: dict[str, Any] = json.loads(r["b"])
        return out

    attrs = {**FIFO, **({"ContentBasedDeduplication": "true"} if by_content else {})}
    url = call("CreateQueue", QueueName="p.fifo", Attributes=attrs)["QueueUrl"]
    first_sent: dict[str, int] = {}  # dedup id -> when its message was accepted (model)
    sent: dict[str, tuple[str, int]] = {}  # message id -> (group, seq)
    held: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}  # consumer -> its batch
    in_flight: dict[str, tuple[str, int]] = {}  # message id -> (group, visible again at)
    deleted: list[str] = []

    def drain_step(kind: str, *args: Any) -> None:
        if kind == "send":
            _, g, k = args
            body = f"{g}-{k}"
            dedup = fifo.dedup_id(None, body, True) if by_content else f"d{k}{g}"
            doc: dict[str, Any] = {"QueueUrl": url, "MessageBody": body, "MessageGroupId": g}
            if not by_content:
                doc["MessageDeduplicationId"] = dedup
            r = call("SendMessage", **doc)
            dup = dedup in first_sent and now[0] - first_sent[dedup] < 300_000
            if dup:
                assert r["MessageId"] in sent or r["MessageId"] in deleted
            else:
                first_sent[dedup] = now[0]
                assert r["MessageId"] not in sent
                sent[r["MessageId"]] = (g, int(r["SequenceNumber"]))
        elif kind == "recv":
            c, n = args
            msgs = call("ReceiveMessage", QueueUrl=url, MaxNumberOfMessages=n,
                        VisibilityTimeout=VIS_S).get("Messages", [])
            for k2 in [k2 for k2, (_, t) in in_flight.items() if t <= now[0]]:
                del in_flight[k2]
            groups = {sent[m["MessageId"]][0] for m in msgs}
            # one in-flight batch per group: none of these groups was in flight
            assert not groups & {g for g, _ in in_flight.values()}
            for g in groups:  # within a group, the oldest not yet deleted, in order
                got = [sent[m["MessageId"]][1] for m in msgs if sent[m["MessageId"]][0] == g]
                pending = sorted(s for i, (g2, s) in sent.items()
                                 if g2 == g and i not in deleted)
                assert got == pending[:len(got)]
            for m in msgs:
                in_flight[m["MessageId"]] = (sent[m["MessageId"]][0], now[0] + VIS_S * 1000)
            held[c] = msgs
        elif kind == "ack":  # the consumer deletes the head of its batch, in order
            c, k = args
            for m in held[c][:k]:
                row = api.store.db.execute("SELECT receipt FROM messages WHERE id=?",
                                           (m["MessageId"],)).fetchone()
                call("DeleteMessage", QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                if row is not None and row[0] == m["ReceiptHandle"]:
                    deleted.append(m["MessageId"])
                    in_flight.pop(m["MessageId"], None)
            held[c] = held[c][k:]
        else:
            now[0] += args[0] * 1000

    for s in steps:
        drain_step(*s)
    # drain: every accepted message is delivered and deleted exactly once
    for _ in range(len(sent) + 2):
        drain_step("tick", VIS_S + 1)
        drain_step("recv", 0, 10)
        drain_step("ack", 0, 10)
    assert sorted(deleted) == sorted(sent) and len(set(deleted)) == len(deleted)
    for g in "abc":  # deletions per group in sequence order
        order = [sent[i][1] for i in deleted if sent[i][0] == g]
        assert order == sorted(order)
    loop.close()
    api.store.db.close()
