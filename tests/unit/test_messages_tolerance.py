"""from_wire across core/messages.py: a newer peer's unknown fields are ignored, a missing
required field is a MessageError naming it (the versioning rules, docs/design.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import messages as m

SPEC = m.FunctionSpec(name="f", arn="arn:aws:lambda:cc-local-1:111122223333:function:f",
                      handler="app.handler", runtime="python3.12", memory_mb=128, timeout_s=3,
                      environment={"A": "b"}, layers=("ab" * 32,), log_group="/aws/lambda/f")
SPAN = m.Span(name="agent", span_id="a" * 16, parent_id="b" * 16, start_ns=1, end_ns=2)

TASK_PORT = m.TaskPortMapping(container_port=8080, protocol="udp")
TASK_CONTAINER = m.TaskContainer(name="web", image_layers=("ab" * 32,), argv=("/srv",),
                                 env={"A": "b"}, workdir="/w", port_mappings=(TASK_PORT,))
TASK_STATE = m.TaskContainerState(state="exited", exit_code=137, started_ms=1, exited_ms=2,
                                  reason="OutOfMemoryError: Container killed due to memory usage")
TASK_LINE = m.TaskLogLine(time_ms=1, text="hello", stream="stderr")

#: one of each message, its fields set away from their defaults where it matters
SAMPLES: list[Any] = [
    SPEC,
    m.CreateEnvRequest(env_id="e", bundle_sha256="cd" * 32, function=SPEC, function_key="k",
                       create_timeout_ms=5000, bundles={"cd" * 32: b"zip"}),
    m.CreateEnvReply(env_id="e", pid=7, init_ms=1.5, init_error={"errorType": "E"}),
    m.InvokeRequest(env_id="e", request_id="r", payload=b"{}", timeout_ms=3000, arn="a",
                    trace_id="Root=1-x", spans=True, stream=True),
    SPAN,
    m.InvokeReply(payload=b"1", function_error="Unhandled", logs=b"l", duration_ms=2.0,
                  max_rss_kb=9, env_alive=False, previous_logs=b"p", oom=True, spans=(SPAN,),
                  logs_live_bytes=1),
    m.DestroyRequest(env_id="e"),
    m.DestroyReply(destroyed=True, function_key="k", logs=b"bye"),
    m.StatusRequest(light=True),
    m.AttestRequest(env_id="e", nonce="n"),
    m.ForgetBundlesRequest(sha256=("ab" * 32,)),
    m.ForgetBundlesReply(forgotten=("ab" * 32,), deferred=()),
    m.HttpRequest(method="POST", path="/p", account="111122223333", query="a=b",
                  headers={"x-h": "v"}, body=b"b", caller="444455556666"),
    m.HttpReply(status=200, headers={"content-type": "application/json"}, body=b"{}"),
    m.GuestInvoke(request_id="r", payload=b"{}", timeout_ms=3000, arn="a", trace_id="t",
                  span=True, stream=True),
    m.GuestResult(request_id="r", payload=b"1", function_error=None, logs=b"l",
                  duration_ms=1.0, max_rss_kb=3, env_alive=True, phase_pending=True, span=SPAN),
    m.GuestLogs(request_id="r", logs=b"line\n"),
    m.GuestPhaseDone(request_id="r", logs=b"l", duration_ms=1.0, max_rss_kb=2, env_alive=False),
    m.GuestReady(init_ms=3.0, init_error=None, logs=b"l", extensions=1),
    # the agent's task ops (issue #17)
    TASK_PORT,
    TASK_CONTAINER,
    m.TaskCreateRequest(task_id="t", account="111122223333", cpu_units=256, memory_mib=512,
                        containers=(TASK_CONTAINER,), hostname="h", network="egress",
                        net_allow=("10.0.0.0/8",)),
    m.TaskCreateReply(task_id="t", private_ipv4="100.64.0.2"),
    m.TaskContainerRequest(task_id="t", container="web"),
    m.TaskContainerStartReply(pid=7),
    m.TaskContainerStopRequest(task_id="t", container="web", grace_s=2.0),
    m.TaskContainerStopReply(exit_code=143),
    m.TaskExecRequest(task_id="t", container="web", command=("/bin/true",), timeout_s=2.0),
    m.TaskExecReply(exit_code=0, output=b"ok", timed_out=False, error=""),
    m.TaskPollRequest(task_id="t", logs_after={"web": 3}),
    TASK_STATE,
    TASK_LINE,
    m.TaskPollReply(containers={"web": TASK_STATE}, logs={"web": (TASK_LINE,)},
                    cursors={"web": 4}, cpu_usage_ns=5, memory_bytes=6,
                    logs_dropped={"web": 1}, oom_kills=1),
    m.TaskDestroyRequest(task_id="t"),
    m.TaskDestroyReply(destroyed=True),
    # managed volumes of a task (issue #19)
    m.TaskMount(volume="data", path="/data", read_only=True),
    m.TaskVolume(name="data", volume_id="vol-0123456789abcdef0", size_gib=2, attach_epoch=3,
                 replicated=True),
    m.TaskCreateRequest(task_id="t", account="111122223333", cpu_units=256, memory_mib=512,
                        containers=(dataclasses.replace(TASK_CONTAINER, mounts=(
                            m.TaskMount(volume="data", path="/data"),)),),
                        volumes=(m.TaskVolume(name="data", volume_id="vol-0123456789abcdef0",
                                              size_gib=2, attach_epoch=3, replicated=False),)),
]

#: wire names that are not the field's own (HttpReply keeps version 1's short names)
WIRE_NAME = {(m.HttpReply, "status"): "s", (m.HttpReply, "headers"): "h",
             (m.HttpReply, "body"): "b"}


def required_wire_names(msg: Any) -> list[str]:
    return [WIRE_NAME.get((type(msg), f.name), f.name) for f in dataclasses.fields(msg)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def test_every_message_type_is_sampled() -> None:
    types = {v for v in vars(m).values() if isinstance(v, type) and dataclasses.is_dataclass(v)}
    assert types == {type(s) for s in SAMPLES}


def test_every_sample_goes_round_the_wire() -> None:
    for msg in SAMPLES:
        assert type(msg).from_wire(msg.to_wire()) == msg, type(msg).__name__


values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                   st.text(max_size=8), st.binary(max_size=8),
                   st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(SAMPLES) - 1),
       extra=st.dictionaries(st.text(min_size=1, max_size=12).map(lambda s: "new_" + s),
                             values, min_size=1, max_size=5))
def test_unknown_newer_fields_are_ignored(index: int, extra: dict[str, Any]) -> None:
    msg = SAMPLES[index]
    wire = msg.to_wire()
    assert not set(extra) & set(wire)
    assert type(msg).from_wire({**wire, **extra}) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_a_missing_required_field_is_an_error_naming_it(msg: Any) -> None:
    wire = msg.to_wire()
    required = required_wire_names(msg)
    # every field optional
    assert required or type(msg) in (m.StatusRequest, m.GuestReady, m.TaskContainerStopReply)
    for name in required:
        assert name in wire, name
        doc = {k: v for k, v in wire.items() if k != name}
        with pytest.raises(m.MessageError, match=repr(name)):
            type(msg).from_wire(doc)


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(SAMPLES) - 1), data=st.data())
def test_any_required_field_removed_names_it(index: int, data: st.DataObject) -> None:
    msg = SAMPLES[index]
    required = required_wire_names(msg)
    if not required:
        return
    gone = data.draw(st.sets(st.sampled_from(required), min_size=1))
    doc = {k: v for k, v in msg.to_wire().items() if k not in gone}
    with pytest.raises(m.MessageError) as e:
        type(msg).from_wire(doc)
    assert any(repr(name) in str(e.value) for name in gone)
