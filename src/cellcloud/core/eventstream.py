"""AWS's event stream framing (``application/vnd.amazon.eventstream``), the encoding side, for
InvokeWithResponseStream's ``PayloadChunk``/``InvokeComplete`` events. Pure.

No installed library encodes it (botocore only parses; awscrt's encoder lives behind its RPC
client), so this is the small encoder the format needs, over ``zlib.crc32``; CI checks its
output with botocore's own parser (tests/unit/test_eventstream.py).

A message: total length (4 bytes, big-endian), headers length (4), CRC-32 of those 8 bytes;
the headers (name length 1 byte, name, type 7 = string, value length 2 bytes, value); the
payload; CRC-32 of everything before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from .limits import DEFAULT_LIMITS

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7
#: the most payload one PayloadChunk carries (a longer body is split)
chunk_bytes_max = DEFAULT_LIMITS.response_stream_chunk_bytes_max


def message(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b"".join(
        struct.pack("!B", len(k.encode())) + k.encode() + struct.pack("!BH", _STRING, len(v.encode()))
        + v.encode() for k, v in headers.items())
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    head = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return head + struct.pack("!I", zlib.crc32(head))


def payload_chunk(data: bytes) -> bytes:
    return message({":event-type": "PayloadChunk", ":content-type": "application/octet-stream",
                    ":message-type": "event"}, data)


def invoke_complete(error_code: str | None = None, error_details: str | None = None,
                    log_result: str | None = None) -> bytes:
    doc: dict[str, Any] = {}
    if error_code is not None:
        doc["ErrorCode"] = error_code
    if error_details is not None:
        doc["ErrorDetails"] = error_details
    if log_result is not None:
        doc["LogResult"] = log_result
    return message({":event-type": "InvokeComplete", ":content-type": "application/json",
                    ":message-type": "event"}, json.dumps(doc).encode())


def response_stream(payload: bytes, error_code: str | None = None,
                    error_details: str | None = None, log_result: str | None = None,
                    final: bool = True) -> bytes:
    """The payload as PayloadChunk events (each at most ``chunk_bytes_max``), then (``final``)
    InvokeComplete."""
    parts = [payload_chunk(payload[i:i + chunk_bytes_max])
             for i in range(0, len(payload), chunk_bytes_max)]
    if final:
        parts.append(invoke_complete(error_code, error_details, log_result))
    return b"".join(parts)
