"""A real agent with the real jail backend, in-process, for the escape and abuse suite.

Each case runs an attack as a function handler through the agent's own ops, checks from the
host that it had no effect, and where it is safe re-runs it with single layers switched off
(negative controls) to show which layer is the one that stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cellcloud.agent.server import Agent
from cellcloud.sandbox import cgroups
from cellcloud.sandbox.backend import Backend, JailBackend
from tests.conftest import make_zip


class Sandbox:
    # A bound, not a deadline: creates run beside other tests on a busy machine (a microVM's
    # boot under TCG takes tens of seconds there).
    create_timeout_ms = 60_000

    def __init__(self, state_dir: str, backend: Backend | None = None) -> None:
        self.group = f"escape-{uuid.uuid4().hex[:6]}"
        self.backend = backend or JailBackend(os.path.join(state_dir, "jailroot"))
        self.backend.start()
        self.agent = Agent(self.group, state_dir, self.backend, uid_base=400_000, pids_max=64)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coro: Any, timeout_s: float = 240) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def bundle_dir(self, code: str, extra: dict[str, str] | None = None) -> tuple[str, str]:
        data = make_zip({"app.py": code, **(extra or {})})
        sha = hashlib.sha256(data).hexdigest()
        return sha, self.agent._bundle(sha, data)

    def reseal(self, bundle_dir: str) -> None:
        """The test changed a bundle on the host on purpose: record its new measurement (what
        unpacking would have recorded), so attestation does not refuse it."""
        from cellcloud.security import attestation

        with open(bundle_dir + ".measure", "w") as f:
            f.write(attestation.measure_tree(bundle_dir))
        self.agent._measured.pop(bundle_dir, None)

    def create(self, code: str, *, disabled: list[str] | None = None, memory_mb: int = 128,
               timeout_s: int = 3, ephemeral_mb: int = 16) -> str:
        sha, _ = self.bundle_dir(code)
        env_id = f"e-{uuid.uuid4().hex[:8]}"
        self.agent.unsafe_disabled_layers = list(disabled or [])
        try:
            self._run(self.agent.create_env({
                "env_id": env_id, "bundle_sha256": sha,
                "function": {"name": "attack", "arn": "arn:aws:lambda:cc-local-1:1:function:a",
                             "handler": "app.handler", "runtime": "python3.11",
                             "memory_mb": memory_mb, "timeout_s": timeout_s,
                             "ephemeral_mb": ephemeral_mb},
                "create_timeout_ms": self.create_timeout_ms,
            }))
        finally:
            self.agent.unsafe_disabled_layers = []
        return env_id

    def invoke(self, env_id: str, event: bytes = b"{}", timeout_s: int = 3) -> dict[str, Any]:
        res: dict[str, Any] = self._run(self.agent.invoke({
            "env_id": env_id, "request_id": uuid.uuid4().hex, "payload": event,
            "timeout_ms": timeout_s * 1000}))
        return res

    def run(self, code: str, event: bytes = b"{}", **kw: Any) -> tuple[str, dict[str, Any]]:
        env_id = self.create(code, **kw)
        return env_id, self.invoke(env_id, event, kw.get("timeout_s", 3))

    def uid_of(self, env_id: str) -> int:
        return self.agent.envs[env_id].spec.uid

    def destroy(self, env_id: str) -> None:
        self._run(self.agent.destroy({"env_id": env_id}))

    def close(self) -> None:
        self._run(_close(self.agent))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        cgroups.sweep(self.group)


async def _close(agent: Agent) -> None:
    agent.close()


def processes_of_uid(uid: int) -> list[int]:
    """Host-side view: every process (any namespace) running as ``uid``."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            out.append(int(pid))
                        break
        except OSError:
            continue
    return out


def wait_no_processes(uid: int, timeout_s: float = 10.0) -> list[int]:
    """Processes of a killed environment are gone once the kernel has reaped them; wait for
    that (bounded) by watching /proc, then report what is left."""
    import time

    deadline = time.monotonic() + timeout_s
    while (left := processes_of_uid(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    import tempfile

    # World-traversable, like a real agent's state: the negative controls must fail because
    # of the layer switched off, not because pytest's tmp dirs are 0700.
    d = tempfile.mkdtemp(prefix="cellcloud-escape-")
    os.chmod(d, 0o755)
    sb = Sandbox(d)
    try:
        yield sb
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)
