"""Agent memory stays bounded under sustained invocations (issue #11, defect 4).

The leak: each environment channel's msgpack ``Unpacker`` (and each transport connection's)
walked its stream through a read buffer allocated up front (1 MiB) and only ever grown, so
every warm environment's channel ended up holding that whole buffer in RSS. These tests
measure the process's RSS in a fresh subprocess (nothing else allocating in it) while frames
stream through the very objects the agent uses.
"""

from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest

from cellcloud.transport import FrameError, FrameReader

MiB = 1024 * 1024

# 100 environments' channels, 100,000 invocation results (1 KiB of logs each) through them.
CHANNELS_SCRIPT = r"""
import asyncio, msgpack, sys
from cellcloud.agent.server import _EnvChannel

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

async def main(envs, invocations):
    loop = asyncio.get_running_loop()
    chans = [_EnvChannel() for _ in range(envs)]
    frame = msgpack.packb({"t": "result", "id": "0" * 36, "ok": True, "payload": b'{"a": 1}',
                           "logs": b"x" * 1024, "duration_ms": 0.1, "max_rss_kb": 1},
                          use_bin_type=True)
    def one(ch):
        ch.waiter = loop.create_future()
        ch.data_received(frame)
        assert ch.waiter.result()["t"] == "result"
        ch.waiter = None
    for ch in chans:  # warm-up: every channel has read once
        one(ch)
    before = rss()
    for i in range(invocations):
        one(chans[i % envs])
    print(rss() - before)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def _growth(script: str, *args: str) -> int:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONMALLOC": "malloc"})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_environment_channels_do_not_grow_with_invocations() -> None:
    growth = _growth(CHANNELS_SCRIPT, "100", "100000")
    # Before the fix: ~100 MiB (1 MiB per channel). Now: at most ~64 KiB per channel.
    assert growth < 24 * MiB, f"RSS grew {growth / MiB:.1f} MiB over 100,000 invocations"


def test_frame_reader_keeps_frames_whole_across_resets() -> None:
    frames = [{"i": i, "pad": b"p" * (i * 97 % 3000)} for i in range(2000)]
    big = {"i": -1, "pad": b"B" * (3 * MiB)}  # bigger than the reader's buffer
    stream = b"".join(msgpack.packb(f, use_bin_type=True) for f in [*frames[:1000], big,
                                                                       *frames[1000:]])
    reader = FrameReader(8 * MiB, read_bytes=4096)
    got = []
    # Odd chunk sizes, so frames straddle every feed boundary (and resets).
    pos, step = 0, 1
    while pos < len(stream):
        chunk = stream[pos:pos + step]
        pos += len(chunk)
        step = step * 7 % 5003 + 1
        got += list(reader.feed(chunk))
    assert got == [*frames[:1000], big, *frames[1000:]]
    assert reader.resets > 0  # it did replace its buffer on the way


def test_frame_reader_still_refuses_oversized_frames() -> None:
    reader = FrameReader(64 * 1024, read_bytes=1024)
    with pytest.raises(FrameError):
        list(reader.feed(msgpack.packb({"x": b"y" * (128 * 1024)}, use_bin_type=True)))
