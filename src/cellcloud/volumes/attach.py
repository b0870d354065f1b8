"""Attach a volume on this host as a block device with a filesystem on it (issue #19,
docs/volumes.md#api-and-attachment): the volume's bytes as one FUSE file (volumes/fusefile.py,
its own process), a loop device over that file (direct I/O when the kernel takes it), ext4
made on the first attach, mounted at a path. Detach undoes it in reverse. Root only.

The chain for durability: fsync in the ext4 → the block layer's flush → the loop device
fsyncs its backing file → FUSE_FSYNC → ``BlockStore.flush`` (tests/volumes/test_attach.py
counts it). One writer at a time is the caller's to hold: the volume's record in the
configuration store names the attachment and its ``attach_epoch`` (control/ec2.py ``attach``);
:func:`attach_volume` takes the record first (through :class:`AttachmentRecords`, which
control/ec2.py's ``Ec2`` is) and gives it back if the mount fails; :func:`attach_file` mounts
what it is told to.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

from .blockdev import volume_file
from .fusefile import FILE_NAME

command_timeout_s = 120.0  # losetup, mkfs, mount, umount: each
fuse_ready_timeout_s = 60.0  # the FUSE process mounted its file
fuse_exit_timeout_s = 30.0  # the FUSE process left once its mount went
busy_retry_interval_s = 0.05  # a busy FUSE mount (the loop device still closing) is retried


class AttachError(Exception):
    pass


@dataclass
class Attached:
    mount_at: str
    fuse_dir: str
    loop_device: str
    direct_io: bool  # the loop device does direct I/O to the FUSE file
    formatted: bool  # this attach made the filesystem (the first attach)
    #: the FUSE process: a plain child, tied to no event loop (an attachment outlives the
    #: loop that made it)
    server: subprocess.Popen[bytes]
    stats_path: str | None = None
    steps: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """The FUSE process's counters as of its last fsync (``stats_path`` given)."""
        if not self.stats_path or not os.path.exists(self.stats_path):
            return {}
        with open(self.stats_path) as f:
            out: dict[str, Any] = json.load(f)
        return out


async def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), command_timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AttachError(f"{argv[0]} took longer than {command_timeout_s} s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode not in ok:
        raise AttachError(f"{' '.join(argv)} failed ({proc.returncode}): {text[-500:]}")
    return int(proc.returncode or 0), text


@dataclass(frozen=True)
class ReplicatedVolume:
    """A replicated volume as the FUSE process reaches it (volumes/client.py): its id, the
    store colony holding its config cell, its storage servers, the client id it attaches as,
    and the region's PKI (mutual TLS to the storage servers as role ``volume``) if any."""

    volume_id: str
    colony_path: str
    servers_path: str
    client_id: str
    pki_dir: str = ""
    region: str = "cc-local-1"
    attach_timeout_s: float | None = None  # None: fusefile's volume_attach_timeout_s

    def argv(self) -> list[str]:
        out = ["--volume-id", self.volume_id, "--colony", self.colony_path, "--servers",
               self.servers_path, "--client-id", self.client_id]
        if self.attach_timeout_s is not None:
            out += ["--attach-timeout-s", str(self.attach_timeout_s)]
        if self.pki_dir:
            out += ["--pki-dir", self.pki_dir, "--region", self.region]
        return out


async def attach_file(path: str, size_bytes: int, fuse_dir: str, mount_at: str, *,
                      direct_io: bool | None = None, stats_path: str | None = None
                      ) -> Attached:
    """Attach the FileBlockStore at ``path`` (``direct_io``: None tries it, then goes without)."""
    return await _attach(["--file", path, "--size-bytes", str(size_bytes)], fuse_dir,
                         mount_at, direct_io, stats_path)


async def attach_replicated(volume: ReplicatedVolume, fuse_dir: str, mount_at: str, *,
                            direct_io: bool | None = None, stats_path: str | None = None
                            ) -> Attached:
    """Attach a replicated volume: the FUSE process attaches a ``VolumeClient`` (taking the
    volume over, fencing any previous writer) before it mounts; a storage server's loss is a
    pause in the writes (the client rewires), not an error."""
    return await _attach(volume.argv(), fuse_dir, mount_at, direct_io, stats_path)


async def _attach(store_argv: list[str], fuse_dir: str, mount_at: str,
                  direct_io: bool | None, stats_path: str | None) -> Attached:
    os.makedirs(fuse_dir, exist_ok=True)
    os.makedirs(mount_at, exist_ok=True)
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "cellcloud.volumes.fusefile", "--mountpoint", fuse_dir,
            *store_argv, "--ready-fd", str(write_fd)]
    if stats_path:
        argv += ["--stats", stats_path]
    errors = tempfile.TemporaryFile()  # its stderr: never a pipe that could fill and block it
    try:
        server = await asyncio.to_thread(subprocess.Popen, argv, pass_fds=(write_fd,),
                                         stdin=subprocess.DEVNULL, stderr=errors)
    finally:
        os.close(write_fd)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd),
                                      fuse_ready_timeout_s)
    except TimeoutError:
        line = b""
    finally:
        os.close(read_fd)
    if not line:
        if server.poll() is None:
            server.kill()
        await asyncio.to_thread(server.wait)
        errors.seek(0)
        err = errors.read()[-800:].decode(errors="replace")
        errors.close()
        raise AttachError(f"the FUSE file did not come up: {err}")
    errors.close()  # the process keeps its own descriptor
    att = Attached(mount_at, fuse_dir, "", False, False, server, stats_path)
    try:
        backing = os.path.join(fuse_dir, FILE_NAME)
        tries = [True, False] if direct_io is None else [direct_io]
        for dio in tries:
            code, out = await _run("losetup", "--find", "--show",
                                   f"--direct-io={'on' if dio else 'off'}", backing,
                                   ok=(0, 1))
            if code == 0:
                att.loop_device, att.direct_io = out.splitlines()[-1], dio
                break
        if not att.loop_device:
            raise AttachError(f"losetup failed: {out[-500:]}")
        att.steps.append("loop")
        code, fs = await _run("blkid", "-p", "-o", "value", "-s", "TYPE", att.loop_device,
                              ok=(0, 2))
        if code == 2 or not fs:  # nothing on it: the first attach makes the filesystem
            await _run("mkfs.ext4", "-q", "-F", "-E",
                       "nodiscard,lazy_itable_init=1,lazy_journal_init=1", att.loop_device)
            att.formatted = True
        elif fs != "ext4":
            raise AttachError(f"the volume holds a {fs!r} filesystem, not ext4")
        await _run("mount", "-t", "ext4", att.loop_device, mount_at)
        att.steps.append("mount")
    except BaseException:
        await detach(att)
        raise
    return att


def _read_line(fd: int) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 256)
        if not chunk:
            break
        buf += chunk
    return buf


async def detach(att: Attached) -> None:
    """Unmount, free the loop device, unmount the FUSE file, wait for its process."""
    if "mount" in att.steps:
        await _run("umount", att.mount_at)
        att.steps.remove("mount")
    if "loop" in att.steps:
        await _run("losetup", "--detach", att.loop_device)
        att.steps.remove("loop")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + fuse_exit_timeout_s
    while att.server.poll() is None:
        # The loop device lets go of the FUSE file shortly after --detach: until then the
        # FUSE mount is busy (umount exits 32), so it is retried until the deadline.
        code, out = await _run("umount", att.fuse_dir, ok=(0, 1, 32))
        if code == 0 or "not mounted" in out:
            break
        if loop.time() > deadline:
            att.server.kill()
            break
        await asyncio.sleep(busy_retry_interval_s)
    try:
        await asyncio.to_thread(att.server.wait, fuse_exit_timeout_s)
    except subprocess.TimeoutExpired:
        att.server.kill()
        await asyncio.to_thread(att.server.wait)


# -- a volume of the EC2 API, attached under its record ------------------------------------------
GiB = 1024 ** 3


class AttachmentRecords(Protocol):
    """Where a volume's one attachment is recorded (control/ec2.py's ``Ec2``)."""

    async def attach(self, account: str, volume_id: str, target: str,
                     device: str = ...) -> dict[str, Any]: ...

    async def detach(self, account: str, volume_id: str, attach_epoch: int
                     ) -> dict[str, Any]: ...


@dataclass
class VolumeAttachment:
    account: str
    volume_id: str
    attach_epoch: int
    attached: Attached


@dataclass(frozen=True)
class StorageLinks:
    """Where a region's replicated volumes are (``cellcloud up --storage-servers N``)."""

    colony_path: str
    servers_path: str
    pki_dir: str = ""
    region: str = "cc-local-1"


async def attach_volume(records: AttachmentRecords, account: str, volume_id: str, target: str,
                        data_dir: str, mount_at: str, run_dir: str,
                        storage: StorageLinks | None = None) -> VolumeAttachment:
    """Take the volume's attachment (refused while another holds it: ``VolumeInUse``), then
    mount it; a mount that fails gives the attachment back. A replicated volume (its record
    says ``storage: replicated``) is served by a ``VolumeClient`` over ``storage``, attached
    as ``<target>@<attach_epoch>``; another is the FileBlockStore file under ``data_dir``."""
    rec = await records.attach(account, volume_id, target)
    epoch = int(rec["attach_epoch"])
    try:
        fuse_dir = os.path.join(run_dir, f"{volume_id}.fuse")
        if rec.get("storage") == "replicated":
            if storage is None:
                raise AttachError(f"{volume_id} is replicated: attaching it needs the "
                                  "region's store colony and storage servers")
            att = await attach_replicated(ReplicatedVolume(
                volume_id, storage.colony_path, storage.servers_path, f"{target}@{epoch}",
                storage.pki_dir, storage.region), fuse_dir, mount_at)
        else:
            path = volume_file(data_dir, account, volume_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            att = await attach_file(path, int(rec["size_gib"]) * GiB, fuse_dir, mount_at)
    except BaseException:
        await records.detach(account, volume_id, epoch)
        raise
    return VolumeAttachment(account, volume_id, epoch, att)


async def detach_volume(records: AttachmentRecords, va: VolumeAttachment) -> None:
    """Unmount, then end the attachment of this epoch (the volume is ``available`` again)."""
    await detach(va.attached)
    await records.detach(va.account, va.volume_id, va.attach_epoch)
