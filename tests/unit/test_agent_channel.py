"""The agent's end of an environment channel (agent/server.py), against a fake guest on a
socketpair: the one set of names, the first dialect of guests adopted in a live update, a frame
split across reads, and a guest that writes garbage. An in-process agent, nothing spawned."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from cellcloud.agent.server import Agent
from cellcloud.core import messages as m
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import FrameReader, pack


class StubBackend:
    name = "stub"

    def start(self) -> None: ...
    async def spawn(self, spec: Any) -> Any:
        raise AssertionError("not used")
    def kill(self, pid: int) -> None: ...
    def close(self) -> None: ...


Guest = Callable[[dict[str, Any]], bytes]  # an invoke frame -> the bytes written back


def fake_guest(sock: socket.socket, answer: Guest, seen: list[dict[str, Any]]) -> None:
    reader = FrameReader(1 << 24)
    try:
        while data := sock.recv(65536):
            for doc in reader.feed(data):
                seen.append(doc)
                out = answer(doc)
                for i in range(0, len(out), 7000):  # in pieces: the agent reassembles
                    sock.sendall(out[i:i + 7000])
    except OSError:
        pass  # the test is over (its end closed) or the agent hung up on garbage


def run(tmp_path: Any, answer: Guest, invoke: dict[str, Any], guest_wire: int | None
        ) -> tuple[dict[str, Any], list[dict[str, Any]], Agent]:
    ours, theirs = socket.socketpair()
    seen: list[dict[str, Any]] = []
    spec = EnvSpec(env_id="env-1", function_name="f", function_version="$LATEST",
                   function_arn="arn:f", handler="app.handler", runtime="python3.11",
                   memory_mb=128, timeout_s=3, bundle_dir="/nonexistent", uid=1, gid=1,
                   cgroup_group="unit-agent")
    doc: dict[str, Any] = {
        "spec": spec.to_wire(), "function_key": "a/f/$LATEST/1", "pid": os.getpid(),
        "created_ms": 0, "slot": 0, "invocations": 0, "init_error": None, "init_ms": 1.0,
        "last_used_ms": 0, "max_rss_kb": 0, "measurements": {}}
    if guest_wire is not None:
        doc["guest_wire"] = guest_wire

    async def go() -> tuple[dict[str, Any], Agent]:
        agent = Agent("unit-agent", str(tmp_path), StubBackend(), uid_base=500_000,
                      runtimes_found={})
        await agent.adopt([(doc, ours)])
        agent._remove = agent.envs.pop  # type: ignore[method-assign,assignment]  # no cgroups
        return await agent.invoke(invoke), agent

    guest = threading.Thread(target=fake_guest, args=(theirs, answer, seen), daemon=True)
    guest.start()
    try:
        reply, agent = asyncio.run(go())
    finally:
        theirs.shutdown(socket.SHUT_RDWR)
        guest.join(60)
        theirs.close()
    return reply, seen, agent


INVOKE = {"env_id": "env-1", "request_id": "req-1", "payload": b"{}" + b" " * 100_000,
          "timeout_ms": 30_000, "arn": "arn:f:1"}


def test_the_channel_carries_one_set_of_names(tmp_path: Any) -> None:
    def answer(doc: dict[str, Any]) -> bytes:
        return pack(m.GuestResult(doc["request_id"], b"x" * 50_000, "Unhandled",
                                  b"log", 1.5, 7, env_alive=True).to_wire())

    reply, seen, agent = run(tmp_path, answer, INVOKE, m.GUEST_WIRE)
    assert seen == [{"t": "invoke", "request_id": "req-1", "payload": INVOKE["payload"],
                     "timeout_ms": 30_000, "arn": "arn:f:1"}]
    assert m.InvokeReply.from_wire(reply) == m.InvokeReply(b"x" * 50_000, "Unhandled", b"log",
                                                           1.5, 7, env_alive=True)
    assert "env-1" in agent.envs  # alive: kept


def test_a_guest_of_the_first_dialect_is_spoken_to_in_it(tmp_path: Any) -> None:
    def answer(doc: dict[str, Any]) -> bytes:
        assert "deadline_ms" in doc and "id" in doc  # it could not read anything else
        return msgpack.packb({"t": "result", "id": doc["id"], "ok": True, "payload": b"1",
                              "error_type": None, "logs": b"", "duration_ms": 1.0,
                              "max_rss_kb": 3, "fatal": True}, use_bin_type=True)

    reply, seen, agent = run(tmp_path, answer, INVOKE, None)  # adopted: no guest_wire
    assert seen[0]["id"] == "req-1" and seen[0]["payload"] == INVOKE["payload"]
    assert reply["function_error"] is None and reply["payload"] == b"1"
    assert reply["function_error"] is None and reply["env_alive"] is False
    assert "env-1" not in agent.envs  # fatal in the old dialect: the environment is gone


def test_garbage_from_a_guest_ends_it(tmp_path: Any) -> None:
    reply, _seen, agent = run(tmp_path, lambda doc: b"\xc1" * 16, INVOKE, m.GUEST_WIRE)
    assert reply["function_error"] == "Unhandled" and reply["env_alive"] is False
    assert b"invalid frame" in reply["payload"]
    assert "env-1" not in agent.envs


def test_a_result_without_a_request_id_is_out_of_turn(tmp_path: Any) -> None:
    reply, _seen, _agent = run(
        tmp_path, lambda doc: pack({"t": "result", "payload": b"1"}), INVOKE, m.GUEST_WIRE)
    assert b"Runtime.InvalidResponse" in reply["payload"] and reply["env_alive"] is False


TRACE = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"


def test_the_agent_passes_the_trace_on_and_reports_its_span_and_the_environments(
        tmp_path: Any) -> None:
    def answer(doc: dict[str, Any]) -> bytes:
        parent = doc["trace_id"].split("Parent=")[1].split(";")[0]
        # a guest whose function forged the frame: another name, parent and times
        forged = m.Span("my name\n", "e" * 16, "1" * 16, 0, 2**62)
        assert parent != "53995c3f42cd8ad8" and doc["span"] is True
        return pack(m.GuestResult(doc["request_id"], b"1", None, span=forged).to_wire())

    reply, seen, _ = run(tmp_path, answer, {**INVOKE, "trace_id": TRACE, "spans": True},
                         m.GUEST_WIRE)
    agent_span, env_span = m.InvokeReply.from_wire(reply).spans
    assert seen[0]["trace_id"] == TRACE.replace("53995c3f42cd8ad8", agent_span.span_id)
    assert (agent_span.name, agent_span.parent_id) == ("agent", "53995c3f42cd8ad8")
    # the agent names the environment's span and parents it; the times stay within its own
    assert (env_span.name, env_span.span_id, env_span.parent_id) == (
        "environment", "e" * 16, agent_span.span_id)
    assert agent_span.start_ns <= env_span.start_ns <= env_span.end_ns <= agent_span.end_ns


def test_without_spans_asked_the_trace_goes_through_unchanged(tmp_path: Any) -> None:
    def answer(doc: dict[str, Any]) -> bytes:
        return pack(m.GuestResult(doc["request_id"], b"1", None).to_wire())

    reply, seen, _ = run(tmp_path, answer, {**INVOKE, "trace_id": TRACE}, m.GUEST_WIRE)
    assert seen[0]["trace_id"] == TRACE and "span" not in seen[0]
    assert "spans" not in reply
