"""The invoke shell (frontend/invoker.py) over fake agents, in process: the clock is injected,
nothing sleeps, every wait is on a condition."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from cellcloud.core.errors import LambdaError
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.store import SqliteFunctionStore
from cellcloud.transport import RemoteError, TransportError
from tests.conftest import make_zip

ACCOUNT = "123456789012"
WAIT_S = 60


class FakeAgent:
    """Creates environments; ``invoke`` parks until the test releases it with an outcome."""

    def __init__(self) -> None:
        self.envs: set[str] = set()
        self.parked: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self.arrived = asyncio.Event()
        self.up = True

    async def call(self, op: str, body: Any = None, *, timeout_s: float) -> Any:
        if not self.up:
            raise TransportError("cannot connect (test)")
        if op == "create_env":
            self.envs.add(body["env_id"])
            return {}
        if op == "invoke":
            if body["env_id"] not in self.envs:
                raise RemoteError("EnvGone", body["env_id"])
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.parked.append((body, fut))
            self.arrived.set()
            return await fut
        if op == "status":
            return {"envs": [{"env_id": e} for e in self.envs]}
        if op == "destroy":
            self.envs.discard(body["env_id"])
            return {}
        raise AssertionError(op)

    async def close(self) -> None:
        pass

    async def wait_parked(self, n: int) -> None:
        async def enough() -> None:
            while len(self.parked) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), WAIT_S)


def ok_reply(body: dict[str, Any]) -> dict[str, Any]:
    return {"payload": b"1", "function_error": None, "logs": b"", "env_alive": True}


def _cell(tmp_path: Any, agents: dict[str, FakeAgent], **kw: Any) -> Cell:
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path)),
                {a: ("127.0.0.1", 9) for a in agents}, **kw)
    cell.agents = agents  # type: ignore[assignment]
    zipped = base64.b64encode(make_zip({"app.py": "def handler(e, c):\n    return 1\n"})).decode()
    for name in ("f", "g"):
        cell.catalog.create_function(ACCOUNT, {"FunctionName": name, "Runtime": "python3.11",
                                       "Handler": "app.handler", "Code": {"ZipFile": zipped}})
    return cell


def test_host_death_under_two_functions_throttles_neither(tmp_path: Any) -> None:
    # Issue #20 regression: an agent that dies while running f's and g's invocations is not
    # f's fault (nor g's); before, each was charged a killed worker and throttled
    # (FunctionKillsWorkers) on the next invoke.
    async def main() -> None:
        agent = FakeAgent()
        cell = _cell(tmp_path, {"a1": agent}, shard_size=1)
        f = asyncio.ensure_future(cell.invoke(ACCOUNT, "f", b"{}", log_tail=False))
        g = asyncio.ensure_future(cell.invoke(ACCOUNT, "g", b"{}", log_tail=False))
        await agent.wait_parked(2)
        agent.envs.clear()  # the host dies with both invocations in flight
        for _, fut in agent.parked:
            fut.set_exception(TransportError("connection lost (test)"))
        for task in (f, g):
            with pytest.raises(LambdaError) as e:
                await task
            assert e.value.status == 500
        await cell.sync_agents()  # the host is back (empty)
        agent.parked.clear()
        again = asyncio.ensure_future(cell.invoke(ACCOUNT, "f", b"{}", log_tail=False))
        parked = asyncio.ensure_future(agent.wait_parked(1))
        await asyncio.wait({again, parked}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        if again.done():
            again.result()  # raises what refused it (it was FunctionKillsWorkers)
        await parked
        body, fut = agent.parked[0]
        fut.set_result(ok_reply(body))
        assert (await again).payload == b"1"

    asyncio.run(main())


def test_deadline_on_the_injected_clock(tmp_path: Any) -> None:
    async def main() -> None:
        now = [1000.0]
        agent = FakeAgent()
        cell = _cell(tmp_path, {"a1": agent}, shard_size=1, clock=lambda: now[0])
        task = asyncio.ensure_future(cell.invoke(ACCOUNT, "f", b"{}", log_tail=False))
        await agent.wait_parked(1)  # the agent hangs
        cell.tick()
        assert not task.done()
        now[0] += 3 + cell.limits.invoke_answer_slack_ms / 1000  # timeout 3 s + the slack
        cell.tick()
        with pytest.raises(LambdaError) as e:
            await asyncio.wait_for(task, WAIT_S)
        assert e.value.status == 500 and "not answered within" in e.value.message
        assert cell._inflight == {("123456789012", "f"): 1}  # the handler may still run
        body, fut = agent.parked[0]
        fut.set_result(ok_reply(body))
        for _ in range(100):
            if not cell._inflight:
                break
            await asyncio.sleep(0)  # let the agent call's task finish (no time passes)
        assert cell._inflight == {}

    asyncio.run(main())
