"""Kombu (the messaging library under Celery) through its SQS transport against the region:
send, receive, ack, visibility extension, and a consumer that loses nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.conftest import Region

from .conftest import new_name

kombu = pytest.importorskip("kombu")
pytest.importorskip("pycurl")  # the SQS transport's HTTP client

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(region: Region) -> Iterator[Any]:
    host, port = region.endpoint.removeprefix("http://").rsplit(":", 1)
    c = kombu.Connection(
        f"sqs://{quote(str(region.doc['access_key_id']), safe='')}:"
        f"{quote(str(region.doc['secret_access_key']), safe='')}@{host}:{port}",
        transport_options={"region": str(region.doc["region"]), "is_secure": False,
                           "wait_time_seconds": 1, "polling_interval": 0.05,
                           "visibility_timeout": 60})
    try:
        yield c
    finally:
        c.release()


def test_send_receive_ack_and_extend_visibility(conn: Any) -> None:
    name = new_name("kq")
    q = conn.SimpleQueue(name)
    q.put({"n": 1})
    q.put({"n": 2})
    first = q.get(timeout=60)
    assert first.payload == {"n": 1}
    # visibility extension, as Kombu's own backoff does it: the receipt handle is the tag
    ch = conn.default_channel
    url = ch._new_queue(name)
    ch.sqs(name).change_message_visibility(QueueUrl=url, ReceiptHandle=first.delivery_tag,
                                           VisibilityTimeout=600)
    first.ack()
    second = q.get(timeout=60)
    assert second.payload == {"n": 2}
    second.ack()
    with pytest.raises(q.Empty):
        q.get(timeout=2)
    attrs = ch.sqs(name).get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
        "Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == attrs[
        "ApproximateNumberOfMessagesNotVisible"] == "0"
    q.close()


def _consume(conn: Any, n: int, fifo: bool = False) -> None:
    name = new_name("kc") + (".fifo" if fifo else "")
    queue = kombu.Queue(name, kombu.Exchange(name, type="direct"), routing_key=name)
    with conn.Producer() as producer:
        for i in range(n):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=name,
                             declare=[queue],
                             **({"MessageGroupId": f"g{i % 4}"} if fifo else {}))
    seen: dict[int, int] = {}
    order: list[int] = []

    def on_message(body: dict[str, int], message: Any) -> None:
        seen[body["i"]] = seen.get(body["i"], 0) + 1
        order.append(body["i"])
        message.ack()

    deadline = time.monotonic() + max(120.0, n / 10)
    with conn.Consumer(queue, callbacks=[on_message], prefetch_count=10):
        while len(seen) < n and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=5)
            except TimeoutError:
                continue
    assert sorted(seen) == list(range(n)), f"{n - len(seen)} lost"
    # SQS's rule is at least once; nothing here expires (visibility 60 s), so exactly once
    assert set(seen.values()) == {1}
    if fifo:  # each group in send order
        for g in range(4):
            got = [i for i in order if i % 4 == g]
            assert got == sorted(got)


def test_consumer_processes_every_message(conn: Any) -> None:
    _consume(conn, 200)


def test_consumer_of_a_fifo_queue_keeps_group_order(conn: Any) -> None:
    _consume(conn, 100, fifo=True)


@pytest.mark.slow
def test_consumer_processes_10000_messages(conn: Any) -> None:
    _consume(conn, 10_000)
