"""The cell data model: typed values, strict command validation, deterministic apply."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.store_model import (
    SESSION_EXPIRED,
    VALUE_BYTES_MAX,
    CellState,
    CommandRejected,
    is_read_only,
    validate_command,
)


def fresh() -> CellState:
    return CellState(alpha_slots=4, configs=[(1, ("a", "b", "c"))])


def run(sm: CellState, cmd: dict, client: int = 0, seq: int = 0):
    return sm.apply(sm.applied_index + 1, validate_command(cmd), client, seq)


@pytest.mark.parametrize(
    "cmd",
    [
        {"op": "put", "key": "k", "value": 1.5},  # no floats
        {"op": "put", "key": "k", "value": "str"},  # no str values
        {"op": "put", "key": "k"},  # missing field
        {"op": "put", "key": "k", "value": 1, "ttl": 3},  # a field we do not understand
        {"op": "frobnicate", "key": "k"},
        {"op": "get", "key": b"k"},
        {"op": "get", "key": ""},
        {"op": "put", "key": "k", "value": b"x" * (VALUE_BYTES_MAX + 1)},
        {"op": "put", "key": "k", "value": 2**63},
        {"op": "txn", "reads": [], "checks": [["k", "gt", 1]], "writes": []},
        {"op": "txn", "reads": ["k"] * 17, "checks": [], "writes": []},
        {"op": "reconfig", "expect": ["a"], "remove": "a", "add": "a"},
        ["put", "k", 1],
    ],
)
def test_rejects_what_it_does_not_fully_understand(cmd):
    with pytest.raises(CommandRejected):
        validate_command(cmd)


def test_put_get_delete_cas_are_typed():
    sm = fresh()
    assert run(sm, {"op": "get", "key": "k"}) is None
    assert run(sm, {"op": "put", "key": "k", "value": 1}) is True
    # True == 1 in Python, but not here.
    assert run(sm, {"op": "cas", "key": "k", "expected": True, "value": 2}) is False
    assert run(sm, {"op": "cas", "key": "k", "expected": 1, "value": b"x"}) is True
    assert run(sm, {"op": "get", "key": "k"}) == b"x"
    assert run(sm, {"op": "cas", "key": "k", "expected": b"x", "value": None}) is True
    assert run(sm, {"op": "delete", "key": "k"}) is False
    assert run(sm, {"op": "cas", "key": "k", "expected": None, "value": False}) is True
    assert run(sm, {"op": "get", "key": "k"}) is False


def test_txn_reads_checks_then_writes_atomically():
    sm = fresh()
    run(sm, {"op": "put", "key": "a", "value": 1})
    txn = {
        "op": "txn",
        "reads": ["a", "b"],
        "checks": [["a", "eq", 1], ["b", "absent", None]],
        "writes": [["a", 2], ["b", b"y"]],
    }
    assert run(sm, txn) == [True, [1, None]]
    assert run(sm, txn) == [False, [2, b"y"]]  # checks fail: nothing written
    assert sm.data == {"a": 2, "b": b"y"}
    assert is_read_only({"op": "txn", "reads": ["a"], "checks": [], "writes": []})
    assert not is_read_only(txn)


def open_session(sm: CellState) -> int:
    client_id = run(sm, {"op": "session"})
    assert isinstance(client_id, int) and client_id in sm.sessions
    return client_id


def test_sessions_apply_each_command_at_most_once():
    sm = fresh()
    c = open_session(sm)
    assert run(sm, {"op": "cas", "key": "k", "expected": None, "value": 1}, c, 1) is True
    # The retry is a no-op that returns the first answer.
    assert run(sm, {"op": "cas", "key": "k", "expected": None, "value": 1}, c, 1) is True
    assert run(sm, {"op": "put", "key": "k", "value": 5}, c, 0) is None  # older seq: ignored
    assert sm.data == {"k": 1}


def test_a_late_retry_after_its_session_was_evicted_is_refused_not_applied_again():
    # Regression: sessions past sessions_max were evicted and a late retry from the evicted
    # client opened a new session and applied a second time.
    sm = CellState(alpha_slots=4, configs=[(1, ("a", "b", "c"))], sessions_max=2)
    c = open_session(sm)
    assert run(sm, {"op": "put", "key": "n", "value": 1}, c, 1) is True
    inc = {"op": "cas", "key": "n", "expected": 1, "value": 2}
    assert run(sm, inc, c, 2) is True
    run(sm, {"op": "put", "key": "n", "value": 1}, 0, 0)  # someone resets n
    for _ in range(2):  # two newer clients evict c's session
        other = open_session(sm)
        run(sm, {"op": "get", "key": "n"}, other, 1)
    assert c not in sm.sessions
    assert run(sm, inc, c, 2) is SESSION_EXPIRED  # the late retry of seq 2
    assert run(sm, inc, c, 1) is SESSION_EXPIRED  # and of seq 1 (a new seq too)
    assert sm.data == {"n": 1}
    # A duplicate "session" command only opens a session that nobody uses.
    assert open_session(sm) != c


def test_session_ids_are_unique_slots():
    sm = fresh()
    ids = [open_session(sm) for _ in range(5)]
    assert len(set(ids)) == 5


def test_reconfig_one_at_a_time_takes_effect_alpha_slots_later():
    sm = fresh()
    cmd = {"op": "reconfig", "expect": ["a", "b", "c"], "remove": "c", "add": "d"}
    assert run(sm, cmd) is True
    assert sm.configs[-1] == (1 + 4, ("a", "b", "d"))
    # A second change before the first takes effect is refused.
    cmd2 = {"op": "reconfig", "expect": ["a", "b", "d"], "remove": "b", "add": "e"}
    assert run(sm, cmd2) is False
    while sm.applied_index < 5:
        run(sm, {"op": "noop"})
    assert run(sm, cmd2) is True


values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.binary(max_size=8))
commands = st.one_of(
    st.builds(lambda k: {"op": "get", "key": k}, st.sampled_from("xyz")),
    st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, st.sampled_from("xyz"), values),
    st.builds(lambda k: {"op": "delete", "key": k}, st.sampled_from("xyz")),
    st.builds(
        lambda k, e, v: {"op": "cas", "key": k, "expected": e, "value": v},
        st.sampled_from("xyz"),
        st.one_of(st.none(), values),
        st.one_of(st.none(), values),
    ),
)


@given(st.lists(commands, max_size=40))
def test_snapshot_roundtrip_is_exact(cmds):
    a = fresh()
    clients = [open_session(a) for _ in range(3)]
    for i, cmd in enumerate(cmds):
        run(a, cmd, client=clients[i % 3], seq=1 + i)
    b = CellState.from_snapshot(a.snapshot(), alpha_slots=4)
    assert b.snapshot() == a.snapshot()
    for cmd in cmds:
        assert run(a, cmd) == run(b, cmd)
