"""A region with storage servers (``cellcloud up --storage-servers 4 --store-colony ...``,
issue #19): the supervisor runs them (mTLS, a rack each); boto3's ``CreateVolume`` makes the
volume's config cell with 3 replicas on them; the volume attached over the region's mTLS as
role ``volume`` (``cellcloud volume attach``) holds an ext4 whose fsynced files are on the
replicas; a storage server killed with SIGKILL under it is a pause in the writes; attached
again, every fsynced file reads back intact; ``DeleteVolume`` removes the config and the
replicas' bytes; a snapshot of it completes (frozen on a replica, copied over mTLS)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cellcloud.volumes.client import cell_of, load_servers
from cellcloud.volumes.core import CONFIG_KEY, VolumeConfig
from tests.integration.conftest import running_region

from .harness import Stack

pytestmark = pytest.mark.integration


def _write_fsynced(path: str, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def _attach(state_dir: str, volume_id: str, mount_at: str
            ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``cellcloud volume attach`` in the background, once it printed its mounted line."""
    proc = subprocess.Popen([sys.executable, "-m", "cellcloud", "volume", "attach", volume_id,
                             "--at", mount_at, "--state-dir", state_dir],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise AssertionError("cellcloud volume attach did not mount")
    doc: dict[str, Any] = json.loads(line)
    return proc, doc


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

            # `cellcloud volume attach` (the operator's host-side attach): the control
            # plane's record, then FUSE → loop → ext4, the FUSE process's links to the
            # storage servers mTLS as role "volume".
            mnt = str(tmp_path / "mnt")
            rng = random.Random(3)
            written: dict[str, str] = {}
            proc, line = _attach(sd, vid, mnt)
            try:
                assert line["attach_epoch"] == 1 and line["mounted_at"] == mnt
                during = _config(colony, vid)
                assert during is not None and during.attached_client.endswith("@1")
                for i in range(10):
                    written[f"f{i}"] = _write_fsynced(f"{mnt}/f{i}", rng.randbytes(16384))
                marker = open(f"{mnt}/f0", "rb").read()
                for sid in cfg.replicas:  # durable on every replica once fsync returned
                    with open(os.path.join(sd, "storage", sid, f"{vid}.img"), "rb") as f:
                        assert marker in f.read()
                # A storage server killed under the mounted ext4 (the supervisor restarts
                # it): the writes go on after a pause.
                pid = int(comps[cfg.primary]["pid"])
                os.kill(pid, signal.SIGKILL)
                for i in range(10, 20):
                    written[f"f{i}"] = _write_fsynced(f"{mnt}/f{i}", rng.randbytes(16384))
            finally:
                proc.send_signal(signal.SIGTERM)  # unmount, detach
                assert proc.wait(120) == 0
            after = _config(colony, vid)
            assert after is not None and cfg.primary not in after.replicas
            assert after.attached_client == ""
            v = ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
            assert v["State"] == "available" and not v["Attachments"]
            proc, line = _attach(sd, vid, mnt)  # again: every fsynced file is there
            try:
                assert line["attach_epoch"] == 2
                for name, digest in written.items():
                    assert hashlib.sha256(Path(f"{mnt}/{name}").read_bytes()
                                          ).hexdigest() == digest
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(120) == 0

            # A snapshot of it: frozen on a replica, copied by the control plane over mTLS.
            snap_id = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
            deadline = time.monotonic() + 60
            while (state := ec2.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0][
                    "State"]) == "pending" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert state == "completed"
            ec2.delete_volume(VolumeId=vid)
            assert _config(colony, vid) is None
            for sid in servers:  # the server the volume was rewired away from too
                assert not os.path.exists(os.path.join(sd, "storage", sid, f"{vid}.img"))
            with pytest.raises(ClientError) as e:
                ec2.describe_volumes(VolumeIds=[vid])
            assert e.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
    finally:
        colony.stop_all()
