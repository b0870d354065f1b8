"""A tiny synchronous world for unit tests of the Paxos core: a message bag we control."""

from __future__ import annotations

import random
from typing import Any

from cellcloud.core.paxos import (
    PERSIST_ACTIONS,
    Action,
    DurableState,
    Replica,
    ReplicaParams,
    Reply,
    Request,
    Response,
    Send,
)
from cellcloud.store.sim import SimDisk

PARAMS = ReplicaParams(alpha_slots=4, log_entries_max=8, pipeline_depth_max=16)


class Cluster:
    def __init__(self, members=("a", "b", "c"), params: ReplicaParams = PARAMS, seed: int = 0):
        self.params = params
        self.rng = random.Random(seed)
        self.now = 0
        self.members = tuple(members)
        self.disks: dict[str, SimDisk] = {m: SimDisk() for m in members}
        self.replicas: dict[str, Replica] = {}
        self.bag: list[tuple[str, Any]] = []
        self.responses: list[Response] = []
        self.chosen: dict[int, tuple] = {}
        self.promised_seen: dict[str, tuple] = {}
        for m in members:
            self.start(m, self.members)
        self.request_id = 0

    def start(self, node: str, members) -> Replica:
        durable: DurableState | None = self.disks[node].load("cell")
        r = Replica(
            "cell", node, members, self.params, random.Random(self.rng.random()), self.now, durable
        )
        r.applied_trace = []
        self.replicas[node] = r
        self.observe(r)
        return r

    def add_node(self, node: str) -> Replica:
        self.disks[node] = SimDisk()
        return self.start(node, None)

    def crash(self, node: str) -> None:
        self.disks[node].crash()
        self.replicas.pop(node)
        self.bag = [(dst, m) for dst, m in self.bag if dst != node]

    def observe(self, r: Replica) -> None:
        assert r.applied_trace is not None
        for slot, cmd, cid, seq, _executed in r.applied_trace:
            got = (cmd, cid, seq)
            assert self.chosen.setdefault(slot, got) == got, ("agreement", slot)
        r.applied_trace.clear()
        assert r.promised >= self.promised_seen.get(r.node_id, (0, "")), "promise went back"
        self.promised_seen[r.node_id] = r.promised
        assert r.sm.applied_index == r.commit_index

    def execute(self, node: str, actions: list[Action]) -> list[Action]:
        persists = [a for a in actions if isinstance(a, PERSIST_ACTIONS)]
        for a in persists:
            self.disks[node].write(a)
        self.disks[node].sync()
        for a in actions:
            if isinstance(a, Reply):
                self.responses.append(a.msg)
            elif isinstance(a, Send):
                self.bag.append((a.to, a.msg))
        self.observe(self.replicas[node])
        return actions

    def deliver(self, index: int = 0, duplicate: bool = False) -> None:
        dst, msg = self.bag[index] if duplicate else self.bag.pop(index)
        r = self.replicas.get(dst)
        if r is not None:
            self.execute(dst, r.on_message(msg, self.now))

    def deliver_all(self, steps_max: int = 10_000) -> None:
        for _ in range(steps_max):
            if not self.bag:
                return
            self.deliver(0)
        raise AssertionError("messages never quiesced")

    def tick(self, node: str, advance_ms: int = 0) -> None:
        self.now += advance_ms
        r = self.replicas.get(node)
        if r is not None:
            self.execute(node, r.on_tick(self.now))

    def elect(self, node: str) -> Replica:
        self.tick(node, self.params.election_timeout_ms_max + 1)
        self.deliver_all()
        r = self.replicas[node]
        assert r.role == "leader", r.statistics()
        return r

    def request(self, node: str, cmd: Any, client_id: int = 0, seq: int = 0) -> int:
        self.request_id += 1
        req = Request("cell", "client", self.request_id, client_id, seq, cmd)
        self.execute(node, self.replicas[node].on_message(req, self.now))
        return self.request_id

    def open_session(self, node: str) -> int:
        """Open a client session through ``node`` (a leader): its id, for retries."""
        rid = self.request(node, {"op": "session"})
        self.deliver_all()
        resp = self.response(rid)
        assert resp is not None and resp.status == "ok", resp
        return int(resp.result)

    def response(self, request_id: int) -> Response | None:
        for resp in self.responses:
            if resp.request_id == request_id:
                return resp
        return None
