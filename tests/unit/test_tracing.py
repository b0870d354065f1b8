"""X-Ray trace headers (core/tracing.py), their trip through the invoke path's messages, and the
built-in Python runtime's ``_X_AMZN_TRACE_ID``."""

from __future__ import annotations

import os
import random
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import messages as m
from cellcloud.core import tracing
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sandbox import guest, pyruntime
from cellcloud.transport.codec import pack, unpack

FULL = re.compile(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=[01]")
AWS_EXAMPLE = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"

roots = st.builds(lambda a, b: f"1-{a}-{b}", st.text("0123456789abcdef", min_size=8,
                                                     max_size=8),
                  st.text("0123456789abcdef", min_size=24, max_size=24))
spans = st.text("0123456789abcdef", min_size=16, max_size=16)


def test_parse_aws_example() -> None:
    t = tracing.parse(AWS_EXAMPLE)
    assert t == tracing.TraceHeader("1-5759e988-bd862e3fe1be46a994272793", "53995c3f42cd8ad8",
                                    True)
    assert t.format() == AWS_EXAMPLE
    # AWS's X-Ray -> OpenTelemetry mapping: time digits then random digits; Parent is the span
    assert f"{t.otel_trace_id:032x}" == "5759e988bd862e3fe1be46a994272793"
    assert t.otel_parent_id == 0x53995C3F42CD8AD8


def test_parse_is_lenient_about_case_order_and_extra_fields() -> None:
    t = tracing.parse("sampled=0; parent=53995C3F42CD8AD8 ;Lineage=a:1;"
                      "root=1-5759E988-BD862E3FE1BE46A994272793")
    assert t == tracing.TraceHeader("1-5759e988-bd862e3fe1be46a994272793", "53995c3f42cd8ad8",
                                    False)
    assert tracing.parse("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=?").sampled is None


@pytest.mark.parametrize("bad", [
    None, "", "garbage", "Root=1-5759e988-bd862e3fe1be46a99427279",  # 23 random digits
    "Root=2-5759e988-bd862e3fe1be46a994272793", "Root=1-5759e98g-bd862e3fe1be46a994272793",
    "Parent=53995c3f42cd8ad8;Sampled=1",  # no root
    "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad",
    "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=yes",
    "Root=1-5759e988-bd862e3fe1be46a994272793;junk",
    AWS_EXAMPLE + ";Lineage=" + "x" * DEFAULT_LIMITS.trace_header_chars_max,
])
def test_parse_refuses(bad: str | None) -> None:
    assert tracing.parse(bad) is None


@given(roots, st.none() | spans, st.none() | st.booleans())
def test_format_parse_round_trip(root: str, parent: str | None, sampled: bool | None) -> None:
    t = tracing.TraceHeader(root, parent, sampled)
    assert tracing.parse(t.format()) == t


def test_begin_makes_a_valid_id_from_the_time_and_the_seed() -> None:
    now_ms = 1_700_000_000_123
    t, span = tracing.begin(None, now_ms=now_ms, rng=random.Random(7), sample=False)
    assert FULL.fullmatch(t.child(span).format())
    assert t.root[2:10] == f"{now_ms // 1000:08x}"
    assert t.parent is None and t.sampled is False
    again, span2 = tracing.begin(None, now_ms=now_ms, rng=random.Random(7), sample=False)
    assert (again, span2) == (t, span)  # seeded: replayable
    other, _ = tracing.begin(None, now_ms=now_ms, rng=random.Random(8), sample=False)
    assert other.root != t.root


def test_begin_honours_a_valid_incoming_header() -> None:
    t, span = tracing.begin(AWS_EXAMPLE, now_ms=0, rng=random.Random(1), sample=False)
    assert t.root == "1-5759e988-bd862e3fe1be46a994272793"
    assert t.parent == "53995c3f42cd8ad8"  # the caller's span is this hop's parent
    assert t.sampled is True  # its decision stands
    assert t.child(span).parent == span != t.parent
    undecided, _ = tracing.begin("Root=1-5759e988-bd862e3fe1be46a994272793", now_ms=0,
                                 rng=random.Random(1), sample=True)
    assert undecided.sampled is True and undecided.parent is None
    fresh, _ = tracing.begin("Root=bogus", now_ms=0, rng=random.Random(1), sample=True)
    assert fresh.root != "bogus" and fresh.sampled is True


def test_span_ids_are_never_zero() -> None:
    class Zero(random.Random):
        def getrandbits(self, k: int) -> int:
            return 0

    assert tracing.new_span_id(Zero()) == "0000000000000001"


def test_response_header_carries_root_and_decision() -> None:
    t = tracing.parse(AWS_EXAMPLE)
    assert t is not None
    assert t.response() == "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"


# -- the messages ---------------------------------------------------------------------------
def _trip(msg: Any) -> Any:
    return unpack(pack(msg.to_wire()), 1 << 20)


def test_invoke_messages_carry_the_trace_and_spans() -> None:
    req = m.InvokeRequest("e", "r", b"{}", 1000, "arn", trace_id=AWS_EXAMPLE, spans=True)
    assert m.InvokeRequest.from_wire(_trip(req)) == req
    plain = m.InvokeRequest("e", "r", b"{}", 1000)
    assert "trace_id" not in plain.to_wire() and "spans" not in plain.to_wire()
    sp = (m.Span("agent", "1" * 16, "2" * 16, 10, 20), m.Span("environment", "3" * 16, "1" * 16,
                                                               12, 18))
    rep = m.InvokeReply(b"ok", None, spans=sp)
    assert m.InvokeReply.from_wire(_trip(rep)) == rep
    gi = m.GuestInvoke("r", b"{}", 1000, "arn", trace_id=AWS_EXAMPLE, span=True)
    assert m.GuestInvoke.from_wire(_trip(gi)) == gi
    gr = m.GuestResult("r", b"ok", None, span=sp[1])
    assert m.GuestResult.from_wire(_trip(gr)) == gr
    # the first dialect has no room for them and drops them, as an old guest expects
    legacy = m.GuestInvoke("r", b"{}", 1000, trace_id=AWS_EXAMPLE, span=True, legacy=True)
    assert "trace_id" not in legacy.to_wire(0)


def test_a_reply_with_too_many_spans_is_refused() -> None:
    sp = m.Span("agent", "1" * 16, "2" * 16, 10, 20)
    doc = m.InvokeReply(b"ok", None, spans=(sp,) * (DEFAULT_LIMITS.trace_spans_per_reply_max
                                                    + 1)).to_wire()
    with pytest.raises(m.MessageError, match="spans"):
        m.InvokeReply.from_wire(doc)


# -- the environment ------------------------------------------------------------------------
def test_guest_hands_the_runtime_the_trace_with_its_own_span() -> None:
    ask = m.GuestInvoke("r", b"{}", 1000, trace_id=AWS_EXAMPLE, span=True)
    header, span = guest._runtime_trace(ask, 0)
    t = tracing.parse(header)
    assert t is not None and span is not None
    assert t.root == "1-5759e988-bd862e3fe1be46a994272793" and t.sampled is True
    assert t.parent == span[0] and span[1] == "53995c3f42cd8ad8"
    # no spans asked: the header as the agent sent it
    assert guest._runtime_trace(m.GuestInvoke("r", b"", 1, trace_id=AWS_EXAMPLE), 0) == (
        AWS_EXAMPLE, None)
    # an agent that sent none: still a valid header for the function
    header, span = guest._runtime_trace(m.GuestInvoke("r", b"", 1), 1_700_000_000_000)
    assert FULL.fullmatch(header) is None and span is None  # no Parent: nothing caused it
    assert tracing.parse(header) is not None


class _FakeClient:
    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        self.responses: list[bytes] = []

    def next(self) -> tuple[str, bytes, int, str, str]:
        return "req-1", b"{}", 0, "arn", self.trace_id

    def respond(self, request_id: str, body: bytes) -> None:
        self.responses.append(body)

    def error(self, request_id: str, body: bytes) -> None:
        raise AssertionError(body)

    def init_error(self, body: bytes) -> None:
        raise AssertionError(body)


def test_builtin_runtime_sets_x_amzn_trace_id_per_invocation() -> None:
    """As awslambdaric does (update_xray_env_variable): set from Lambda-Runtime-Trace-Id,
    removed when an invocation has none."""
    seen: list[str | None] = []

    def handler(event: Any, context: Any) -> str:
        seen.append(os.environ.get("_X_AMZN_TRACE_ID"))
        return "ok"

    saved = os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        pyruntime.handle_one(handler, _FakeClient(AWS_EXAMPLE))
        pyruntime.handle_one(handler, _FakeClient(""))
    finally:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
        if saved is not None:
            os.environ["_X_AMZN_TRACE_ID"] = saved
    assert seen == [AWS_EXAMPLE, None]


def test_no_opentelemetry_import_when_tracing_is_off() -> None:
    """Off (no --otlp-endpoint, no OTEL_EXPORTER_OTLP_ENDPOINT): the invoke path's modules and
    the exporter's factory import nothing of the SDK."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import cellcloud.router.server, cellcloud.frontend.server, cellcloud.agent.server\n"
            "import cellcloud.sandbox.guest\n"
            "from cellcloud import span_export\n"
            "assert span_export.from_config(None, 'x') is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_valid_span_id() -> None:
    assert tracing.valid_span_id("53995c3f42cd8ad8")
    assert not tracing.valid_span_id("0" * 16)
    assert not tracing.valid_span_id("53995C3F42CD8AD8")  # ours are lower-case
    assert not tracing.valid_span_id("53995c3f42cd8ad")
    assert not tracing.valid_span_id("environment\n")
