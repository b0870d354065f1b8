"""The event source mappings' shell (frontend/mappings.py) in one process: the API's states
and refusals, and a poller over a real queue store with the invoke path replaced by a fake
that fails some messages."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from cellcloud.core.errors import LambdaError
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.mappings import Mappings
from cellcloud.frontend.store import SqliteFunctionStore
from cellcloud.queues.api import QueueApi
from cellcloud.queues.store import QueueStore

from .test_catalog import ACCOUNT, create

REGION = "cc-local-1"


def _arn(q: str) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{q}"


@dataclass
class _Result:
    payload: bytes
    function_error: str | None = None


def _setup(tmp_path: Any) -> tuple[Cell, QueueApi, Mappings]:
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path / "cell")), {}, region=REGION)
    queues = QueueApi(QueueStore(str(tmp_path / "q")), REGION)
    mappings = Mappings(cell, queues, str(tmp_path))
    cell.mappings = mappings
    create(cell, "f")
    return cell, queues, mappings


async def _until(cond: Any, what: str) -> None:
    for _ in range(3000):  # 60 s
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_states_and_refusals(tmp_path: Any) -> None:
    cell, queues, mappings = _setup(tmp_path)
    queues.store.create(ACCOUNT, "q", {}, 0)

    async def main() -> None:
        m = mappings.create(ACCOUNT, {"FunctionName": "f", "EventSourceArn": _arn("q")})
        u = m["UUID"]
        assert m["State"] == "Creating"
        with pytest.raises(LambdaError) as e:
            mappings.update(ACCOUNT, u, {"BatchSize": 5})
        assert e.value.type == "ResourceInUseException"
        mappings.reconcile()
        assert mappings.get(ACCOUNT, u)["State"] == "Enabled"
        assert mappings.update(ACCOUNT, u, {"BatchSize": 5})["State"] == "Updating"
        old = mappings.pollers[u]

        def settled() -> bool:
            mappings.reconcile()
            return bool(mappings.get(ACCOUNT, u)["State"] == "Enabled")

        await _until(settled, "the update to settle")
        assert mappings.pollers[u] is not old and old.task.done()
        # the queue's visibility timeout changes: the poller restarts with it
        old = mappings.pollers[u]
        queues.store.set_attributes(ACCOUNT, "q", {"VisibilityTimeout": "45"})

        def restarted() -> bool:
            mappings.reconcile()
            p = mappings.pollers.get(u)
            return p is not None and p is not old and p.core.params.visibility_ms == 45_000

        await _until(restarted, "the poller to restart")
        assert mappings.get(ACCOUNT, u)["State"] == "Enabled"
        # a mapping whose queue is gone does not stop the others from being reconciled
        queues.store.create(ACCOUNT, "gone", {}, 0)
        g = mappings.create(ACCOUNT, {"FunctionName": "f", "EventSourceArn": _arn("gone")})
        queues.store.delete_queue(ACCOUNT, "gone")
        mappings.reconcile()
        assert mappings.get(ACCOUNT, g["UUID"])["State"] == "Creating"
        mappings.delete(ACCOUNT, g["UUID"])
        mappings.reconcile()
        assert mappings.update(ACCOUNT, u, {"Enabled": False})["State"] == "Disabling"
        await _until(lambda: (mappings.reconcile(), mappings.get(ACCOUNT, u)["State"])[1]
                     == "Disabled", "Disabled")
        assert u not in mappings.pollers or mappings.pollers[u].task.done()
        assert mappings.delete(ACCOUNT, u)["State"] == "Deleting"
        with pytest.raises(LambdaError) as e:
            mappings.delete(ACCOUNT, u)
        assert e.value.type == "ResourceInUseException"
        mappings.reconcile()
        with pytest.raises(LambdaError) as e:
            mappings.get(ACCOUNT, u)
        assert e.value.type == "ResourceNotFoundException"
        await mappings.close()

    asyncio.run(main())


def test_a_poller_deletes_only_what_succeeded(tmp_path: Any) -> None:
    cell, queues, mappings = _setup(tmp_path)
    queues.store.create(ACCOUNT, "dlq", {}, 0)
    queues.store.create(ACCOUNT, "q", {"VisibilityTimeout": "3", "RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": _arn("dlq"), "maxReceiveCount": 1})}, 0)
    seen: list[int] = []

    async def invoke(account: str, name: str, payload: bytes, **kw: Any) -> _Result:
        records = json.loads(payload)["Records"]
        assert {r["eventSource"] for r in records} == {"aws:sqs"}
        fails = []
        for r in records:
            n = json.loads(r["body"])["n"]
            if n % 7 == 0:
                fails.append({"itemIdentifier": r["messageId"]})
            else:
                seen.append(n)
        await asyncio.sleep(0)
        return _Result(json.dumps({"batchItemFailures": fails}).encode())

    cell.invoke = invoke  # type: ignore[method-assign]
    n = 100

    async def main() -> None:
        mappings.start()
        mappings.create(ACCOUNT, {"FunctionName": "f", "EventSourceArn": _arn("q"),
                                  "FunctionResponseTypes": ["ReportBatchItemFailures"]})
        for i in range(n):
            queues.store.send(ACCOUNT, "q", json.dumps({"n": i}), queues.now_ms())
            queues._sent_to(ACCOUNT, "q")
        now = queues.now_ms
        await _until(lambda: sum(queues.store.counts(ACCOUNT, "q", now())) == 0
                     and queues.store.counts(ACCOUNT, "dlq", now())[0] == len(range(0, n, 7)),
                     "the queue to drain")
        [st] = (await cell.status())["mappings"].values()
        assert (st["account"], st["queue"]) == (ACCOUNT, "q")
        assert st["deleted"] == n - len(range(0, n, 7)) and st["failed"] >= len(range(0, n, 7))
        await mappings.close()

    asyncio.run(main())
    assert sorted(seen) == [i for i in range(n) if i % 7]  # each success exactly once
    dead = sorted(json.loads(m["Body"])["n"] for m in queues.store.peek(ACCOUNT, "dlq", 1000))
    assert dead == list(range(0, n, 7))


def test_a_fifo_group_stays_in_order_across_a_failure(tmp_path: Any) -> None:
    """A FIFO queue, 3 groups of 10; the handler fails a3 once and, as Lambda advises, reports
    the rest of a's messages in that batch as failed too. Every message succeeds exactly once,
    each group in send order."""
    cell, queues, mappings = _setup(tmp_path)
    fifo_attrs = {"FifoQueue": "true", "ContentBasedDeduplication": "false",
                  "DeduplicationScope": "queue", "FifoThroughputLimit": "perQueue"}
    queues.store.create(ACCOUNT, "dlq.fifo", dict(fifo_attrs), 0)
    queues.store.create(ACCOUNT, "q.fifo", {**fifo_attrs, "VisibilityTimeout": "3",
                                            "RedrivePolicy": json.dumps(
                                                {"deadLetterTargetArn": _arn("dlq.fifo"),
                                                 "maxReceiveCount": 5})}, 0)
    done: list[tuple[str, int]] = []
    failed_once: set[str] = set()

    async def invoke(account: str, name: str, payload: bytes, **kw: Any) -> _Result:
        fails, broken = [], set()
        for r in json.loads(payload)["Records"]:
            g, i = r["attributes"]["MessageGroupId"], json.loads(r["body"])["i"]
            if g in broken:
                fails.append({"itemIdentifier": r["messageId"]})
            elif (g, i) == ("a", 3) and "a3" not in failed_once:
                failed_once.add("a3")
                broken.add(g)
                fails.append({"itemIdentifier": r["messageId"]})
            else:
                done.append((g, i))
        await asyncio.sleep(0)
        return _Result(json.dumps({"batchItemFailures": fails}).encode())

    cell.invoke = invoke  # type: ignore[method-assign]
    from cellcloud.queues.store import Outgoing

    async def main() -> None:
        mappings.start()
        mappings.create(ACCOUNT, {"FunctionName": "f", "EventSourceArn": _arn("q.fifo"),
                                  "FunctionResponseTypes": ["ReportBatchItemFailures"]})
        for i in range(10):
            queues.store.send_many(ACCOUNT, "q.fifo", [
                Outgoing(json.dumps({"i": i, "g": g}), 0, group=g, dedup=f"{g}{i}")
                for g in "abc"], queues.now_ms())
            queues._sent_to(ACCOUNT, "q.fifo")
        await _until(lambda: len(done) == 30, "every message to succeed")
        await mappings.close()

    asyncio.run(main())
    for g in "abc":
        assert [i for gg, i in done if gg == g] == list(range(10))
    assert queues.store.counts(ACCOUNT, "dlq.fifo", queues.now_ms()) == (0, 0)
