"""Every internal link of cellcloud goes through this module.

One persistent, multiplexed connection per peer; frames are msgpack objects streamed back to
back (msgpack is self-delimiting, so no length prefix is needed; the framing itself, shared with
the agent <-> guest channel, the zygote and the handover, is :mod:`.codec`):

    request:  [0, call_id, op, body]
    response: [1, call_id, ok, body]      ok=False -> body = {"type": ..., "message": ...}

A server is a dict of typed operations: an op not in the dict is refused and counted, so a
component's surface is exactly the keys of that dict (the agent's is six entries long).

TLS is one argument: pass an ``ssl.SSLContext`` to :func:`serve` / :class:`Client` and the same
frames travel over mutual TLS; nothing else in cellcloud opens internal sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .codec import FrameError, FrameReader, frame_read_bytes, pack, unpack

__all__ = ["CallTimeout", "Client", "FrameError", "FrameReader", "OpError", "RemoteError",
           "Server", "Stream", "TransportError", "disable_mtls", "enable_mtls", "frame_bytes_max",
           "frame_read_bytes", "mtls_role", "pack", "tls_stats", "unpack"]

log = logging.getLogger(__name__)

frame_bytes_max = 80 * 1024 * 1024  # a 50 MB zip, base64-encoded in its API request (~67 MB)
calls_in_flight_max = 4096  # per connection; more is a protocol error, not a queue

Handler = Callable[[Any], Awaitable[Any]]


@dataclass
class TlsStats:
    """This process's TLS handshakes on internal links, by side (``server``: accepted,
    ``client``: opened): completed, and failed (a bad or missing certificate, a protocol
    error). Exported as Prometheus counters by :mod:`cellcloud.metrics`."""

    handshakes: dict[str, int] = field(default_factory=lambda: {"server": 0, "client": 0})
    failures: dict[str, int] = field(default_factory=lambda: {"server": 0, "client": 0})


tls_stats = TlsStats()


class _CountedSSLObject(ssl.SSLObject):
    """What ``wrap_bio`` returns on our contexts (asyncio's and uvloop's TLS both drive an
    SSLObject): the same object, counting how each handshake ends."""

    def do_handshake(self) -> None:
        side = "server" if self.server_side else "client"
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not over yet
        except (ssl.SSLError, OSError):
            tls_stats.failures[side] += 1
            raise
        tls_stats.handshakes[side] += 1


def _counted(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.sslobject_class = _CountedSSLObject
    return ctx


class Stream:
    """An op's answer sent as it is produced (a streamed function response): each item of
    ``items`` leaves as ``[2, id, item]`` the moment it is ready, then ``[1, id, True, None]``
    ends the call (``[1, id, False, error]`` if ``items`` raised). The caller reads it with
    :meth:`Client.call_stream`. No flow control: a producer bounds what it streams."""

    __slots__ = ("items",)

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self.items = items


class _Mtls:
    """Process-wide mutual TLS: every Server and Client of this process uses it once enabled."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, role: str,
                 region: str) -> None:
        self.server_ctx = _counted(server_ctx)
        self.client_ctx = _counted(client_ctx)
        self.role = role
        self.region = region


_mtls: _Mtls | None = None


def enable_mtls(config: Any, role: str) -> None:
    """Switch this process's internal links to mutual TLS 1.3 as ``role`` (one place, as
    DESIGN's transport rule wants). ``config`` is a ``security.pki.TlsConfig``."""
    global _mtls
    _mtls = _Mtls(config.server_context(), config.client_context(), role, config.region)


def disable_mtls() -> None:
    """Back to plain links (a harness that spoke mTLS for a while, in a process that goes on)."""
    global _mtls
    _mtls = None


def mtls_role() -> str | None:
    return _mtls.role if _mtls is not None else None


def _peer_check_for(roles: frozenset[str] | set[str]) -> PeerCheck | None:
    if _mtls is None:
        return None
    from ..security import pki

    check: PeerCheck = pki.peer_check(_mtls.region, roles)
    return check


class TransportError(Exception):
    """The peer could not be reached, or the link broke mid-call."""


class CallTimeout(TransportError):
    pass


class NotDelivered(TransportError):
    """The call never left: no connection, or the peer is not one we may call."""


class RemoteError(Exception):
    """The peer ran the op and it raised; ``type`` is the peer's error type name."""

    def __init__(self, type_: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message
        self.data = data or {}


class OpError(Exception):
    """Raised by an op handler to send a typed error (not a crash) back to the caller."""

    def __init__(self, type_: str, message: str, **data: Any) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message
        self.data = data


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def _unpacker() -> FrameReader:
    return FrameReader(frame_bytes_max, strict_map_key=False)


@dataclass
class ServerStats:
    connections: int = 0
    calls: int = 0
    errors: int = 0
    unknown_ops: int = 0
    malformed_frames: int = 0
    rejected_peers: int = 0  # mTLS peers whose certificate names a role not allowed here
    forbidden_ops: int = 0  # calls of an op the peer's role may not call here (OPS_ALLOWED)
    by_op: dict[str, int] = field(default_factory=dict)


PeerCheck = Callable[[Any], bool]  # peercert dict -> allowed?


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, ops: dict[str, Handler], stats: ServerStats,
                 peer_check: PeerCheck | None = None,
                 ops_for_role: Mapping[str, frozenset[str]] | None = None) -> None:
        self._peer_check = peer_check
        self._ops_for_role = ops_for_role
        self._allowed: frozenset[str] | None = None  # None: every op (no per-op rule)
        self._ops = ops
        self._stats = stats
        self._unpacker = _unpacker()
        self._packer = _packer()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._stats.connections += 1
        if self._peer_check is not None and not self._peer_check(
                transport.get_extra_info("peercert")):
            self._stats.rejected_peers += 1
            transport.close()
            return
        if self._ops_for_role:
            from ..security import pki

            ident = pki.identity_of(transport.get_extra_info("peercert"))
            if ident is not None:
                self._allowed = self._ops_for_role.get(ident.role)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stats.connections -= 1
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self._unpacker.feed(data):
                self._on_frame(frame)
        except (msgpack.OutOfData, msgpack.ExtraData, ValueError, msgpack.UnpackException):
            self._stats.malformed_frames += 1
            if self._transport is not None:
                self._transport.close()

    def _on_frame(self, frame: Any) -> None:
        if not (isinstance(frame, list) and len(frame) == 4 and frame[0] == 0):
            self._stats.malformed_frames += 1
            if self._transport is not None:
                self._transport.close()
            return
        _, call_id, op, body = frame
        self._stats.calls += 1
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is not None and self._allowed is not None and op not in self._allowed:
            self._stats.forbidden_ops += 1
            self._send([1, call_id, False, {"type": "Forbidden",
                                            "message": f"{op!r} is not open to this peer"}])
            return
        if handler is None:
            self._stats.unknown_ops += 1
            self._send([1, call_id, False, {"type": "UnknownOperation", "message": f"{op!r}"}])
            return
        self._stats.by_op[op] = self._stats.by_op.get(op, 0) + 1
        task = asyncio.ensure_future(self._run(call_id, handler, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call_id: int, handler: Handler, body: Any) -> None:
        try:
            result = await handler(body)
        except OpError as e:
            self._stats.errors += 1
            self._send([1, call_id, False, {"type": e.type, "message": e.message, "data": e.data}])
        except Exception as e:  # a bug in an op must not take the server down
            self._stats.errors += 1
            log.exception("op failed")
            self._send([1, call_id, False, {"type": "InternalError", "message": repr(e)}])
        else:
            if isinstance(result, Stream):
                await self._stream(call_id, result)
                return
            self._send([1, call_id, True, result])

    async def _stream(self, call_id: int, stream: Stream) -> None:
        try:
            async for item in stream.items:
                if self._transport is None or self._transport.is_closing():
                    close = getattr(stream.items, "aclose", None)
                    if close is not None:
                        await close()  # the caller is gone: the producer stops (its finally)
                    return
                self._send([2, call_id, item])
        except OpError as e:
            self._stats.errors += 1
            self._send([1, call_id, False, {"type": e.type, "message": e.message, "data": e.data}])
        except Exception as e:
            self._stats.errors += 1
            log.exception("streamed op failed")
            self._send([1, call_id, False, {"type": "InternalError", "message": repr(e)}])
        else:
            self._send([1, call_id, True, None])

    def _send(self, frame: list[Any]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        # Answers that become ready in the same loop iteration leave in one write: under load
        # that is one syscall for many frames instead of one each.
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(self._packer.pack(frame))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])


class Server:
    """A listening transport server. ``ops`` maps op name -> ``async def op(body) -> result``."""

    def __init__(self, ops: Mapping[str, Handler], *, peer_check: PeerCheck | None = None) -> None:
        self.ops: dict[str, Handler] = dict(ops)
        self.peer_check = peer_check
        self.ops_for_role: dict[str, frozenset[str]] = {}
        self.stats = ServerStats()
        self._servers: list[asyncio.AbstractServer] = []

    async def listen_tcp(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, sock: Any = None
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if ssl_context is None and _mtls is not None:
            from ..security import pki

            ssl_context = _mtls.server_ctx
            if self.peer_check is None:
                self.peer_check = _peer_check_for(pki.ACCEPTS.get(_mtls.role, frozenset()))
            self.ops_for_role = {client: ops for (server, client), ops in pki.OPS_ALLOWED.items()
                                 if server == _mtls.role}
        if sock is not None:
            srv = await loop.create_server(self._protocol, sock=sock, ssl=ssl_context)
        else:
            srv = await loop.create_server(
                self._protocol, host, port, ssl=ssl_context, reuse_address=True
            )
        self._servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return addr[0], addr[1]

    def _protocol(self) -> _ServerProtocol:
        return _ServerProtocol(self.ops, self.stats, self.peer_check, self.ops_for_role)

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[Exception | None], None]) -> None:
        self._unpacker = _unpacker()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: streamed calls (Client.call_stream): their items, then an end (None) or an error
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self._out: list[bytes] = []

    def send(self, data: bytes) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self._unpacker.feed(data):
                if frame[0] == 2 or frame[1] in self.streams:
                    self._on_stream_frame(frame)
                    continue
                _, call_id, ok, body = frame
                fut = self.pending.pop(call_id, None)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(body)
                else:
                    fut.set_exception(
                        RemoteError(body.get("type", "Error"), body.get("message", ""),
                                    body.get("data"))
                    )
        except Exception as e:  # malformed peer: drop the link, fail the calls
            log.warning("malformed frame from peer: %r", e)
            if self.transport is not None:
                self.transport.close()

    def _on_stream_frame(self, frame: list[Any]) -> None:
        q = self.streams.get(frame[1])
        if q is None:
            return  # a stream its caller stopped reading
        if frame[0] == 2:
            q.put_nowait(("item", frame[2]))
        elif frame[2]:
            q.put_nowait(("end", frame[3]))
        else:
            body = frame[3]
            q.put_nowait(("error", RemoteError(body.get("type", "Error"),
                                               body.get("message", ""), body.get("data"))))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        err = TransportError(f"connection lost: {exc!r}")
        for q in self.streams.values():
            q.put_nowait(("error", err))
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self._on_lost(exc)


def _expire(fut: asyncio.Future[Any], op: str, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(CallTimeout(f"{op} timed out after {timeout_s}s"))


class Client:
    """A persistent, multiplexed connection to one peer, reconnected lazily on the next call.

    Retries are *not* done here: DESIGN rule 4 says retry at one layer only, and that layer is
    the caller, which knows whether an op is idempotent.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout_s: float = 2.0,
        peer_check: PeerCheck | None = None,
        expect_role: str | None = None,
    ) -> None:
        if ssl_context is None and _mtls is not None:
            from ..security import pki

            ssl_context = _mtls.client_ctx
            if peer_check is None:
                peer_check = _peer_check_for({expect_role} if expect_role else set(pki.ROLES))
        self._peer_check = peer_check
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout_s = connect_timeout_s
        self._proto: _ClientProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._ids = itertools.count(1)
        self._packer = _packer()

    @property
    def connected(self) -> bool:
        return self._proto is not None and self._proto.transport is not None

    async def _connect(self) -> _ClientProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and self._proto.transport is not None:
                return self._proto
            loop = asyncio.get_running_loop()

            def lost(_exc: Exception | None) -> None:
                self._proto = None

            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _ClientProtocol(lost),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname if self._ssl else None,
                    ),
                    self._connect_timeout_s,
                )
            except (OSError, TimeoutError) as e:
                raise NotDelivered(f"cannot connect to {self.host}:{self.port}: {e!r}") from e
            if self._peer_check is not None and (
                    proto.transport is None
                    or not self._peer_check(proto.transport.get_extra_info("peercert"))):
                if proto.transport is not None:
                    proto.transport.close()
                raise NotDelivered(f"{self.host}:{self.port} is not a peer we may call "
                                     "(its certificate names another role)")
            self._proto = proto
            return proto

    async def call(self, op: str, body: Any = None, *, timeout_s: float) -> Any:
        """Send one call and wait for its answer, at most ``timeout_s`` seconds."""
        proto = self._proto
        if proto is None or proto.transport is None:
            proto = await self._connect()
        transport = proto.transport
        if transport is None:
            raise NotDelivered("connection lost before send")
        if len(proto.pending) >= calls_in_flight_max:
            raise TransportError("too many calls in flight on one connection")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.pending[call_id] = fut
        proto.send(self._packer.pack([0, call_id, op, body]))
        # A timer that fails the future is cheaper on the hot path than asyncio.wait_for,
        # which wraps every call in an extra task.
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, fut, op, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            proto.pending.pop(call_id, None)

    async def call_stream(self, op: str, body: Any = None, *,
                          timeout_s: float) -> AsyncGenerator[tuple[str, Any], None]:
        """A call whose answer may be a :class:`Stream`: yields ``("item", x)`` for each
        streamed item as it arrives, then ``("end", answer)`` once (the answer of an op that
        did not stream, or None); raises as :meth:`call` does. ``timeout_s`` bounds the whole
        call."""
        proto = self._proto
        if proto is None or proto.transport is None:
            proto = await self._connect()
        if proto.transport is None:
            raise NotDelivered("connection lost before send")
        if len(proto.pending) + len(proto.streams) >= calls_in_flight_max:
            raise TransportError("too many calls in flight on one connection")
        call_id = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue()
        proto.streams[call_id] = q
        proto.send(self._packer.pack([0, call_id, op, body]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(q.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise CallTimeout(f"{op} timed out after {timeout_s}s") from None
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "end":
                    return
        finally:
            proto.streams.pop(call_id, None)

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
