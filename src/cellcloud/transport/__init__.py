"""Every internal link of cellcloud goes through this module.

One persistent, multiplexed connection per peer; frames are msgpack objects streamed back to
back (msgpack is self-delimiting, so no length prefix is needed; the framing itself, shared with
the agent <-> guest channel, the zygote and the handover, is :mod:`.codec`):

    request:  [0, call_id, op, body]
    response: [1, call_id, ok, body]      ok=False -> body = {"type": ..., "message": ...}
    go away:  [1, 0, False, {"type": "GoAway"}]   (the server drains: send no more calls here)

A draining server (:meth:`Server.drain`, a process being replaced) stops listening, tells each
connection to go away — call id 0 is never a call's, so a peer that predates the frame drops it
as an answer nobody waits for —, answers calls that still arrive ``Draining`` (nothing ran: the
caller may send them again, to the replacement), finishes the calls under way, and closes a
connection once its client has (or at its deadline). A client told to go away sends its next
call on a new connection and closes the old one once its answers are in.

A server is a dict of typed operations: an op not in the dict is refused and counted, so a
component's surface is exactly the keys of that dict (the agent's is six entries long).

TLS is one argument: pass an ``ssl.SSLContext`` to :func:`serve` / :class:`Client` and the same
frames travel over mutual TLS; nothing else in cellcloud opens internal sockets.

Versions (:mod:`cellcloud.core.protocols`): a Server and a Client that name their ``protocol``
negotiate a version on connect: the client's first frame is ``[0, 0, "hello", {"protocol",
"versions": [min, max]}]``, answered ``[1, 0, True, {"protocol", "version", "versions"}]``
(or refused: ``ProtocolVersionRefused``, both windows named, the link closed, the refusal
counted in :data:`protocol_stats`). A link at the previous version has its bodies translated
here, so ops and callers see only the current version. ``CELLCLOUD_PROTOCOL_MAX``
(``"agent=1,frontend=1"``, or ``"1"`` for all) caps what this process speaks, as an older
build would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..core import protocols
from ..core.protocols import OpAdapter, ProtocolError
from .codec import FrameError, FrameReader, frame_read_bytes, pack, unpack

__all__ = ["DRAINING", "CallTimeout", "Client", "FrameError", "FrameReader", "NotDelivered",
           "OpError", "RedeliveringClient", "RemoteError", "Server", "Stream", "TransportError",
           "VersionRefused", "disable_mtls", "enable_mtls", "frame_bytes_max", "frame_read_bytes",
           "mtls_role", "not_run", "pack", "protocol_stats", "tls_stats", "unpack"]

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


@dataclass
class ProtocolStats:
    """This process's internal links by protocol and side (``server``: accepted, ``client``:
    opened): the versions they speak (``links``: {protocol: {side: {version: count}}}, counted
    once per link) and the peers refused for a version outside the window (``refused``, with
    the last refusal's message in ``last_refusal``). In the agents' and frontends' status
    (``protocols``) and exported by :mod:`cellcloud.metrics`."""

    links: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    refused: dict[str, dict[str, int]] = field(default_factory=dict)
    last_refusal: dict[str, str] = field(default_factory=dict)

    def linked(self, protocol: str, side: str, version: int) -> None:
        by_version = self.links.setdefault(protocol, {}).setdefault(side, {})
        by_version[version] = by_version.get(version, 0) + 1

    def refuse(self, protocol: str, side: str, message: str) -> None:
        by_side = self.refused.setdefault(protocol, {})
        by_side[side] = by_side.get(side, 0) + 1
        self.last_refusal[protocol] = message

    def snapshot(self) -> dict[str, Any]:
        """For status: ``{protocol: {"window": [min, max], "links": {side: {version: n}},
        "refused": {side: n}, "last_refusal": str}}`` (versions as strings: JSON keys)."""
        caps = _caps()
        out: dict[str, Any] = {}
        for name in sorted(protocols.PROTOCOLS):
            doc: dict[str, Any] = {"window": list(protocols.window(name, caps.get(name)))}
            if name in self.links:
                doc["links"] = {side: {str(v): n for v, n in sorted(by.items())}
                                for side, by in self.links[name].items()}
            if name in self.refused:
                doc["refused"] = dict(self.refused[name])
                doc["last_refusal"] = self.last_refusal.get(name, "")
            out[name] = doc
        return out


protocol_stats = ProtocolStats()
protocol_max_env = "CELLCLOUD_PROTOCOL_MAX"


def _caps() -> dict[str, int]:
    """This process's caps (CELLCLOUD_PROTOCOL_MAX); a bad value is refused (ValueError)."""
    return protocols.parse_caps(os.environ.get(protocol_max_env, ""))


def _window(protocol: str | None,
            versions: tuple[int, int] | None) -> tuple[int, int] | None:
    if protocol is None:
        return None
    if protocol not in protocols.PROTOCOLS:
        raise ValueError(f"unknown internal protocol {protocol!r}")
    return versions if versions is not None else protocols.window(
        protocol, _caps().get(protocol))


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


#: the error type of a call a draining server refused before running it (see Server.drain)
DRAINING = "Draining"
_GOAWAY = [1, 0, False, {"type": "GoAway", "message": "the server is draining"}]


def not_run(e: BaseException) -> bool:
    """Whether a failed call certainly did not run at the peer, so sending it again (to the
    same address: a replacement process) cannot run it twice."""
    return isinstance(e, NotDelivered) or (isinstance(e, RemoteError) and e.type == DRAINING)


class VersionRefused(NotDelivered):
    """The call never left: the peer and this side have no protocol version in common (the
    message names both windows)."""


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
    drained: int = 0  # calls refused unrun because the server was draining
    refused_versions: int = 0  # peers refused for a protocol version outside the window
    by_op: dict[str, int] = field(default_factory=dict)


PeerCheck = Callable[[Any], bool]  # peercert dict -> allowed?


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, ops: dict[str, Handler], stats: ServerStats,
                 peer_check: PeerCheck | None = None,
                 ops_for_role: Mapping[str, frozenset[str]] | None = None,
                 live: set[_ServerProtocol] | None = None,
                 changed: Callable[[], None] | None = None,
                 protocol: str | None = None, versions: tuple[int, int] | None = None) -> None:
        self._live = live if live is not None else set()  # the server's open connections
        self.made = False  # connection_made ran (under TLS: once the handshake is over)
        self._changed = changed or (lambda: None)  # a call ended or a connection closed
        self.draining = False
        self._protocol = protocol
        self._versions = versions
        self.version: int | None = None  # negotiated (or implied by a first call); None: not yet
        self._adapt: Mapping[str, OpAdapter] | None = None  # ops to translate (an older peer)
        self._refused = False
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
        self.made = True
        self._live.add(self)
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
        if self.draining:
            self._send(list(_GOAWAY))

    def connection_lost(self, exc: Exception | None) -> None:
        self._stats.connections -= 1
        self._transport = None
        self._live.discard(self)
        self._changed()

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    @property
    def open(self) -> bool:
        return self._transport is not None

    def go_away(self) -> None:
        self.draining = True
        self._send(list(_GOAWAY))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

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
        if self._refused:
            return  # closing: nothing more is run on a refused link
        if self.version is None and self._protocol is not None and not self._negotiate(
                call_id, op, body):
            return
        self._stats.calls += 1
        if self.draining:
            self._stats.drained += 1
            self._send([1, call_id, False, {"type": DRAINING,
                                            "message": "the server is being replaced; "
                                                       "nothing ran, send it again"}])
            return
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
        adapter = self._adapt.get(op) if self._adapt is not None else None
        if adapter is not None and adapter.request_up is not None:
            body = adapter.request_up(body)
        task = asyncio.ensure_future(self._run(call_id, handler, body, adapter))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._changed()

    def _negotiate(self, call_id: Any, op: Any, body: Any) -> bool:
        """The link's first frame: a hello (answered here), or a call of a client from before
        negotiation (version 1 implied). False: the frame is dealt with (answered, or the link
        refused and closing)."""
        assert self._protocol is not None and self._versions is not None
        peer = self._peer_name()
        try:
            if op == protocols.HELLO_OP and call_id == 0:
                version = protocols.negotiate(self._protocol, self._versions, body, peer)
            else:  # no hello: an older client, which speaks version 1
                version = protocols.common(self._protocol, self._versions, (1, 1),
                                           f"{peer} (no hello: version 1)")
        except ProtocolError as e:
            self._refused = True
            self._stats.refused_versions += 1
            protocol_stats.refuse(self._protocol, "server", str(e))
            n = self._stats.refused_versions
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ...: a peer retrying floods no log
                log.warning("refused an internal peer (%d so far): %s", n, e)
            self._send([1, call_id, False, {"type": protocols.REFUSED, "message": str(e),
                                            "data": {"versions": list(self._versions)}}])
            if self._transport is not None:
                asyncio.get_running_loop().call_soon(self._transport.close)  # after the answer
            return False
        self.version = version
        self._adapt = protocols.adapters(self._protocol, version)
        protocol_stats.linked(self._protocol, "server", version)
        if op == protocols.HELLO_OP and call_id == 0:
            self._send([1, 0, True, {"protocol": self._protocol, "version": version,
                                     "versions": list(self._versions)}])
            return False
        return True

    def _peer_name(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"peer {peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 \
            else "the peer"

    async def _run(self, call_id: int, handler: Handler, body: Any,
                   adapter: OpAdapter | None = None) -> None:
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
                await self._stream(call_id, result, adapter)
                return
            if adapter is not None and adapter.reply_down is not None:
                result = adapter.reply_down(result)
            self._send([1, call_id, True, result])

    async def _stream(self, call_id: int, stream: Stream, adapter: OpAdapter | None) -> None:
        down = adapter.item_down if adapter is not None else None
        try:
            async for item in stream.items:
                if self._transport is None or self._transport.is_closing():
                    close = getattr(stream.items, "aclose", None)
                    if close is not None:
                        await close()  # the caller is gone: the producer stops (its finally)
                    return
                self._send([2, call_id, down(item) if down is not None else item])
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

    def __init__(self, ops: Mapping[str, Handler], *, peer_check: PeerCheck | None = None,
                 protocol: str | None = None,
                 versions: tuple[int, int] | None = None) -> None:
        """``protocol``: the internal protocol served (core/protocols.py), negotiated on each
        link; ``versions``: the window spoken (default: this build's, capped by
        CELLCLOUD_PROTOCOL_MAX). None: no negotiation (a hello is an unknown op, as it was to
        every server before versions)."""
        self.protocol = protocol
        self.versions = _window(protocol, versions)
        self.ops: dict[str, Handler] = dict(ops)
        self.peer_check = peer_check
        self.ops_for_role: dict[str, frozenset[str]] = {}
        self.stats = ServerStats()
        self._servers: list[asyncio.AbstractServer] = []
        self._live: set[_ServerProtocol] = set()
        # Every connection accepted, including those still in their TLS handshake (their
        # connection_made comes after it): a drain waits for those too, or a client whose
        # handshake ended first could send a call into a process about to exit. Weak: a
        # failed handshake's protocol is simply dropped.
        self._accepted: weakref.WeakSet[_ServerProtocol] = weakref.WeakSet()
        self._change: asyncio.Event | None = None  # set by a drain's connections as they settle

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
        proto = _ServerProtocol(self.ops, self.stats, self.peer_check, self.ops_for_role,
                                live=self._live, changed=self._changed,
                                protocol=self.protocol, versions=self.versions)
        proto.draining = self._change is not None  # accepted as the drain began: told at once
        self._accepted.add(proto)
        return proto

    def _changed(self) -> None:
        if self._change is not None:
            self._change.set()

    async def _until(self, done: Callable[[], bool], deadline: float) -> None:
        """Wait until ``done()`` or the loop's clock passes ``deadline``, woken by each call
        that ends and each connection that closes."""
        loop = asyncio.get_running_loop()
        self._change = self._change or asyncio.Event()
        while not done() and loop.time() < deadline:
            self._change.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._change.wait(), deadline - loop.time())

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()

    async def drain(self, timeout_s: float) -> int:
        """Leave without failing a call: stop listening, tell every connection to go away,
        refuse calls that still arrive (``Draining``), and wait — at most ``timeout_s`` — for
        the calls under way to finish and the clients to close their connections; then close
        what is left. Answers how many calls were still running at the deadline."""
        self._change = asyncio.Event()
        for srv in self._servers:
            srv.close()  # new connections are refused from here on (the replacement's port)
        for conn in list(self._accepted):
            if conn.open:
                conn.go_away()
            else:  # mid-handshake: told when it is over (connection_made)
                conn.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._until(lambda: not any(c.busy for c in self._live), deadline)
        # The calls are answered; a client that has not hung up by now (it hangs up once its
        # last answer is in) gets a short grace, then the connection closes under it.
        await self._until(lambda: not self._live and all(p.made for p in self._accepted),
                          loop.time() + min(1.0, max(0.0, deadline - loop.time())))
        running = sum(len(c._tasks) for c in self._live)
        for conn in list(self._live):
            conn.close()
        for srv in self._servers:
            await srv.wait_closed()
        return running


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[Exception | None], None],
                 on_goaway: Callable[[], None] | None = None) -> None:
        self._on_goaway = on_goaway or (lambda: None)
        self._unpacker = _unpacker()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: streamed calls (Client.call_stream): their items, then an end (None) or an error
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self._out: list[bytes] = []
        self.gone_away = False  # the server is draining: no new calls on this connection
        self.version: int | None = None  # negotiated; None: no protocol named
        self.adapt: Mapping[str, OpAdapter] | None = None  # ops to translate (an older server)

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
                if call_id == 0 and not ok and isinstance(body, dict) \
                        and body.get("type") == "GoAway":
                    self.gone_away = True
                    self._on_goaway()
                    self._on_lost(None)  # the client's next call connects afresh
                    self.close_if_idle()
                    continue
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

    def close_if_idle(self) -> None:
        """A connection told to go away closes once no call waits on it (soon: the call the
        answer just popped has its result already)."""
        if not self.pending and not self.streams and self.transport is not None:
            asyncio.get_running_loop().call_soon(self._close_if_still_idle)

    def _close_if_still_idle(self) -> None:
        if not self.pending and not self.streams and self.transport is not None:
            self.transport.close()

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


def _down(adapt: Mapping[str, OpAdapter], op: str, body: Any) -> Any:
    adapter = adapt.get(op)
    return adapter.request_down(body) if adapter and adapter.request_down else body


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
        protocol: str | None = None,
        versions: tuple[int, int] | None = None,
    ) -> None:
        """``protocol``: the internal protocol to negotiate on connect (default: the one
        ``expect_role`` serves); ``versions``: the window offered (default: this build's,
        capped by CELLCLOUD_PROTOCOL_MAX)."""
        if protocol is None and expect_role in protocols.PROTOCOLS:
            protocol = expect_role
        self.protocol = protocol
        self.versions = _window(protocol, versions)
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
        # When the peer last said it is being replaced (GoAway or a Draining answer), loop time
        self.replacing_since: float | None = None

    def _told_to_go_away(self) -> None:
        self.replacing_since = asyncio.get_running_loop().time()

    @property
    def connected(self) -> bool:
        return self._proto is not None and self._proto.transport is not None

    async def _connect(self) -> _ClientProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and self._proto.transport is not None \
                    and not self._proto.gone_away:
                return self._proto
            loop = asyncio.get_running_loop()

            def lost(_exc: Exception | None) -> None:
                if self._proto is proto_box[0]:
                    self._proto = None

            proto_box: list[_ClientProtocol | None] = [None]

            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _ClientProtocol(lost, self._told_to_go_away),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self._server_hostname if self._ssl else None,
                    ),
                    self._connect_timeout_s,
                )
            except (OSError, TimeoutError) as e:
                raise NotDelivered(f"cannot connect to {self.host}:{self.port}: {e!r}") from e
            proto_box[0] = proto
            if self._peer_check is not None and (
                    proto.transport is None
                    or not self._peer_check(proto.transport.get_extra_info("peercert"))):
                if proto.transport is not None:
                    proto.transport.close()
                raise NotDelivered(f"{self.host}:{self.port} is not a peer we may call "
                                     "(its certificate names another role)")
            if self.protocol is not None:
                await self._hello(proto)
            self._proto = proto
            return proto

    async def _hello(self, proto: _ClientProtocol) -> None:
        """Negotiate the link's version (call id 0, before any call); a server from before
        negotiation answers UnknownOperation: it speaks version 1."""
        assert self.protocol is not None and self.versions is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.pending[0] = fut
        proto.send(self._packer.pack([0, 0, protocols.HELLO_OP,
                                      protocols.hello(self.protocol, self.versions)]))
        peer = f"{self.host}:{self.port}"
        try:
            answer = await asyncio.wait_for(fut, self._connect_timeout_s)
            version = protocols.accepted(self.protocol, self.versions, answer, peer)
        except RemoteError as e:
            if e.type == "UnknownOperation":
                try:
                    version = protocols.common(self.protocol, self.versions, (1, 1),
                                               f"{peer} (no negotiation: version 1)")
                except ProtocolError as pe:
                    self._refused(proto, str(pe))
            elif e.type == protocols.REFUSED:
                self._refused(proto, f"{peer} refused this client: {e.message}")
            else:
                self._refused(proto, f"{peer} answered the hello with {e}")
        except ProtocolError as e:
            self._refused(proto, str(e))
        except (TimeoutError, TransportError) as e:
            if proto.transport is not None:
                proto.transport.close()
            raise NotDelivered(f"no hello answer from {peer}: {e!r}") from e
        finally:
            proto.pending.pop(0, None)
        proto.version = version
        proto.adapt = protocols.adapters(self.protocol, version)
        protocol_stats.linked(self.protocol, "client", version)

    def _refused(self, proto: _ClientProtocol, message: str) -> None:
        assert self.protocol is not None
        protocol_stats.refuse(self.protocol, "client", message)
        if proto.transport is not None:
            proto.transport.close()
        raise VersionRefused(message)

    @property
    def version(self) -> int | None:
        """The version the current link speaks (None: not connected, or no protocol)."""
        return self._proto.version if self._proto is not None else None

    async def call(self, op: str, body: Any = None, *, timeout_s: float) -> Any:
        """Send one call and wait for its answer, at most ``timeout_s`` seconds."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.gone_away:
            proto = await self._connect()
        transport = proto.transport
        if transport is None:
            raise NotDelivered("connection lost before send")
        if len(proto.pending) >= calls_in_flight_max:
            raise TransportError("too many calls in flight on one connection")
        if proto.adapt is not None:
            body = _down(proto.adapt, op, body)
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
            if proto.gone_away:
                proto.close_if_idle()

    async def call_stream(self, op: str, body: Any = None, *,
                          timeout_s: float) -> AsyncGenerator[tuple[str, Any], None]:
        """A call whose answer may be a :class:`Stream`: yields ``("item", x)`` for each
        streamed item as it arrives, then ``("end", answer)`` once (the answer of an op that
        did not stream, or None); raises as :meth:`call` does. ``timeout_s`` bounds the whole
        call."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.gone_away:
            proto = await self._connect()
        if proto.transport is None:
            raise NotDelivered("connection lost before send")
        if len(proto.pending) + len(proto.streams) >= calls_in_flight_max:
            raise TransportError("too many calls in flight on one connection")
        if proto.adapt is not None:
            body = _down(proto.adapt, op, body)
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
            if proto.gone_away:
                proto.close_if_idle()

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class RedeliveringClient(Client):
    """A client whose caller may send a call again when it certainly did not run
    (:func:`not_run`: no connection, or the peer was draining) — while the peer process is
    being replaced (it said so: GoAway, Draining). The caller chooses this client, so the retry stays at its layer (DESIGN
    rule 4); a call that may have run is never sent twice. Sends again with a doubling pause
    (``first_pause_s`` up to ``pause_max_s``) for at most ``redeliver_s`` and within the call's
    own ``timeout_s``."""

    def __init__(self, host: str, port: int, *, redeliver_s: float,
                 first_pause_s: float = 0.02, pause_max_s: float = 0.5, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self.redeliver_s = redeliver_s
        self._first_pause_s = first_pause_s
        self._pause_max_s = pause_max_s
        self.redelivered = 0  # calls sent again (a count for the caller's status)

    def _again(self, e: BaseException, now: float) -> bool:
        """Send it again? Only what certainly did not run, and only while the peer is being
        replaced: it answered Draining, or told this client to go away in the last
        ``redeliver_s``. A peer that is simply down (crashed, killed, never started) is not
        waited for: its callers learn at once, as before."""
        if isinstance(e, RemoteError) and e.type == DRAINING:
            self.replacing_since = now
            return True
        return (isinstance(e, NotDelivered) and self.replacing_since is not None
                and now - self.replacing_since < self.redeliver_s)

    async def call(self, op: str, body: Any = None, *, timeout_s: float) -> Any:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(self.redeliver_s, timeout_s)
        pause = self._first_pause_s
        while True:
            try:
                return await super().call(op, body, timeout_s=timeout_s)
            except (NotDelivered, RemoteError) as e:
                if not self._again(e, loop.time()) or loop.time() + pause > give_up:
                    raise
            await asyncio.sleep(pause)  # the replacement is starting: a bounded backoff
            pause = min(pause * 2, self._pause_max_s)
            self.redelivered += 1

    async def call_stream(self, op: str, body: Any = None, *,
                          timeout_s: float) -> AsyncGenerator[tuple[str, Any], None]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(self.redeliver_s, timeout_s)
        pause = self._first_pause_s
        while True:
            items = super().call_stream(op, body, timeout_s=timeout_s)
            try:
                first = await anext(items)
            except (NotDelivered, RemoteError) as e:
                await items.aclose()
                if not self._again(e, loop.time()) or loop.time() + pause > give_up:
                    raise
                await asyncio.sleep(pause)  # as in call()
                pause = min(pause * 2, self._pause_max_s)
                self.redelivered += 1
                continue
            try:
                yield first
                async for item in items:
                    yield item
            finally:
                await items.aclose()
            return
