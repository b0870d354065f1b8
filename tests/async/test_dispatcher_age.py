"""The dispatcher's shell around retry.too_old: an event older than its maximum age is not run
again; it goes to its on-failure destination (or is dropped) without an invoke."""

from __future__ import annotations

import asyncio
from typing import Any

from cellcloud.core import retry
from cellcloud.frontend.dispatcher import Dispatcher
from cellcloud.frontend.events import Event, EventStore, now_ms


class _Frontend:
    """Stands in for the frontend's transport client and records what the dispatcher asks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, op: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.calls.append((op, body))
        if op == "sqs":
            return {"s": 200, "h": {}, "b": b"{}"}
        return {"s": 200, "h": {}, "b": b"null"}


def test_an_event_older_than_its_maximum_age_is_not_invoked(tmp_path: object) -> None:
    store = EventStore(str(tmp_path))
    acct = "111111111111"
    store.put_config(acct, "f", "$LATEST", {"DestinationConfig": {"OnFailure": {
        "Destination": f"arn:aws:sqs:cc-local-1:{acct}:dlq"}}})
    old = now_ms() - retry.event_age_s_default * 1000 - 1
    store.insert(Event("e-old", acct, "f", "$LATEST", b"{}", old, 3, 0, 2))
    frontend = _Frontend()
    d = Dispatcher(store, frontend, "cc-local-1")  # type: ignore[arg-type]
    [ev] = store.claim(d.owner, now_ms(), 16, 4, {})
    asyncio.run(d._deliver_once(ev))
    assert [op for op, _ in frontend.calls] == ["sqs"]  # the record, and no invoke
    assert b"EventAgeExceeded" in frontend.calls[0][1]["b"]
    assert store.depth() == 0 and d.counters["attempts"] == 0
