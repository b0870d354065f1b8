"""The invoke path's message types (core/messages.py): round trips, refusals, dialects."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import messages as m
from cellcloud.transport.codec import pack, unpack

ids = st.text(min_size=1, max_size=12)
opt_err = st.none() | st.sampled_from(["Unhandled", "Handled"])
func = st.builds(
    m.FunctionSpec, name=ids, arn=ids, handler=ids, runtime=ids,
    memory_mb=st.integers(128, 10240), timeout_s=st.integers(1, 900),
    ephemeral_mb=st.none() | st.integers(512, 10240),
    environment=st.dictionaries(ids, st.text(max_size=8), max_size=3),
    version=ids, network=st.sampled_from(["", "egress", "none"]),
    net_allow=st.lists(ids, max_size=2).map(tuple), layers=st.lists(ids, max_size=2).map(tuple))
messages = st.one_of(
    st.builds(m.CreateEnvRequest, env_id=ids, bundle_sha256=ids, function=func,
              function_key=ids, create_timeout_ms=st.none() | st.integers(1, 10**6),
              bundles=st.dictionaries(ids, st.binary(max_size=8), max_size=2)),
    st.builds(m.CreateEnvReply, env_id=ids, pid=st.integers(1, 2**22),
              init_ms=st.floats(0, 1e6), init_error=st.none() | st.just({"errorType": "X"})),
    st.builds(m.InvokeRequest, env_id=ids, request_id=ids, payload=st.binary(max_size=64),
              timeout_ms=st.integers(1, 900_000), arn=ids),
    st.builds(m.InvokeReply, payload=st.binary(max_size=64), function_error=opt_err,
              logs=st.binary(max_size=16), duration_ms=st.floats(0, 1e6),
              max_rss_kb=st.integers(0, 2**31), env_alive=st.booleans(),
              previous_logs=st.binary(max_size=8), oom=st.booleans()),
    st.builds(m.DestroyRequest, env_id=ids),
    st.builds(m.DestroyReply, destroyed=st.just(True), function_key=ids,
              logs=st.binary(max_size=8)),
    st.builds(m.StatusRequest, light=st.booleans()),
    st.builds(m.AttestRequest, env_id=ids, nonce=ids),
    st.builds(m.ForgetBundlesRequest, sha256=st.lists(ids, max_size=3).map(tuple)),
    st.builds(m.ForgetBundlesReply, forgotten=st.lists(ids, max_size=3).map(tuple),
              deferred=st.lists(ids, max_size=3).map(tuple)),
    st.builds(m.GuestInvoke, request_id=ids, payload=st.binary(max_size=64),
              timeout_ms=st.integers(1, 900_000), arn=ids),
    st.builds(m.GuestResult, request_id=ids, payload=st.binary(max_size=64),
              function_error=opt_err, logs=st.binary(max_size=16),
              duration_ms=st.floats(0, 1e6), max_rss_kb=st.integers(0, 2**31),
              env_alive=st.booleans(), phase_pending=st.booleans(), legacy=st.booleans()),
    st.builds(m.GuestPhaseDone, request_id=ids, logs=st.binary(max_size=16),
              duration_ms=st.floats(0, 1e6), max_rss_kb=st.integers(0, 2**31),
              env_alive=st.booleans(), legacy=st.booleans()),
    st.builds(m.GuestReady, init_ms=st.floats(0, 1e6),
              init_error=st.none() | st.just({"errorType": "X", "errorMessage": "y"}),
              logs=st.binary(max_size=16), extensions=st.integers(0, 10)),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_survives_the_wire(msg: Any) -> None:
    wire = unpack(pack(msg.to_wire()), 1 << 20)
    assert type(msg).from_wire(wire) == msg


def test_unknown_fields_are_ignored() -> None:
    doc = m.InvokeRequest("e", "r", b"p", 1000).to_wire() | {"trace": "x", "future": [1]}
    assert m.InvokeRequest.from_wire(doc) == m.InvokeRequest("e", "r", b"p", 1000)


@pytest.mark.parametrize("field", ["env_id", "request_id", "payload", "timeout_ms"])
def test_a_missing_required_field_is_refused_by_name(field: str) -> None:
    doc = m.InvokeRequest("e", "r", b"p", 1000).to_wire()
    del doc[field]
    with pytest.raises(m.MessageError, match=repr(field)):
        m.InvokeRequest.from_wire(doc)


@pytest.mark.parametrize("field,value", [
    ("timeout_ms", "1000"), ("timeout_ms", True), ("payload", "text"), ("env_id", 7)])
def test_a_field_of_the_wrong_type_is_refused(field: str, value: Any) -> None:
    doc = m.InvokeRequest("e", "r", b"p", 1000).to_wire() | {field: value}
    with pytest.raises(m.MessageError, match=repr(field)):
        m.InvokeRequest.from_wire(doc)


def test_not_a_map_is_refused() -> None:
    with pytest.raises(m.MessageError):
        m.DestroyRequest.from_wire(["env"])
    with pytest.raises(m.MessageError, match="'memory_mb'"):
        m.CreateEnvRequest.from_wire({"env_id": "e", "bundle_sha256": "s", "function": {
            "name": "f", "arn": "a", "handler": "h", "runtime": "python3.11", "timeout_s": 3}})


def test_one_set_of_names_frontend_to_guest_and_back() -> None:
    """The request id, the relative timeout, function_error and env_alive keep their names
    on both hops (the first dialect spelled them id / deadline_ms / error_type / fatal)."""
    req = m.InvokeRequest("env-1", "req-1", b"{}", 3000, "arn:f").to_wire()
    ask = m.GuestInvoke.from_wire(m.GuestInvoke("req-1", b"{}", 3000, "arn:f").to_wire())
    guest_wire = m.GuestInvoke(ask.request_id, ask.payload, ask.timeout_ms, ask.arn).to_wire()
    shared = {"request_id", "payload", "timeout_ms", "arn"}
    assert shared <= req.keys() and shared <= guest_wire.keys()
    assert {k: req[k] for k in shared} == {k: guest_wire[k] for k in shared}
    result = m.GuestResult("req-1", b"1", "Unhandled", env_alive=False).to_wire()
    reply = m.InvokeReply(b"1", "Unhandled", env_alive=False).to_wire()
    for k in ("request_id", "function_error", "env_alive", "payload", "logs"):
        assert k in result
    for k in ("function_error", "env_alive", "payload", "logs"):
        assert reply[k] == result[k]
    assert not {"id", "error_type", "fatal", "deadline_ms"} & (
        req.keys() | guest_wire.keys() | result.keys() | reply.keys())


def test_the_first_guest_dialect_is_read_and_answered_in_kind() -> None:
    """A guest adopted from an older agent (or an agent rolled back) speaks the first dialect."""
    old_ask = {"t": "invoke", "id": "r", "payload": b"x", "deadline_ms": 10_500, "arn": "a"}
    ask = m.GuestInvoke.from_wire(old_ask, now_ms=10_000)
    assert (ask.request_id, ask.timeout_ms, ask.legacy) == ("r", 500, True)
    assert ask.to_wire(now_ms=10_000) == old_ask
    old_result = {"t": "result", "id": "r", "ok": False, "payload": b"e",
                  "error_type": "Unhandled", "logs": b"", "duration_ms": 1.0,
                  "max_rss_kb": 5, "fatal": True}
    res = m.GuestResult.from_wire(old_result)
    assert (res.function_error, res.env_alive, res.legacy) == ("Unhandled", False, True)
    assert res.to_wire() == old_result
    ok = m.GuestResult.from_wire(old_result | {"ok": True, "error_type": None, "fatal": False,
                                               "phase": "pending"})
    assert (ok.function_error, ok.env_alive, ok.phase_pending) == (None, True, True)
    done = m.GuestPhaseDone.from_wire({"t": "done", "id": "r", "logs": b"l", "fatal": True})
    assert (done.request_id, done.env_alive, done.legacy) == ("r", False, True)
    assert m.GuestReady.from_wire({"t": "ready", "init_ms": 3, "init_error": None}).wire == 1
    assert m.GuestReady(1.0).wire == m.GUEST_WIRE


def test_status_takes_no_body_too() -> None:
    assert m.StatusRequest.from_wire(None) == m.StatusRequest()
    assert m.StatusRequest.from_wire({"light": True}).light


# -- the agent's task ops (agent/tasks.py) ----------------------------------------------------
names = st.text(min_size=1, max_size=8)
opt_int = st.none() | st.integers(0, 2**40)
task_container = st.builds(
    m.TaskContainer, name=names, image_layers=st.lists(ids, min_size=1, max_size=3).map(tuple),
    argv=st.lists(ids, min_size=1, max_size=3).map(tuple),
    env=st.dictionaries(names, st.text(max_size=8), max_size=3), workdir=st.text(max_size=8),
    port_mappings=st.lists(st.builds(m.TaskPortMapping, container_port=st.integers(1, 65535),
                                     protocol=st.sampled_from(["tcp", "udp"])),
                           max_size=2).map(tuple))
task_messages = st.one_of(
    st.builds(m.TaskCreateRequest, task_id=ids, account=ids, cpu_units=st.integers(256, 16384),
              memory_mib=st.integers(512, 122880),
              containers=st.lists(task_container, min_size=1, max_size=3).map(tuple),
              hostname=ids, network=st.sampled_from(["", "egress", "none"]),
              net_allow=st.lists(ids, max_size=2).map(tuple)),
    st.builds(m.TaskCreateReply, task_id=ids, private_ipv4=st.sampled_from(["", "10.0.0.2"])),
    st.builds(m.TaskContainerRequest, task_id=ids, container=names),
    st.builds(m.TaskContainerStartReply, pid=st.integers(1, 2**22)),
    st.builds(m.TaskContainerStopRequest, task_id=ids, container=names,
              grace_s=st.floats(0, 120)),
    st.builds(m.TaskContainerStopReply, exit_code=st.none() | st.integers(0, 255)),
    st.builds(m.TaskExecRequest, task_id=ids, container=names,
              command=st.lists(ids, min_size=1, max_size=3).map(tuple),
              timeout_s=st.floats(0.1, 120)),
    st.builds(m.TaskExecReply, exit_code=st.none() | st.integers(0, 255),
              output=st.binary(max_size=16), timed_out=st.booleans(), error=st.text(max_size=8)),
    st.builds(m.TaskPollRequest, task_id=ids,
              logs_after=st.dictionaries(names, st.integers(0, 2**40), max_size=3)),
    st.builds(m.TaskPollReply,
              containers=st.dictionaries(names, st.builds(
                  m.TaskContainerState, state=st.sampled_from(["pending", "running", "exited"]),
                  exit_code=st.none() | st.integers(0, 255), started_ms=opt_int,
                  exited_ms=opt_int, reason=st.text(max_size=8)), max_size=3),
              logs=st.dictionaries(names, st.lists(st.builds(
                  m.TaskLogLine, time_ms=st.integers(0, 2**42), text=st.text(max_size=12),
                  stream=st.sampled_from(["stdout", "stderr"])), max_size=3).map(tuple),
                  max_size=2),
              cursors=st.dictionaries(names, st.integers(0, 2**40), max_size=3),
              cpu_usage_ns=st.integers(0, 2**50), memory_bytes=st.integers(0, 2**40),
              logs_dropped=st.dictionaries(names, st.integers(0, 2**20), max_size=2),
              oom_kills=st.integers(0, 100)),
    st.builds(m.TaskDestroyRequest, task_id=ids),
    st.builds(m.TaskDestroyReply, destroyed=st.booleans()),
)


@settings(max_examples=200, deadline=None)
@given(task_messages)
def test_every_task_message_survives_the_wire(msg: Any) -> None:
    wire = unpack(pack(msg.to_wire()), 1 << 20)
    assert type(msg).from_wire(wire) == msg


def test_task_messages_refuse_bad_fields_by_name() -> None:
    good = m.TaskCreateRequest("t1", "111122223333", 256, 512, (
        m.TaskContainer("web", ("sha256:" + "a" * 64,), ("python3", "-m", "http.server")),))
    wire = good.to_wire()
    with pytest.raises(m.MessageError, match="'containers'"):
        m.TaskCreateRequest.from_wire({k: v for k, v in wire.items() if k != "containers"})
    with pytest.raises(m.MessageError, match="'argv'"):
        m.TaskCreateRequest.from_wire({**wire, "containers": [{"name": "a", "argv": [1]}]})
    with pytest.raises(m.MessageError, match="'logs_after'"):
        m.TaskPollRequest.from_wire({"task_id": "t", "logs_after": {"a": "x"}})
    assert m.TaskCreateRequest.from_wire({**wire, "newer": 1}) == good
