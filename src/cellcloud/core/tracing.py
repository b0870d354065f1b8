"""X-Ray trace ids and their OpenTelemetry twins (pure: no I/O; randomness and time come in).

An invocation's trace header is AWS X-Ray's::

    Root=1-<8 hex: epoch seconds>-<24 hex: random>;Parent=<16 hex: span id>;Sampled=0|1

The router makes one per invoke (or honours a valid incoming ``X-Amzn-Trace-Id``), and every
hop passes it on with ``Parent`` set to its own span's id, so the next hop's span is its child;
the environment hands the function the header with ``Parent`` = the environment's span, as
Lambda does (``Lambda-Runtime-Trace-Id``, ``_X_AMZN_TRACE_ID``).

OpenTelemetry ids are derived as AWS's X-Ray/OTel mapping does: the 128-bit trace id is the
root's 8 time digits followed by its 24 random digits; a span id is the 64-bit ``Parent``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .limits import DEFAULT_LIMITS

HEADER = "x-amzn-trace-id"  # the HTTP header, lower-case as the router's headers are

_ROOT = re.compile(r"1-[0-9a-f]{8}-[0-9a-f]{24}")
_SPAN = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class TraceHeader:
    root: str  # "1-<8 hex>-<24 hex>"
    parent: str | None = None  # the span that caused this hop (16 hex), None: a root span
    sampled: bool | None = None  # None: undecided (absent or "?")

    def __post_init__(self) -> None:
        assert _ROOT.fullmatch(self.root), self.root
        assert self.parent is None or _SPAN.fullmatch(self.parent), self.parent

    def format(self) -> str:
        parts = [f"Root={self.root}"]
        if self.parent is not None:
            parts.append(f"Parent={self.parent}")
        if self.sampled is not None:
            parts.append(f"Sampled={int(self.sampled)}")
        return ";".join(parts)

    def child(self, span_id: str) -> TraceHeader:
        """The header the next hop gets: this one with ``Parent`` = the current span."""
        return TraceHeader(self.root, span_id, self.sampled)

    def response(self) -> str:
        """What an invoke's answer carries back: the root and the sampling decision."""
        return f"Root={self.root};Sampled={int(bool(self.sampled))}"

    @property
    def otel_trace_id(self) -> int:
        """The OpenTelemetry trace id (X-Ray's time digits then its random digits)."""
        return int(self.root[2:10] + self.root[11:], 16)

    @property
    def otel_parent_id(self) -> int | None:
        return int(self.parent, 16) if self.parent is not None else None


def parse(value: str | None) -> TraceHeader | None:
    """A header's value, or None when it is not a valid X-Ray trace header (no valid Root, a
    malformed Parent or Sampled, too long). Keys are case-insensitive; unknown fields (Lineage,
    Self, ...) are dropped."""
    if not value or len(value) > DEFAULT_LIMITS.trace_header_chars_max:
        return None
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if not sep:
            if key:
                return None
            continue
        fields.setdefault(key.strip().lower(), val.strip().lower())
    root = fields.get("root", "")
    if not _ROOT.fullmatch(root):
        return None
    parent = fields.get("parent")
    if parent is not None and not _SPAN.fullmatch(parent):
        return None
    sampled_raw = fields.get("sampled")
    if sampled_raw in (None, "?"):
        sampled: bool | None = None
    elif sampled_raw in ("0", "1"):
        sampled = sampled_raw == "1"
    else:
        return None
    return TraceHeader(root, parent, sampled)


def valid_span_id(value: str) -> bool:
    return bool(_SPAN.fullmatch(value)) and value != "0" * 16


def new_span_id(rng: random.Random) -> str:
    """A span id: 16 hex digits, never all zero (invalid in W3C and OTel)."""
    return f"{rng.getrandbits(64) or 1:016x}"


def new_root(now_ms: int, rng: random.Random) -> str:
    return f"1-{(now_ms // 1000) & 0xFFFFFFFF:08x}-{rng.getrandbits(96):024x}"


def begin(incoming: str | None, *, now_ms: int, rng: random.Random,
          sample: bool) -> tuple[TraceHeader, str]:
    """The first hop's trace: ``incoming`` when valid (its Parent is this span's parent, its
    Sampled decision is kept), else a new root. Undecided sampling becomes ``sample`` (the
    region samples everything while an exporter is configured, nothing otherwise).
    Returns (the header as received or made, this hop's own span id)."""
    found = parse(incoming)
    if found is None:
        found = TraceHeader(new_root(now_ms, rng), None, sample)
    elif found.sampled is None:
        found = TraceHeader(found.root, found.parent, sample)
    return found, new_span_id(rng)
