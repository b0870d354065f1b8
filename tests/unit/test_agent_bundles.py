"""The agent's unpacked bundles (issue #11): nothing half-written stays after a failed unpack,
leftovers are swept at start, and ``forget_bundles`` drops a digest only when no environment
runs from it. An in-process agent with a stub backend (nothing is spawned)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from types import SimpleNamespace
from typing import Any

import pytest

from cellcloud.agent.server import Agent
from cellcloud.transport import OpError
from tests.conftest import make_zip


class StubBackend:
    name = "stub"

    def start(self) -> None: ...
    async def spawn(self, spec: Any) -> Any:
        raise AssertionError("not used")
    def kill(self, pid: int) -> None: ...
    def close(self) -> None: ...


def new_agent(state_dir: str) -> Agent:
    return Agent("unit-agent", state_dir, StubBackend(), uid_base=500_000, runtimes_found={})


def bundle(tag: str) -> tuple[str, bytes]:
    data = make_zip({"app.py": f"# {tag}\n", "lib/x.py": "x = 1\n"})
    return hashlib.sha256(data).hexdigest(), data


def test_failed_unpack_leaves_nothing(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = new_agent(str(tmp_path))
    sha, data = bundle("a")
    real_open = open
    written: list[str] = []

    def full_disk_open(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if "x" in mode or "w" in mode:
            written.append(str(path))
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **kw)

    import cellcloud.sandbox.unpack as core_bundle

    monkeypatch.setattr(core_bundle, "open", full_disk_open, raising=False)
    with pytest.raises(OpError) as e:
        agent._bundle(sha, data)
    assert e.value.type == "BundleUnpackFailed" and len(written) == 2
    assert os.listdir(agent.bundles_dir) == []
    monkeypatch.undo()
    assert os.path.isdir(agent._bundle(sha, data))  # and a later try unpacks it


def test_start_sweeps_partial_unpacks(tmp_path: str) -> None:
    agent = new_agent(str(tmp_path))
    sha, data = bundle("a")
    kept = agent._bundle(sha, data)
    dead = os.path.join(agent.bundles_dir, f"{'b' * 64}.tmp-999999999-5")
    os.makedirs(os.path.join(dead, "lib"))
    with open(os.path.join(dead, "lib", "big"), "wb") as f:
        f.write(b"\0" * 4096)
    with open(dead + ".measure", "w") as f:
        f.write("x")
    alive = os.path.join(agent.bundles_dir, f"{'c' * 64}.tmp-1-5")  # pid 1: still running
    os.makedirs(alive)
    again = new_agent(str(tmp_path))
    assert sorted(os.listdir(again.bundles_dir)) == sorted(
        [os.path.basename(kept), os.path.basename(kept) + ".measure", os.path.basename(alive)])


def _fake_env(agent: Agent, env_id: str, bundle_dir: str) -> None:
    agent.envs[env_id] = SimpleNamespace(  # type: ignore[assignment]
        spec=SimpleNamespace(env_id=env_id, bundle_dir=bundle_dir, layer_dirs=[]),
        spawned=SimpleNamespace(pid=0), channel=SimpleNamespace(transport=None),
        cgroup=SimpleNamespace(kill_all=lambda: None, destroy=lambda: True), slot=0)


def test_forget_bundles_waits_for_the_last_environment(tmp_path: str) -> None:
    agent = new_agent(str(tmp_path))
    used, used_data = bundle("used")
    idle, idle_data = bundle("idle")
    used_dir = agent._bundle(used, used_data)
    idle_dir = agent._bundle(idle, idle_data)
    _fake_env(agent, "env-1", used_dir)
    answer = asyncio.run(agent.forget_bundles({"sha256": [used, idle]}))
    assert answer == {"forgotten": [idle], "deferred": [used]}
    assert not os.path.exists(idle_dir) and not os.path.exists(idle_dir + ".measure")
    assert os.path.isdir(used_dir)  # an environment runs from it
    agent._remove("env-1")
    assert os.listdir(agent.bundles_dir) == []


def test_forget_bundles_refuses_what_is_not_a_digest(tmp_path: str) -> None:
    agent = new_agent(str(tmp_path))
    for body in ({"sha256": ["../../etc"]}, {"sha256": "x"}, {"sha256": ["a" * 64] * 1001}):
        with pytest.raises(OpError):
            asyncio.run(agent.forget_bundles(body))


class BusyNetwork:
    """A network helper answering counters only when let go (busy wiring a namespace)."""

    info = {"mode": "egress"}

    def __init__(self) -> None:
        import threading
        self.go = threading.Event()
        self.calls = 0

    def counters(self) -> dict[str, Any]:
        self.calls += 1
        assert self.go.wait(60)
        return {"helper": {"leased": 0}, "dns": {}}

    def alive(self) -> bool:
        return True


def test_full_status_does_not_wait_on_a_busy_network_helper(tmp_path: str) -> None:
    agent = new_agent(str(tmp_path))
    net = BusyNetwork()
    agent.network = net  # type: ignore[assignment]

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        first = await agent.status({})  # the helper is busy: answered without its counters
        second = await agent.status({})  # waits for the same read, starts no other
        net.go.set()
        assert agent._net_counters is not None
        await asyncio.wait_for(asyncio.shield(agent._net_counters), 60)
        third = await agent.status({})
        return first, second, third

    first, second, third = asyncio.run(main())
    assert "busy" in first["network"]["error"] and "busy" in second["network"]["error"]
    assert net.calls == 2  # one read for the two busy statuses, one for the third
    assert "error" not in third["network"] and third["network"]["helper"] == {"leased": 0}
