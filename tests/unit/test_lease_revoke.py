"""A change is answered only after the agents refused the leases it revoked.

Regression: the agent's refusal was asked from the task that RevokeLease spawned, so
``settle_leases`` (called right after the change fed the core) found nothing under way and
returned before the ask was even sent; a router could then run the old code under its lease.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from cellcloud.core.invoke import RevokeLease
from cellcloud.core.limits import Limits
from cellcloud.frontend.invoker import Invoker


class FakeAgent:
    """Records lease_end asks; the refusal answers after a few loop turns (a real call's
    round trip), the wait for the lease's invocations never (not needed here)."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.never: asyncio.Future[Any] | None = None

    async def call(self, op: str, body: dict[str, Any], timeout_s: float) -> Any:
        assert op == "lease_end"
        if body.get("wait") is False:
            for _ in range(3):
                await asyncio.sleep(0)
            self.refused.append(body["lease_id"])
            return {"refused": True}
        self.never = asyncio.get_running_loop().create_future()
        return await self.never


def test_settle_waits_for_the_refusal_of_a_lease_revoked_just_before() -> None:
    agent = FakeAgent()
    cell = SimpleNamespace(agents={"a1": agent}, limits=Limits(), rng=None)
    invoker = Invoker.__new__(Invoker)  # only the lease-ending part is exercised
    invoker.cell = cell  # type: ignore[assignment]
    invoker._tasks = set()
    invoker._ending = set()

    async def main() -> list[str]:
        invoker._execute(RevokeLease("lease-1", "router-1", "env-1", "a1"))
        await invoker.settle_leases()
        seen = list(agent.refused)  # what the agent had refused when the change was answered
        for t in list(invoker._tasks):
            t.cancel()
        await asyncio.gather(*invoker._tasks, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == ["lease-1"]
