"""A volume attached as a block device with ext4 on it (volumes/attach.py, issue #19): the
volume's bytes as one FUSE file served from a FileBlockStore, a loop device over it, ext4 made
on the first attach. Written files come back after a detach and a new attach; an fsync in the
ext4 reaches ``BlockStore.flush`` before it returns, and the data is in the store by then; a
write past the end of the device is refused as a block device refuses it."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellcloud.core.ec2_query import Ec2Error
from cellcloud.volumes.attach import (
    AttachError,
    VolumeAttachment,
    attach_file,
    attach_volume,
    detach,
    detach_volume,
)
from cellcloud.volumes.blockdev import FileBlockStore, StoreBusy

pytestmark = pytest.mark.integration
SIZE = 64 * 1024 * 1024


def _mountinfo(mount_at: str) -> tuple[str, str] | None:
    """(fs type, source) of the mount at ``mount_at``, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == mount_at:
                fstype, source = right.split()[:2]
                return fstype, source
    return None


def test_attach_write_fsync_detach_reattach_read_back(tmp_path: Path) -> None:
    backing = str(tmp_path / "vol.img")
    fuse_dir, mnt = str(tmp_path / "fuse"), str(tmp_path / "mnt")
    stats = str(tmp_path / "stats.json")
    marker = os.urandom(16).hex().encode() * 64  # 2 KiB nobody else writes

    async def first() -> None:
        att = await attach_file(backing, SIZE, fuse_dir, mnt, stats_path=stats)
        try:
            assert att.formatted  # the first attach made the filesystem
            assert _mountinfo(mnt) == ("ext4", att.loop_device)
            assert att.loop_device.startswith("/dev/loop")
            assert _mountinfo(fuse_dir) is not None  # the FUSE file under it
            os.makedirs(f"{mnt}/dir")
            for i in range(20):
                Path(f"{mnt}/dir/f{i}").write_bytes(b"%d\n" % i * 1000)
            before = att.stats().get("store", {}).get("flushes", 0)
            fd = os.open(f"{mnt}/marked", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, marker)
                os.fsync(fd)  # ext4 → loop → FUSE_FSYNC → BlockStore.flush, before it returns
            finally:
                os.close(fd)
            assert att.stats()["store"]["flushes"] > before  # counted by the BlockStore
            with open(backing, "rb") as f:  # the store holds the bytes once fsync returned
                assert marker in f.read()
        finally:
            await detach(att)
        assert _mountinfo(mnt) is None and _mountinfo(fuse_dir) is None
        assert att.server.returncode is not None

    async def second() -> None:
        att = await attach_file(backing, SIZE, fuse_dir, mnt)
        try:
            assert not att.formatted  # the filesystem was kept
            assert Path(f"{mnt}/marked").read_bytes() == marker
            for i in range(20):
                assert Path(f"{mnt}/dir/f{i}").read_bytes() == b"%d\n" % i * 1000
        finally:
            await detach(att)

    asyncio.run(first())
    asyncio.run(second())


def test_a_second_attach_of_the_same_volume_is_refused(tmp_path: Path) -> None:
    backing = str(tmp_path / "vol.img")

    async def run() -> None:
        att = await attach_file(backing, SIZE, str(tmp_path / "f1"), str(tmp_path / "m1"))
        try:
            with pytest.raises(AttachError, match="one writer at a time"):
                await attach_file(backing, SIZE, str(tmp_path / "f2"), str(tmp_path / "m2"))
            assert _mountinfo(str(tmp_path / "f2")) is None
            assert _mountinfo(str(tmp_path / "m1")) == ("ext4", att.loop_device)
        finally:
            await detach(att)

    asyncio.run(run())


def test_writes_past_the_end_are_refused(tmp_path: Path) -> None:
    backing = str(tmp_path / "vol.img")
    fuse_dir, mnt = str(tmp_path / "fuse"), str(tmp_path / "mnt")

    async def run() -> None:
        att = await attach_file(backing, SIZE, fuse_dir, mnt)
        try:
            with open(f"/sys/block/{os.path.basename(att.loop_device)}/size") as f:
                assert int(f.read()) * 512 == SIZE  # the device is the volume's size
            fd = os.open(att.loop_device, os.O_WRONLY)
            try:
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, b"x" * 4096, SIZE)  # the block layer: past the end
                assert e.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            fd = os.open(f"{fuse_dir}/volume", os.O_WRONLY)
            try:
                # The FUSE file as a block device answers: a write that crosses the end is
                # short (what fits), one at the end is ENOSPC.
                assert os.pwrite(fd, b"x" * 512, SIZE - 256) == 256
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, b"x" * 512, SIZE)
                assert e.value.errno == errno.ENOSPC
                with pytest.raises(OSError) as e:
                    os.ftruncate(fd, SIZE * 2)
                assert e.value.errno == errno.EPERM
            finally:
                os.close(fd)
        finally:
            await detach(att)
        assert os.path.getsize(backing) == SIZE

    asyncio.run(run())


def test_file_block_store(tmp_path: Path) -> None:
    async def run() -> None:
        s = FileBlockStore(str(tmp_path / "b"), 4096)
        await s.write(1000, b"abc")
        await s.flush()
        assert await s.read(999, 5) == b"\0abc\0"
        for off, n in [(4095, 2), (-1, 1), (5000, 0)]:
            with pytest.raises(ValueError):
                await s.read(off, n)
        with pytest.raises(ValueError):
            await s.write(4094, b"xyz")
        assert s.counters["flushes"] == 1 and s.counters["bytes_written"] == 3
        with pytest.raises(StoreBusy):  # one writer at a time
            FileBlockStore(str(tmp_path / "b"), 4096)
        s.close()
        FileBlockStore(str(tmp_path / "b"), 4096).close()  # free again once closed
        with pytest.raises(ValueError, match="not the volume's"):
            FileBlockStore(str(tmp_path / "b"), 8192)
        with pytest.raises(ValueError):
            FileBlockStore(str(tmp_path / "c"), 1000)

    asyncio.run(run())


def test_a_volume_of_the_api_attached_under_its_record(tmp_path: Path) -> None:
    """CreateVolume → attach (the record says in-use, DeleteVolume is VolumeInUse, a second
    attach is refused at the record before any mount) → write → detach (available) → attach
    again: the bytes are there → detach → DeleteVolume."""
    from cellcloud.control.configstore import SqliteConfigStore
    from tests.control.test_ec2 import A, Api

    api = Api(SqliteConfigStore(str(tmp_path / "config.db")))
    vid = api.create(1)["VolumeId"]
    data, run = str(tmp_path / "data"), str(tmp_path / "run")

    async def attach(mnt: str) -> VolumeAttachment:
        return await attach_volume(api.ec2, A, vid, "task/t1", data, mnt, run)

    va = asyncio.run(attach(str(tmp_path / "m1")))
    try:
        assert va.attach_epoch == 1 and va.attached.formatted
        v = api.ok("DescribeVolumes", {"VolumeIds": [vid]})["Volumes"][0]
        assert v["State"] == "in-use" and v["Attachments"][0]["InstanceId"] == "task/t1"
        assert api.err("DeleteVolume", {"VolumeId": vid})[0] == "VolumeInUse"
        with pytest.raises(Ec2Error) as e:
            asyncio.run(attach(str(tmp_path / "m2")))
        assert e.value.code == "VolumeInUse"
        assert _mountinfo(str(tmp_path / "m2")) is None
        with open(tmp_path / "m1" / "data", "wb") as f:
            f.write(b"kept\n")
            os.fsync(f.fileno())
        with open(f"/sys/block/{os.path.basename(va.attached.loop_device)}/size") as f:
            assert int(f.read()) * 512 == 1024 ** 3  # sized as the volume's Size (GiB)
    finally:
        asyncio.run(detach_volume(api.ec2, va))
    assert api.ok("DescribeVolumes", {"VolumeIds": [vid]})["Volumes"][0]["State"] == "available"
    va = asyncio.run(attach(str(tmp_path / "m3")))
    try:
        assert va.attach_epoch == 2 and not va.attached.formatted
        assert (tmp_path / "m3" / "data").read_bytes() == b"kept\n"
    finally:
        asyncio.run(detach_volume(api.ec2, va))
    api.ok("DeleteVolume", {"VolumeId": vid})


_FAILING_STORE = """
import sys
from cellcloud.volumes.fusefile import serve

class Failing:
    size_bytes = 1 << 20
    async def read(self, offset, length):
        raise RuntimeError("the store lost its replicas")
    async def write(self, offset, data):
        raise OSError(5, "no quorum")
    async def flush(self):
        raise RuntimeError("no quorum")

serve(Failing(), sys.argv[1], ready_fd=int(sys.argv[2]))
"""


def test_a_failing_store_is_eio(tmp_path: Path) -> None:
    """Whatever a BlockStore raises, the file answers EIO, as a failing disk does (never a
    hang, never another errno)."""
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", _FAILING_STORE, str(mnt), str(w)],
                            pass_fds=(w,), stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        assert os.read(r, 100).startswith(b'{"ready"')
        fd = os.open(mnt / "volume", os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)  # O_DIRECT: an aligned buffer
        try:
            for call in (lambda: os.preadv(fd, [buf], 0), lambda: os.pwritev(fd, [buf], 0),
                         lambda: os.fsync(fd)):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
    finally:
        os.close(r)
        subprocess.run(["umount", str(mnt)], check=False)
        proc.wait(timeout=60)
