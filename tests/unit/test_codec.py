"""The one framing of internal links (transport/codec.py): stream frames and whole messages."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.transport.codec import (
    FrameError,
    FrameReader,
    StreamChannel,
    pack,
    pack_parts,
    recv_message,
    send_message,
    unpack,
    unpack_dict,
)

docs = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(docs, min_size=1, max_size=6), st.data())
def test_frames_split_anywhere_come_out_whole(objs: list[object], data: st.DataObject) -> None:
    stream = b"".join(pack(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader(1 << 20, read_bytes=16)
    out: list[object] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out.extend(reader.feed(stream[start:cut]))
        start = cut
    assert out == objs


def test_a_partial_frame_waits_for_the_rest() -> None:
    frame = pack({"t": "result", "payload": b"x" * 1000})
    reader = FrameReader(1 << 20)
    assert list(reader.feed(frame[:-1])) == []
    assert list(reader.feed(frame[-1:])) == [{"t": "result", "payload": b"x" * 1000}]


def test_a_frame_over_the_cap_is_refused() -> None:
    reader = FrameReader(4096, read_bytes=1024)
    with pytest.raises(FrameError):
        list(reader.feed(pack({"payload": b"x" * 10_000})))


def test_an_oversize_frame_fed_in_pieces_is_refused() -> None:
    reader = FrameReader(4096, read_bytes=1024)
    frame = pack({"payload": b"x" * 10_000})
    with pytest.raises(FrameError):
        for i in range(0, len(frame), 1000):
            list(reader.feed(frame[i:i + 1000]))


def test_garbage_is_refused() -> None:
    reader = FrameReader(4096)
    with pytest.raises(FrameError):
        list(reader.feed(b"\xc1" * 8))  # 0xc1: never used in msgpack
    with pytest.raises(FrameError):
        unpack(b"\xc1", 4096)
    with pytest.raises(FrameError):
        unpack(pack(1) + pack(2), 4096)  # trailing bytes in a whole message
    with pytest.raises(FrameError):
        unpack(pack(b"x" * 100), 50)
    with pytest.raises(FrameError):
        unpack_dict(pack([1, 2]), 4096)


def test_the_reader_buffer_is_replaced_after_traffic() -> None:
    reader = FrameReader(1 << 20, read_bytes=1024)
    for _ in range(10):
        assert list(reader.feed(pack(b"y" * 600))) == [b"y" * 600]
    assert reader.resets >= 1


def test_messages_with_fds_on_a_seqpacket_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        send_message(a, {"t": "env", "n": 1}, [w])
        doc, fds = recv_message(b, 4096, 1)
        assert doc == {"t": "env", "n": 1} and len(fds) == 1
        os.write(fds[0], b"!")
        assert os.read(r, 1) == b"!"
        os.close(fds[0])
        a.sendall(b"\xc1\xc1")
        with pytest.raises(FrameError):
            recv_message(b, 4096)
        a.sendall(pack({"big": b"x" * 8000}))
        with pytest.raises(FrameError):  # over the cap: refused, not truncated and misread
            recv_message(b, 4096)
        a.close()
        assert recv_message(b, 4096) == (None, [])
    finally:
        for fd in (r, w):
            os.close(fd)
        b.close()


def test_a_stream_channel_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    try:
        left, right = StreamChannel(a, 1 << 20), StreamChannel(b, 1 << 20)
        left.send({"t": "invoke", "payload": b"p" * 200_000})
        left.send({"t": "shutdown"})
        assert right.recv() == {"t": "invoke", "payload": b"p" * 200_000}
        assert right.recv() == {"t": "shutdown"}
        a.close()
        assert right.recv() is None
    finally:
        b.close()


def test_the_codec_is_plain_msgpack() -> None:
    # Peers of an older build (a guest adopted in a live update) frame with msgpack directly.
    doc = {"t": "ready", "logs": b"x", "init_ms": 1.5}
    assert unpack(msgpack.packb(doc, use_bin_type=True), 4096) == doc


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), docs | st.binary(min_size=16 * 1024,
                                                             max_size=70_000), max_size=5))
def test_parts_are_one_frame(doc: dict[str, object]) -> None:
    parts = pack_parts(doc)
    assert list(FrameReader(1 << 20).feed(b"".join(parts))) == [doc]


def test_a_big_payload_is_written_from_where_it_is() -> None:
    payload = b"p" * 100_000
    parts = pack_parts({"t": "result", "payload": payload, "logs": b"l"})
    assert any(p is payload for p in parts)  # not copied into the frame
    assert pack_parts({"t": "x", "payload": b"small"}) == [pack({"t": "x", "payload": b"small"})]
