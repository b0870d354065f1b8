"""Linearizability checker for store histories (WGL search, as in Porcupine and Knossos).

A history is a list of ``Operation``: a client's command with the time it was called and the
time its result came back (``None`` when the client never learned the outcome: the command may
or may not have taken effect, at any time after its call).

The check is partitioned: every cell is independent, and inside a cell the keys are split into
groups that no operation spans (union-find over each operation's keys; a transaction joins its
keys into one group). Each group is searched separately with the Wing–Gong–Lowe algorithm and
Lowe's memoisation of (linearized set, model state), which keeps the search small.

The model here is written independently of ``cellcloud.core.store_model`` on purpose: the
checker must not share a bug with the thing it checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

State = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Operation:
    client: str
    cell: str
    cmd: dict[str, Any]
    call_ms: float
    return_ms: float | None  # None: outcome unknown
    result: Any = None
    op_id: int = 0


@dataclass
class CheckResult:
    ok: bool
    partitions: int = 0
    operations: int = 0
    failed_partition: list[Operation] = field(default_factory=list)
    reason: str = ""


def _teq(a: Any, b: Any) -> bool:
    """Typed equality, recursive over lists/tuples (``True`` is not ``1``)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_teq(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def keys_of(cmd: dict[str, Any]) -> list[str]:
    op = cmd["op"]
    if op in ("get", "put", "delete", "cas"):
        return [cmd["key"]]
    if op == "txn":
        return list(cmd["reads"]) + [c[0] for c in cmd["checks"]] + [w[0] for w in cmd["writes"]]
    return []


def step(state: dict[str, Any], cmd: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """(expected result, new state or None when unchanged)."""
    op = cmd["op"]
    if op == "get":
        return state.get(cmd["key"]), None
    if op == "put":
        new = dict(state)
        new[cmd["key"]] = cmd["value"]
        return True, new
    if op == "delete":
        if cmd["key"] not in state:
            return False, None
        new = dict(state)
        del new[cmd["key"]]
        return True, new
    if op == "cas":
        cur = state.get(cmd["key"])
        if not (type(cur) is type(cmd["expected"]) and cur == cmd["expected"]):
            return False, None
        new = dict(state)
        if cmd["value"] is None:
            new.pop(cmd["key"], None)
        else:
            new[cmd["key"]] = cmd["value"]
        return True, new
    if op == "txn":
        reads = [state.get(k) for k in cmd["reads"]]
        ok = True
        for key, check, want in cmd["checks"]:
            have = state.get(key)
            if check == "eq":
                ok = ok and _teq(have, want)
            elif check == "ne":
                ok = ok and not _teq(have, want)
            elif check == "absent":
                ok = ok and have is None
            elif check == "present":
                ok = ok and have is not None
        if not ok or not cmd["writes"]:
            return [ok, reads], None
        new = dict(state)
        for key, value in cmd["writes"]:
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        return [ok, reads], new
    raise ValueError(f"checker does not model op {op!r}")


def _freeze(state: dict[str, Any]) -> State:
    # Tag each value with its type: in Python ``True == 1`` and they hash alike, and a cache
    # that confused them would wrongly prune the search.
    return tuple(sorted((k, (type(v).__name__, v)) for k, v in state.items()))


class _Node:
    __slots__ = ("op", "is_call", "match", "prev", "next")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op = op
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def check_partition(ops: list[Operation], states_max: int = 2_000_000) -> bool:
    """WGL search over one independent group of operations. True if linearizable."""
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        ret = math.inf if op.return_ms is None else op.return_ms
        assert ret >= op.call_ms, op
        events.append((op.call_ms, 0, i))
        events.append((ret, 1, i))
    events.sort()  # calls sort before returns at the same time (conservative: overlap)
    head = _Node(-1, False)
    prev = head
    calls: dict[int, _Node] = {}
    for _, kind, i in events:
        node = _Node(i, kind == 0)
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        prev.next = node
        node.prev = prev
        prev = node

    def lift(n: _Node) -> None:
        assert n.prev is not None and n.match is not None and n.match.prev is not None
        n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev
        m = n.match
        m.prev.next = m.next  # type: ignore[union-attr]
        if m.next is not None:
            m.next.prev = m.prev

    def unlift(n: _Node) -> None:
        m = n.match
        assert m is not None and m.prev is not None and n.prev is not None
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
        n.prev.next = n
        if n.next is not None:
            n.next.prev = n

    state: dict[str, Any] = {}
    frozen = _freeze(state)
    linearized = 0
    cache: set[tuple[int, State]] = set()
    stack: list[tuple[_Node, dict[str, Any], State]] = []
    entry = head.next
    while head.next is not None:
        assert entry is not None
        if entry.is_call:
            op = ops[entry.op]
            expected, new_state = step(state, op.cmd)
            if op.return_ms is None or _teq(expected, op.result):
                nxt = state if new_state is None else new_state
                nxt_frozen = frozen if new_state is None else _freeze(new_state)
                bits = linearized | (1 << entry.op)
                if (bits, nxt_frozen) not in cache:
                    cache.add((bits, nxt_frozen))
                    if len(cache) > states_max:
                        raise RuntimeError("linearizability search exceeded states_max")
                    stack.append((entry, state, frozen))
                    state, frozen, linearized = nxt, nxt_frozen, bits
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False
            node, state, frozen = stack.pop()
            linearized &= ~(1 << node.op)
            unlift(node)
            entry = node.next
    return True


def partition(history: list[Operation]) -> list[list[Operation]]:
    """Split a history into independent groups: per cell, then per connected key set."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for op in history:
        ks = [(op.cell, k) for k in keys_of(op.cmd)]
        for k in ks[1:]:
            ra, rb = find(ks[0]), find(k)
            if ra != rb:
                parent[ra] = rb
        if ks:
            find(ks[0])
    groups: dict[tuple[str, str], list[Operation]] = {}
    for op in history:
        first = keys_of(op.cmd)[:1]
        if first:
            groups.setdefault(find((op.cell, first[0])), []).append(op)
    return list(groups.values())


def _is_read(cmd: dict[str, Any]) -> bool:
    return cmd["op"] == "get" or (cmd["op"] == "txn" and not cmd["writes"])


def check_history(history: list[Operation]) -> CheckResult:
    """Check a whole history; pending reads are dropped (they change nothing)."""
    history = [op for op in history if not (op.return_ms is None and _is_read(op.cmd))]
    groups = partition(history)
    for group in groups:
        if not check_partition(group):
            return CheckResult(False, len(groups), len(history), group, "not linearizable")
    return CheckResult(True, len(groups), len(history))
