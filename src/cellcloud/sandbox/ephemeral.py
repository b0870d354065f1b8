"""Disk-backed /tmp for environments: a private ext4 filesystem per environment, so a full
/tmp is ENOSPC (as on Lambda) and its pages never count against the function's memory.

Making one costs no mkfs on the cold path: a template image per size is formatted once
(sparse, no journal), and a small pool of ready loop devices is kept per size — a sparse copy
of the template (only its ~100 KiB of metadata is copied) bound to a free loop device with
LO_FLAGS_AUTOCLEAR and already unlinked. An environment mounts one; when its mount namespace
goes away the loop device detaches itself and the image's blocks are freed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import subprocess
from dataclasses import dataclass

log = logging.getLogger("cellcloud.sandbox.ephemeral")

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
_LOOP_MAJOR = 7
inodes_per_mb = 8  # Lambda-sized /tmp holds many small files too
loop_bind_attempts_max = 16
# Errors that mean loop devices cannot work on this host at all (others are transient).
PERMANENT_LOOP_ERRORS = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EPERM,
                                   errno.EACCES, errno.ENOSYS})


@dataclass
class Loop:
    path: str
    fd: int  # keeps the device attached until the environment has mounted it
    size_mb: int


def _copy_sparse(src: str, dst: str) -> int:
    """Copy only the data extents of ``src``; returns an open fd of the copy."""
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = os.fstat(fi).st_size
        os.ftruncate(fo, size)
        off = 0
        while off < size:
            try:
                data = os.lseek(fi, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past off
                break
            hole = os.lseek(fi, data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                pos += os.copy_file_range(fi, fo, hole - pos, pos, pos)
            off = hole
    except BaseException:
        os.close(fo)
        raise
    finally:
        os.close(fi)
    return fo


class LoopPool:
    def __init__(self, work_dir: str, *, ready_per_size: int = 8) -> None:
        self.work_dir = work_dir
        self.ready_per_size = ready_per_size
        self._ready: dict[int, list[Loop]] = {}
        self._seq = 0
        self.fallbacks = 0  # environments that got a tmpfs /tmp because no device was ready
        self.available = os.path.exists("/dev/loop-control")
        os.makedirs(work_dir, mode=0o700, exist_ok=True)

    def template(self, size_mb: int) -> str:
        path = os.path.join(self.work_dir, f"template-{size_mb}m.img")
        if not os.path.exists(path):
            tmp = path + ".new"
            with open(tmp, "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
                 "-E", "lazy_itable_init=1,root_owner=0:0",
                 "-N", str(max(1024, size_mb * inodes_per_mb)), tmp],
                check=True, stdin=subprocess.DEVNULL, capture_output=True)
            os.rename(tmp, path)
        return path

    def _make(self, size_mb: int) -> Loop:
        self._seq += 1
        image = os.path.join(self.work_dir, f"env-{os.getpid()}-{self._seq}.img")
        fo = _copy_sparse(self.template(size_mb), image)
        try:
            ld, path = self._bind_free_loop(fo)
        finally:
            os.close(fo)
            os.unlink(image)  # the loop device holds the file; its blocks go when it detaches
        return Loop(path, ld, size_mb)

    @staticmethod
    def _bind_free_loop(fo: int) -> tuple[int, str]:
        """Bind ``fo`` to a free loop device. Several zygotes (agents) share the host's loop
        devices: one that another zygote took between GET_FREE and CONFIGURE answers EBUSY,
        and we simply ask for another free one."""
        info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0,
                           LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)
        last: OSError | None = None
        for _ in range(loop_bind_attempts_max):
            ctl = os.open("/dev/loop-control", os.O_RDWR)
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            path = f"/dev/loop{n}"
            if not os.path.exists(path):  # no devtmpfs/udev to make the node for us
                try:
                    os.mknod(path, 0o600 | 0o060000, os.makedev(_LOOP_MAJOR, n))
                except FileExistsError:
                    pass
            ld = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(ld, LOOP_CONFIGURE, struct.pack("=II", fo, 0) + info + bytes(64))
            except OSError as e:
                os.close(ld)
                if e.errno not in (errno.EBUSY, errno.EAGAIN):
                    raise
                last = e
                continue
            return ld, path
        raise last or OSError(errno.EBUSY, "no free loop device")

    def take(self, size_mb: int) -> Loop:
        ready = self._ready.get(size_mb)
        if ready:
            return ready.pop()
        return self._make(size_mb)

    def refill_one(self) -> bool:
        """Top up the pool by one device; False when every size is full (idle work)."""
        if not self.available:
            return False
        for size_mb in sorted(self._ready, key=lambda s: len(self._ready[s])):
            if len(self._ready[size_mb]) < self.ready_per_size:
                try:
                    self._ready[size_mb].append(self._make(size_mb))
                except (OSError, subprocess.CalledProcessError) as e:
                    log.warning("cannot provision a %d MB /tmp: %s", size_mb, e)
                    if not isinstance(e, OSError) or e.errno in PERMANENT_LOOP_ERRORS:
                        self.available = False
                    return False
                return True
        return False

    def want(self, size_mb: int) -> None:
        self._ready.setdefault(size_mb, [])
