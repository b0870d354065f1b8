"""The endpoint's sans-IO pieces: connection deadlines and cap, the head scanner, the JSON
depth measure and the tenant's status view (issue #11)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.connguard import ConnectionGuard, GuardParams, HeaderScanner, HeadTooLarge
from cellcloud.core.errors import LambdaError
from cellcloud.core.jsondepth import check_json_depth, json_depth
from cellcloud.core.tenant_status import cell_status_for_tenant

P = GuardParams(header_timeout_ms=10_000, body_timeout_ms=30_000,
                body_rate_bytes_per_s_min=1000, keepalive_idle_timeout_ms=30_000,
                connections_max=3)


def test_silent_connection_expires_at_the_header_deadline() -> None:
    g = ConnectionGuard(P)
    assert g.opened(1, 0) == []
    assert g.expired(9_999) == []
    assert g.expired(10_000) == [1]
    assert len(g) == 0


def test_trickling_head_does_not_move_its_deadline() -> None:
    g = ConnectionGuard(P)
    g.opened(1, 0)
    g.request_started(1, 5_000)  # bytes arrive: still the same head
    assert g.expired(10_000) == [1]


def test_body_deadline_grows_with_bytes_at_the_minimum_rate() -> None:
    g = ConnectionGuard(P)
    g.opened(1, 0)
    g.headers_done(1, 1_000)
    g.body_received(1, 1)  # a trickle: 1 ms more
    assert g.expired(31_000) == [] and g.expired(31_001) == [1]
    g.opened(2, 0)
    g.headers_done(2, 0)
    g.body_received(2, 60_000)  # 60 s worth at 1000 B/s
    assert g.expired(89_999) == [] and g.expired(90_000) == [2]


def test_busy_connection_never_expires_and_idle_one_does() -> None:
    g = ConnectionGuard(P)
    g.opened(1, 0)
    g.headers_done(1, 0)
    g.message_done(1, 0)
    assert g.phase(1) == "busy"
    assert g.expired(10_000_000) == []
    g.response_done(1, 10_000_000)
    assert g.phase(1) == "idle"
    assert g.expired(10_029_999) == [] and g.expired(10_030_000) == [1]


def test_next_request_on_a_kept_alive_connection_gets_a_new_head_deadline() -> None:
    g = ConnectionGuard(P)
    g.opened(1, 0)
    g.headers_done(1, 0)
    g.message_done(1, 0)
    g.response_done(1, 100)
    g.request_started(1, 20_000)
    assert g.phase(1) == "headers"
    assert g.expired(29_999) == [] and g.expired(30_000) == [1]


def test_cap_evicts_oldest_idle_first_then_oldest_stalled_never_busy_or_new() -> None:
    g = ConnectionGuard(P)
    g.opened(1, 0)  # stalled head
    g.opened(2, 1)
    g.headers_done(2, 1)
    g.message_done(2, 1)
    g.response_done(2, 2)  # idle
    g.opened(3, 3)
    g.headers_done(3, 3)
    g.message_done(3, 3)  # busy
    assert g.opened(4, 4) == [2]  # the idle one, though the stalled one is older
    assert g.opened(5, 5) == [1]  # then the longest-stalled
    assert g.opened(6, 6) == [4]  # 4 is stalled now; 3 is busy, 6 is new
    assert g.stats.evicted == 3


def test_cap_never_refuses_when_everything_else_is_busy() -> None:
    g = ConnectionGuard(GuardParams(connections_max=1))
    g.opened(1, 0)
    g.headers_done(1, 0)
    g.message_done(1, 0)
    assert g.opened(2, 1) == []
    assert len(g) == 2


def test_scanner_finds_the_end_of_the_head_across_chunks() -> None:
    s = HeaderScanner(line_bytes_max=100, bytes_max=1000, headers_max=3)
    head = b"\r\nGET / HTTP/1.1\r\nhost: x\r\na: b\r\n\r\nBODY"
    end = None
    for i in range(len(head)):
        end = s.feed(head[i:i + 1])
        if end is not None:
            assert head[i + 1:] == b"BODY"
            break
    assert end == 1 and not s.active


@pytest.mark.parametrize("head,why", [
    (b"GET / HTTP/1.1\r\nx: " + b"a" * 101 + b"\r\n", "longer"),
    (b"GET / HTTP/1.1\r\n" + b"h: v\r\n" * 4, "at most"),
    (b"GET / HTTP/1.1\r\n" + b"h: " + b"v" * 90 + b"\r\n" * 1, None),
])
def test_scanner_limits(head: bytes, why: str | None) -> None:
    s = HeaderScanner(line_bytes_max=100, bytes_max=1000, headers_max=3)
    if why is None:
        assert s.feed(head) is None
        return
    with pytest.raises(HeadTooLarge, match=why):
        s.feed(head)


def test_scanner_total_bytes() -> None:
    s = HeaderScanner(line_bytes_max=100, bytes_max=300, headers_max=100)
    with pytest.raises(HeadTooLarge, match="larger"):
        for _ in range(10):
            s.feed(b"h: " + b"v" * 50 + b"\r\n")


@given(st.recursive(st.none() | st.integers() | st.text(alphabet="[]{}\"\\ab"),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.text(alphabet="[]{}\"\\", max_size=3), c, max_size=3),
                    max_leaves=30))
def test_json_depth_matches_the_structure(doc: object) -> None:
    def depth(x: object) -> int:
        if isinstance(x, list):
            return 1 + max((depth(y) for y in x), default=0)
        if isinstance(x, dict):
            return 1 + max((depth(y) for y in x.values()), default=0)
        return 0

    assert json_depth(json.dumps(doc)) == depth(doc)


def test_deep_json_is_refused_without_recursing() -> None:
    for d in (513, 990, 100_000):
        with pytest.raises(LambdaError) as e:
            check_json_depth(b"[" * d + b"]" * d, 512)
        assert (e.value.status, e.value.type) == (400, "InvalidRequestContentException")
    check_json_depth(b"[" * 512 + b"]" * 512, 512)
    check_json_depth(json.dumps({"s": "[" * 10_000}), 512)  # brackets in a string


def test_tenant_view_keeps_only_its_own() -> None:
    cell = {"cell_id": "cell-1", "pid": 42, "counters": {"invokes": 9},
            "agents": {"a0": {"agent_id": "a0", "pid": 7, "envs": [
                {"env_id": "e1", "function": "mine", "function_key": "111/mine/$LATEST/1",
                 "pid": 100, "uid": 5},
                {"env_id": "e2", "function": "theirs", "function_key": "222/theirs/$LATEST/1",
                 "pid": 101, "uid": 6}]},
                       "a1": {"agent_id": "a1", "error": "connection refused 10.0.0.1"}},
            "async": {"backlog": [{"account": "111", "function": "mine"},
                                  {"account": "222", "function": "theirs"}]},
            "shards": {"functions": {"111/mine/$LATEST/1": ["a0"],
                                     "222/theirs/$LATEST/1": ["a1"]}},
            "poison": {"throttled": ["222/theirs"]}}
    view = cell_status_for_tenant(cell, "111")
    text = json.dumps(view)
    assert "222" not in text and "theirs" not in text and "10.0.0.1" not in text
    assert [e["env_id"] for e in view["agents"]["a0"]["envs"]] == ["e1"]
    assert "pid" not in view and "counters" not in view
