"""The data model inside one store cell: typed values, commands, and the state machine.

Pure and deterministic: every replica that applies the same commands in the same order reaches
the same state and returns the same results. No floats, no clocks, no randomness.

Values are ``bytes``, ``int`` (signed 64-bit) or ``bool``. ``True`` and ``1`` are different
values here (Python says they are equal; we compare types too). A command is a dict whose keys
must be exactly the ones its ``op`` defines: a command with an unknown op, an unknown field, a
missing field or a value of the wrong type is rejected whole (``CommandRejected``), never
partly applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Value = bytes | int | bool
Members = tuple[str, ...]

KEY_BYTES_MAX = 256
VALUE_BYTES_MAX = 4096
TXN_KEYS_MAX = 16
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

_FIELDS: dict[str, frozenset[str]] = {
    "get": frozenset({"op", "key"}),
    "put": frozenset({"op", "key", "value"}),
    "delete": frozenset({"op", "key"}),
    "cas": frozenset({"op", "key", "expected", "value"}),
    "txn": frozenset({"op", "reads", "checks", "writes"}),
    "noop": frozenset({"op"}),
    "reconfig": frozenset({"op", "expect", "remove", "add"}),
    # Opens a client session: the result is the new session's client id (the slot it was
    # applied at, so unique in the cell; a duplicate only opens a session nobody uses).
    "session": frozenset({"op"}),
}
CHECK_OPS = frozenset({"eq", "ne", "absent", "present"})


class CommandRejected(ValueError):
    """A command this node does not fully understand, or one over a limit."""


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise CommandRejected(f"key must be str, got {type(key).__name__}")
    if not key or len(key.encode()) > KEY_BYTES_MAX:
        raise CommandRejected(f"key must be 1..{KEY_BYTES_MAX} bytes")


def _check_value(value: Any, *, nullable: bool) -> None:
    if value is None:
        if nullable:
            return
        raise CommandRejected("value must not be None")
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CommandRejected("int value outside signed 64-bit range")
        return
    if isinstance(value, bytes):
        if len(value) > VALUE_BYTES_MAX:
            raise CommandRejected(f"value over value_bytes_max={VALUE_BYTES_MAX}")
        return
    raise CommandRejected(f"unsupported value type {type(value).__name__}")


def validate_command(cmd: Any) -> dict[str, Any]:
    """Return ``cmd`` if it is a well-formed command; raise ``CommandRejected`` otherwise."""
    if not isinstance(cmd, dict):
        raise CommandRejected("command must be a map")
    op = cmd.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise CommandRejected(f"unknown op {op!r}")
    if set(cmd) != _FIELDS[op]:
        raise CommandRejected(f"fields for {op} must be exactly {sorted(_FIELDS[op])}")
    if op in ("get", "put", "delete", "cas"):
        _check_key(cmd["key"])
    if op == "put":
        _check_value(cmd["value"], nullable=False)
    elif op == "cas":
        _check_value(cmd["expected"], nullable=True)
        _check_value(cmd["value"], nullable=True)
    elif op == "txn":
        reads, checks, writes = cmd["reads"], cmd["checks"], cmd["writes"]
        if not all(isinstance(x, list | tuple) for x in (reads, checks, writes)):
            raise CommandRejected("txn reads/checks/writes must be lists")
        if len(reads) + len(checks) + len(writes) > TXN_KEYS_MAX:
            raise CommandRejected(f"txn over txn_keys_max={TXN_KEYS_MAX}")
        for key in reads:
            _check_key(key)
        for check in checks:
            if not isinstance(check, list | tuple) or len(check) != 3:
                raise CommandRejected("txn check must be [key, op, value]")
            _check_key(check[0])
            if check[1] not in CHECK_OPS:
                raise CommandRejected(f"unknown check op {check[1]!r}")
            _check_value(check[2], nullable=check[1] in ("absent", "present"))
        for write in writes:
            if not isinstance(write, list | tuple) or len(write) != 2:
                raise CommandRejected("txn write must be [key, value-or-None]")
            _check_key(write[0])
            _check_value(write[1], nullable=True)
    elif op == "reconfig":
        expect, remove, add = cmd["expect"], cmd["remove"], cmd["add"]
        if not isinstance(expect, list | tuple) or not all(isinstance(m, str) for m in expect):
            raise CommandRejected("reconfig expect must be a list of node ids")
        if not isinstance(remove, str) or not isinstance(add, str) or remove == add:
            raise CommandRejected("reconfig remove/add must be two different node ids")
    return cmd


def is_read_only(cmd: dict[str, Any]) -> bool:
    return cmd["op"] == "get" or (cmd["op"] == "txn" and not cmd["writes"])


def same_value(a: Value | None, b: Value | None) -> bool:
    """Typed equality: ``True`` is not ``1``."""
    return type(a) is type(b) and a == b


def reconfigured(members: Members, cmd: dict[str, Any]) -> Members | None:
    """The membership after ``cmd``, or None when ``cmd`` does not apply to ``members``."""
    if tuple(cmd["expect"]) != members or cmd["remove"] not in members or cmd["add"] in members:
        return None
    return tuple(sorted([m for m in members if m != cmd["remove"]] + [cmd["add"]]))


def config_at(configs: list[tuple[int, Members]], slot: int) -> Members:
    """Membership in effect for ``slot`` given ``(effective_slot, members)`` in slot order."""
    current = configs[0][1]
    for effective, members in configs:
        if effective > slot:
            break
        current = members
    return current


class _SessionExpired:
    """The result of a command whose client session this cell no longer remembers."""

    def __repr__(self) -> str:
        return "SESSION_EXPIRED"


# A command under a client id the cell has no session for: the session was evicted
# (``sessions_max``) or never opened (ids come from a ``session`` command), so the cell cannot
# tell whether this is a late retry of a command it already applied. It applies nothing and
# answers this; the client opens a new session, and treats the command's outcome as unknown
# unless it knows no earlier attempt of it was sent.
SESSION_EXPIRED = _SessionExpired()


@dataclass(slots=True)
class CellState:
    """The replicated state of one cell: data, client sessions, membership history."""

    alpha_slots: int
    configs: list[tuple[int, Members]]
    applied_index: int = 0
    data: dict[str, Value] = field(default_factory=dict)
    # client_id -> (seq, result) of the client's last applied command, in apply order.
    sessions: dict[int, tuple[int, Any]] = field(default_factory=dict)
    sessions_max: int = 1024
    # Whether the last ``apply`` executed its command (False: answered from a session or
    # refused as expired). The simulator's at-most-once check reads it.
    last_executed: bool = False
    # Planted bug (tests only): the old rule, a command from an unknown session is applied
    # and opens a session, so a late retry after eviction applies twice.
    bug_apply_evicted_sessions: bool = False

    def read(self, cmd: dict[str, Any]) -> Any:
        """Evaluate a read-only command against the current state."""
        if cmd["op"] == "get":
            return self.data.get(cmd["key"])
        assert cmd["op"] == "txn" and not cmd["writes"]
        return self._txn(cmd)

    def _txn(self, cmd: dict[str, Any]) -> list[Any]:
        values = [self.data.get(k) for k in cmd["reads"]]
        ok = True
        for key, check, want in cmd["checks"]:
            have = self.data.get(key)
            if check == "eq":
                ok = ok and same_value(have, want)
            elif check == "ne":
                ok = ok and not same_value(have, want)
            elif check == "absent":
                ok = ok and have is None
            else:
                ok = ok and have is not None
        if ok:
            for key, value in cmd["writes"]:
                if value is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value
        return [ok, values]

    def apply(self, slot: int, cmd: dict[str, Any], client_id: int, seq: int) -> Any:
        """Apply the command chosen for ``slot``; returns its result (cached for retries)."""
        assert slot == self.applied_index + 1, (slot, self.applied_index)
        self.applied_index = slot
        self.last_executed = False
        if cmd["op"] == "session":
            self._remember(slot, 0, None)
            return slot
        if client_id:
            last = self.sessions.get(client_id)
            if last is not None and seq <= last[0]:
                # A retry of something already applied: never apply twice.
                return last[1] if seq == last[0] else None
            if last is None and not self.bug_apply_evicted_sessions:
                # Evicted (or never opened): this may be a late retry of an applied command.
                return SESSION_EXPIRED
        self.last_executed = True
        result = self._execute(slot, cmd)
        if client_id:
            self._remember(client_id, seq, result)
        return result

    def _remember(self, client_id: int, seq: int, result: Any) -> None:
        self.sessions.pop(client_id, None)
        self.sessions[client_id] = (seq, result)
        while len(self.sessions) > self.sessions_max:
            del self.sessions[next(iter(self.sessions))]

    def _execute(self, slot: int, cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op == "get":
            return self.data.get(cmd["key"])
        if op == "put":
            self.data[cmd["key"]] = cmd["value"]
            return True
        if op == "delete":
            return self.data.pop(cmd["key"], None) is not None
        if op == "cas":
            if not same_value(self.data.get(cmd["key"]), cmd["expected"]):
                return False
            if cmd["value"] is None:
                self.data.pop(cmd["key"], None)
            else:
                self.data[cmd["key"]] = cmd["value"]
            return True
        if op == "txn":
            return self._txn(cmd)
        if op == "noop":
            return None
        assert op == "reconfig", op
        last_effective, members = self.configs[-1]
        if last_effective > slot:
            return False  # one change at a time: the previous one has not taken effect yet
        new = reconfigured(members, cmd)
        if new is None:
            return False
        self.configs.append((slot + self.alpha_slots, new))
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.applied_index,
            "data": dict(self.data),
            "sessions": [[c, s, r] for c, (s, r) in self.sessions.items()],
            "configs": [[e, list(m)] for e, m in self.configs],
        }

    @classmethod
    def from_snapshot(
        cls, snap: dict[str, Any], alpha_slots: int, sessions_max: int = 1024
    ) -> CellState:
        return cls(
            alpha_slots=alpha_slots,
            configs=[(int(e), tuple(m)) for e, m in snap["configs"]],
            applied_index=int(snap["index"]),
            data=dict(snap["data"]),
            sessions={int(c): (int(s), r) for c, s, r in snap["sessions"]},
            sessions_max=sessions_max,
        )
