"""Deadlines and a cap for the public endpoint's connections, sans-IO.

A client connection is always in one phase, by what it owes us:

    headers ──(headers complete)──> body ──(message complete)──> busy | idle
    idle ──(a byte of the next request)──> headers        busy ──(response sent)──> idle

- ``headers``: from accept (or the first byte of a kept-alive connection's next request) the
  request line and headers must be complete within ``header_timeout_ms``; bytes that trickle in
  do not move the deadline.
- ``body``: from the end of the headers the body must be complete within ``body_timeout_ms``
  plus ``1 / body_rate_bytes_per_s_min`` seconds per byte received: a body that stalls or
  trickles is closed at about ``body_timeout_ms``; a body that keeps coming at the minimum rate
  or faster gets the time it needs (its size is capped elsewhere).
- ``busy``: the request is complete and the application answers it (an invoke may run for
  15 minutes): no deadline here, the application has its own.
- ``idle``: nothing in flight and nothing owed: kept alive for ``keepalive_idle_timeout_ms``.

Over ``connections_max`` connections, a new connection makes room: the oldest ``idle`` one is
closed, else the one stalled longest in ``headers``/``body``; a new connection is never refused
(a good client may share an attacker's address) and a ``busy`` one is never closed.

The shell reports events with the time passed in and closes what :meth:`expired` and
:meth:`opened` return. Each phase is an insertion-ordered dict, so for ``headers`` and ``idle``
(fixed timeouts) the expired connections are at the front and a sweep touches only those.

:class:`HeaderScanner` bounds a request's head before the HTTP parser sees it: at most
``line_bytes_max`` per line, ``bytes_max`` in all and ``headers_max`` header lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["headers", "body", "busy", "idle"]
_PHASES: tuple[Phase, ...] = ("headers", "body", "busy", "idle")


@dataclass(frozen=True)
class GuardParams:
    header_timeout_ms: int = 10_000
    body_timeout_ms: int = 30_000
    body_rate_bytes_per_s_min: int = 64 * 1024
    keepalive_idle_timeout_ms: int = 30_000
    connections_max: int = 50_000

    def __post_init__(self) -> None:
        assert self.header_timeout_ms > 0 and self.body_timeout_ms > 0
        assert self.keepalive_idle_timeout_ms > 0 and self.body_rate_bytes_per_s_min > 0
        assert self.connections_max >= 1


@dataclass
class _Conn:
    phase: Phase
    since_ms: int
    body_bytes: int = 0
    in_flight: int = 0  # requests handed to the application and not yet answered


@dataclass
class GuardStats:
    opened: int = 0
    closed_header_timeout: int = 0
    closed_body_timeout: int = 0
    closed_idle_timeout: int = 0
    evicted: int = 0


@dataclass
class ConnectionGuard:
    params: GuardParams = field(default_factory=GuardParams)

    def __post_init__(self) -> None:
        self._conns: dict[int, _Conn] = {}
        self._by_phase: dict[Phase, dict[int, None]] = {p: {} for p in _PHASES}
        self.stats = GuardStats()

    def __len__(self) -> int:
        return len(self._conns)

    def phase(self, cid: int) -> Phase | None:
        c = self._conns.get(cid)
        return c.phase if c else None

    # -- events --------------------------------------------------------------------------------
    def opened(self, cid: int, now_ms: int) -> list[int]:
        """A new connection (its first request's head is due now); returns connections to
        close to keep within ``connections_max``."""
        assert cid not in self._conns
        self._conns[cid] = _Conn("headers", now_ms)
        self._by_phase["headers"][cid] = None
        self.stats.opened += 1
        evict: list[int] = []
        while len(self._conns) - len(evict) > self.params.connections_max:
            victim = self._victim(exclude=cid, taken=evict)
            if victim is None:
                break  # everything else is answering a request: over the cap, never refuse
            evict.append(victim)
        for v in evict:
            self.closed(v)
        self.stats.evicted += len(evict)
        return evict

    def request_started(self, cid: int, now_ms: int) -> None:
        """The first byte of a request on a kept-alive connection."""
        c = self._conns.get(cid)
        if c is not None and c.phase in ("idle", "busy"):
            self._move(cid, c, "headers", now_ms)

    def headers_done(self, cid: int, now_ms: int) -> None:
        """The head is complete; the application now has the request."""
        c = self._conns.get(cid)
        if c is not None:
            c.in_flight += 1
            c.body_bytes = 0
            self._move(cid, c, "body", now_ms)

    def body_received(self, cid: int, nbytes: int) -> None:
        c = self._conns.get(cid)
        if c is not None:
            c.body_bytes += nbytes

    def message_done(self, cid: int, now_ms: int) -> None:
        """The client has sent the whole request."""
        c = self._conns.get(cid)
        if c is not None and c.phase == "body":
            self._move(cid, c, "busy" if c.in_flight else "idle", now_ms)

    def response_done(self, cid: int, now_ms: int) -> None:
        c = self._conns.get(cid)
        if c is None:
            return
        c.in_flight = max(0, c.in_flight - 1)
        if c.phase == "busy" and not c.in_flight:
            self._move(cid, c, "idle", now_ms)

    def closed(self, cid: int) -> None:
        c = self._conns.pop(cid, None)
        if c is not None:
            del self._by_phase[c.phase][cid]

    def expired(self, now_ms: int) -> list[int]:
        """Connections past their phase's deadline (forgotten here; the shell closes them)."""
        p = self.params
        out: list[int] = []
        timed: tuple[tuple[Phase, int], ...] = (("headers", p.header_timeout_ms),
                                                ("idle", p.keepalive_idle_timeout_ms))
        for phase, timeout_ms in timed:
            for cid in self._by_phase[phase]:  # oldest first: stop at the first still in time
                if now_ms - self._conns[cid].since_ms < timeout_ms:
                    break
                out.append(cid)
                if phase == "headers":
                    self.stats.closed_header_timeout += 1
                else:
                    self.stats.closed_idle_timeout += 1
        for cid in self._by_phase["body"]:
            c = self._conns[cid]
            allowance_ms = p.body_timeout_ms + c.body_bytes * 1000 // p.body_rate_bytes_per_s_min
            if now_ms - c.since_ms >= allowance_ms:
                out.append(cid)
                self.stats.closed_body_timeout += 1
        for cid in out:
            self.closed(cid)
        return out

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self._conns),
                **{f"connections_{p}": len(self._by_phase[p]) for p in _PHASES},
                **vars(self.stats)}

    # -- inside --------------------------------------------------------------------------------
    def _move(self, cid: int, c: _Conn, phase: Phase, now_ms: int) -> None:
        del self._by_phase[c.phase][cid]
        c.phase, c.since_ms = phase, now_ms
        self._by_phase[phase][cid] = None

    def _victim(self, exclude: int, taken: list[int]) -> int | None:
        for cid in self._by_phase["idle"]:
            if cid != exclude and cid not in taken:
                return cid
        best: tuple[int, int] | None = None
        stalled: tuple[Phase, ...] = ("headers", "body")
        for phase in stalled:
            for cid in self._by_phase[phase]:
                if cid == exclude or cid in taken:
                    continue
                since = self._conns[cid].since_ms
                if best is None or since < best[0]:
                    best = (since, cid)
                break  # oldest of this phase found (or the only candidate after exclusions)
        return best[1] if best else None


class HeadTooLarge(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class HeaderScanner:
    """Counts a request head's lines and bytes as they arrive; raises :class:`HeadTooLarge`.

    :meth:`feed` returns the offset just past the head's blank line once it is in ``data``
    (then the scanner is done until :meth:`reset`), or None while the head goes on.
    """

    line_bytes_max: int = 8 * 1024
    bytes_max: int = 64 * 1024
    headers_max: int = 100
    active: bool = True
    _line: int = 0  # bytes of the current, unfinished line (without CR/LF)
    _bytes: int = 0
    _lines: int = 0  # finished non-empty lines: the request line, then headers
    _last_cr: bool = False  # the current line's last byte so far is CR

    def reset(self) -> None:
        self.active, self._line, self._bytes, self._lines = True, 0, 0, 0
        self._last_cr = False

    def feed(self, data: bytes) -> int | None:
        if not self.active:
            return None
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            if end > pos:
                self._line += end - pos
                self._last_cr = data[end - 1] == 0x0D
            self._bytes += end - pos + (nl >= 0)
            content = self._line - (1 if self._last_cr else 0)
            if content > self.line_bytes_max:
                raise HeadTooLarge(f"A request line or header is longer than "
                                   f"{self.line_bytes_max} bytes")
            if self._bytes > self.bytes_max:
                raise HeadTooLarge(f"The request's headers are larger than {self.bytes_max} bytes")
            if nl < 0:
                return None
            if content == 0:  # a blank line ends the head once a request line came before it
                if self._lines > 0:
                    self.active = False
                    return nl + 1
            else:
                self._lines += 1
                if self._lines - 1 > self.headers_max:
                    raise HeadTooLarge(f"A request may carry at most {self.headers_max} headers")
            self._line, self._last_cr = 0, False
            pos = nl + 1
        return None
