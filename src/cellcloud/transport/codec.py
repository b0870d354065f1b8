"""The one framing of cellcloud's internal links: msgpack objects, nothing else.

Every internal link frames its messages here, whatever carries them:

- byte streams (the RPC links of :mod:`cellcloud.transport`, the agent <-> guest channel, a
  socketpair): msgpack objects back to back (msgpack is self-delimiting, so no length
  prefix), read with :class:`FrameReader`, whose buffer is capped and does not stay big;
- message sockets (the zygote's and its keeper's control sockets, the agent's live-update
  handover: SOCK_SEQPACKET, where file descriptors ride along with SCM_RIGHTS): one msgpack
  object per message, :func:`send_message` / :func:`recv_message`.

Every read is bounded (a message or a buffered frame over its cap is refused), and garbage, an
object of the wrong shape or trailing bytes raise :class:`FrameError` (a ``ValueError``).
This module imports no event loop: the guest, which runs in every environment, uses it too.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

frame_read_bytes = 64 * 1024  # a frame reader's buffer between resets (see FrameReader)


class FrameError(ValueError):
    """Bytes that are not a frame: garbage, a frame over its cap, or not the expected shape."""


def pack(doc: Any) -> bytes:
    """One frame."""
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


split_bytes_min = 16 * 1024  # a bytes value this big goes out as its own buffer (pack_parts)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def pack_parts(doc: Any) -> list[bytes]:
    """The frame of ``doc`` as buffers to write back to back (``writev``/``sendmsg``): a map's
    big bytes values (a payload, logs) are not copied into the frame but written from where
    they are; the same bytes on the wire as :func:`pack` (up to the order of the map's keys)."""
    if not isinstance(doc, dict) or not any(
            type(v) is bytes and len(v) >= split_bytes_min for v in doc.values()):
        return [pack(doc)]
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack_map_header(len(doc))
    parts: list[bytes] = []
    for k, v in doc.items():
        packer.pack(k)
        if type(v) is bytes and len(v) >= split_bytes_min:
            parts += [packer.bytes() + _bin_header(len(v)), v]
            packer.reset()
        else:
            packer.pack(v)
    tail = packer.bytes()
    if tail:
        parts.append(tail)
    return parts


def unpack(data: bytes, max_bytes: int) -> Any:
    """The one object of a whole message (a SOCK_SEQPACKET message); refuses more than
    ``max_bytes``, garbage and trailing bytes."""
    if len(data) > max_bytes:
        raise FrameError(f"a {len(data)}-byte message; the limit is {max_bytes}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:  # ExtraData, FormatError, ...
        raise FrameError(f"not a frame: {e!r}") from e


def unpack_dict(data: bytes, max_bytes: int) -> dict[str, Any]:
    doc = unpack(data, max_bytes)
    if not isinstance(doc, dict):
        raise FrameError(f"a frame must be a map, not {type(doc).__name__}")
    return doc


class FrameReader:
    """msgpack objects from a byte stream, with a buffer that does not stay big.

    msgpack's ``Unpacker`` allocates its read buffer up front (``read_size``: 1 MiB unless told
    otherwise) and only ever grows it (a large frame leaves it large); the stream walks through
    the buffer, touching every page of it. So each long-lived stream ended up holding its whole
    buffer in RSS: an agent with 100 warm environments grew by ~100 MiB over a few hundred
    thousand invocations and never gave it back. Here the buffer starts at ``read_bytes``, and
    once more than that has gone through and no partial frame is buffered, the ``Unpacker`` is
    replaced by a fresh one, so a reader holds about ``read_bytes`` (plus the frame in
    progress) for its whole life. A frame bigger than ``max_buffer_bytes`` is refused
    (:class:`FrameError`), as is garbage."""

    def __init__(self, max_buffer_bytes: int, read_bytes: int = frame_read_bytes,
                 **options: Any) -> None:
        self._options = dict(raw=False, max_buffer_size=max_buffer_bytes,
                             read_size=min(read_bytes, max_buffer_bytes), **options)
        self.resets = 0
        self._new()

    def _new(self) -> None:
        self._unpacker = msgpack.Unpacker(**self._options)
        self._fed = 0

    def feed(self, data: bytes | memoryview) -> Iterator[Any]:
        """Feed bytes (copied: the caller may reuse its buffer once the objects are out);
        yields every object they complete."""
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as e:
            raise FrameError(f"a frame over the {self._options['max_buffer_size']}-byte "
                             "limit") from e
        self._fed += len(data)
        end = -1
        while True:
            try:
                obj = next(self._unpacker)
            except StopIteration:
                break
            except (ValueError, msgpack.UnpackException) as e:
                raise FrameError(f"not a frame: {e!r}") from e
            end = self._unpacker.tell()  # at an object boundary: the end of this object
            yield obj
        if end == self._fed and self._fed > self._options["read_size"]:
            self.resets += 1
            self._new()


def send_message(sock: socket.socket, doc: Any, fds: Sequence[int] = ()) -> None:
    """One message on a SOCK_SEQPACKET socket, with ``fds`` passed along (SCM_RIGHTS)."""
    if fds:
        socket.send_fds(sock, [pack(doc)], list(fds))
    else:
        sock.sendall(pack(doc))


def recv_message(sock: socket.socket, max_bytes: int,
                 max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (a map) from a SOCK_SEQPACKET socket and the fds that came with it;
    ``(None, [])`` when the peer hung up. A bad message closes its fds and raises."""
    if max_fds:
        msg, fds, _flags, _addr = socket.recv_fds(sock, max_bytes + 1, max_fds)
    else:
        msg, fds = sock.recv(max_bytes + 1), []
    if not msg:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        return unpack_dict(msg, max_bytes), fds
    except FrameError:
        for fd in fds:
            os.close(fd)
        raise


class StreamChannel:
    """A blocking, thread-safe framed channel over a stream socket (the guest's end of its
    agent channel): one read buffer, reused for every read (no allocation per read), and
    frames written whole, one ``send`` each."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self._sock = sock
        self._reader = FrameReader(max_frame_bytes)
        self._pending: Iterator[Any] = iter(())
        self._send_lock = threading.Lock()
        self._buf = bytearray(frame_read_bytes)
        self._view = memoryview(self._buf)

    def send(self, doc: Any) -> None:
        parts = pack_parts(doc)
        with self._send_lock:
            if len(parts) == 1:
                self._sock.sendall(parts[0])
                return
            views = [memoryview(p) for p in parts]
            while views:  # one sendmsg (writev) for the lot, unless the kernel took less
                sent = self._sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]

    def recv(self) -> Any:
        """The next object; None when the peer hung up."""
        while True:
            for doc in self._pending:
                return doc
            n = self._sock.recv_into(self._buf)
            if not n:
                return None
            self._pending = self._reader.feed(self._view[:n])
