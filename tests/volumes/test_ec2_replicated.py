"""The EC2 API over replicated storage (control/ec2.py with a ``RegionVolumes``), without a
region: a store colony and 4 storage servers on loopback. CreateVolume makes the config cell
(idempotent by ClientToken: one volume, one cell); a volume that cannot be placed is
``InsufficientVolumeCapacity`` and leaves no record; ``attach_volume`` mounts it through a
``VolumeClient`` attached as ``<target>@<attach_epoch>``; DeleteVolume removes the config and
the replicas' bytes, and the last writer stays fenced on every replica."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from cellcloud import transport
from cellcloud.control.configstore import SqliteConfigStore
from cellcloud.volumes.attach import StorageLinks, attach_volume, detach_volume
from cellcloud.volumes.client import RegionVolumes, cell_of
from cellcloud.volumes.core import CONFIG_KEY, VolumeConfig
from tests.control.test_ec2 import ZONE, A, Api

from .harness import Stack

pytestmark = pytest.mark.integration


def _servers_file(path: str, stack: Stack, ids: list[str]) -> str:
    with open(path, "w") as f:
        json.dump({sid: {"host": a.host, "port": a.port, "labels": a.labels}
                   for sid, a in stack.servers.items() if sid in ids}, f)
    return path


def test_ec2_volumes_on_storage_servers(tmp_path: Path) -> None:
    stack = Stack(str(tmp_path), store_nodes=3, servers=4)
    try:
        servers = _servers_file(str(tmp_path / "servers.json"), stack, list(stack.servers))
        api = Api(SqliteConfigStore(str(tmp_path / "config.db")), str(tmp_path / "data"))
        region_volumes = api.ec2.volumes = RegionVolumes(stack.colony_path, servers)

        def config(vid: str) -> VolumeConfig | None:
            async def get() -> VolumeConfig | None:
                store = stack.store()
                try:
                    raw = await store.get(cell_of(vid), CONFIG_KEY)
                    return VolumeConfig.decode(raw) if isinstance(raw, bytes) else None
                finally:
                    await store.close()
            return asyncio.run(get())

        vid = api.create(1, ClientToken="tok-1")["VolumeId"]
        assert api.create(1, ClientToken="tok-1")["VolumeId"] == vid  # one volume, one cell
        cfg = config(vid)
        assert cfg is not None and cfg.epoch == 1 and len(cfg.replicas) == 3

        # Too few servers for 3 replicas: refused before any record is made.
        api.ec2.volumes = RegionVolumes(stack.colony_path, _servers_file(
            str(tmp_path / "two.json"), stack, ["s0", "s1"]))
        assert api.err("CreateVolume", {"AvailabilityZone": ZONE, "Size": 1}
                       )[0] == "InsufficientVolumeCapacity"
        assert [v["VolumeId"] for v in api.ok("DescribeVolumes")["Volumes"]] == [vid]
        api.ec2.volumes = region_volumes

        links = StorageLinks(stack.colony_path, servers)
        va = asyncio.run(attach_volume(api.ec2, A, vid, "task/t1", str(tmp_path / "data"),
                                       str(tmp_path / "mnt"), str(tmp_path / "run"), links))
        try:
            attached = config(vid)
            assert attached is not None and attached.attached_client == "task/t1@1"
            with open(tmp_path / "mnt" / "kept", "wb") as f:
                f.write(b"replicated\n")
                os.fsync(f.fileno())
            assert api.err("DeleteVolume", {"VolumeId": vid})[0] == "VolumeInUse"
        finally:
            asyncio.run(detach_volume(api.ec2, va))
        last = config(vid)
        assert last is not None and last.attached_client == ""
        assert not os.path.exists(tmp_path / "data" / A / f"{vid}.img")  # not a local file

        api.ok("DeleteVolume", {"VolumeId": vid})
        assert config(vid) is None
        for sid in last.replicas:
            assert not os.path.exists(tmp_path / sid / f"{vid}.img")

        async def write_as_last_writer(sid: str) -> str:
            addr = stack.servers[sid]
            c = transport.Client(addr.host, addr.port)
            try:
                reply = await c.call("volume", {
                    "op": "write", "volume": vid, "epoch": last.epoch,
                    "config": last.to_dict(), "offset": 0, "data": b"x"}, timeout_s=30)
                return str(reply["status"])
            finally:
                await c.close()

        for sid in last.replicas:  # the tombstone fences the volume's last configuration
            assert asyncio.run(write_as_last_writer(sid)) == "stale"
        one = last.replicas[0]  # durably: after a restart too
        stack.kill9(one)
        stack.start_server(one, stack.servers[one].labels)
        assert asyncio.run(write_as_last_writer(one)) == "stale"
        assert not os.path.exists(tmp_path / one / f"{vid}.img")
        api.loop.run_until_complete(region_volumes.close())
    finally:
        stack.stop_all()


def test_a_snapshot_of_an_attached_replicated_volume_restores_its_point_in_time(
        tmp_path: Path) -> None:
    """CreateSnapshot of a replicated volume while its writer is attached and writing: the
    snapshot holds every write acknowledged before the call and none made after it; a volume
    created from it (replicated too) reads back exactly that point."""
    from cellcloud.store.client import StoreClient
    from cellcloud.volumes.client import VolumeClient, load_servers

    stack = Stack(str(tmp_path), store_nodes=3, servers=4)
    api = Api(SqliteConfigStore(str(tmp_path / "config.db")), str(tmp_path / "data"))
    run = api.loop.run_until_complete
    store = None
    try:
        servers = _servers_file(str(tmp_path / "servers.json"), stack, list(stack.servers))
        region_volumes = api.ec2.volumes = RegionVolumes(stack.colony_path, servers)
        vid = api.create(1)["VolumeId"]
        rec = run(api.ec2.attach(A, vid, "task/t1"))
        store = StoreClient.from_file(stack.colony_path)

        def client(volume_id: str, name: str) -> VolumeClient:
            vc = VolumeClient(volume_id, store, load_servers(servers), client_id=name)
            run(vc.attach())
            return vc

        writer = client(vid, f"task/t1@{rec['attach_epoch']}")
        mib = 1 << 20
        before = {i * 3 * mib + 512 * i: bytes([i + 1]) * 8192 for i in range(12)}
        before[900 * mib] = b"far" * 1000  # a sparse volume: most of it holes
        for off, data in before.items():
            run(writer.write(off, data))
        sid = api.ok("CreateSnapshot", {"VolumeId": vid})["SnapshotId"]  # attached: allowed
        after = {off: b"\xee" * len(data) for off, data in list(before.items())[:6]}
        after.update({(40 + i) * mib: b"\xdd" * 4096 for i in range(6)})
        for off, data in after.items():  # written after the snapshot's point
            run(writer.write(off, data))

        api.wait_copies()
        (snap,) = api.ok("DescribeSnapshots", {"SnapshotIds": [sid]})["Snapshots"]
        assert snap["State"] == "completed", snap
        assert not [p for p in tmp_path.glob("s*/*.frozen")]  # the frozen copy was dropped

        async def frozen_by() -> list[str]:  # the servers that made a frozen copy
            out = []
            for sid, addr in stack.servers.items():
                c = transport.Client(addr.host, addr.port)
                try:
                    if (await c.call("stats", {}, timeout_s=30))["snapshots"]:
                        out.append(sid)
                finally:
                    await c.close()
            return out

        assert len(run(frozen_by())) == 1
        restored = api.ok("CreateVolume", {"AvailabilityZone": ZONE, "SnapshotId": sid})
        assert restored["State"] == "creating" and restored["SnapshotId"] == sid
        api.wait_copies()
        (vol,) = api.ok("DescribeVolumes", {"VolumeIds": [restored["VolumeId"]]})["Volumes"]
        assert vol["State"] == "available", vol
        check = client(restored["VolumeId"], "check")  # replicated: it has a config cell
        for off, data in before.items():
            assert run(check.read(off, len(data))) == data, off
        for off, data in after.items():
            if off not in before:
                assert run(check.read(off, len(data))) == bytes(len(data)), off
        for off, data in after.items():  # the source has moved on
            assert run(writer.read(off, len(data))) == data
        run(check.close())
        run(writer.close())
        run(region_volumes.close())
    finally:
        if store is not None:
            run(store.close())
        api.close()
        stack.stop_all()
