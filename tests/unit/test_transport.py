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
