"""What the microVM snapshot tests (test_microvm_snapshot.py, test_microvm_agentsnap.py,
test_microvm_snapstart.py) share: a function bundle, a snapshot whose state file has a byte
flipped, and one invoke in an environment (one that ``MicrovmBackend`` spawns, or on a
channel of the test's)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from typing import Any

import pytest

from cellcloud.microvm import boot, core
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel

#: What a test of a guest booted from the agent image needs of the host: root, QEMU and a
#: Debian cloud kernel (scripts/setup.sh installs both); a module's ``pytestmark``.
NEEDS_GUEST = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
    pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                       is None, reason="no Debian cloud kernel (scripts/setup.sh)"),
]


def flip_byte(path: str, at: int) -> None:
    """The byte at offset ``at`` of the file ``path`` with its lowest bit flipped (flipping it
    again makes the file whole)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def flipped_copy(snap_dir: str, bad: str, state_bytes: int) -> str:
    """``bad``: a copy of the snapshot directory ``snap_dir`` with a byte flipped in the middle
    of its ``state.bin`` (``state_bytes`` long)."""
    shutil.copytree(snap_dir, bad)
    flip_byte(os.path.join(bad, "state.bin"), state_bytes // 2)
    return bad


def write_bundle(bundle: str, code: str) -> str:
    """``bundle``: a new function bundle whose ``app.py`` is ``code``."""
    os.makedirs(bundle)
    with open(os.path.join(bundle, "app.py"), "w") as f:
        f.write(code)
    return bundle


async def invoke_ready(chan: StreamChannel, arn: str) -> dict[str, Any]:
    """One invocation with ``{}`` in the environment on ``chan`` (it said ``ready``): the
    handler's result."""
    chan.send({"t": "invoke", "id": "r1", "request_id": "r1", "payload": b"{}",
               "timeout_ms": 30_000, "deadline_ms": int(time.time() * 1000) + 30_000,
               "arn": arn})
    result = await asyncio.to_thread(chan.recv)
    assert result and result.get("t") == "result", result
    return dict(json.loads(result["payload"]))


def invoke_once(backend: Any, spec: EnvSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """An environment of ``spec`` spawned by ``backend``, invoked once with ``{}`` and killed:
    its ``ready`` frame and the handler's result."""
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        spawned = await backend.spawn(spec)
        try:
            chan = StreamChannel(spawned.channel, 64 << 20)
            spawned.channel.settimeout(120)
            ready = await asyncio.to_thread(chan.recv)
            assert ready and ready.get("t") == "ready" and not ready.get("init_error"), ready
            return ready, await invoke_ready(chan, spec.function_arn)
        finally:
            backend.kill(spawned.pid)
            spawned.channel.close()

    return asyncio.run(go())
