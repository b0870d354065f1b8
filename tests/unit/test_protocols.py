"""core/protocols.py: the negotiation (pure), the caps, the adapters' round trips."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import messages as m
from cellcloud.core import protocols as p

windows = st.tuples(st.integers(1, 6), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1]))


@given(ours=windows, theirs=windows, extra=st.dictionaries(
    st.text(min_size=1, max_size=6).map(lambda s: "x" + s), st.integers(), max_size=3))
def test_the_highest_common_version_or_a_refusal_naming_both_windows(
        ours: tuple[int, int], theirs: tuple[int, int], extra: dict[str, Any]) -> None:
    doc = {**extra, **p.hello("agent", theirs)}  # a newer client's extra fields: ignored
    common = set(range(ours[0], ours[1] + 1)) & set(range(theirs[0], theirs[1] + 1))
    if common:
        assert p.negotiate("agent", ours, doc) == max(common)
        assert p.accepted("agent", theirs, {"version": max(common), **extra}) == max(common)
    else:
        with pytest.raises(p.ProtocolError) as e:
            p.negotiate("agent", ours, doc)
        assert f"{ours[0]}..{ours[1]}" in str(e.value)
        assert f"{theirs[0]}..{theirs[1]}" in str(e.value)


@pytest.mark.parametrize("doc", [None, [], {}, {"protocol": "agent"},
                                 {"protocol": "agent", "versions": [2, 1]},
                                 {"protocol": "agent", "versions": [0, 1]},
                                 {"protocol": "agent", "versions": [1, True]},
                                 {"protocol": "agent", "versions": "1..2"},
                                 {"protocol": "frontend", "versions": [1, 2]}])
def test_a_malformed_hello_is_refused(doc: Any) -> None:
    with pytest.raises(p.ProtocolError):
        p.negotiate("agent", (1, 2), doc)


def test_an_answer_outside_what_was_offered_is_refused() -> None:
    for answer in ({"version": 3}, {"version": "2"}, {}, None):
        with pytest.raises(p.ProtocolError):
            p.accepted("agent", (1, 2), answer)


def test_caps() -> None:
    assert p.parse_caps("") == {}
    assert p.parse_caps("1") == dict.fromkeys(p.PROTOCOLS, 1)
    assert p.parse_caps("agent=1, frontend=2") == {"agent": 1, "frontend": 2}
    for bad in ("agent=0", "agent=x", "nope=1", "0"):
        with pytest.raises(p.ProtocolError):
            p.parse_caps(bad)
    assert p.window("agent", 1) == (1, 1) and p.window("agent", 9) == p.PROTOCOLS["agent"]


def test_every_protocol_serves_its_previous_version_with_adapters_only_where_it_changed() -> None:
    for name, (lo, hi) in p.PROTOCOLS.items():
        assert hi - lo <= 1, name  # a window of N-1..N
        assert p.adapters(name, hi) is None
        if lo < hi:
            assert p.adapters(name, lo), name  # a new version is a change: something adapts
    with pytest.raises(p.ProtocolError):
        p.adapters("agent", 0)


REQ = m.HttpRequest(method="POST", path="/p", account="111122223333", query="a=b",
                    headers={"h": "v"}, body=b"b", caller="444455556666")


@pytest.mark.parametrize("req", [REQ, m.HttpRequest(method="GET", path="/", account="1")])
def test_http_adapters_round_trip(req: m.HttpRequest) -> None:
    v1 = p.request_to_version("frontend", "http", 1, req.to_wire())
    assert v1 == req.as_api()  # version 1's names are the map the frontend's routes read
    up = p.ADAPTERS[("frontend", 1)]["http"].request_up
    assert up is not None and m.HttpRequest.from_wire(up(v1)) == req


def test_agent_replies_get_status_back_for_version_1() -> None:
    for fe, status in ((None, "ok"), ("Unhandled", "function_error")):
        wire = m.InvokeReply(payload=b"", function_error=fe).to_wire()
        assert "status" not in wire
        assert p.reply_to_version("agent", "invoke", 1, wire) == {"status": status, **wire}
        assert p.reply_to_version("agent", "invoke", 2, wire) == wire
