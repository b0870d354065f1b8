"""StoreClient's sessions against a scripted cell: opened by the cell, refused when evicted."""

import asyncio
from typing import Any

import pytest

from cellcloud.core.store_model import SESSION_EXPIRED, CellState, validate_command
from cellcloud.store.client import StoreClient, StoreSessionExpired
from cellcloud.store.colony import Colony
from cellcloud.store.wire import decode


class ScriptedCell:
    """One cell's state machine answering the client's frames directly; ``drop`` lists the
    request numbers whose answer is lost (the client sees a timeout)."""

    def __init__(self, sessions_max: int = 4, drop: tuple[int, ...] = ()) -> None:
        self.sm = CellState(alpha_slots=4, configs=[(1, ("n0",))], sessions_max=sessions_max)
        self.drop = set(drop)
        self.requests = 0
        self.executed: list[tuple[int, int]] = []

    async def call(self, node: str, body: dict[str, Any], rid: int) -> dict[str, Any] | None:
        req = decode(body)
        self.requests += 1
        cmd = validate_command(req.command)
        result = self.sm.apply(self.sm.applied_index + 1, cmd, req.client_id, req.seq)
        if self.sm.last_executed:
            self.executed.append((req.client_id, req.seq))
        if self.requests in self.drop:
            return None
        if result is SESSION_EXPIRED:
            return {"request_id": rid, "status": "session_expired", "result": "expired"}
        return {"request_id": rid, "status": "ok", "result": result}

    def evict_everyone(self) -> None:
        for _ in range(self.sm.sessions_max):
            self.sm.apply(self.sm.applied_index + 1, {"op": "session"}, 0, 0)


def client_for(cell: ScriptedCell) -> StoreClient:
    client = StoreClient(Colony.local(1, 0), lanes_max=1, attempt_timeout_ms=50)

    async def members(name: str, refresh: bool = False) -> list[str]:
        return ["n0"]

    client.members = members  # type: ignore[method-assign]
    client._call = cell.call  # type: ignore[method-assign]
    return client


def test_the_client_opens_a_session_and_reopens_when_the_cell_evicted_it():
    cell = ScriptedCell()
    client = client_for(cell)

    async def scenario() -> None:
        await client.put("c", "k", 1)
        cell.evict_everyone()
        # The first attempt is refused, nothing applied; a new session, and the put runs once.
        await client.put("c", "k", 2)
        assert await client.get("c", "k") == 2

    asyncio.run(scenario())
    assert client.counters["sessions_opened"] == 2 and client.counters["sessions_expired"] == 1
    puts = [e for e in cell.executed if e[1] >= 1]
    assert len(puts) == len(set(puts)) == 3


def test_a_refused_retry_after_an_unanswered_attempt_raises_outcome_unknown():
    # Request 1 opens the session, request 2 (the put) is applied but its answer is lost;
    # the session is then evicted, so the retry is refused: the client must not resend it
    # under a new session (it would apply twice) and reports the outcome as unknown.
    cell = ScriptedCell(drop=(2,))
    client = client_for(cell)
    real_call = cell.call

    async def call(node: str, body: dict[str, Any], rid: int) -> dict[str, Any] | None:
        if cell.requests == 2:
            cell.evict_everyone()
        return await real_call(node, body, rid)

    client._call = call  # type: ignore[method-assign]

    async def scenario() -> None:
        with pytest.raises(StoreSessionExpired):
            await client.cas("c", "n", None, 1)

    asyncio.run(scenario())
    assert cell.sm.data == {"n": 1}
    assert [e for e in cell.executed if e[1] >= 1] == [(1, 1)]
