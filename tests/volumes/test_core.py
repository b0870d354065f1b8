"""The sans-IO volume core event by event: server fencing, all-replica writes, rewiring,
placement by failure domain."""

from __future__ import annotations

import random
from typing import Any

from cellcloud.store.placement import Candidate, place_cell
from cellcloud.volumes.core import (
    INVALID,
    NOT_MEMBER,
    OK,
    STALE,
    CfgCas,
    CfgGet,
    ClientCore,
    Complete,
    DropData,
    PersistConfig,
    ReadData,
    ResetData,
    SendServer,
    ServerCore,
    ServerInfo,
    VolumeConfig,
    WriteData,
    choose_replicas,
    volume_zone,
)

CFG1 = VolumeConfig("v", 4096, 1, ("s0", "s1", "s2"), "s0")
SERVERS = [ServerInfo(f"s{i}", {"zone": "z0" if i < 5 else "z1", "rack": f"r{i % 3}"})
           for i in range(7)]


def _req(cfg: VolumeConfig, op: str, **kw: Any) -> dict[str, Any]:
    return {"op": op, "volume": cfg.volume_id, "epoch": cfg.epoch, "config": cfg.to_dict(), **kw}


def test_server_fences_older_epochs_and_learns_newer_ones() -> None:
    s = ServerCore("s1")
    reply, eff = s.on_request(_req(CFG1, "write", offset=0, data=b"x"))
    assert reply["status"] == OK
    assert eff == [PersistConfig(CFG1), WriteData("v", 0, b"x")]
    cfg2 = VolumeConfig("v", 4096, 2, ("s1", "s2", "s3"), "s1", "c2", 2, ("s3",))
    reply, eff = s.on_request(_req(cfg2, "fence"))
    assert reply["status"] == OK and eff == [PersistConfig(cfg2)]
    reply, eff = s.on_request(_req(CFG1, "write", offset=0, data=b"y"))
    assert reply == {"status": STALE, "epoch": 2} and eff == []
    # A restarted server that loaded its configuration still fences.
    s2 = ServerCore("s1")
    s2.load([cfg2])
    assert s2.on_request(_req(CFG1, "write", offset=0, data=b"y"))[0]["status"] == STALE
    # Planted bug: no fencing accepts the old writer.
    bad = ServerCore("s1", bug_no_fencing=True)
    bad.load([cfg2])
    assert bad.on_request(_req(CFG1, "write", offset=0, data=b"y"))[0]["status"] == OK


def test_a_dropped_volume_keeps_its_epoch_as_a_tombstone() -> None:
    """DeleteVolume's ``drop`` (at the epoch after the last record) removes the bytes; the
    configuration stays, so the writer of the last record is still refused."""
    s = ServerCore("s1")
    s.on_request(_req(CFG1, "write", offset=0, data=b"x"))
    gone = VolumeConfig("v", 4096, 2, CFG1.replicas, "s0")
    reply, eff = s.on_request(_req(gone, "drop"))
    assert reply["status"] == OK and eff == [PersistConfig(gone), DropData("v")]
    assert s.on_request(_req(CFG1, "write", offset=0, data=b"y")) == (
        {"status": STALE, "epoch": 2}, [])
    # A server the volume was rewired away from drops its old copy too; one that never held
    # the volume has nothing to drop and keeps no tombstone.
    away = ServerCore("s9")
    away.on_request(_req(VolumeConfig("v", 4096, 1, ("s9", "s1", "s2"), "s9"), "fence"))
    assert away.on_request(_req(gone, "drop")) == (
        {"status": OK, "epoch": 2}, [PersistConfig(gone), DropData("v")])
    never = ServerCore("s8")
    assert never.on_request(_req(gone, "drop")) == ({"status": OK, "epoch": 2}, [])
    assert "v" not in never.volumes
    assert never.on_request(_req(gone, "write", offset=0, data=b"y"))[0]["status"] == NOT_MEMBER


def test_a_new_replica_is_reset_once_when_it_learns_its_epoch() -> None:
    s = ServerCore("s3")
    cfg2 = VolumeConfig("v", 4096, 2, ("s0", "s1", "s3"), "s0", "c", 2, ("s3",))
    _, eff = s.on_request(_req(cfg2, "fence", reset=True))
    assert eff == [ResetData("v", 4096), PersistConfig(cfg2)]
    # The same fence again (a retry after a wait) must not wipe writes made since.
    assert s.on_request(_req(cfg2, "fence", reset=True))[1] == []
    # A mirror read asks for the allocation map too.
    s0 = ServerCore("s0")
    _, eff = s0.on_request(_req(cfg2, "mirror_read", offset=0, length=64))
    assert eff[-1] == ReadData("v", 0, 64, mirror=True)


def test_server_refuses_non_members_out_of_range_and_reads_from_catching_up() -> None:
    s = ServerCore("s9")
    assert s.on_request(_req(CFG1, "fence"))[0]["status"] == NOT_MEMBER
    s = ServerCore("s0")
    assert s.on_request(_req(CFG1, "write", offset=4095, data=b"ab"))[0]["status"] == INVALID
    assert s.on_request(_req(CFG1, "read", offset=-1, length=1))[0]["status"] == INVALID
    assert s.on_request({"op": "write"})[0]["status"] == INVALID
    cfg2 = VolumeConfig("v", 4096, 2, ("s0", "s1", "s3"), "s0", "c", 2, ("s3",))
    assert ServerCore("s3").on_request(_req(cfg2, "read", offset=0, length=1))[0][
        "status"] == "not_ready"


def _attach(c: ClientCore, cfg: VolumeConfig) -> list[Any]:
    acts = c.start(0)
    assert acts == [CfgGet("v")]
    acts = c.on_cfg(cfg, None, 1)
    assert isinstance(acts[0], CfgCas) and acts[0].new.attached_client == c.client_id
    new = acts[0].new
    acts = c.on_cfg(new, True, 2)
    fences = [a for a in acts if isinstance(a, SendServer)]
    assert {a.server for a in fences} == set(cfg.replicas)
    out: list[Any] = []
    for a in fences:
        out += c.on_server(a.rid, {"status": OK}, 3)
    assert c.phase == "ready" and c.fenced_epoch == new.epoch
    return out


def test_client_acknowledges_a_write_only_when_every_replica_answered() -> None:
    c = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(c, CFG1)
    acts = c.submit_write(1, 0, b"hello", 10)
    sends = [a for a in acts if isinstance(a, SendServer)]
    assert {a.server for a in sends} == {"s0", "s1", "s2"}
    assert all(a.request["op"] == "write" and a.request["epoch"] == 2 for a in sends)
    assert c.on_server(sends[0].rid, {"status": OK}, 11) == []
    assert c.on_server(sends[1].rid, {"status": OK}, 12) == []
    done = c.on_server(sends[2].rid, {"status": OK}, 13)
    assert done == [Complete(1, True, epoch=2, sent_ms=10)]


def test_a_silent_replica_is_rewired_and_the_write_resent_to_the_new_set() -> None:
    c = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(c, CFG1)
    sends = [a for a in c.submit_write(1, 0, b"x", 10) if isinstance(a, SendServer)]
    for a in sends:
        if a.server != "s2":
            assert c.on_server(a.rid, {"status": OK}, 11) == []
    acts = c.on_tick(10 + c.params.request_timeout_ms)
    cas = [a for a in acts if isinstance(a, CfgCas)]
    assert len(cas) == 1
    new = cas[0].new
    assert new.epoch == 3 and "s2" not in new.replicas and len(new.replicas) == 3
    assert new.primary == "s0" and new.catching_up == tuple(set(new.replicas) - {"s0", "s1"})
    acts = c.on_cfg(new, True, 300)
    fences = [a for a in acts if isinstance(a, SendServer)]
    acts = []
    for a in fences:
        acts += c.on_server(a.rid, {"status": OK}, 301)
    # Re-mirroring alternates with IO: a chunk is read from the primary, written to the new
    # replica, then the queued write goes out.
    assert [a.request.get("reset") for a in fences] == [
        True if a.server in new.catching_up else None for a in fences]
    (chunk_read,) = acts
    assert chunk_read.server == "s0" and chunk_read.request["op"] == "mirror_read"
    data = bytes(c.params.mirror_chunk_bytes)
    (chunk_write,) = c.on_server(chunk_read.rid, {"status": OK, "data": data}, 302)
    assert chunk_write.server in new.catching_up
    assert chunk_write.request["op"] == "mirror_write" and chunk_write.request["data"] == data
    acts = c.on_server(chunk_write.rid, {"status": OK}, 303)
    resent = [a for a in acts if isinstance(a, SendServer) and a.request["op"] == "write"]
    assert {a.server for a in resent} == set(new.replicas)  # the new replica too
    assert all(a.request["epoch"] == 3 for a in resent)


def test_a_client_told_stale_learns_it_is_deposed_and_fails_its_writes() -> None:
    c = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(c, CFG1)
    sends = [a for a in c.submit_write(1, 0, b"x", 10) if isinstance(a, SendServer)]
    acts: list[Any] = []
    for a in sends:
        acts += c.on_server(a.rid, {"status": STALE, "epoch": 3}, 11)
    assert acts == [CfgGet("v")]
    other = VolumeConfig("v", 4096, 3, CFG1.replicas, "s0", "c2", 3)
    assert c.on_cfg(other, None, 12) == [Complete(1, False, error="deposed")]
    assert c.submit_write(2, 0, b"y", 13) == [Complete(2, False, error="deposed")]


def test_a_write_past_the_end_is_refused_before_it_is_sent() -> None:
    c = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(c, CFG1)
    (done,) = c.submit_write(1, 4090, b"0123456789", 5)
    assert isinstance(done, Complete) and not done.ok and "past the end" in done.error


def test_new_replicas_prefer_the_zone_and_spread_racks() -> None:
    got = choose_replicas(SERVERS, ["s0"], set(), 3, random.Random(3))
    racks = {SERVERS[int(s[1:])].labels["rack"] for s in got}
    zones = {SERVERS[int(s[1:])].labels["zone"] for s in got}
    assert got[0] == "s0" and len(racks) == 3 and zones == {"z0"}


def test_the_volume_cell_is_placed_near_its_servers_zone_across_racks() -> None:
    # The store colony: 9 nodes in two zones, 3 racks each; the volume's servers are in z1.
    colony = [Candidate(f"n{i}", {"zone": "z0" if i < 4 else "z1", "rack": f"r{i % 3}",
                                   "power": f"p{i % 3}"}) for i in range(9)]
    servers = [ServerInfo(f"s{i}", {"zone": "z1", "rack": f"r{i}"}) for i in range(3)]
    zone = volume_zone(servers, ["s0", "s1", "s2"])
    assert zone == "z1"
    members = place_cell(colony, zone, replicas=5)
    by_id = {c.node_id: c for c in colony}
    in_zone = [m for m in members if by_id[m].labels["zone"] == "z1"]
    assert len(in_zone) == 5  # the zone has 5 nodes: all of them
    racks = [by_id[m].labels["rack"] for m in members]
    assert max(racks.count(r) for r in set(racks)) <= 2  # no rack holds a majority


def test_config_round_trips_and_rejects_a_primary_that_is_catching_up() -> None:
    cfg = VolumeConfig("v", 4096, 3, ("a", "b", "c"), "a", "c1", 2, ("c",))
    assert VolumeConfig.decode(cfg.encode()) == cfg
    bad = dict(cfg.to_dict(), primary="c")
    try:
        VolumeConfig.from_dict(bad)
    except Exception as exc:
        assert "primary" in str(exc)
    else:
        raise AssertionError("a catching-up primary was accepted")


def test_create_volume_refuses_a_size_out_of_range() -> None:
    import asyncio

    import pytest

    from cellcloud.volumes.client import create_volume
    from cellcloud.volumes.core import VolumeError

    class NoStore:  # the size is checked before the store is touched
        pass

    for size in (1024**3 - 1, 16_385 * 1024**3):
        with pytest.raises(VolumeError, match="outside"):
            asyncio.run(create_volume(NoStore(), "v", size, {}))  # type: ignore[arg-type]


def test_attach_without_force_is_refused_and_detach_frees_the_volume() -> None:
    a = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(a, CFG1)
    held = a.config
    assert held is not None
    b = ClientCore("c2", "v", SERVERS, random.Random(2))
    b.force = False
    b.start(10)
    assert b.on_cfg(held, None, 11) == [] and b.phase == "refused"
    assert b.submit_write(1, 0, b"x", 12) == [Complete(1, False, error="deposed")]
    (cas,) = a.detach(20)
    assert isinstance(cas, CfgCas) and cas.new.attached_client == ""
    assert cas.new.epoch == held.epoch + 1
    assert a.on_cfg(cas.new, True, 21) == [] and a.phase == "detached"
    c = ClientCore("c3", "v", SERVERS, random.Random(3))
    c.force = False
    c.start(30)
    (take,) = c.on_cfg(cas.new, None, 31)
    assert isinstance(take, CfgCas) and take.new.attached_client == "c3"


def test_non_overlapping_operations_fly_together_overlapping_ones_wait() -> None:
    from cellcloud.volumes.core import ClientParams

    c = ClientCore("c1", "v", SERVERS, random.Random(1), ClientParams(inflight_max=4))
    _attach(c, CFG1)
    w1 = [a for a in c.submit_write(1, 0, b"a" * 10, 5) if isinstance(a, SendServer)]
    w2 = [a for a in c.submit_write(2, 100, b"b" * 10, 5) if isinstance(a, SendServer)]
    assert len(w1) == len(w2) == 3  # both in flight
    assert c.submit_write(3, 5, b"c" * 10, 5) == []  # overlaps write 1: waits
    assert c.submit_read(4, 200, 10, 5) != []  # does not overlap: goes
    done: list[Any] = []
    for a in w1:
        done += c.on_server(a.rid, {"status": OK}, 6)
    assert done[0] == Complete(1, True, epoch=2, sent_ms=5)
    w3 = [a for a in done[1:] if isinstance(a, SendServer)]
    assert {a.server for a in w3} == {"s0", "s1", "s2"} and w3[0].request["offset"] == 5


def test_a_read_counts_only_once_every_complete_replica_confirmed_the_epoch() -> None:
    """Reads are fenced (docs/volumes.md): the primary's bytes are the answer, but the read
    completes only when the other complete replicas confirmed the reader's epoch; one that
    knows a newer epoch makes a deposed reader's read fail instead of returning stale bytes."""
    c = ClientCore("c1", "v", SERVERS, random.Random(1))
    _attach(c, CFG1)
    sends = [a for a in c.submit_read(1, 0, 5, 10) if isinstance(a, SendServer)]
    assert {(a.server, a.request["op"]) for a in sends} == {
        ("s0", "read"), ("s1", "check"), ("s2", "check")}
    by = {a.server: a for a in sends}
    assert c.on_server(by["s0"].rid, {"status": OK, "data": b"hello"}, 11) == []
    assert c.on_server(by["s1"].rid, {"status": OK}, 12) == []
    assert c.on_server(by["s2"].rid, {"status": OK}, 13) == [
        Complete(1, True, data=b"hello", epoch=2, sent_ms=10)]
    # Deposed without knowing it: the old primary still serves, a survivor says stale.
    sends = [a for a in c.submit_read(2, 0, 5, 20) if isinstance(a, SendServer)]
    acts: list[Any] = []
    for a in sends:
        reply = {"status": STALE, "epoch": 4} if a.server == "s1" else {
            "status": OK, "data": b"old!!"}
        acts += c.on_server(a.rid, reply, 21)
    assert acts == [CfgGet("v")]  # no Complete with the old bytes
    other = VolumeConfig("v", 4096, 4, ("s1", "s2", "s3"), "s1", "c2", 3, ("s3",))
    assert c.on_cfg(other, None, 22) == [Complete(2, False, error="deposed")]


def test_a_server_answers_a_check_by_its_epoch() -> None:
    s = ServerCore("s1")
    assert s.on_request(_req(CFG1, "check"))[0]["status"] == OK
    newer = VolumeConfig("v", 4096, 3, CFG1.replicas, "s0", "c2", 3)
    assert s.on_request(_req(newer, "fence"))[0]["status"] == OK
    reply, effects = s.on_request(_req(CFG1, "check"))
    assert reply == {"status": STALE, "epoch": 3} and effects == []


def test_group_commit_sends_the_writes_queued_during_a_round_as_one_round() -> None:
    from cellcloud.volumes.core import ClientParams

    c = ClientCore("c1", "v", SERVERS, random.Random(1),
                   ClientParams(inflight_max=8, write_batch_max=3, batch_bytes_max=64))
    _attach(c, CFG1)
    r1 = [a for a in c.submit_write(1, 0, b"a" * 8, 5) if isinstance(a, SendServer)]
    assert [a.request["op"] for a in r1] == ["write"] * 3  # alone: a plain write
    # While that round is in flight, writes wait (a read may go); then they go together.
    assert c.submit_write(2, 100, b"b" * 8, 6) == []
    assert c.submit_write(3, 200, b"c" * 8, 6) == []
    assert c.submit_write(4, 300, b"d" * 8, 6) == []
    assert c.submit_write(5, 400, b"e" * 8, 6) == []  # a fourth: past write_batch_max
    assert c.submit_read(6, 1000, 8, 6) != []
    done: list[Any] = []
    for a in r1:
        done += c.on_server(a.rid, {"status": OK}, 7)
    assert done[0] == Complete(1, True, epoch=2, sent_ms=5)
    r2 = [a for a in done[1:] if isinstance(a, SendServer)]
    assert {a.server for a in r2} == {"s0", "s1", "s2"}
    assert all(a.request["op"] == "write_batch" for a in r2)
    assert r2[0].request["writes"] == [[100, b"b" * 8], [200, b"c" * 8], [300, b"d" * 8]]
    done = []
    for a in r2[:2]:
        done += c.on_server(a.rid, {"status": OK}, 8)
    assert done == []  # a round is acknowledged only when every replica answered
    done = c.on_server(r2[2].rid, {"status": OK}, 9)
    assert done[:3] == [Complete(i, True, epoch=2, sent_ms=7) for i in (2, 3, 4)]
    r3 = [a for a in done[3:] if isinstance(a, SendServer)]
    assert [a.request["op"] for a in r3] == ["write"] * 3 and r3[0].request["offset"] == 400
    assert c.batches == 1


def test_a_server_applies_a_write_batch_as_one_request() -> None:
    s = ServerCore("s1")
    reply, effects = s.on_request(_req(CFG1, "write_batch", writes=[[0, b"ab"], [10, b"cd"]]))
    assert reply["status"] == OK
    assert [e for e in effects if isinstance(e, WriteData)] == [
        WriteData("v", 0, b"ab"), WriteData("v", 10, b"cd")]
    for bad in ([], [[0, b"x"], [4095, b"yz"]], [[0, "str"]], [[0]] * 2):
        assert s.on_request(_req(CFG1, "write_batch", writes=bad))[0]["status"] == INVALID


def test_a_snapshot_is_frozen_by_a_complete_replica_of_the_current_epoch() -> None:
    from cellcloud.volumes.core import NOT_READY, DropFrozen, FreezeData, ReadFrozen

    s = ServerCore("s0")
    reply, effects = s.on_request(_req(CFG1, "snapshot", snapshot="snap-0123456789abcdef0"))
    assert reply["status"] == OK and effects[-1] == FreezeData("v", "snap-0123456789abcdef0")
    newer = VolumeConfig("v", 4096, 2, ("s0", "s1", "s3"), "s0", catching_up=("s3",))
    s.on_request(_req(newer, "fence"))
    # an older configuration's snapshot request is stale (it may miss newer writes' order)
    assert s.on_request(_req(CFG1, "snapshot", snapshot="snap-0123456789abcdef0"))[0] == {
        "status": STALE, "epoch": 2}
    # a replica still being re-mirrored holds no complete copy
    assert ServerCore("s3").on_request(_req(newer, "snapshot", snapshot="snap-01234567"))[
        0]["status"] == NOT_READY
    assert s.on_request(_req(newer, "snapshot", snapshot="../etc"))[0]["status"] == INVALID
    # the frozen copy is read and dropped without the fence (it does not change)
    read = {"op": "snapshot_read", "volume": "v", "snapshot": "snap-01234567", "offset": 0,
            "length": 4096}
    assert s.on_request(read) == ({"status": OK}, [ReadFrozen("v", "snap-01234567", 0, 4096)])
    assert s.on_request({**read, "length": 2 << 20})[0]["status"] == INVALID
    assert s.on_request({"op": "snapshot_drop", "volume": "v", "snapshot": "snap-01234567"}
                        ) == ({"status": OK}, [DropFrozen("v", "snap-01234567")])
