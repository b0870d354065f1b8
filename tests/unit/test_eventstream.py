"""core/eventstream.py's frames, read back by botocore's own event stream parser (and its
response parser for InvokeWithResponseStream, as boto3 reads them)."""

from __future__ import annotations

import json
import zlib

import botocore.session
from botocore.eventstream import EventStreamBuffer
from botocore.parsers import create_parser
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import eventstream


@given(st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256),
                       st.text(max_size=50), max_size=5), st.binary(max_size=3000))
def test_botocore_reads_what_we_write(headers: dict[str, str], payload: bytes) -> None:
    buf = EventStreamBuffer()
    buf.add_data(eventstream.message(headers, payload))
    (msg,) = list(buf)
    assert msg.headers == headers and msg.payload == payload


def test_a_flipped_bit_is_refused() -> None:
    raw = bytearray(eventstream.payload_chunk(b"hello"))
    raw[-6] ^= 1
    buf = EventStreamBuffer()
    buf.add_data(bytes(raw))
    try:
        list(buf)
    except Exception as e:  # botocore's ChecksumMismatch
        assert "Checksum" in type(e).__name__ or "checksum" in str(e).lower()
    else:
        raise AssertionError("botocore accepted a corrupt message")
    assert zlib.crc32(b"") == 0


def test_boto3_parses_an_invoke_with_response_stream() -> None:
    model = botocore.session.get_session().get_service_model("lambda")
    op = model.operation_model("InvokeWithResponseStream")
    body = b"x" * (eventstream.chunk_bytes_max + 10)
    raw = eventstream.response_stream(body, log_result="TG9n")

    class Raw:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def stream(self) -> list[bytes]:
            return [self.data[i:i + 1000] for i in range(0, len(self.data), 1000)]

    parsed = create_parser("rest-json").parse(
        {"status_code": 200, "headers": {"content-type": eventstream.CONTENT_TYPE,
                                         "x-amz-executed-version": "$LATEST"},
         "body": Raw(raw), "context": {"operation_name": "InvokeWithResponseStream"}},
        op.output_shape)
    events = list(parsed["EventStream"])
    chunks = [e["PayloadChunk"]["Payload"] for e in events if "PayloadChunk" in e]
    assert b"".join(chunks) == body and len(chunks) == 2
    assert events[-1] == {"InvokeComplete": {"LogResult": "TG9n"}}
    buf = EventStreamBuffer()
    buf.add_data(eventstream.invoke_complete("Unhandled", "boom"))
    (msg,) = list(buf)
    assert msg.headers[":event-type"] == "InvokeComplete"
    assert json.loads(msg.payload) == {"ErrorCode": "Unhandled", "ErrorDetails": "boom"}
