"""A replicated volume attached as ext4 (issue #19's Done-when at host level): the FUSE file
served by a ``VolumeClient`` over storage servers, a loop device, ext4. Files written and
fsynced in the mounted filesystem; a storage server (the volume's primary) killed with
SIGKILL; the writes go on after a pause (the client rewires the volume onto the spare server);
unmounted, mounted again by a new client: every fsynced file reads back intact."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from cellcloud.volumes.attach import AttachError, ReplicatedVolume, attach_replicated, detach
from cellcloud.volumes.client import cell_of, create_volume
from cellcloud.volumes.core import CONFIG_KEY, VolumeConfig

from .harness import Stack

pytestmark = pytest.mark.integration
GIB = 1024**3
FILE_BYTES = 64 * 1024


def _mountinfo(mount_at: str) -> tuple[str, str] | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == mount_at:
                fstype, source = right.split()[:2]
                return fstype, source
    return None


def _write_fsynced(path: str, data: bytes) -> float:
    """Write ``data`` to a new file and fsync it; the seconds it took."""
    t0 = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0


def test_ext4_on_a_replicated_volume_survives_a_storage_server_kill(tmp_path: Path) -> None:
    # 4 servers for 3 replicas: the spare is where the rewire puts the lost replica.
    stack = Stack(str(tmp_path), store_nodes=3, servers=4)
    try:
        servers_path = str(tmp_path / "servers.json")
        with open(servers_path, "w") as f:
            json.dump({sid: {"host": a.host, "port": a.port, "labels": a.labels}
                       for sid, a in stack.servers.items()}, f)

        async def create() -> VolumeConfig:
            store = stack.store()
            try:
                return await create_volume(store, "vol-ext4", GIB, stack.servers,
                                           rng=random.Random(7))
            finally:
                await store.close()

        async def config() -> VolumeConfig:
            store = stack.store()
            try:
                raw = await store.get(cell_of("vol-ext4"), CONFIG_KEY)
                assert isinstance(raw, bytes)
                return VolumeConfig.decode(raw)
            finally:
                await store.close()

        cfg = asyncio.run(create())
        mnt, fuse_dir = str(tmp_path / "mnt"), str(tmp_path / "fuse")
        vol = ReplicatedVolume("vol-ext4", stack.colony_path, servers_path, "host-a")
        rng = random.Random(1)
        written: dict[str, str] = {}  # file name -> sha256 of what was fsynced
        pauses: list[float] = []

        twenty_done, killed = threading.Event(), threading.Event()

        def writer() -> None:  # each file written and fsynced before the next
            for i in range(60):
                data = rng.randbytes(FILE_BYTES)
                took = _write_fsynced(f"{mnt}/f{i}", data)
                written[f"f{i}"] = hashlib.sha256(data).hexdigest()
                if i >= 20:
                    pauses.append(took)
                if i == 19:  # the next 40 are written after the kill
                    twenty_done.set()
                    assert killed.wait(120)

        att = asyncio.run(attach_replicated(vol, fuse_dir, mnt))
        try:
            assert att.formatted and _mountinfo(mnt) == ("ext4", att.loop_device)
            thread = threading.Thread(target=writer)
            thread.start()
            assert twenty_done.wait(120)
            stack.kill9(cfg.primary)  # the volume's primary, under the mounted ext4
            killed.set()
            thread.join(300)
            assert not thread.is_alive() and len(written) == 60
        finally:
            asyncio.run(detach(att))
        assert att.server.returncode == 0  # the FUSE process detached its client and left

        after = asyncio.run(config())
        assert cfg.primary not in after.replicas  # the writes went on over a rewired volume
        assert after.epoch > cfg.epoch + 1 and after.attached_client == ""
        print(f"longest fsync after the kill: {max(pauses) * 1000:.0f} ms "
              f"(median {sorted(pauses)[len(pauses) // 2] * 1000:.0f} ms)")

        vol2 = ReplicatedVolume("vol-ext4", stack.colony_path, servers_path, "host-b")
        att = asyncio.run(attach_replicated(vol2, fuse_dir, mnt))
        try:
            assert not att.formatted  # the filesystem was kept
            for name, digest in written.items():
                assert hashlib.sha256(Path(f"{mnt}/{name}").read_bytes()).hexdigest() == digest
        finally:
            asyncio.run(detach(att))

        # A volume the store has no cell of: the FUSE process gives up, says why, and mounts
        # nothing (a missing cell and an unreachable one look alike to the store client).
        ghost = ReplicatedVolume("vol-none", stack.colony_path, servers_path, "host-c",
                                 attach_timeout_s=2)
        with pytest.raises(AttachError, match="no such volume"):
            asyncio.run(attach_replicated(ghost, str(tmp_path / "fuse2"), str(tmp_path / "m2")))
        assert _mountinfo(str(tmp_path / "fuse2")) is None
    finally:
        stack.stop_all()
