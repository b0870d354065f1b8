"""Pure pieces of the shells: frames, SQLite durability, placement, backoff."""

import random

import msgpack
import pytest

from cellcloud.core.paxos import (
    Accept,
    Entry,
    PersistCommit,
    PersistEntries,
    PersistPromise,
    PersistSnapshot,
    Request,
)
from cellcloud.store.backoff import RetryBudget, full_jitter_ms
from cellcloud.store.durable import SqliteStore
from cellcloud.store.placement import Candidate, PlacementError, place_cell
from cellcloud.store.wire import FrameRejected, decode, encode, seal, unseal

KEY = b"k" * 32


def test_frames_roundtrip_and_reject_tampering():
    msg = Accept("c", "n1", (3, "n1"), (Entry(4, (3, "n1"), {"op": "noop"}, 7, 1),), 2)
    frame = seal(KEY, encode(msg))[4:]
    assert decode(unseal(KEY, frame)) == msg
    with pytest.raises(FrameRejected):
        unseal(b"x" * 32, frame)  # wrong key
    tag, raw = msgpack.unpackb(frame)
    forged = msgpack.packb([tag, raw[:-1] + bytes([raw[-1] ^ 1])])
    with pytest.raises(FrameRejected):
        unseal(KEY, forged)


def test_partly_understood_messages_are_rejected():
    body = encode(Request("c", "x", 1, 2, 3, {"op": "get", "key": "k"}))
    with pytest.raises(FrameRejected):
        decode(dict(body, priority=1))
    with pytest.raises(FrameRejected):
        decode(dict(body, t="teleport"))


def test_sqlite_roundtrip(tmp_path):
    s = SqliteStore(str(tmp_path / "n.sqlite3"))
    s.create_cells([("c", ("a", "b", "c"))])
    e1 = Entry(1, (1, "a"), {"op": "put", "key": "k", "value": b"v"}, 9, 1)
    e2 = Entry(2, (1, "a"), {"op": "noop"})
    s.persist([PersistPromise("c", (1, "a")), PersistEntries("c", (e1, e2)), PersistCommit("c", 1)])
    s.persist([PersistPromise("c", (0, "z"))])  # promises never go back
    s.close()
    s = SqliteStore(str(tmp_path / "n.sqlite3"))
    members, d = s.load("c")
    assert members == ("a", "b", "c") and d.promised == (1, "a") and d.commit_index == 1
    assert d.entries == {1: e1, 2: e2}
    snap = {"index": 1, "data": {}, "sessions": [], "configs": [[1, ["a", "b", "c"]]]}
    s.persist([PersistSnapshot("c", snap)])
    _, d = s.load("c")
    assert d.snapshot == snap and list(d.entries) == [2]
    assert s.load("nope") is None


def nodes(spec):
    return [
        Candidate(f"n{i}", {"zone": z, "rack": r, "power": p}) for i, (z, r, p) in enumerate(spec)
    ]


def test_placement_prefers_client_zone_and_spreads_domains():
    spec = [("z0", f"r{i % 4}", f"p{i % 3}") for i in range(6)]
    spec += [("z1", f"s{i}", f"q{i}") for i in range(6)]
    chosen = place_cell(nodes(spec), "z0", 7)
    assert len(chosen) == 7
    assert sum(1 for n in chosen if int(n[1:]) < 6) == 6  # all six z0 nodes fit the rules


def test_placement_never_gives_a_rack_a_majority():
    spec = [("z0", "r0", f"p{i}") for i in range(5)] + [("z0", "r1", "px"), ("z0", "r2", "py")]
    with pytest.raises(PlacementError, match="per rack"):
        place_cell(nodes(spec), "z0", 7)
    spec += [("z1", "r3", "pz"), ("z1", "r4", "pw")]
    chosen = place_cell(nodes(spec), "z0", 7)
    racks = [spec[int(n[1:])][1] for n in chosen]
    assert max(racks.count(r) for r in racks) <= 3


def test_backoff_has_full_jitter_and_budget_runs_out():
    rng = random.Random(1)
    waits = [full_jitter_ms(rng, 5) for _ in range(200)]
    assert min(waits) < 20 and max(waits) > 100 and max(waits) <= 160
    b = RetryBudget(earn_millitokens=100, millitokens_max=3000, millitokens=3000)
    assert [b.try_spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        b.on_attempt()
    assert b.try_spend()
