"""Crash recovery (issue #11): a SIGKILLed supervisor, a dead zygote, a killed warm environment,
and what `cellcloud down` leaves behind. Every wait is on a condition, with a generous bound."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from cellcloud.agent.handover import socket_path
from cellcloud.sandbox import cgroups
from tests.conftest import make_zip

from .conftest import Region, start_region, stop_region

pytestmark = pytest.mark.integration

WAIT_S = 60.0
CODE = "def handler(event, context):\n    return {'ok': True, 'echo': event}\n"


def wait_for(cond: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def env_pids(region: Region, function: str) -> dict[str, int]:
    st = region.client.status()
    return {e["env_id"]: e["pid"] for c in st["cells"].values() for a in c["agents"].values()
            for e in a.get("envs", []) if e["function"] == function}


def agent_dirs(region: Region) -> dict[str, str]:
    comps = region.region_json()["components"]
    assert isinstance(comps, dict)
    return {name: os.path.join(region.state_dir, "cells", name.rsplit("-", 2)[0], "agents", name)
            for name, c in comps.items() if c["kind"] == "agent"}


def cgroup_dirs(agent_id: str, agent_state_dir: str) -> list[str]:
    """Where an agent's environment cgroups live, in every controller (agent/server.py names
    the group after the agent id and its state directory)."""
    group = f"{agent_id}-{hashlib.sha256(agent_state_dir.encode()).hexdigest()[:8]}"
    if cgroups.version() == 2:
        return [os.path.join(cgroups.ROOT, "cellcloud", group)]
    return [os.path.join(cgroups.ROOT, c, "cellcloud", group)
            for c in ("memory", "pids", "cpu", "cpuacct")]


def cli(state_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellcloud", *args, "--state-dir", state_dir],
                          capture_output=True, text=True, timeout=180)


# -- 1. the supervisor dies ------------------------------------------------------------------
def test_sigkilled_supervisor_takes_its_region_down_and_up_serves_again(tmp_path: object) -> None:
    sd = str(tmp_path)
    r = start_region(sd, "--agents-per-cell", "1")
    try:
        name = f"sk-{uuid.uuid4().hex[:6]}"
        r.client.create_function(name, make_zip({"app.py": CODE}), "app.handler")
        assert r.client.invoke(name, {"n": 1}).function_error is None
        doc = r.region_json()
        comps = doc["components"]
        assert isinstance(comps, dict)
        children = [int(c["pid"]) for c in comps.values()]
        envs = list(env_pids(r, name).values())
        assert envs

        # A second `up` while the region lives: refused, and it harms nothing.
        second = cli(sd, "up", "--detach", "--port", "0", "--agents-per-cell", "1")
        assert second.returncode != 0 and "already running" in second.stderr
        assert os.path.exists(os.path.join(sd, "region.json"))
        assert all(alive(p) for p in envs)
        assert r.client.invoke(name, {"n": 2}).function_error is None

        os.kill(int(doc["supervisor_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        # Its region goes with it: every process it started, and their environments.
        wait_for(lambda: not any(alive(p) for p in children + envs),
                 "the dead supervisor's processes and environments exit")
        st = cli(sd, "status")
        assert st.returncode != 0 and "No region is running" in st.stdout
    finally:
        r.client.close()

    # A new `up` on the same state directory serves the functions the old region had.
    r2 = start_region(sd, "--agents-per-cell", "1")
    try:
        res = r2.client.invoke(name, {"n": 3})
        assert res.function_error is None and res.json() == {"ok": True, "echo": {"n": 3}}
    finally:
        stop_region(r2)


# -- 5. down leaves nothing behind -----------------------------------------------------------
def test_down_removes_cgroups_and_handover_sockets(tmp_path: object) -> None:
    r = start_region(str(tmp_path), "--agents-per-cell", "2")
    dirs = agent_dirs(r)
    try:
        name = f"dn-{uuid.uuid4().hex[:6]}"
        r.client.create_function(name, make_zip({"app.py": CODE}), "app.handler")
        assert r.client.invoke(name, {}).function_error is None
        assert env_pids(r, name)
        sockets = [socket_path(d) for d in dirs.values()]
        assert all(os.path.exists(s) for s in sockets)
        groups = [p for a, d in dirs.items() for p in cgroup_dirs(a, d)]
        assert any(os.path.isdir(p) for p in groups)
    finally:
        stop_region(r)
    # `down` returns once the supervisor has exited, and it waits for its agents.
    assert [s for s in sockets if os.path.exists(s)] == []
    assert [p for p in groups if os.path.exists(p)] == []


# -- 3. a warm environment killed from outside -------------------------------------------------
def test_killed_warm_environment_is_replaced_on_the_next_invoke(region: Region) -> None:
    name = f"kw-{uuid.uuid4().hex[:6]}"
    region.client.create_function(name, make_zip({"app.py": CODE}), "app.handler")
    assert region.client.invoke(name, {}).function_error is None
    before = env_pids(region, name)
    assert len(before) == 1
    (pid,) = before.values()
    os.kill(pid, signal.SIGKILL)
    # Killed before the next invoke arrives (the process has exited; whether the agent's event
    # loop has seen its channel hang up yet is the agent's business, not waited for here).
    wait_for(lambda: not alive(pid), "the environment's process exits")
    res = region.client.invoke(name, {"after": "kill"})
    assert res.function_error is None, res.payload
    assert res.json() == {"ok": True, "echo": {"after": "kill"}}
    after = env_pids(region, name)
    assert after and pid not in after.values()


# -- 2. a dead zygote ------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def zygotes_of(agent_pid: int) -> list[int]:
    """The agent's zygote(s), found from /proc: root-owned descendants running the zygote
    module (environments run it too, but under their own uids; the keeper says --keeper)."""
    found = []
    for p in _descendants(agent_pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            uid = os.stat(f"/proc/{p}").st_uid
        except OSError:
            continue
        if uid == 0 and b"cellcloud.sandbox.zygote" in argv and b"--keeper" not in argv:
            found.append(p)
    return found


def test_dead_zygote_is_replaced(region: Region) -> None:
    comps = region.region_json()["components"]
    assert isinstance(comps, dict)
    agents = [int(c["pid"]) for c in comps.values() if c["kind"] == "agent"]
    killed = []
    for agent_pid in agents:
        zs = zygotes_of(agent_pid)
        assert len(zs) == 1, zs
        os.kill(zs[0], signal.SIGKILL)
        killed.append(zs[0])
    wait_for(lambda: not any(alive(z) for z in killed), "the zygotes die")
    # A new function: its cold start needs a zygote, on whichever agent it lands.
    for i in range(2):
        name = f"zy-{uuid.uuid4().hex[:6]}"
        region.client.create_function(name, make_zip({"app.py": CODE}), "app.handler")
        res = region.client.invoke(name, {"i": i})
        assert res.function_error is None, res.payload
    st = region.client.status()
    agents_st = [a for c in st["cells"].values() for a in c["agents"].values()]
    assert sum(a["zygote_restarts"] for a in agents_st) >= 1
    for a in agents_st:
        assert a["zygote_pid"] not in killed
    assert json.dumps(st)  # still one serialisable document
