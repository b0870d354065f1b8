"""A volume as ONE file in a FUSE filesystem, served from a :class:`BlockStore` (issue #19,
docs/volumes.md): the process that ``volumes/attach.py`` starts, so that a loop device can sit
on the file and ext4 on the loop device (this kernel has no nbd or ublk).

``python -m cellcloud.volumes.fusefile --mountpoint DIR --file PATH --size-bytes N`` mounts DIR
with one regular file, ``DIR/volume``, exactly N bytes long. A read or write of it is a
``BlockStore`` read or write (a write answered once the store says it is durable); an fsync of
it (which is what the loop device does for the block layer's flush, so what an fsync in the
ext4 on top becomes) is ``BlockStore.flush``. A write past the end is ENOSPC, as on a block
device; the file cannot be truncated, created, renamed or removed. FUSE's own ``flush`` (a
close) is not a durability point in POSIX and is not one here.

libfuse3 through ``mfusepy`` (ctypes): libfuse calls the operations on its worker threads; each
one hands its call to this process's asyncio loop (another thread), where the store lives.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import mfusepy

from .blockdev import BlockStore, FileBlockStore

log = logging.getLogger("cellcloud.volumes.fusefile")
FILE_NAME = "volume"
_PATH = "/" + FILE_NAME
T = TypeVar("T")


class VolumeFile(mfusepy.Operations):
    use_ns = True

    def __init__(self, store: BlockStore, loop: asyncio.AbstractEventLoop,
                 ready_fd: int | None = None, stats_path: str | None = None) -> None:
        self.store = store
        self.loop = loop
        self.ready_fd = ready_fd
        self.stats_path = stats_path
        self.started_ns = time.time_ns()
        self.counters = {"reads": 0, "writes": 0, "fsyncs": 0, "bytes_written": 0,
                         "refused_past_end": 0, "store_errors": 0}
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """A store call on the store's loop; its failure is EIO, as a failing disk's is."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        except Exception as e:
            log.warning("block store call failed: %r", e)
            with self._lock:
                self.counters["store_errors"] += 1
            raise mfusepy.FuseOSError(errno.EIO) from e

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    # -- the one file ----------------------------------------------------------------------------
    def init(self, path: str) -> None:
        if self.ready_fd is not None:  # mounted: tell the parent, once
            os.write(self.ready_fd, b'{"ready": true}\n')
            os.close(self.ready_fd)
            self.ready_fd = None

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        t = self.started_ns
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, "st_size": 0,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}
        if path == _PATH:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1,
                    "st_size": self.store.size_bytes, "st_blocks": self.store.size_bytes // 512,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path != "/":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", FILE_NAME]

    def open(self, path: str, flags: int) -> int:
        if path != _PATH:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        end = min(offset + size, self.store.size_bytes)
        if offset >= end:
            return b""
        self._count("reads")
        return self._run(self.store.read(offset, end - offset))

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        if offset + len(data) > self.store.size_bytes:
            self._count("refused_past_end")
            raise mfusepy.FuseOSError(errno.ENOSPC)
        self._run(self.store.write(offset, data))
        self._count("writes")
        self._count("bytes_written", len(data))
        return len(data)

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        self._run(self.store.flush())
        self._count("fsyncs")
        if self.stats_path:  # written before the fsync is answered: a test reads it after
            self._write_stats()
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0  # a close, not a durability point (fsync is)

    def release(self, path: str, fh: Any) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if path == _PATH and length == self.store.size_bytes:
            return 0
        raise mfusepy.FuseOSError(errno.EPERM)  # a block device has a fixed size

    def statfs(self, path: str) -> dict[str, int]:
        blocks = self.store.size_bytes // 4096
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}

    def _write_stats(self) -> None:
        with self._lock:  # this file's counters, and the store's own where it keeps some
            doc = json.dumps({**self.counters, "store": dict(getattr(self.store, "counters",
                                                                      {}))})
        tmp = f"{self.stats_path}.tmp.{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(doc)
        os.replace(tmp, str(self.stats_path))


def serve(store: BlockStore, mountpoint: str, ready_fd: int | None = None,
          stats_path: str | None = None) -> None:
    """Mount ``mountpoint`` and serve until it is unmounted (or SIGTERM/SIGINT)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="blockstore", daemon=True)
    thread.start()
    try:
        ops = VolumeFile(store, loop, ready_fd, stats_path)
        mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=False,
                     fsname="cellcloud-volume", subtype="cellcloud", default_permissions=True)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud.volumes.fusefile", description=__doc__)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--file", required=True, help="the FileBlockStore's file")
    p.add_argument("--size-bytes", type=int, required=True)
    p.add_argument("--ready-fd", type=int, help="written one JSON line once mounted")
    p.add_argument("--stats", help="a JSON file of counters, rewritten at every fsync")
    args = p.parse_args(argv)
    store = FileBlockStore(args.file, args.size_bytes)
    try:
        serve(store, args.mountpoint, args.ready_fd, args.stats)
    finally:
        store.close()


if __name__ == "__main__":
    main()
