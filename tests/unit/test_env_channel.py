"""The agent's end of an environment's channel: frames that arrive in one read."""

from __future__ import annotations

import asyncio

import msgpack

from cellcloud.agent.server import _EnvChannel


def test_a_second_frame_in_the_same_read_waits_for_its_reader() -> None:
    async def main() -> None:
        chan = _EnvChannel()
        first = asyncio.ensure_future(chan.request(None, 60))
        await asyncio.sleep(0)  # the request is waiting
        # The early result of an invocation and the end of its Invoke phase, in one read.
        chan.data_received(msgpack.packb({"t": "result", "id": "r"}) +
                           msgpack.packb({"t": "done", "id": "r"}))
        assert (await first)["t"] == "result"
        assert not chan.garbage
        assert (await chan.request(None, 60))["t"] == "done"
        # More unsolicited frames than that are garbage: the channel closes.
        chan.data_received(msgpack.packb({"t": "x"}) + msgpack.packb({"t": "y"}))
        assert chan.garbage

    asyncio.run(main())
