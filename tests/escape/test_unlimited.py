"""No cgroups, no environments: an agent that finds no cgroup hierarchy refuses to start (and its
zygote refuses to spawn) unless the operator said ``--allow-unlimited``; agent status says which.

Detection is made to fail by pointing ``CELLCLOUD_CGROUP_ROOT`` at an empty directory, through
the real agent process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cellcloud.sandbox import cgroups
from cellcloud.transport import Client, OpError
from tests.conftest import make_zip

from .conftest import Sandbox

pytestmark = pytest.mark.integration

WAIT_S = 60  # generous: agents start a zygote and probe runtimes first


class AgentProcess:
    def __init__(self, state_dir: str, *extra: str, cgroup_root: str | None = None) -> None:
        self.agent_id = f"lim-{uuid.uuid4().hex[:6]}"
        r, w = os.pipe()
        env = dict(os.environ, CELLCLOUD_READY_FD=str(w))
        if cgroup_root is not None:
            env["CELLCLOUD_CGROUP_ROOT"] = cgroup_root
        self.log_path = os.path.join(state_dir, "agent.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cellcloud.agent.server", "--agent-id", self.agent_id,
                 "--state-dir", os.path.join(state_dir, "agent"), "--listen", "127.0.0.1:0",
                 "--uid-base", "410000", "--insecure", "--no-favor-dynmods", *extra],
                pass_fds=(w,), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(w)
        # The ready line, or EOF when the agent exits first: a real wait, bounded.
        with os.fdopen(r, "rb") as pipe:
            readable, _, _ = select.select([pipe], [], [], WAIT_S)
            assert readable, "the agent neither announced itself nor exited"
            line = pipe.readline()
        self.ready: dict[str, Any] | None = json.loads(line) if line else None

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def call(self, op: str, body: Any = None) -> Any:
        assert self.ready is not None

        async def go() -> Any:
            c = Client(self.ready["host"], self.ready["port"])  # type: ignore[index]
            try:
                return await c.call(op, body, timeout_s=WAIT_S)
            finally:
                await c.close()

        return asyncio.run(go())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)


@pytest.fixture
def state_dir() -> Iterator[str]:
    import shutil

    d = tempfile.mkdtemp(prefix="cellcloud-unlimited-")
    os.chmod(d, 0o755)
    os.makedirs(os.path.join(d, "no-cgroups"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_agent_refuses_to_start_without_cgroups(state_dir: str) -> None:
    agent = AgentProcess(state_dir, cgroup_root=os.path.join(state_dir, "no-cgroups"))
    try:
        assert agent.ready is None, "an agent without cgroups announced itself"
        assert agent.proc.wait(WAIT_S) != 0
        assert "--allow-unlimited" in agent.log()
    finally:
        agent.stop()


def _create_and_invoke(agent: AgentProcess) -> Any:
    data = make_zip({"app.py": "def handler(e, c):\n    return {'hi': e['n']}\n"})
    sha = hashlib.sha256(data).hexdigest()
    env_id = f"e-{uuid.uuid4().hex[:8]}"
    agent.call("create_env", {
        "env_id": env_id, "bundle_sha256": sha, "bundles": {sha: data},
        "function": {"name": "f", "arn": "arn:aws:lambda:cc-local-1:1:function:f",
                     "handler": "app.handler", "runtime": "python3.11", "memory_mb": 128,
                     "timeout_s": 30}})
    res = agent.call("invoke", {"env_id": env_id, "request_id": uuid.uuid4().hex,
                                "payload": b'{"n": 7}', "timeout_ms": WAIT_S * 1000})
    return json.loads(res["payload"])


def test_allow_unlimited_starts_and_says_so(state_dir: str) -> None:
    agent = AgentProcess(state_dir, "--allow-unlimited",
                         cgroup_root=os.path.join(state_dir, "no-cgroups"))
    try:
        assert agent.ready is not None, agent.log()
        status = agent.call("status")
        assert status["limits"] == "unlimited" and status["cgroup_version"] == 0
        assert "WITHOUT memory, pids or CPU limits" in agent.log()
        assert _create_and_invoke(agent) == {"hi": 7}  # environments run, unlimited
    finally:
        assert agent.stop() == 0


def test_agent_with_cgroups_reports_limits_enforced(state_dir: str) -> None:
    agent = AgentProcess(state_dir)
    try:
        assert agent.ready is not None, agent.log()
        assert agent.call("status")["limits"] == "enforced"
        assert _create_and_invoke(agent) == {"hi": 7}
        # The locked-down agent serves on uvloop without an io_uring instance (a ring made
        # before the lock-down would abort libuv once io_uring_enter is denied).
        pid = agent.ready["pid"]
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        assert "anon_inode:[io_uring]" not in links
        assert agent.call("status")["seccomp"] == 2
    finally:
        assert agent.stop() == 0


def test_zygote_refuses_an_environment_without_cgroups(
        state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line: even an agent that did not check (in-process here) gets no
    environment without limits, unless the spec says the operator allowed it."""
    empty = os.path.join(state_dir, "no-cgroups")
    monkeypatch.setenv("CELLCLOUD_CGROUP_ROOT", empty)  # the zygote reads it at start
    monkeypatch.setattr(cgroups, "ROOT", empty)
    sb = Sandbox(os.path.join(state_dir, "inproc"))
    try:
        with pytest.raises(OpError) as e:
            sb.create("def handler(e, c):\n    return 1\n")
        assert e.value.type == "EnvCreateFailed" and "no cgroup hierarchy" in e.value.message
        sb.agent.allow_unlimited = True
        env, res = sb.run("def handler(e, c):\n    return 1\n")
        assert json.loads(res["payload"]) == 1
        sb.destroy(env)
    finally:
        sb.close()


def test_cellcloud_up_passes_allow_unlimited_to_its_agents(state_dir: str) -> None:
    env = dict(os.environ, CELLCLOUD_CGROUP_ROOT=os.path.join(state_dir, "no-cgroups"))
    region = os.path.join(state_dir, "region")
    up = [sys.executable, "-m", "cellcloud", "up", "--state-dir", region, "--port", "0",
          "--insecure", "--detach"]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=env, capture_output=True, text=True,
                              timeout=WAIT_S * 2)

    try:
        refused = run(*up)
        assert refused.returncode != 0 and "failed to start" in refused.stderr + refused.stdout
        started = run(*up, "--allow-unlimited")
        assert started.returncode == 0, started.stderr
        status = run(sys.executable, "-m", "cellcloud", "status", "--state-dir", region,
                     "--json")
        agents = json.loads(status.stdout)["status"]["cells"]["cell-1"]["agents"]
        assert agents and {a["limits"] for a in agents.values()} == {"unlimited"}
    finally:
        run(sys.executable, "-m", "cellcloud", "down", "--state-dir", region)
