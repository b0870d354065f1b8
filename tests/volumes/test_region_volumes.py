"""A region with storage servers (``cellcloud up --storage-servers 4 --store-colony ...``,
issue #19): the supervisor runs them (mTLS, a rack each); boto3's ``CreateVolume`` makes the
volume's config cell with 3 replicas on them; the volume attached over the region's mTLS as
role ``volume`` holds an ext4 whose fsynced file is on the replicas; ``DeleteVolume`` removes
the config and the replicas' bytes; a snapshot of it is refused by name."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cellcloud.volumes.attach import ReplicatedVolume, attach_replicated, detach
from cellcloud.volumes.client import cell_of, load_servers
from cellcloud.volumes.core import CONFIG_KEY, VolumeConfig
from tests.integration.conftest import running_region

from .harness import Stack

pytestmark = pytest.mark.integration


def _config(stack: Stack, volume_id: str) -> VolumeConfig | None:
    async def get() -> VolumeConfig | None:
        store = stack.store()
        try:
            raw = await store.get(cell_of(volume_id), CONFIG_KEY)
            return VolumeConfig.decode(raw) if isinstance(raw, bytes) else None
        finally:
            await store.close()

    return asyncio.run(get())


def test_a_region_with_storage_servers_replicates_its_volumes(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    colony = Stack(str(tmp_path), store_nodes=3, servers=0)
    try:
        with running_region(tmp_path_factory, "storage-region", "--agents-per-cell", "1",
                            "--storage-servers", "4", "--store-colony",
                            colony.colony_path) as region:
            sd = region.state_dir
            comps: Any = region.region_json()["components"]
            assert sorted(n for n, c in comps.items() if c["kind"] == "storage") == [
                f"storage-{i}" for i in range(4)]
            servers_path = os.path.join(sd, "storage", "servers.json")
            servers = load_servers(servers_path)
            assert {s.labels["rack"] for s in servers.values()} == {f"rack-{i}" for i in range(4)}
            ec2: Any = boto3.client(
                "ec2", endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
                aws_access_key_id=str(region.doc["access_key_id"]),
                aws_secret_access_key=str(region.doc["secret_access_key"]),
                config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                              read_timeout=60))
            vid = ec2.create_volume(AvailabilityZone=f"{region.doc['region']}a",
                                    Size=1)["VolumeId"]
            cfg = _config(colony, vid)
            assert cfg is not None and cfg.epoch == 1 and cfg.size_bytes == 1024**3
            assert len(cfg.replicas) == 3 and set(cfg.replicas) <= set(servers)

            # Attached as the host-side volume process would: mTLS as role "volume".
            mnt, fuse_dir = str(tmp_path / "mnt"), str(tmp_path / "fuse")
            vol = ReplicatedVolume(vid, colony.colony_path, servers_path, "host-1",
                                   pki_dir=sd, region=str(region.doc["region"]))
            att = asyncio.run(attach_replicated(vol, fuse_dir, mnt))
            try:
                assert att.formatted
                marker = os.urandom(32).hex().encode() * 32
                fd = os.open(f"{mnt}/kept", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, marker)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                for sid in cfg.replicas:  # durable on every replica once fsync returned
                    with open(os.path.join(sd, "storage", sid, f"{vid}.img"), "rb") as f:
                        assert marker in f.read()
            finally:
                asyncio.run(detach(att))

            with pytest.raises(ClientError) as e:
                ec2.create_snapshot(VolumeId=vid)
            assert e.value.response["Error"]["Code"] == "UnsupportedOperation"
            ec2.delete_volume(VolumeId=vid)
            assert _config(colony, vid) is None
            for sid in cfg.replicas:
                assert not os.path.exists(os.path.join(sd, "storage", sid, f"{vid}.img"))
            with pytest.raises(ClientError) as e:
                ec2.describe_volumes(VolumeIds=[vid])
            assert e.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
    finally:
        colony.stop_all()
