"""The linearizability checker must accept what is linearizable and reject what is not."""

from cellcloud.store.checker import Operation, check_history, partition


def op(client, cmd, call, ret, result, cell="c"):
    return Operation(client, cell, cmd, call, ret, result)


PUT1 = {"op": "put", "key": "x", "value": 1}
GET = {"op": "get", "key": "x"}


def test_sequential_history_ok():
    h = [op("a", PUT1, 0, 1, True), op("b", GET, 2, 3, 1)]
    assert check_history(h).ok


def test_stale_read_after_completed_write_is_caught():
    h = [op("a", PUT1, 0, 1, True), op("b", GET, 2, 3, None)]
    assert not check_history(h).ok


def test_concurrent_read_may_see_either():
    for seen in (None, 1):
        assert check_history([op("a", PUT1, 0, 10, True), op("b", GET, 2, 3, seen)]).ok


def test_true_is_not_one():
    h = [op("a", {"op": "put", "key": "x", "value": True}, 0, 1, True), op("b", GET, 2, 3, 1)]
    assert not check_history(h).ok
    # The memo of (linearized ops, state) must not confuse True and 1 either.
    h = [
        op("a", {"op": "put", "key": "x", "value": True}, 0, 10, True),
        op("b", {"op": "put", "key": "x", "value": 1}, 0, 10, True),
        op("c", GET, 11, 12, 1),
        op("d", GET, 13, 14, 1),
    ]
    assert check_history(h).ok


def test_unknown_outcome_may_or_may_not_apply():
    pending = op("a", PUT1, 0, None, None)
    assert check_history([pending, op("b", GET, 5, 6, 1)]).ok
    assert check_history([pending, op("b", GET, 5, 6, None)]).ok
    # ... but not both ways in sequence: once seen, it stays.
    h = [pending, op("b", GET, 5, 6, 1), op("b", GET, 7, 8, None)]
    assert not check_history(h).ok


def test_lost_cas_is_caught():
    cas = {"op": "cas", "key": "x", "expected": None, "value": 1}
    h = [op("a", cas, 0, 1, True), op("b", cas, 2, 3, True)]
    assert not check_history(h).ok


def test_txn_joins_keys_into_one_partition():
    txn = {"op": "txn", "reads": ["x"], "checks": [], "writes": [["y", 1]]}
    h = [
        op("a", PUT1, 0, 1, True),
        op("b", txn, 2, 3, [True, [1]]),
        op("c", {"op": "get", "key": "z"}, 0, 1, None),
    ]
    groups = partition(h)
    assert sorted(len(g) for g in groups) == [1, 2]
    bad = [op("a", PUT1, 0, 1, True), op("b", txn, 2, 3, [True, [None]])]
    assert not check_history(bad).ok


def test_cells_are_independent():
    h = [op("a", PUT1, 0, 1, True, cell="c1"), op("b", GET, 2, 3, None, cell="c2")]
    assert check_history(h).ok
