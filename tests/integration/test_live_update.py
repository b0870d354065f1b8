"""Live agent update: `cellcloud agent restart --live` replaces an agent process while its
environments keep running; the in-flight invocation completes and warm environments stay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import make_zip

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

CODE = ("import os, time\n"
        "def handler(event, context):\n"
        "    time.sleep(max(0.0, event.get('until', 0) - time.time()))\n"
        "    return {'stream': context.log_stream_name, 'pid_ns_init': os.getpid()}\n")


@pytest.fixture(scope="module")
def one_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "live", "--agents-per-cell", "1") as r:
        yield r


def envs(region: Region, busy_only: bool = False) -> dict[str, int]:
    st = region.client.status()
    return {e["env_id"]: e["pid"] for c in st["cells"].values() for a in c["agents"].values()
            for e in a.get("envs", []) if e.get("busy") or not busy_only}


def test_live_restart_keeps_environments_and_in_flight_invocations(one_agent: Region) -> None:
    r = one_agent
    name = f"live-{uuid.uuid4().hex[:6]}"
    r.client.create_function(name, make_zip({"app.py": CODE}), "app.handler", timeout_s=30)
    warm = r.client.invoke(name, {}).json()["stream"]
    before_envs = envs(r)
    agent_before = r.region_json()["components"]["cell-1-agent-0"]["pid"]  # type: ignore[index]
    # One invocation in flight across the restart.
    out: dict[str, object] = {}

    def slow() -> None:
        from cellcloud.sdk import Client

        c = Client(r.endpoint, str(r.doc["api_key"]), timeout_s=60)
        res = c.invoke(name, {"until": time.time() + 3})
        out["error"], out["doc"] = res.function_error, res.json()

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 30
    while not envs(r, busy_only=True):  # the slow invoke is running
        assert time.monotonic() < deadline, "the in-flight invocation did not start"
        time.sleep(0.05)
    res = subprocess.run([sys.executable, "-m", "cellcloud", "agent", "restart",
                          "cell-1-agent-0", "--live", "--state-dir", r.state_dir],
                         capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["live"] and result["new_pid"] != result["old_pid"] and result["adopted"] >= 1
    t.join(60)
    assert out["error"] is None and isinstance(out["doc"], dict)  # completed, not lost
    agent_after = r.region_json()["components"]["cell-1-agent-0"]["pid"]  # type: ignore[index]
    assert agent_after != agent_before
    after_envs = envs(r)
    for env_id, pid in before_envs.items():  # the same environments, the same processes
        assert after_envs.get(env_id) == pid
        os.kill(pid, 0)
    # Still warm: the next invoke runs in an environment that existed before the restart.
    assert r.client.invoke(name, {}).json()["stream"] in {warm, out["doc"]["stream"]}  # type: ignore[index]
    assert len(envs(r)) == len(after_envs)
