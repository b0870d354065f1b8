"""A volume as ONE file in a FUSE filesystem, served from a :class:`BlockStore` (issue #19,
docs/volumes.md): the process that ``volumes/attach.py`` starts, so that a loop device can sit
on the file and ext4 on the loop device (this kernel has no nbd or ublk).

``python -m cellcloud.volumes.fusefile --mountpoint DIR --file PATH --size-bytes N`` mounts DIR
with one regular file, ``DIR/volume``, exactly N bytes long, served from a local
``FileBlockStore``; ``--volume-id V --colony COLONY.json --servers SERVERS.json --client-id C``
serves it from the replicated volume (``volumes/client.py``'s ``VolumeClient``: attached with
takeover before the mount, so a previous writer is fenced; detached once unmounted), its links
to storage servers mutual TLS as role ``volume`` with ``--pki-dir``. A read or write of it is a
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
import re
import stat
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import mfusepy

from ..core.limits import DEFAULT_LIMITS
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


store_close_timeout_s = DEFAULT_LIMITS.volume_detach_timeout_ms / 1000
volume_attach_timeout_s = DEFAULT_LIMITS.volume_attach_timeout_ms / 1000


def serve(store: BlockStore, mountpoint: str, ready_fd: int | None = None,
          stats_path: str | None = None) -> None:
    """Mount ``mountpoint`` and serve until it is unmounted (or SIGTERM/SIGINT)."""
    async def given() -> BlockStore:
        return store

    serve_store(given, mountpoint, ready_fd, stats_path)


def serve_store(open_store: Callable[[], Coroutine[Any, Any, BlockStore]], mountpoint: str,
                ready_fd: int | None = None, stats_path: str | None = None,
                close_store: Callable[[BlockStore], Coroutine[Any, Any, None]] | None = None) -> None:
    """Open the store on this process's store loop (a ``VolumeClient`` lives on the loop it
    attached on), mount, serve until unmounted, then close the store there."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="blockstore", daemon=True)
    thread.start()
    try:
        store = asyncio.run_coroutine_threadsafe(open_store(), loop).result()
        try:
            ops = VolumeFile(store, loop, ready_fd, stats_path)
            mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=False,
                         fsname="cellcloud-volume", subtype="cellcloud",
                         default_permissions=True)
        finally:
            if close_store is not None:
                try:
                    asyncio.run_coroutine_threadsafe(close_store(store), loop).result(
                        store_close_timeout_s)
                except Exception as e:  # the mount is gone; a next attach fences anyway
                    log.warning("closing the block store failed: %r", e)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def serve_replicated(volume_id: str, colony_path: str, servers_path: str, client_id: str,
                     mountpoint: str, ready_fd: int | None = None,
                     stats_path: str | None = None,
                     attach_timeout_s: float = volume_attach_timeout_s) -> None:
    """Serve the replicated volume ``volume_id`` (its config cell in the store colony of
    ``colony_path``, its storage servers in ``servers_path``), attached as ``client_id``."""
    from cellcloud.store.client import StoreClient
    from cellcloud.volumes.client import VolumeClient, load_servers
    from cellcloud.volumes.core import VolumeError

    held: dict[str, Any] = {}

    async def open_store() -> BlockStore:
        store = held["store"] = StoreClient.from_file(colony_path)
        vc = VolumeClient(volume_id, store, load_servers(servers_path), client_id=client_id)
        try:
            # takes the volume over: a previous writer is fenced
            await vc.attach(timeout_s=attach_timeout_s)
        except TimeoutError:
            await vc.close()
            await store.close()
            raise VolumeError(f"{volume_id}: not attached within {attach_timeout_s} s (its "
                              "config cell is unreachable, or there is no such volume)"
                              ) from None
        except BaseException:
            await vc.close()
            await store.close()
            raise
        return vc

    async def close_store(vc: BlockStore) -> None:
        assert isinstance(vc, VolumeClient)
        try:
            await vc.detach()  # everything in flight done, then attached_client = ""
        finally:
            await vc.close()
            await held["store"].close()

    serve_store(open_store, mountpoint, ready_fd, stats_path, close_store)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud.volumes.fusefile", description=__doc__)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--file", help="the FileBlockStore's file (a local volume)")
    p.add_argument("--size-bytes", type=int, help="the local volume's size")
    p.add_argument("--volume-id", help="a replicated volume (with --colony and --servers)")
    p.add_argument("--colony", help="the store colony file (the volume's config cell)")
    p.add_argument("--servers", help="the storage servers file (volumes/client.py)")
    p.add_argument("--client-id", help="this attachment's client id (the volume's record)")
    p.add_argument("--attach-timeout-s", type=float, default=volume_attach_timeout_s,
                   help="give up attaching the replicated volume after this long")
    p.add_argument("--pki-dir", help="speak mutual TLS to storage servers as role 'volume'")
    p.add_argument("--region", default="cc-local-1", help="region name in the certificates")
    p.add_argument("--ready-fd", type=int, help="written one JSON line once mounted")
    p.add_argument("--stats", help="a JSON file of counters, rewritten at every fsync")
    args = p.parse_args(argv)
    if args.volume_id:
        if args.file or not (args.colony and args.servers and args.client_id):
            p.error("--volume-id takes --colony, --servers and --client-id, not --file")
        if args.pki_dir:
            from cellcloud import transport
            from cellcloud.security import pki

            # the certificate's directory is named for the client id ("task/t1@2" →
            # "task_t1@2")
            name = re.sub(r"[^A-Za-z0-9_.@-]", "_", args.client_id)
            transport.enable_mtls(pki.tls_config(args.pki_dir, args.region, "volume", "host",
                                                 name), "volume")
        serve_replicated(args.volume_id, args.colony, args.servers, args.client_id,
                         args.mountpoint, args.ready_fd, args.stats, args.attach_timeout_s)
        return
    if not args.file or args.size_bytes is None:
        p.error("give --file and --size-bytes, or --volume-id")
    store = FileBlockStore(args.file, args.size_bytes)
    try:
        serve(store, args.mountpoint, args.ready_fd, args.stats)
    finally:
        store.close()


if __name__ == "__main__":
    main()
