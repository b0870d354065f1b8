"""Multi-Paxos for one store cell, sans-IO.

``Replica`` is the whole protocol for one replica of one cell: acceptor, learner, and (when it
wins a ballot) the cell's distinguished proposer. It does no I/O: ``on_message(msg, now_ms)``
and ``on_tick(now_ms)`` return a list of actions for the shell to carry out, in this order:

1. every ``Persist*`` action, made durable (fsync) as one batch, and only then
2. every ``Send`` and ``Reply``.

A shell that sends before its persists are durable breaks Paxos (the simulator plants exactly
that bug to prove the checker catches it).

Protocol summary (see docs/store.md for the invariants):

* Ballots are ``(round, node_id)``, ordered lexicographically. A replica promises a ballot in
  phase 1 (``Prepare``/``Promise``) and accepts entries of any ballot ``>=`` its promise in
  phase 2 (``Accept``/``Accepted``).
* A new leader recovers every slot above its commit index from a majority of promises (chosen
  values first, else the value of the highest ballot, else a no-op), then proposes a no-op of
  its own ballot; it is *ready* once that no-op commits.
* Reads are linearizable without a log write (ReadIndex): a ready leader records its commit
  index, confirms with a majority heartbeat round started after the read arrived that no higher
  ballot exists, and answers once it has applied up to that index.
* Followers learn commits from the leader and fetch what they lack with ``CatchUpRequest``
  (answered with a snapshot of the state machine plus the committed tail).
* Membership is part of the replicated state: a ``reconfig`` applied at slot ``i`` takes effect
  at slot ``i + alpha_slots``; a leader never has more than ``alpha_slots`` slots in flight, so
  the membership of every slot it proposes is fixed by slots it already knows.
* Client commands carry ``(client_id, seq)`` under a session the cell opened (a ``session``
  command returns the id); the state machine applies each at most once and answers a retry
  with the cached result, so clients may retry anywhere. A command under a session the cell
  no longer has is answered ``session_expired`` and not applied.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cellcloud.core.store_model import (
    SESSION_EXPIRED,
    CellState,
    CommandRejected,
    Members,
    config_at,
    is_read_only,
    reconfigured,
    validate_command,
)

Ballot = tuple[int, str]
ZERO_BALLOT: Ballot = (0, "")
NOOP: dict[str, Any] = {"op": "noop"}


@dataclass(frozen=True, slots=True)
class Entry:
    slot: int
    ballot: Ballot
    cmd: dict[str, Any]
    client_id: int = 0
    seq: int = 0


# ---- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    cell: str
    src: str
    ballot: Ballot
    from_slot: int


@dataclass(frozen=True, slots=True)
class Promise:
    cell: str
    src: str
    ballot: Ballot
    ok: bool
    promised: Ballot
    commit_index: int
    snapshot: dict[str, Any] | None
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Accept:
    cell: str
    src: str
    ballot: Ballot
    entries: tuple[Entry, ...]
    commit_index: int


@dataclass(frozen=True, slots=True)
class Accepted:
    cell: str
    src: str
    ballot: Ballot
    ok: bool
    promised: Ballot
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    cell: str
    src: str
    ballot: Ballot
    commit_index: int
    read_round: int


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    cell: str
    src: str
    ballot: Ballot
    ok: bool
    promised: Ballot
    read_round: int


@dataclass(frozen=True, slots=True)
class CatchUpRequest:
    cell: str
    src: str
    from_slot: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    cell: str
    src: str
    snapshot: dict[str, Any] | None
    entries: tuple[Entry, ...]
    commit_index: int


@dataclass(frozen=True, slots=True)
class Request:
    """A client command. ``src`` is the address replies go to."""

    cell: str
    src: str
    request_id: int
    client_id: int
    seq: int
    command: Any


# Response statuses.
OK = "ok"
NOT_LEADER = "not_leader"
BUSY = "busy"
REJECTED = "rejected"
NOT_HERE = "not_here"
# The client's session was evicted: nothing applied; the command's outcome is unknown if an
# earlier attempt of it was sent (see store_model.SESSION_EXPIRED).
EXPIRED = "session_expired"


@dataclass(frozen=True, slots=True)
class Response:
    cell: str
    src: str
    request_id: int
    status: str
    result: Any = None
    leader_hint: str | None = None


Message = (
    Prepare | Promise | Accept | Accepted | Heartbeat | HeartbeatAck | CatchUpRequest | CatchUp
)

# ---- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Reply:
    to: str
    msg: Response


@dataclass(frozen=True, slots=True)
class PersistPromise:
    cell: str
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class PersistEntries:
    cell: str
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class PersistCommit:
    cell: str
    commit_index: int


@dataclass(frozen=True, slots=True)
class PersistSnapshot:
    """Store ``snapshot`` and drop every log entry at or below its index."""

    cell: str
    snapshot: dict[str, Any]


Action = Send | Reply | PersistPromise | PersistEntries | PersistCommit | PersistSnapshot
PERSIST_ACTIONS = (PersistPromise, PersistEntries, PersistCommit, PersistSnapshot)


@dataclass
class DurableState:
    """What a replica left on disk: enough to rebuild it after a crash."""

    promised: Ballot = ZERO_BALLOT
    commit_index: int = 0
    snapshot: dict[str, Any] | None = None
    entries: dict[int, Entry] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaParams:
    heartbeat_interval_ms: int = 50
    election_timeout_ms_min: int = 200
    election_timeout_ms_max: int = 400
    alpha_slots: int = 32  # a reconfig applied at slot i takes effect at slot i + alpha_slots
    pipeline_depth_max: int = 256  # in-flight + queued commands per cell before "busy"
    reads_pending_max: int = 1024
    log_entries_max: int = 64  # applied entries kept before compacting into a snapshot
    catchup_retry_ms: int = 100
    accept_retry_ms: int = 200  # resend an unacknowledged Accept after this long
    sessions_max: int = 1024
    # Planted bugs: only tests set these, to prove the simulator and checker catch them.
    bug_accept_lower_ballot: bool = False
    bug_stale_reads: bool = False
    bug_apply_evicted_sessions: bool = False
    # count any replica's Accepted toward a slot's majority, members of that slot or not
    bug_count_any_acks: bool = False

    def __post_init__(self) -> None:
        assert 0 < self.heartbeat_interval_ms < self.election_timeout_ms_min
        assert self.election_timeout_ms_min <= self.election_timeout_ms_max
        assert self.alpha_slots >= 1 and self.pipeline_depth_max >= 1


FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"


def majority(members: Members) -> int:
    return len(members) // 2 + 1


def has_quorum(voters: set[str], members: Members) -> bool:
    return sum(1 for m in members if m in voters) >= majority(members)


@dataclass
class _PendingRead:
    round: int
    read_index: int
    to: str
    request_id: int
    cmd: dict[str, Any]


def _same_entry(a: Entry, b: Entry) -> bool:
    return a.cmd == b.cmd and a.client_id == b.client_id and a.seq == b.seq


class Replica:
    """One replica of one cell. Feed it messages and ticks; carry out the actions it returns."""

    def __init__(
        self,
        cell: str,
        node_id: str,
        members: Members | None,
        params: ReplicaParams,
        rng: random.Random,
        now_ms: int,
        durable: DurableState | None = None,
    ) -> None:
        """``members`` is the cell's initial membership; None for a replica that joins an
        existing cell (it learns the state and membership from a snapshot)."""
        self.cell = cell
        self.node_id = node_id
        self.params = params
        self.rng = rng
        durable = durable or DurableState()
        self.promised: Ballot = durable.promised
        self.log: dict[int, Entry] = dict(durable.entries)
        if durable.snapshot is not None:
            self.sm = CellState.from_snapshot(
                durable.snapshot, params.alpha_slots, params.sessions_max
            )
            self.joined = True
        elif members is not None:
            assert len(members) % 2 == 1 and node_id in members, members
            self.sm = CellState(
                alpha_slots=params.alpha_slots,
                configs=[(1, tuple(sorted(members)))],
                sessions_max=params.sessions_max,
            )
            self.joined = True
        else:
            self.sm = CellState(
                alpha_slots=params.alpha_slots,
                configs=[(1, ())],
                sessions_max=params.sessions_max,
            )
            self.joined = False
        self.sm.bug_apply_evicted_sessions = params.bug_apply_evicted_sessions
        self.log = {s: e for s, e in self.log.items() if s > self.sm.applied_index}
        self.commit_index = self.sm.applied_index
        while self.commit_index < durable.commit_index and self.commit_index + 1 in self.log:
            self.commit_index += 1
        self.role = FOLLOWER
        self.ballot: Ballot = ZERO_BALLOT  # our ballot as candidate or leader
        self.leader_hint: str | None = None
        self.leader_ballot: Ballot = ZERO_BALLOT
        self.election_deadline_ms = now_ms + self._election_timeout()
        self.catchup_sent_ms = -(10**9)
        # candidate
        self.promises: dict[str, Promise] = {}
        # leader
        self.promised_by: set[str] = set()
        self.recovered: dict[int, Entry] = {}  # late-promised values for slots not yet proposed
        self.next_slot = 0
        self.first_own_slot = 0
        self.acks: dict[int, set[str]] = {}
        self.sent_ms: dict[int, int] = {}  # slot -> when we last sent its Accept
        # A shell that batches sets this: requests only queue, and ``flush`` proposes them
        # all in one Accept per peer.
        self.batching = False
        self.waiters: dict[int, list[tuple[str, int]]] = {}
        self.inflight: dict[tuple[int, int], int] = {}  # (client_id, seq) -> slot
        self.queue: deque[Request] = deque()
        self.reads: deque[_PendingRead] = deque()
        self.read_round_sent = 0
        self.read_round_acked = 0
        self.read_acks: dict[str, int] = {}
        self.last_ack_ms: dict[str, int] = {}
        self.next_heartbeat_ms = 0
        self.now_hint_ms = now_ms
        self.counters: dict[str, int] = {
            "elections": 0,
            "commits": 0,
            "busy": 0,
            "rejected": 0,
            "catchups": 0,
            "snapshots": 0,
        }
        # Tests and the simulator set this to a list to see every (slot, cmd, client, seq,
        # executed) applied; executed is False for a retry answered from its session.
        self.applied_trace: list[tuple[int, Any, int, int, bool]] | None = None
        # Re-apply what we know is chosen.
        actions: list[Action] = []
        self._apply_committed(actions)

    # ---- small helpers ----------------------------------------------------------------------

    def _election_timeout(self) -> int:
        p = self.params
        return self.rng.randint(p.election_timeout_ms_min, p.election_timeout_ms_max)

    def _configs_view(self) -> list[tuple[int, Members]]:
        """Membership history: applied configs plus reconfigs in our log beyond them."""
        if not any(e.cmd["op"] == "reconfig" for e in self.log.values()):
            return self.sm.configs
        configs = list(self.sm.configs)
        for slot in sorted(s for s in self.log if s > self.sm.applied_index):
            cmd = self.log[slot].cmd
            if cmd["op"] != "reconfig" or configs[-1][0] > slot:
                continue
            new = reconfigured(configs[-1][1], cmd)
            if new is not None:
                configs.append((slot + self.params.alpha_slots, new))
        return configs

    def config_for(self, slot: int) -> Members:
        return config_at(self._configs_view(), slot)

    def _window_configs(self, first: int, last: int) -> list[Members]:
        configs = self._configs_view()
        out: list[Members] = []
        for s in [first] + [e for e, _ in configs if first < e <= last]:
            m = config_at(configs, s)
            if m not in out:
                out.append(m)
        return out

    def _peers(self, first: int, last: int) -> list[str]:
        peers: set[str] = set()
        for m in self._window_configs(first, last):
            peers.update(m)
        peers.discard(self.node_id)
        return sorted(peers)

    def is_member(self) -> bool:
        return self.joined and self.node_id in self.config_for(self.commit_index + 1)

    def statistics(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "ballot": self.ballot,
            "promised": self.promised,
            "commit_index": self.commit_index,
            "applied_index": self.sm.applied_index,
            "log_entries": len(self.log),
            "members": self.config_for(self.commit_index + 1),
            "leader_hint": self.leader_hint,
            "inflight": len(self.acks),
            "queued": len(self.queue),
            "reads_pending": len(self.reads),
            **self.counters,
        }

    # ---- entry points -----------------------------------------------------------------------

    def on_message(self, msg: Message | Request, now_ms: int) -> list[Action]:
        assert msg.cell == self.cell, (msg.cell, self.cell)
        self.now_hint_ms = now_ms
        actions: list[Action] = []
        if isinstance(msg, Request):
            self._on_request(msg, now_ms, actions)
        elif isinstance(msg, Prepare):
            self._on_prepare(msg, now_ms, actions)
        elif isinstance(msg, Promise):
            self._on_promise(msg, now_ms, actions)
        elif isinstance(msg, Accept):
            self._on_accept(msg, now_ms, actions)
        elif isinstance(msg, Accepted):
            self._on_accepted(msg, now_ms, actions)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg, now_ms, actions)
        elif isinstance(msg, HeartbeatAck):
            self._on_heartbeat_ack(msg, now_ms, actions)
        elif isinstance(msg, CatchUpRequest):
            self._on_catchup_request(msg, actions)
        elif isinstance(msg, CatchUp):
            self._on_catchup(msg, now_ms, actions)
        else:  # pragma: no cover - the shell only decodes known types
            raise TypeError(type(msg))
        return actions

    def on_tick(self, now_ms: int) -> list[Action]:
        self.now_hint_ms = now_ms
        actions: list[Action] = []
        if self.role == LEADER:
            if not self.is_member() and self.commit_index >= self.first_own_slot:
                self._step_down(None, actions)  # we reconfigured ourselves out
            elif not self._quorum_heard(now_ms):
                self._step_down(None, actions)  # lost touch with a majority
            elif now_ms >= self.next_heartbeat_ms:
                self._broadcast_heartbeat(now_ms, actions)
        elif now_ms >= self.election_deadline_ms and self.is_member():
            self._start_election(now_ms, actions)
        return actions

    # ---- acceptor ---------------------------------------------------------------------------

    def _promise_for(self, from_slot: int, ok: bool) -> Promise:
        snapshot = None
        if ok and self.sm.applied_index >= from_slot:
            snapshot = self.sm.snapshot()
            from_slot = self.sm.applied_index + 1
        entries = tuple(e for s, e in sorted(self.log.items()) if s >= from_slot) if ok else ()
        return Promise(
            self.cell,
            self.node_id,
            self.ballot if self.role != FOLLOWER else self.promised,
            ok,
            self.promised,
            self.commit_index,
            snapshot,
            entries,
        )

    def _on_prepare(self, msg: Prepare, now_ms: int, actions: list[Action]) -> None:
        if msg.ballot < self.promised:
            reply = Promise(self.cell, self.node_id, msg.ballot, False, self.promised, 0, None, ())
            actions.append(Send(msg.src, reply))
            return
        if msg.ballot > self.promised:
            self.promised = msg.ballot
            actions.append(PersistPromise(self.cell, msg.ballot))
        if self.role != FOLLOWER and msg.ballot > self.ballot:
            self._step_down(msg.src, actions)
        if self.role == FOLLOWER:
            self.leader_hint = msg.src  # likely the next leader: redirect there, do not duel
        self.election_deadline_ms = now_ms + self._election_timeout()
        p = self._promise_for(msg.from_slot, True)
        actions.append(
            Send(
                msg.src,
                Promise(
                    p.cell,
                    p.src,
                    msg.ballot,
                    True,
                    p.promised,
                    p.commit_index,
                    p.snapshot,
                    p.entries,
                ),
            )
        )

    def _on_accept(self, msg: Accept, now_ms: int, actions: list[Action]) -> None:
        if msg.ballot < self.promised and not self.params.bug_accept_lower_ballot:
            actions.append(
                Send(
                    msg.src, Accepted(self.cell, self.node_id, msg.ballot, False, self.promised, ())
                )
            )
            return
        if msg.ballot > self.promised:
            self.promised = msg.ballot
            actions.append(PersistPromise(self.cell, msg.ballot))
        if msg.ballot >= self.promised:
            self._follow(msg.src, msg.ballot, now_ms, actions)
        stored: list[Entry] = []
        for e in msg.entries:
            assert e.ballot == msg.ballot
            if e.slot <= self.sm.applied_index:
                continue  # chosen and applied; Paxos says the leader proposes the same value
            old = self.log.get(e.slot)
            if e.slot <= self.commit_index:
                assert old is not None and old.cmd == e.cmd, ("chosen value changed", e, old)
                continue
            if old != e:
                self.log[e.slot] = e
                stored.append(e)
        if stored:
            actions.append(PersistEntries(self.cell, tuple(stored)))
        slots = tuple(e.slot for e in msg.entries)
        actions.append(
            Send(msg.src, Accepted(self.cell, self.node_id, msg.ballot, True, self.promised, slots))
        )
        if self.role == FOLLOWER and msg.ballot == self.leader_ballot:
            self._learn_commit(msg.ballot, msg.commit_index, msg.src, now_ms, actions)

    def _on_heartbeat(self, msg: Heartbeat, now_ms: int, actions: list[Action]) -> None:
        ok = msg.ballot >= self.promised
        if ok:
            if msg.ballot > self.promised:
                self.promised = msg.ballot
                actions.append(PersistPromise(self.cell, msg.ballot))
            self._follow(msg.src, msg.ballot, now_ms, actions)
        actions.append(
            Send(
                msg.src,
                HeartbeatAck(
                    self.cell, self.node_id, msg.ballot, ok, self.promised, msg.read_round
                ),
            )
        )
        if ok and self.role == FOLLOWER:
            self._learn_commit(msg.ballot, msg.commit_index, msg.src, now_ms, actions)

    def _follow(self, leader: str, ballot: Ballot, now_ms: int, actions: list[Action]) -> None:
        if self.role != FOLLOWER and ballot > self.ballot:
            self._step_down(leader, actions)
        if self.role == FOLLOWER:
            self.leader_hint = leader
            self.leader_ballot = ballot
            self.election_deadline_ms = now_ms + self._election_timeout()

    def _learn_commit(
        self, ballot: Ballot, leader_commit: int, leader: str, now_ms: int, actions: list[Action]
    ) -> None:
        before = self.commit_index
        while self.commit_index < leader_commit:
            e = self.log.get(self.commit_index + 1)
            if e is None or e.ballot != ballot:
                break
            self.commit_index += 1
        if self.commit_index > before:
            actions.append(PersistCommit(self.cell, self.commit_index))
            self._apply_committed(actions)
        if self.commit_index < leader_commit and (
            now_ms - self.catchup_sent_ms >= self.params.catchup_retry_ms
        ):
            self.catchup_sent_ms = now_ms
            actions.append(
                Send(leader, CatchUpRequest(self.cell, self.node_id, self.commit_index + 1))
            )

    def _on_catchup_request(self, msg: CatchUpRequest, actions: list[Action]) -> None:
        if self.commit_index < msg.from_slot:
            return
        slots = range(msg.from_slot, self.commit_index + 1)
        if (
            msg.from_slot > 1
            and len(slots) <= self.params.log_entries_max
            and all(s in self.log for s in slots)
        ):
            snapshot = None
            entries = tuple(self.log[s] for s in slots)
        else:
            snapshot = self.sm.snapshot()
            entries = ()
        actions.append(
            Send(msg.src, CatchUp(self.cell, self.node_id, snapshot, entries, self.commit_index))
        )

    def _on_catchup(self, msg: CatchUp, now_ms: int, actions: list[Action]) -> None:
        self.counters["catchups"] += 1
        self._install_chosen(msg.snapshot, msg.entries, msg.commit_index, actions)

    def _install_chosen(
        self,
        snapshot: dict[str, Any] | None,
        entries: tuple[Entry, ...],
        commit_index: int,
        actions: list[Action],
    ) -> None:
        """Adopt state another replica knows is chosen (a snapshot and committed entries)."""
        if snapshot is not None and snapshot["index"] > self.sm.applied_index:
            self.sm = CellState.from_snapshot(
                snapshot, self.params.alpha_slots, self.params.sessions_max
            )
            self.sm.bug_apply_evicted_sessions = self.params.bug_apply_evicted_sessions
            self.joined = True
            for s in [s for s in self.log if s <= self.sm.applied_index]:
                del self.log[s]
            self.counters["snapshots"] += 1
            actions.append(PersistSnapshot(self.cell, snapshot))
            if self.commit_index < self.sm.applied_index:
                self.commit_index = self.sm.applied_index
                actions.append(PersistCommit(self.cell, self.commit_index))
        if not self.joined:
            return
        stored: list[Entry] = []
        chosen = {e.slot: e for e in entries if self.sm.applied_index < e.slot <= commit_index}
        for e in chosen.values():
            old = self.log.get(e.slot)
            if e.slot <= self.commit_index:
                assert old is not None and _same_entry(old, e), ("chosen value changed", e, old)
                continue
            if old is None or not _same_entry(old, e):
                self.log[e.slot] = e
                stored.append(e)
        if stored:
            actions.append(PersistEntries(self.cell, tuple(stored)))
        before = self.commit_index
        while self.commit_index + 1 in chosen:
            self.commit_index += 1
        if self.commit_index > before:
            actions.append(PersistCommit(self.cell, self.commit_index))
        self._apply_committed(actions)

    # ---- learner / state machine -------------------------------------------------------------

    def _apply_committed(self, actions: list[Action]) -> None:
        while self.sm.applied_index < self.commit_index:
            slot = self.sm.applied_index + 1
            e = self.log[slot]
            result = self.sm.apply(slot, e.cmd, e.client_id, e.seq)
            if self.applied_trace is not None:
                self.applied_trace.append(
                    (slot, e.cmd, e.client_id, e.seq, self.sm.last_executed)
                )
            self.counters["commits"] += 1
            status = OK
            if result is SESSION_EXPIRED:
                status, result = EXPIRED, (
                    "SessionExpired: the cell no longer remembers this client's session, so it "
                    "cannot tell a retry from a new command; nothing was applied"
                )
            for to, request_id in self.waiters.pop(slot, ()):
                actions.append(
                    Reply(to, Response(self.cell, self.node_id, request_id, status, result))
                )
            if e.client_id:
                self.inflight.pop((e.client_id, e.seq), None)
            self.acks.pop(slot, None)
            self.sent_ms.pop(slot, None)
        applied = [s for s in self.log if s <= self.sm.applied_index]
        if len(applied) >= self.params.log_entries_max:
            snap = self.sm.snapshot()
            for s in applied:
                del self.log[s]
            actions.append(PersistSnapshot(self.cell, snap))
        if self.role == LEADER:
            self._serve_reads(actions)

    # ---- proposer: election -----------------------------------------------------------------

    def _start_election(self, now_ms: int, actions: list[Action]) -> None:
        self.counters["elections"] += 1
        self.role = CANDIDATE
        self.ballot = (max(self.promised[0], self.ballot[0]) + 1, self.node_id)
        self.promised = self.ballot
        actions.append(PersistPromise(self.cell, self.ballot))
        self.election_deadline_ms = now_ms + self._election_timeout()
        self.promises = {self.node_id: self._promise_for(self.commit_index + 1, True)}
        prepare = Prepare(self.cell, self.node_id, self.ballot, self.commit_index + 1)
        last = self.commit_index + 1 + self.params.alpha_slots
        for peer in self._peers(self.commit_index + 1, last):
            actions.append(Send(peer, prepare))
        self._try_lead(now_ms, actions)

    def _on_promise(self, msg: Promise, now_ms: int, actions: list[Action]) -> None:
        if not msg.ok:
            if msg.promised > self.ballot and self.role != FOLLOWER:
                self._step_down(None, actions)
            return
        if msg.ballot != self.ballot:
            return
        if self.role == CANDIDATE:
            self.promises[msg.src] = msg
            self._try_lead(now_ms, actions)
        elif self.role == LEADER:
            self.promised_by.add(msg.src)
            # Values a late promiser accepted for slots we have not proposed yet must win.
            for e in msg.entries:
                if e.slot >= self.next_slot:
                    have = self.recovered.get(e.slot)
                    if have is None or e.ballot > have.ballot:
                        self.recovered[e.slot] = e
            self._pump(now_ms, actions)

    def _try_lead(self, now_ms: int, actions: list[Action]) -> None:
        # Adopt the most advanced chosen snapshot first: it is chosen, so always safe.
        best = max(
            (p for p in self.promises.values() if p.snapshot is not None),
            key=lambda p: p.snapshot["index"] if p.snapshot else 0,
            default=None,
        )
        if best is not None:
            self._install_chosen(best.snapshot, (), self.commit_index, actions)
        start = self.commit_index + 1
        chosen: dict[int, Entry] = {}
        highest: dict[int, Entry] = {}
        for p in self.promises.values():
            for e in p.entries:
                if e.slot < start:
                    continue
                if e.slot <= p.commit_index:
                    chosen[e.slot] = e
                have = highest.get(e.slot)
                if have is None or e.ballot > have.ballot:
                    highest[e.slot] = e
        max_slot = max([start - 1, *highest])
        view: dict[int, Entry] = {}
        for s in range(start, max_slot + 1):
            src = chosen.get(s) or highest.get(s)
            if src is None:
                view[s] = Entry(s, self.ballot, NOOP)
            else:
                view[s] = Entry(s, self.ballot, src.cmd, src.client_id, src.seq)
        # Every slot we will propose needs promises from a majority of its membership.
        saved = self.log
        self.log = {**{s: e for s, e in self.log.items() if s < start}, **view}
        try:
            needed = self._window_configs(start, max_slot + 1 + self.params.alpha_slots)
        finally:
            self.log = saved
        voters = set(self.promises)
        if not all(has_quorum(voters, m) for m in needed):
            for m in needed:
                for peer in m:
                    if peer not in self.promises and peer != self.node_id:
                        prepare = Prepare(self.cell, self.node_id, self.ballot, start)
                        actions.append(Send(peer, prepare))
            return
        self._become_leader(view, max_slot, now_ms, actions)

    def _become_leader(
        self, view: dict[int, Entry], max_slot: int, now_ms: int, actions: list[Action]
    ) -> None:
        self.role = LEADER
        self.leader_hint = self.node_id
        self.leader_ballot = self.ballot
        self.promised_by = set(self.promises)
        self.promises = {}
        self.recovered = {}
        self.acks = {}
        self.waiters = {}
        self.inflight = {}
        self.reads.clear()
        self.read_round_sent = self.read_round_acked = 0
        self.read_acks = {}
        self.last_ack_ms = {}
        self.next_slot = max_slot + 1
        new_entries = list(view.values())
        self.first_own_slot = self.next_slot
        new_entries.append(Entry(self.next_slot, self.ballot, NOOP))
        self.next_slot += 1
        for e in new_entries:
            self.log[e.slot] = e
            self.acks[e.slot] = {self.node_id}
            self.sent_ms[e.slot] = now_ms
            if e.client_id:
                self.inflight[(e.client_id, e.seq)] = e.slot
        actions.append(PersistEntries(self.cell, tuple(new_entries)))
        self._send_accepts(tuple(new_entries), actions)
        self.next_heartbeat_ms = now_ms + self.params.heartbeat_interval_ms
        for peer in self._peers(self.commit_index + 1, self.next_slot + self.params.alpha_slots):
            self.last_ack_ms[peer] = now_ms
        self._advance_commit(now_ms, actions)

    def _step_down(self, leader: str | None, actions: list[Action]) -> None:
        was_leader = self.role == LEADER
        self.role = FOLLOWER
        self.leader_hint = leader
        self.promises = {}
        if was_leader:
            # Outcome unknown to us now: clients retry with the same (client_id, seq), and the
            # state machine applies each command at most once.
            hint = leader
            for slot in sorted(self.waiters):
                for to, request_id in self.waiters[slot]:
                    actions.append(
                        Reply(
                            to,
                            Response(self.cell, self.node_id, request_id, NOT_LEADER, None, hint),
                        )
                    )
            for req in self.queue:
                actions.append(
                    Reply(
                        req.src,
                        Response(self.cell, self.node_id, req.request_id, NOT_LEADER, None, hint),
                    )
                )
            for r in self.reads:
                actions.append(
                    Reply(
                        r.to,
                        Response(self.cell, self.node_id, r.request_id, NOT_LEADER, None, hint),
                    )
                )
            self.waiters = {}
            self.inflight = {}
            self.queue.clear()
            self.reads.clear()
            self.acks = {}
            self.sent_ms = {}

    # ---- proposer: phase 2 ------------------------------------------------------------------

    def _send_accepts(self, entries: tuple[Entry, ...], actions: list[Action]) -> None:
        if not entries:
            return
        first, last = entries[0].slot, entries[-1].slot
        msg = Accept(self.cell, self.node_id, self.ballot, entries, self.commit_index)
        for peer in self._peers(first, last):
            actions.append(Send(peer, msg))

    def _leader_ack(self, msg: Accepted | HeartbeatAck, now_ms: int,
                    actions: list[Action]) -> bool:
        """Whether an ack counts for this leader's ballot; a refusal naming a higher
        ballot deposes it. A counted ack refreshes the sender's lease clock."""
        if self.role != LEADER:
            return False
        if not msg.ok:
            if msg.promised > self.ballot:
                self._step_down(None, actions)
            return False
        if msg.ballot != self.ballot:
            return False
        self.last_ack_ms[msg.src] = now_ms
        return True

    def _on_accepted(self, msg: Accepted, now_ms: int, actions: list[Action]) -> None:
        if not self._leader_ack(msg, now_ms, actions):
            return
        for slot in msg.slots:
            acks = self.acks.get(slot)
            if acks is not None:
                acks.add(msg.src)
        self._advance_commit(now_ms, actions)

    def _advance_commit(self, now_ms: int, actions: list[Action]) -> None:
        before = self.commit_index
        while True:
            slot = self.commit_index + 1
            acks = self.acks.get(slot)
            if acks is None:
                break
            members = self.config_for(slot)
            if self.params.bug_count_any_acks:
                chosen = len(acks) >= majority(members)
            else:
                chosen = has_quorum(acks, members)
            if not chosen:
                break
            self.commit_index = slot
        if self.commit_index > before:
            actions.append(PersistCommit(self.cell, self.commit_index))
            self._apply_committed(actions)
            if self.role == LEADER:
                self._pump(now_ms, actions)

    def _room(self) -> bool:
        """May the leader propose ``next_slot`` now? (alpha window and promise quorum)."""
        if self.next_slot > self.commit_index + self.params.alpha_slots:
            return False
        return has_quorum(self.promised_by, self.config_for(self.next_slot))

    def _propose(self, cmd: dict[str, Any], client_id: int, seq: int) -> Entry:
        assert self.role == LEADER and self._room()
        e = Entry(self.next_slot, self.ballot, cmd, client_id, seq)
        self.next_slot += 1
        self.log[e.slot] = e
        self.acks[e.slot] = {self.node_id}
        self.sent_ms[e.slot] = self.now_hint_ms
        return e

    def _pump(self, now_ms: int, actions: list[Action]) -> None:
        """Propose recovered values and queued commands while the window has room."""
        new: list[Entry] = []
        while self.role == LEADER and self._room():
            if self.next_slot in self.recovered:
                r = self.recovered.pop(self.next_slot)
                e = self._propose(r.cmd, r.client_id, r.seq)
                if e.client_id:
                    self.inflight[(e.client_id, e.seq)] = e.slot
                new.append(e)
                continue
            if not self.queue:
                break
            req = self.queue.popleft()
            if not self._answer_from_session(req, actions):
                e = self._propose(req.command, req.client_id, req.seq)
                self.waiters.setdefault(e.slot, []).append((req.src, req.request_id))
                self.inflight[(req.client_id, req.seq)] = e.slot
                new.append(e)
        if new:
            actions.append(PersistEntries(self.cell, tuple(new)))
            self._send_accepts(tuple(new), actions)
            self._advance_commit(now_ms, actions)
        if self.role == LEADER and not self._room():
            missing = [
                m
                for m in self.config_for(self.next_slot)
                if m not in self.promised_by and m != self.node_id
            ]
            if missing and self.next_slot <= self.commit_index + self.params.alpha_slots:
                prepare = Prepare(self.cell, self.node_id, self.ballot, self.commit_index + 1)
                for m in missing:
                    actions.append(Send(m, prepare))

    def _answer_from_session(self, req: Request, actions: list[Action]) -> bool:
        """Answer a retry of an applied or in-flight command without proposing it again."""
        if not req.client_id:
            return False
        last = self.sm.sessions.get(req.client_id)
        if last is not None and req.seq <= last[0]:
            result = last[1] if req.seq == last[0] else None
            actions.append(
                Reply(req.src, Response(self.cell, self.node_id, req.request_id, OK, result))
            )
            return True
        slot = self.inflight.get((req.client_id, req.seq))
        if slot is not None:
            self.waiters.setdefault(slot, []).append((req.src, req.request_id))
            return True
        return False

    # ---- client requests --------------------------------------------------------------------

    def _reply(self, req: Request, status: str, result: Any, actions: list[Action]) -> None:
        hint = self.leader_hint if status == NOT_LEADER else None
        actions.append(
            Reply(req.src, Response(self.cell, self.node_id, req.request_id, status, result, hint))
        )

    def _on_request(self, req: Request, now_ms: int, actions: list[Action]) -> None:
        try:
            cmd = validate_command(req.command)
        except CommandRejected as exc:
            self.counters["rejected"] += 1
            self._reply(req, REJECTED, str(exc), actions)
            return
        if cmd["op"] in ("noop",):
            self._reply(req, REJECTED, "noop is internal", actions)
            return
        if self.role != LEADER:
            if self.role == FOLLOWER and self.leader_hint is None and self.is_member():
                # A cell woken from idle has no leader: campaign at the next tick.
                self.election_deadline_ms = min(self.election_deadline_ms, now_ms)
            self._reply(req, NOT_LEADER, None, actions)
            return
        if is_read_only(cmd):
            if self.params.bug_stale_reads:
                self._reply(req, OK, self.sm.read(cmd), actions)
                return
            if self.commit_index >= self.first_own_slot:
                if len(self.reads) >= self.params.reads_pending_max:
                    self.counters["busy"] += 1
                    self._reply(req, BUSY, None, actions)
                    return
                rnd = self.read_round_sent + 1
                self.reads.append(
                    _PendingRead(rnd, self.commit_index, req.src, req.request_id, cmd)
                )
                if self.read_round_sent == self.read_round_acked:
                    self._broadcast_heartbeat(now_ms, actions, new_round=True)
                    self._check_read_quorum(now_ms, actions)
                return
            # Not ready yet: a read through the log is linearizable too.
        if self._answer_from_session(req, actions):
            return
        if len(self.queue) + len(self.acks) >= self.params.pipeline_depth_max:
            self.counters["busy"] += 1
            self._reply(req, BUSY, None, actions)
            return
        self.queue.append(req)
        if not self.batching:
            self._pump(now_ms, actions)

    def flush(self, now_ms: int) -> list[Action]:
        """Propose everything queued since the last flush (for shells that batch)."""
        self.now_hint_ms = now_ms
        actions: list[Action] = []
        if self.role == LEADER and self.queue:
            self._pump(now_ms, actions)
        return actions

    # ---- leader: heartbeats and reads --------------------------------------------------------

    def _broadcast_heartbeat(
        self, now_ms: int, actions: list[Action], new_round: bool = False
    ) -> None:
        if new_round:
            self.read_round_sent += 1
        self.next_heartbeat_ms = now_ms + self.params.heartbeat_interval_ms
        hb = Heartbeat(
            self.cell, self.node_id, self.ballot, self.commit_index, self.read_round_sent
        )
        horizon = now_ms - self.params.accept_retry_ms
        stale = [
            s for s in sorted(self.acks) if s in self.log and self.sent_ms.get(s, 0) <= horizon
        ]
        for s in stale:
            self.sent_ms[s] = now_ms
        unacked = tuple(self.log[s] for s in stale)
        for peer in self._peers(self.commit_index + 1, self.next_slot + self.params.alpha_slots):
            actions.append(Send(peer, hb))
            missing = tuple(e for e in unacked if peer not in self.acks[e.slot])
            if missing:  # resend what the peer has not acknowledged (lost messages)
                actions.append(
                    Send(
                        peer,
                        Accept(self.cell, self.node_id, self.ballot, missing, self.commit_index),
                    )
                )

    def _quorum_heard(self, now_ms: int) -> bool:
        horizon = now_ms - 2 * self.params.election_timeout_ms_max
        heard = {p for p, t in self.last_ack_ms.items() if t >= horizon} | {self.node_id}
        return all(
            has_quorum(heard, m)
            for m in self._window_configs(self.commit_index + 1, self.next_slot)
        )

    def _on_heartbeat_ack(self, msg: HeartbeatAck, now_ms: int, actions: list[Action]) -> None:
        if not self._leader_ack(msg, now_ms, actions):
            return
        if msg.read_round > self.read_acks.get(msg.src, 0):
            self.read_acks[msg.src] = msg.read_round
        self._check_read_quorum(now_ms, actions)

    def _check_read_quorum(self, now_ms: int, actions: list[Action]) -> None:
        rnd = self.read_round_sent
        configs = self._window_configs(self.commit_index + 1, self.next_slot)
        while rnd > self.read_round_acked:
            voters = {p for p, r in self.read_acks.items() if r >= rnd} | {self.node_id}
            if all(has_quorum(voters, m) for m in configs):
                self.read_round_acked = rnd
                break
            rnd -= 1
        self._serve_reads(actions)
        if self.reads and self.reads[-1].round > self.read_round_sent:
            self._broadcast_heartbeat(now_ms, actions, new_round=True)

    def _serve_reads(self, actions: list[Action]) -> None:
        while self.reads:
            r = self.reads[0]
            if r.round > self.read_round_acked or r.read_index > self.sm.applied_index:
                break
            self.reads.popleft()
            result = self.sm.read(r.cmd)
            actions.append(Reply(r.to, Response(self.cell, self.node_id, r.request_id, OK, result)))
