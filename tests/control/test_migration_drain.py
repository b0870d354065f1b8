"""A migration forgets the old cell's copy only when the tenant has nothing left in flight
there: sync invokes *and* accepted async events (queued, leased, awaiting a retry)."""

from __future__ import annotations

from typing import Any

from cellcloud.frontend.cell import Cell
from cellcloud.frontend.clone import tenant_inflight
from cellcloud.frontend.events import Event, EventStore, Intake
from cellcloud.frontend.store import SqliteFunctionStore


def _cell(tmp_path: Any, events: Intake | None) -> Cell:
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path)), {})
    cell.events = events
    return cell


def test_async_events_hold_the_drain(tmp_path: Any) -> None:
    store = EventStore(str(tmp_path))
    cell = _cell(tmp_path, Intake(store))
    assert tenant_inflight(cell, "111111111111") == 0
    store.insert(Event("e1", "111111111111", "fn", "$LATEST", b"{}", 0, 3, 0, 0))
    store.insert(Event("e2", "222222222222", "fn", "$LATEST", b"{}", 0, 3, 0, 0))
    assert tenant_inflight(cell, "111111111111") == 1  # its own event, not the other tenant's
    cell.invoker.core.inflight["111111111111/fn"] = 2
    assert tenant_inflight(cell, "111111111111") == 3
    claimed = store.claim("dispatcher", now=1, total=10, per_function_max=4, inflight={})
    for ev in claimed:
        if ev.account == "111111111111":
            assert tenant_inflight(cell, "111111111111") == 3  # leased still counts
            store.complete(ev.id, "dispatcher")
    cell.invoker.core.inflight.clear()
    assert tenant_inflight(cell, "111111111111") == 0


def test_a_cell_without_an_async_path_counts_sync_only(tmp_path: Any) -> None:
    cell = _cell(tmp_path, None)
    cell.invoker.core.inflight["111111111111/fn"] = 1
    assert tenant_inflight(cell, "111111111111") == 1
