"""What a volume's bytes are to whoever attaches it: a :class:`BlockStore` (issue #19,
docs/volumes.md). The replicated volume client (volumes/client.py) is one; :class:`FileBlockStore`
(one local file) is the other, for tests and as the benchmarks' baseline.

The contract: ``size_bytes`` is fixed for the store's life; ``read``/``write`` take a byte
offset and never cross ``size_bytes`` (a caller that asks is refused with ``ValueError``: the
FUSE file turns it into ENOSPC/EIO as a block device would); ``write`` returns once the bytes are
durable; ``flush`` returns once every write before it is durable (the block layer's flush, which
an fsync in the filesystem on top becomes).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from collections.abc import Callable
from typing import Protocol

copy_chunk_bytes = 8 * 1024 * 1024  # one copy_file_range call of a snapshot or a restore


class BlockStore(Protocol):
    @property
    def size_bytes(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...


def check_range(size_bytes: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise ValueError(f"[{offset}, {offset + length}) is outside the volume's "
                         f"{size_bytes} bytes")


class StoreBusy(Exception):
    """The volume's bytes are held by another writer."""


class FileBlockStore:
    """A volume's bytes in one local (sparse) file. Writes are ``O_DSYNC`` (durable when
    ``write`` returns, as the contract says); ``flush`` is an ``fdatasync`` all the same, so
    that a flush is never a no-op. The file is ``flock``ed for the store's life: a second
    store on it (a second attach of the volume) is :class:`StoreBusy`."""

    def __init__(self, path: str, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % 512:
            raise ValueError("a volume's size is a positive multiple of 512 bytes")
        self.path = path
        self.size_bytes = size_bytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DSYNC | os.O_CLOEXEC, 0o600)
        try:
            try:  # one writer: a second store on the same file (another attach) is refused
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"{path} is open as a volume elsewhere (one writer at a "
                                "time)") from None
            have = os.fstat(self._fd).st_size
            if have == 0:
                os.ftruncate(self._fd, size_bytes)
            elif have != size_bytes:
                raise ValueError(f"{path} holds {have} bytes, not the volume's {size_bytes}")
        except BaseException:
            os.close(self._fd)
            raise
        self.counters = {"reads": 0, "writes": 0, "flushes": 0, "bytes_written": 0}

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.size_bytes, offset, length)
        self.counters["reads"] += 1
        return await asyncio.to_thread(os.pread, self._fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        check_range(self.size_bytes, offset, len(data))
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(data)
        view = memoryview(data)
        while view:
            n = await asyncio.to_thread(os.pwrite, self._fd, view, offset)
            view, offset = view[n:], offset + n

    async def flush(self) -> None:
        self.counters["flushes"] += 1
        await asyncio.to_thread(os.fdatasync, self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- where a FileBlockStore's volumes and snapshots live, and copies of them --------------------
def volume_file(data_dir: str, account: str, volume_id: str) -> str:
    """A volume's bytes as a FileBlockStore (until the replicated volume client serves them):
    ``<data_dir>/<account>/<volume id>.img``."""
    return os.path.join(data_dir, account, f"{volume_id}.img")


def snapshot_file(data_dir: str, account: str, snapshot_id: str) -> str:
    return os.path.join(data_dir, account, "snapshots", f"{snapshot_id}.img")


def open_source(path: str, missing_ok: bool) -> int | None:
    """``path`` opened to be copied, under a shared ``flock`` (a FileBlockStore holds an
    exclusive one): from here the bytes cannot change under the copy (an attach is refused,
    :class:`StoreBusy`; other copies may read alongside), and a delete of the file does not
    reach the open descriptor. None: no file and ``missing_ok`` (a volume never attached is
    all zeros). A writer holding it now is :class:`StoreBusy`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusy(f"{path} is held by a writer (one writer at a time)") from None
    return fd


def data_extents(fd: int, end: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of allocated data in the file open at ``fd`` before
    ``end`` (``SEEK_DATA``/``SEEK_HOLE``; holes read as zeroes)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole to the end
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        out.append((data, hole))
        off = hole
    return out


def copy_extents(fd: int | None, dst: str, size_bytes: int,
                 progress: Callable[[int], None] | None = None) -> None:
    """``dst`` becomes a sparse file of ``size_bytes`` holding the data extents of the file
    open at ``fd`` (:func:`open_source`; holes stay holes; None: all zeros), written to
    ``dst.part`` and renamed into place once durable. ``fd`` is closed at the end."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".part"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    try:
        os.ftruncate(out, size_bytes)
        if fd is not None:
            for data, hole in data_extents(fd, min(size_bytes, os.fstat(fd).st_size)):
                pos = data
                while pos < hole:
                    n = os.copy_file_range(fd, out, min(copy_chunk_bytes, hole - pos),
                                           pos, pos)
                    if n <= 0:
                        raise OSError(errno.EIO, f"the source ended early at {pos}")
                    pos += n
                    if progress is not None:
                        progress(pos)
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    os.close(out)
    replace_durably(tmp, dst)


def replace_durably(tmp: str, dst: str) -> None:
    """``tmp`` (written and fsynced) renamed to ``dst``, the rename made durable by an fsync
    of their directory."""
    os.replace(tmp, dst)
    dfd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
