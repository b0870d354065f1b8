"""Frames between store nodes and clients: msgpack bodies, each with an HMAC-SHA256 tag.

A frame on the wire is ``u32 big-endian length`` + ``msgpack([tag, body])`` where ``body`` is
the msgpack encoding of one message map and ``tag = HMAC-SHA256(key, body)``. A frame whose tag
does not verify is dropped by the receiver (and counted); so is a frame over
``FRAME_BYTES_MAX`` or one that decodes to a message type or field set we do not know: a node
rejects what it only partly understands.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import msgpack

from cellcloud.core.paxos import (
    Accept,
    Accepted,
    CatchUp,
    CatchUpRequest,
    Entry,
    Heartbeat,
    HeartbeatAck,
    Prepare,
    Promise,
    Request,
    Response,
)

FRAME_BYTES_MAX = 4 * 1024 * 1024
TAG_BYTES = 32
_LEN = struct.Struct(">I")


class FrameRejected(ValueError):
    """A frame that failed authentication or does not decode to a known message."""


def seal(key: bytes, body: dict[str, Any]) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    tag = hmac.new(key, raw, hashlib.sha256).digest()
    frame = msgpack.packb([tag, raw], use_bin_type=True)
    if len(frame) > FRAME_BYTES_MAX:
        raise ValueError(f"frame over frame_bytes_max={FRAME_BYTES_MAX}")
    return _LEN.pack(len(frame)) + frame


def unseal(key: bytes, frame: bytes) -> dict[str, Any]:
    try:
        tag, raw = msgpack.unpackb(frame, raw=False)
    except Exception as exc:
        raise FrameRejected("malformed frame") from exc
    if not isinstance(tag, bytes) or not isinstance(raw, bytes):
        raise FrameRejected("malformed frame")
    want = hmac.new(key, raw, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, want):
        raise FrameRejected("bad hmac")
    body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if not isinstance(body, dict):
        raise FrameRejected("body is not a map")
    return body


async def read_frame(reader: Any) -> bytes:
    head = await reader.readexactly(_LEN.size)
    (length,) = _LEN.unpack(head)
    if length > FRAME_BYTES_MAX:
        raise FrameRejected(f"frame over frame_bytes_max={FRAME_BYTES_MAX}")
    frame: bytes = await reader.readexactly(length)
    return frame


# ---- message <-> map --------------------------------------------------------------------


def _ballot(b: Any) -> tuple[int, str]:
    if not (isinstance(b, list | tuple) and len(b) == 2):
        raise FrameRejected("bad ballot")
    if not isinstance(b[0], int) or not isinstance(b[1], str):
        raise FrameRejected("bad ballot")
    return (b[0], b[1])


def _entry_out(e: Entry) -> list[Any]:
    return [e.slot, list(e.ballot), e.cmd, e.client_id, e.seq]


def _entry_in(x: Any) -> Entry:
    if not (isinstance(x, list) and len(x) == 5 and isinstance(x[2], dict)):
        raise FrameRejected("bad entry")
    return Entry(int(x[0]), _ballot(x[1]), x[2], int(x[3]), int(x[4]))


_FIELDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "prepare": (Prepare, ("cell", "src", "ballot", "from_slot")),
    "promise": (
        Promise,
        ("cell", "src", "ballot", "ok", "promised", "commit_index", "snapshot", "entries"),
    ),
    "accept": (Accept, ("cell", "src", "ballot", "entries", "commit_index")),
    "accepted": (Accepted, ("cell", "src", "ballot", "ok", "promised", "slots")),
    "heartbeat": (Heartbeat, ("cell", "src", "ballot", "commit_index", "read_round")),
    "heartbeat_ack": (HeartbeatAck, ("cell", "src", "ballot", "ok", "promised", "read_round")),
    "catchup_request": (CatchUpRequest, ("cell", "src", "from_slot")),
    "catchup": (CatchUp, ("cell", "src", "snapshot", "entries", "commit_index")),
    "request": (Request, ("cell", "src", "request_id", "client_id", "seq", "command")),
    "response": (
        Response,
        ("cell", "src", "request_id", "status", "result", "leader_hint"),
    ),
}
_NAMES = {cls: name for name, (cls, _) in _FIELDS.items()}


def encode(msg: Any) -> dict[str, Any]:
    name = _NAMES[type(msg)]
    out: dict[str, Any] = {"t": name}
    for f in _FIELDS[name][1]:
        v = getattr(msg, f)
        if f in ("ballot", "promised"):
            v = list(v)
        elif f == "entries":
            v = [_entry_out(e) for e in v]
        elif f == "slots":
            v = list(v)
        out[f] = v
    return out


def decode(body: dict[str, Any]) -> Any:
    name = body.get("t")
    if name not in _FIELDS:
        raise FrameRejected(f"unknown message type {name!r}")
    cls, fields = _FIELDS[name]
    if set(body) != {"t", *fields}:
        raise FrameRejected(f"fields for {name} must be exactly {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for f in fields:
        v = body[f]
        if f in ("ballot", "promised"):
            v = _ballot(v)
        elif f == "entries":
            if not isinstance(v, list):
                raise FrameRejected("bad entries")
            v = tuple(_entry_in(x) for x in v)
        elif f == "slots":
            v = tuple(int(s) for s in v)
        elif f in ("cell", "src") and not isinstance(v, str):
            raise FrameRejected(f"{f} must be str")
        kwargs[f] = v
    return cls(**kwargs)
