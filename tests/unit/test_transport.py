import asyncio
from typing import Any

import pytest

from cellcloud.transport import CallTimeout, Client, OpError, RemoteError, Server, TransportError


async def _server() -> tuple[Server, int, asyncio.Event]:
    hang = asyncio.Event()

    async def echo(body: Any) -> Any:
        return body

    async def fail(body: Any) -> Any:
        raise OpError("Nope", "refused", detail=1)

    async def slow(body: Any) -> Any:
        await hang.wait()
        return "late"

    srv = Server({"echo": echo, "fail": fail, "slow": slow})
    _, port = await srv.listen_tcp("127.0.0.1", 0)
    return srv, port, hang


def test_calls_errors_and_unknown_ops() -> None:
    async def main() -> None:
        srv, port, hang = await _server()
        c = Client("127.0.0.1", port)
        assert await c.call("echo", {"b": b"\x00" * 10}, timeout_s=5) == {"b": b"\x00" * 10}
        # Many calls multiplexed over one connection, answered out of order.
        results = await asyncio.gather(*(c.call("echo", i, timeout_s=5) for i in range(200)))
        assert results == list(range(200))
        with pytest.raises(RemoteError) as e:
            await c.call("fail", None, timeout_s=5)
        assert e.value.type == "Nope" and e.value.data == {"detail": 1}
        with pytest.raises(RemoteError) as e:
            await c.call("run_command", "sh", timeout_s=5)
        assert e.value.type == "UnknownOperation"
        assert srv.stats.unknown_ops == 1
        with pytest.raises(CallTimeout):
            await c.call("slow", None, timeout_s=0.05)
        hang.set()
        await c.close()
        await srv.close()

    asyncio.run(main())


def test_unreachable_peer_is_a_transport_error() -> None:
    async def main() -> None:
        srv, port, _ = await _server()
        await srv.close()
        c = Client("127.0.0.1", port)
        with pytest.raises(TransportError):
            await c.call("echo", 1, timeout_s=1)

    asyncio.run(main())


def test_client_reconnects_after_server_restart() -> None:
    async def main() -> None:
        srv, port, _ = await _server()
        c = Client("127.0.0.1", port)
        assert await c.call("echo", 1, timeout_s=5) == 1
        await srv.close()
        # Existing connections are not closed by server.close(); drop ours as a crash would.
        await c.close()
        srv2 = Server({"echo": srv.ops["echo"]})
        await srv2.listen_tcp("127.0.0.1", port)
        assert await c.call("echo", 2, timeout_s=5) == 2
        await c.close()
        await srv2.close()

    asyncio.run(main())


def test_a_streamed_answer_arrives_item_by_item() -> None:
    """An op answering a Stream: each item reaches the caller while the op is still producing
    (the op waits for an event the caller sets only after it saw the first item)."""
    from cellcloud.transport import Stream

    async def main() -> None:
        go = asyncio.Event()

        async def produce(body: Any) -> Any:
            async def items() -> Any:
                yield b"first"
                await go.wait()
                yield b"second"
            return Stream(items())

        async def broken(body: Any) -> Any:
            async def items() -> Any:
                yield 1
                raise OpError("Midway", "failed midway")
            return Stream(items())

        async def plain(body: Any) -> Any:
            return {"whole": body}

        srv = Server({"produce": produce, "broken": broken, "plain": plain})
        _, port = await srv.listen_tcp("127.0.0.1", 0)
        c = Client("127.0.0.1", port)
        got = []
        async for kind, value in c.call_stream("produce", None, timeout_s=30):
            got.append((kind, value))
            if value == b"first":
                go.set()  # only now may the producer go on
        assert got == [("item", b"first"), ("item", b"second"), ("end", None)]
        assert [x async for x in c.call_stream("plain", 7, timeout_s=30)] == [
            ("end", {"whole": 7})]
        seen = []
        with pytest.raises(RemoteError) as e:
            async for item in c.call_stream("broken", None, timeout_s=30):
                seen.append(item)
        assert seen == [("item", 1)] and e.value.type == "Midway"
        # an ordinary call on the same connection still works
        assert await c.call("plain", 1, timeout_s=30) == {"whole": 1}
        await c.close()
        await srv.close()

    asyncio.run(main())


def test_a_draining_server_finishes_its_calls_and_its_successor_gets_the_rest() -> None:
    """A process replaced on its port (a rollout): the call under way when the drain begins
    is answered by the old server; calls made during the drain are either refused unrun
    (``Draining``) or find the port closed, and a RedeliveringClient sends them again until the
    successor listens. No call fails and none runs twice (the ops count their runs)."""
    from cellcloud.transport import DRAINING, RedeliveringClient, not_run

    async def main() -> None:
        old_runs: list[Any] = []
        new_runs: list[Any] = []
        release = asyncio.Event()

        async def old_op(body: Any) -> Any:
            old_runs.append(body)
            if body == "slow":
                await release.wait()
            return ["old", body]

        async def new_op(body: Any) -> Any:
            new_runs.append(body)
            return ["new", body]

        old = Server({"op": old_op})
        _, port = await old.listen_tcp("127.0.0.1", 0)
        plain = Client("127.0.0.1", port)
        rc = RedeliveringClient("127.0.0.1", port, redeliver_s=60)
        assert await rc.call("op", 0, timeout_s=30) == ["old", 0]
        slow = asyncio.ensure_future(rc.call("op", "slow", timeout_s=30))
        await _until(lambda: "slow" in old_runs)
        # A plain client's call that reaches the draining server is refused unrun.
        assert await plain.call("op", "first", timeout_s=30) == ["old", "first"]
        drain = asyncio.ensure_future(old.drain(30))
        await _until(lambda: old.stats.drained > 0 or plain._proto is None)
        late = [asyncio.ensure_future(rc.call("op", i, timeout_s=30)) for i in range(1, 6)]
        with pytest.raises(TransportError) as e:
            # told to go away, the plain client connects afresh: the port is closed now
            await plain.call("op", "refused", timeout_s=30)
        assert not_run(e.value)
        release.set()
        assert await slow == ["old", "slow"]  # the call under way finished on the old server
        assert await drain == 0
        new = Server({"op": new_op})
        await new.listen_tcp("127.0.0.1", port)
        assert [await t for t in late] == [["new", i] for i in range(1, 6)]
        assert old_runs == [0, "slow", "first"] and sorted(new_runs) == [1, 2, 3, 4, 5]
        assert rc.redelivered > 0 and DRAINING == "Draining"
        await rc.close()
        await plain.close()
        await new.close()

    asyncio.run(main())


def test_a_call_refused_draining_is_a_remote_error_a_plain_client_sees() -> None:
    """A connection that sends a call after the server began draining (before it read the
    go-away) is answered Draining, which not_run() recognises."""
    from cellcloud.transport import DRAINING, not_run

    async def main() -> None:
        release = asyncio.Event()

        async def op(body: Any) -> Any:
            await release.wait()
            return body

        srv = Server({"op": op})
        _, port = await srv.listen_tcp("127.0.0.1", 0)
        c = Client("127.0.0.1", port)
        first = asyncio.ensure_future(c.call("op", 1, timeout_s=30))
        await _until(lambda: srv.stats.calls == 1)
        proto = c._proto
        assert proto is not None
        drain = asyncio.ensure_future(srv.drain(30))
        await _until(lambda: proto.gone_away)
        # Write on the old connection as a client that had not read the go-away would.
        fut = asyncio.get_running_loop().create_future()
        proto.pending[99] = fut
        assert proto.transport is not None
        proto.transport.write(c._packer.pack([0, 99, "op", 2]))
        with pytest.raises(RemoteError) as e:
            await asyncio.wait_for(fut, 30)
        assert e.value.type == DRAINING and not_run(e.value)
        release.set()
        assert await first == 1
        assert await drain == 0
        await c.close()

    asyncio.run(main())


async def _until(cond: Any, timeout_s: float = 60.0) -> None:
    """Wait for a condition other coroutines make true (bounded; the loop runs meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_peer_that_is_simply_down_is_not_waited_for() -> None:
    """Redelivery is for a peer being replaced (it said so); a peer that is down without a
    word — crashed, killed, never started — fails its callers at once (a blast-radius run
    with a killed cell waited 30 s per request before)."""
    from cellcloud.transport import NotDelivered, RedeliveringClient

    async def main() -> None:
        srv, port, _ = await _server()
        await srv.close()  # never told anyone to go away
        rc = RedeliveringClient("127.0.0.1", port, redeliver_s=60)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NotDelivered):
            await rc.call("echo", 1, timeout_s=60)
        assert rc.redelivered == 0 and loop.time() - t0 < 30  # not the 60 s budget
        await rc.close()

    asyncio.run(main())
