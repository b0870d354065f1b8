"""How the console reads a function's logs: one small adapter, so that a logs API (the
CloudWatch Logs subset of issue #16) can replace the read behind it without touching the pages.

Today it is the frontend's own read, ``GET /cellcloud/v1/functions/{name}/logs?limit=N``
(``frontend/cell.py`` ``logs``), asked of the function's cell through the ``http`` op the
router forwards every Lambda API request with."""

from __future__ import annotations

import json
from typing import Any, Protocol

from ..core.messages import HttpRequest


class CellCaller(Protocol):
    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any: ...


class LogsUnavailable(Exception):
    """The cell answered the logs read with an error (status, body)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"logs read answered {status}")
        self.status = status
        self.body = body


async def read_function_logs(region: CellCaller, account: str, name: str,
                             limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` log events of ``account``'s function ``name``, oldest first:
    ``{"timestamp": ms, "requestId": id, "message": text}`` (one event per invocation)."""
    resp = await region.call_cell(account, "http", HttpRequest(
        method="GET", path=f"/cellcloud/v1/functions/{name}/logs", query=f"limit={limit}",
        account=account).to_wire(), timeout_s=30)
    if resp["s"] != 200:
        raise LogsUnavailable(int(resp["s"]), bytes(resp["b"]))
    events: list[dict[str, Any]] = json.loads(resp["b"])["events"]
    return events
