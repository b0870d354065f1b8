"""The compatibility matrix: each internal protocol, spoken by a client of version N to a
server of version N-1 and the reverse (and without negotiation, as a build from before it),
in process on loopback; a peer outside the window is refused, with both windows named, and
counted. The version 1 shapes are the fixtures captured from the code before versions
(capture_v1.py); the real-process matrix (an agent, a frontend capped) is test_processes.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import generate_latest

from cellcloud import transport
from cellcloud.core import messages as m
from cellcloud.core import protocols
from cellcloud.metrics import process_registry
from cellcloud.transport import Client, RemoteError, Server, Stream, VersionRefused
from tests.compat_matrix import capture_v1

FIXTURES = capture_v1.HERE


def fixture(name: str) -> Any:
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        return capture_v1.from_json(json.load(f))


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def served(ops: dict[str, Any], protocol: str | None, versions: tuple[int, int] | None,
                 body: Callable[[Server, int], Awaitable[Any]]) -> Any:
    server = Server(ops, protocol=protocol, versions=versions)
    _, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        return await body(server, port)
    finally:
        await server.close()


def test_the_capture_script_writes_the_committed_fixtures(tmp_path: Any) -> None:
    # The router of this build, facing a frontend from before negotiation (which answers
    # its hello UnknownOperation), sends exactly version 1's frames; the agent's replies as
    # served to a version 1 peer are version 1's.
    names = capture_v1.write(str(tmp_path))
    assert sorted(names) == sorted(os.listdir(FIXTURES))
    for name in names:
        with open(os.path.join(FIXTURES, name)) as a, open(tmp_path / name) as b:
            assert json.load(a) == json.load(b), name


OLD, NEW = (1, 1), None  # a build capped at version 1; this build's window

# (server window, client window, the version they speak)
PAIRS = [(NEW, NEW, "current"), (NEW, OLD, 1), (OLD, NEW, 1), (OLD, OLD, 1)]


@pytest.mark.parametrize("protocol", sorted(protocols.PROTOCOLS))
@pytest.mark.parametrize(("server_w", "client_w", "speaks"), PAIRS)
def test_every_protocol_negotiates_across_versions(protocol: str, server_w: Any, client_w: Any,
                                                   speaks: Any) -> None:
    seen: list[Any] = []

    async def echo(body: Any) -> Any:
        seen.append(body)
        return {"echo": body}

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port, protocol=protocol, versions=client_w)
        try:
            assert await c.call("echo", {"x": 1}, timeout_s=30) == {"echo": {"x": 1}}
            want = protocols.PROTOCOLS[protocol][1] if speaks == "current" else speaks
            assert c.version == want
            assert (server.versions or (0, 0))[1] >= want
        finally:
            await c.close()

    run(served({"echo": echo}, protocol, server_w, body))
    assert seen == [{"x": 1}]


HTTP = m.HttpRequest(method="POST", path="/2015-03-31/functions/echo/invocations",
                     query="Qualifier=live", account="111122223333",
                     headers={"x-amzn-trace-id": "Root=1-5759e988-bd862e3fe1be46a994272793;"
                                                 "Parent=629f6fbed82c07cd;Sampled=0"},
                     body=b'{"k": 1}')


@pytest.mark.parametrize(("server_w", "client_w"), [(NEW, NEW), (NEW, OLD), (OLD, NEW),
                                                    (OLD, OLD)])
def test_router_to_frontend_http_in_both_directions(server_w: Any, client_w: Any) -> None:
    # Whatever the versions, the frontend's op reads this build's typed request and the
    # router reads its typed reply.
    seen: list[m.HttpRequest] = []

    async def http(body: Any) -> Any:
        seen.append(m.HttpRequest.from_wire(body))
        return fixture("frontend.http_reply")

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port, protocol="frontend", versions=client_w)
        try:
            reply = m.HttpReply.from_wire(await c.call("http", HTTP.to_wire(), timeout_s=30))
            assert reply.status == 404 and reply.headers["x-amzn-errortype"] == \
                "UnknownOperationException"
        finally:
            await c.close()

    run(served({"http": http}, "frontend", server_w, body))
    assert seen == [HTTP]


def test_a_router_from_before_versions_reaches_this_frontend() -> None:
    # No hello, version 1's exact frame (the fixture): the op gets the typed request.
    seen: list[m.HttpRequest] = []

    async def http(body: Any) -> Any:
        seen.append(m.HttpRequest.from_wire(body))
        return {"s": 200, "h": {}, "b": b""}

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port)  # no protocol: the client of a build before versions
        try:
            assert (await c.call("http", fixture("frontend.http.invoke"), timeout_s=30))["s"] \
                == 200
            assert c.version is None
        finally:
            await c.close()
        assert server.stats.refused_versions == 0

    run(served({"http": http}, "frontend", NEW, body))
    assert seen == [HTTP]
    assert fixture("frontend.http.frame")[:3] == [0, 2, "http"]


def test_this_router_reaches_a_frontend_from_before_versions() -> None:
    # The frontend answers the hello UnknownOperation (it has no such op): version 1 frames.
    seen: list[Any] = []

    async def http(body: Any) -> Any:
        seen.append(body)
        return {"s": 200, "h": {}, "b": b""}

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port, protocol="frontend")
        try:
            await c.call("http", HTTP.to_wire(), timeout_s=30)
            assert c.version == 1
        finally:
            await c.close()

    run(served({"http": http}, None, None, body))
    assert seen == [fixture("frontend.http.invoke")]


REPLY = m.InvokeReply(payload=b'{"ok": true}', function_error=None, logs=b"line\n",
                      duration_ms=1.5, max_rss_kb=1024)


@pytest.mark.parametrize("client_w", [OLD, NEW, "none"])
def test_agent_invoke_reply_in_each_version(client_w: Any) -> None:
    # Version 2 dropped "status"; a version 1 peer (capped, or from before negotiation)
    # gets version 1's exact reply, streamed or not.
    async def invoke(body: Any) -> Any:
        if body.get("stream"):
            async def items() -> Any:
                yield {"c": b"chunk"}
                yield {"r": REPLY.to_wire()}
            return Stream(items())
        return REPLY.to_wire()

    async def body(server: Server, port: int) -> tuple[Any, list[Any]]:
        c = (Client("127.0.0.1", port) if client_w == "none"
             else Client("127.0.0.1", port, protocol="agent", versions=client_w))
        try:
            whole = await c.call("invoke", {}, timeout_s=30)
            streamed = [x async for x in c.call_stream("invoke", {"stream": True},
                                                       timeout_s=30)]
            return whole, streamed
        finally:
            await c.close()

    whole, streamed = run(served({"invoke": invoke}, "agent", NEW, body))
    want = fixture("agent.invoke_reply") if client_w != NEW else REPLY.to_wire()
    assert whole == want and ("status" in whole) == (client_w != NEW)
    assert streamed == [("item", {"c": b"chunk"}), ("item", {"r": want}), ("end", None)]
    assert m.InvokeReply.from_wire(whole) == REPLY


def test_a_server_past_the_clients_window_refuses_it_and_counts_it() -> None:
    ran: list[Any] = []

    async def op(body: Any) -> Any:
        ran.append(body)
        return {}

    async def body(server: Server, port: int) -> None:
        before = transport.protocol_stats.refused.get("agent", {}).get("server", 0)
        old = Client("127.0.0.1", port, protocol="agent", versions=(1, 1))
        with pytest.raises(VersionRefused) as e:
            await old.call("op", {}, timeout_s=30)
        assert "1..1" in str(e.value) and "2..3" in str(e.value)
        # a client from before negotiation: its first call is refused, not run
        legacy = Client("127.0.0.1", port)
        with pytest.raises(RemoteError) as r:
            await legacy.call("op", {}, timeout_s=30)
        assert r.value.type == protocols.REFUSED and "2..3" in r.value.message
        await legacy.close()
        assert server.stats.refused_versions == 2
        assert transport.protocol_stats.refused["agent"]["server"] == before + 2
        snap = transport.protocol_stats.snapshot()["agent"]
        assert snap["refused"]["server"] >= 2 and "2..3" in snap["last_refusal"]
        exposition = generate_latest(process_registry()).decode()
        assert (f'cellcloud_protocol_refused_total{{protocol="agent",side="server"}} '
                f'{float(before + 2)}') in exposition

    run(served({"op": op}, "agent", (2, 3), body))
    assert ran == []


def test_a_client_past_the_servers_window_is_refused_with_both_windows() -> None:
    async def op(body: Any) -> Any:
        return {}

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port, protocol="frontend", versions=(3, 4))
        with pytest.raises(VersionRefused) as e:
            await c.call("op", {}, timeout_s=30)
        assert "3..4" in str(e.value) and "1..2" in str(e.value)
        assert server.stats.refused_versions == 1
        # and a client that only speaks 2 facing a build before negotiation: refused here
        before = transport.protocol_stats.refused.get("frontend", {}).get("client", 0)

        async def inner(_s: Server, port2: int) -> None:
            c2 = Client("127.0.0.1", port2, protocol="frontend", versions=(2, 2))
            with pytest.raises(VersionRefused, match="no version in common"):
                await c2.call("op", {}, timeout_s=30)

        await served({"op": op}, None, None, inner)
        assert transport.protocol_stats.refused["frontend"]["client"] == before + 1

    run(served({"op": op}, "frontend", NEW, body))


def test_a_hello_for_another_protocol_is_refused() -> None:
    async def op(body: Any) -> Any:
        return {}

    async def body(server: Server, port: int) -> None:
        c = Client("127.0.0.1", port, protocol="control")
        with pytest.raises(VersionRefused, match="'control'.*'agent'"):
            await c.call("op", {}, timeout_s=30)

    run(served({"op": op}, "agent", NEW, body))


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLCLOUD_PROTOCOL_MAX", "agent=1")
    assert Server({}, protocol="agent").versions == (1, 1)
    assert Server({}, protocol="frontend").versions == protocols.PROTOCOLS["frontend"]
    assert Client("127.0.0.1", 1, expect_role="agent").versions == (1, 1)
    monkeypatch.setenv("CELLCLOUD_PROTOCOL_MAX", "1")
    assert Client("127.0.0.1", 1, protocol="frontend").versions == (1, 1)
    monkeypatch.setenv("CELLCLOUD_PROTOCOL_MAX", "agnet=1")
    with pytest.raises(ValueError, match="unknown protocol 'agnet'"):
        Server({}, protocol="agent")
