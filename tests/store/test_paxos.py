"""The Paxos core, driven event by event: protocol steps, limits, and a Hypothesis state machine
that delivers, drops, duplicates and reorders messages and crashes replicas."""

from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from cellcloud.core.paxos import (
    BUSY,
    NOT_LEADER,
    OK,
    REJECTED,
    Accept,
    Accepted,
    Entry,
    PersistEntries,
    Send,
)
from cellcloud.store.checker import Operation, check_history

from .harness import PARAMS, Cluster


def put(k, v):
    return {"op": "put", "key": k, "value": v}


def test_elect_commit_and_every_replica_applies():
    c = Cluster()
    c.elect("a")
    rid = c.request("a", put("x", 1), client_id=c.open_session("a"), seq=1)
    c.deliver_all()
    assert c.response(rid).status == OK and c.response(rid).result is True
    c.tick("a", PARAMS.heartbeat_interval_ms)
    c.deliver_all()
    for r in c.replicas.values():
        assert r.sm.data == {"x": 1}


def test_acceptor_persists_before_it_answers():
    c = Cluster()
    c.elect("a")
    c.request("a", put("x", 1))
    i = next(i for i, (dst, m) in enumerate(c.bag) if dst == "b" and isinstance(m, Accept))
    dst, msg = c.bag.pop(i)
    actions = c.replicas["b"].on_message(msg, c.now)
    kinds = [type(a) for a in actions]
    assert PersistEntries in kinds and Send in kinds
    assert kinds.index(PersistEntries) < kinds.index(Send)


def test_lower_ballot_accept_is_refused_unless_bug_planted():
    for bug in (False, True):
        params = replace(PARAMS, bug_accept_lower_ballot=bug)
        c = Cluster(params=params)
        c.elect("a")
        c.elect("b")  # b's ballot is now promised everywhere it reached
        stale = Accept("cell", "a", (1, "a"), (Entry(9, (1, "a"), {"op": "noop"}),), 0)
        out = c.replicas["c"].on_message(stale, c.now)
        acked = [a.msg for a in out if isinstance(a, Send) and isinstance(a.msg, Accepted)]
        assert acked[0].ok is bug


def test_follower_redirects_and_bad_commands_are_rejected():
    c = Cluster()
    c.elect("a")
    rid = c.request("b", put("x", 1))
    assert c.response(rid).status == NOT_LEADER and c.response(rid).leader_hint == "a"
    rid = c.request("a", {"op": "put", "key": "x", "value": 1.0})
    assert c.response(rid).status == REJECTED
    rid = c.request("a", {"op": "put", "key": "x", "value": 1, "extra": 0})
    assert c.response(rid).status == REJECTED


def test_full_pipeline_answers_busy():
    c = Cluster()
    c.elect("a")
    rids = [c.request("a", put("x", i)) for i in range(40)]
    statuses = [c.response(r).status if c.response(r) else None for r in rids]
    assert statuses.count(BUSY) == 40 - PARAMS.pipeline_depth_max
    c.deliver_all()
    assert all(c.response(r).status in (OK, BUSY) for r in rids)


def test_read_needs_a_heartbeat_round_but_no_log_write():
    c = Cluster()
    c.elect("a")
    c.request("a", put("x", 1))
    c.deliver_all()
    before = c.replicas["a"].sm.applied_index
    rid = c.request("a", {"op": "get", "key": "x"})
    assert c.response(rid) is None  # waits for a majority to confirm the ballot
    c.deliver_all()
    assert c.response(rid).result == 1
    assert c.replicas["a"].sm.applied_index == before


def test_retry_of_applied_command_returns_cached_result():
    c = Cluster()
    c.elect("a")
    cas = {"op": "cas", "key": "x", "expected": None, "value": 1}
    client = c.open_session("a")
    r1 = c.request("a", cas, client_id=client, seq=1)
    c.deliver_all()
    r2 = c.request("a", cas, client_id=client, seq=1)
    c.deliver_all()
    assert c.response(r1).result is True and c.response(r2).result is True


def test_lagging_replica_catches_up_from_snapshot_after_compaction():
    c = Cluster()
    c.elect("a")
    c.crash("c")
    client = c.open_session("a")
    for i in range(3 * PARAMS.log_entries_max):
        c.request("a", put(f"k{i % 5}", i), client_id=client, seq=i + 1)
        c.deliver_all()
    assert len(c.replicas["a"].log) <= PARAMS.log_entries_max
    c.start("c", c.members)
    for _ in range(5):
        c.tick("a", PARAMS.heartbeat_interval_ms)
        c.deliver_all()
    assert c.replicas["c"].sm.data == c.replicas["a"].sm.data
    assert c.replicas["c"].counters["snapshots"] >= 1


def test_restart_recovers_accepted_state():
    c = Cluster()
    c.elect("a")
    c.request("a", put("x", 7))
    c.deliver_all()
    for n in ("a", "b", "c"):
        c.crash(n)
    for n in ("a", "b", "c"):
        c.start(n, c.members)
    c.elect("b")
    rid = c.request("b", {"op": "get", "key": "x"})
    c.deliver_all()
    assert c.response(rid).result == 7


def test_reconfigure_replaces_a_replica_while_available():
    c = Cluster()
    leader = c.elect("a")
    c.add_node("d")
    rid = c.request("a", {"op": "reconfig", "expect": ["a", "b", "c"], "remove": "c", "add": "d"})
    c.deliver_all()
    assert c.response(rid).result is True
    # Keep writing through the alpha window; the cell stays available throughout.
    client = c.open_session("a")
    for i in range(2 * PARAMS.alpha_slots):
        r = c.request("a", put("x", i), client_id=client, seq=i + 1)
        c.deliver_all()
        c.tick("a", PARAMS.heartbeat_interval_ms)
        c.deliver_all()
        assert c.response(r).status == OK
    assert leader.config_for(leader.commit_index + 1) == ("a", "b", "d")
    assert c.replicas["d"].sm.data == leader.sm.data
    # c is out: a and d alone are a majority now.
    c.crash("c")
    c.crash("b")
    r = c.request("a", put("y", 1), client_id=client, seq=100)
    c.deliver_all()
    assert c.response(r).status == OK


class PaxosMachine(RuleBasedStateMachine):
    """Random schedules of delivery, loss, duplication, ticks, crashes, client writes and reads.
    Invariants (checked after every step by the harness): replicas agree on every applied
    slot; a promise never goes backwards, even across a crash. At the end the clients' history
    (each command its own client; call and return in machine steps; an answer other than ok
    leaves the outcome unknown) must be linearizable."""

    params = PARAMS

    def __init__(self):
        super().__init__()
        self.c = Cluster(seed=1, params=self.params)
        self.step = 0
        self.calls: dict[int, tuple[dict, int]] = {}  # request id -> (command, call step)
        self.history: list[Operation] = []
        self.seen = 0  # responses already looked at

    def _call(self, node, cmd):
        self.step += 1
        rid = self.c.request(node, cmd)
        self.calls[rid] = (cmd, self.step)

    @precondition(lambda self: self.c.bag)
    @rule(i=st.integers(0, 1000))
    def deliver(self, i):
        self.c.deliver(i % len(self.c.bag))

    @precondition(lambda self: self.c.bag)
    @rule(i=st.integers(0, 1000))
    def drop(self, i):
        self.c.bag.pop(i % len(self.c.bag))

    @precondition(lambda self: self.c.bag)
    @rule(i=st.integers(0, 1000))
    def duplicate(self, i):
        self.c.deliver(i % len(self.c.bag), duplicate=True)

    @rule(node=st.sampled_from("abc"), advance=st.integers(0, 500))
    def tick(self, node, advance):
        self.c.tick(node, advance)

    @rule(node=st.sampled_from("abc"))
    def crash_restart(self, node):
        if node in self.c.replicas:
            self.c.crash(node)
            self.c.start(node, self.c.members)

    @rule(node=st.sampled_from("abc"), key=st.sampled_from("xy"), v=st.integers(0, 3))
    def submit(self, node, key, v):
        if node in self.c.replicas:
            self._call(node, put(key, v))

    @rule(node=st.sampled_from("abc"), key=st.sampled_from("xy"))
    def read(self, node, key):
        if node in self.c.replicas:
            self._call(node, {"op": "get", "key": key})

    @invariant()
    def collect_answers(self):
        self.step += 1
        for resp in self.c.responses[self.seen :]:
            call = self.calls.pop(resp.request_id, None)
            if call is None:
                continue
            cmd, called = call
            ok = resp.status == OK
            self.history.append(
                Operation(
                    f"p{resp.request_id}",
                    "cell",
                    cmd,
                    called,
                    self.step if ok else None,
                    resp.result if ok else None,
                    len(self.history),
                )
            )
        self.seen = len(self.c.responses)

    def teardown(self):
        pending = [
            Operation(f"p{rid}", "cell", cmd, called, None, None, len(self.history) + i)
            for i, (rid, (cmd, called)) in enumerate(sorted(self.calls.items()))
        ]
        result = check_history(self.history + pending)
        assert result.ok, f"not linearizable: {result.failed_partition[:20]}"

    @invariant()
    def committed_prefix_matches_chosen(self):
        for r in self.c.replicas.values():
            for slot, e in r.log.items():
                if slot <= r.commit_index:
                    assert self.c.chosen[slot] == (e.cmd, e.client_id, e.seq)


TestPaxosMachine = PaxosMachine.TestCase
TestPaxosMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)

