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
import fcntl
import os
from typing import Protocol


class BlockStore(Protocol):
    size_bytes: int

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
