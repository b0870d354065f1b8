"""Passive communication and the jail's first layers, shown with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from cellcloud.agent.lockdown import seccomp_mode
from tests.conftest import make_zip

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

PROBE = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    port = int(sys.argv[1])
    lock = sys.argv[2] == "lock"
    if lock:
        from cellcloud.agent.lockdown import lock_down
        lock_down()
    out = {}
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.close()
        out["connect"] = "ok"
    except OSError as e:
        out["connect"] = e.errno
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        out["socket6"] = "ok"
    except OSError as e:
        out["socket6"] = e.errno
    try:
        subprocess.run(["/bin/true"], check=True)
        out["exec"] = "ok"
    except OSError as e:
        out["exec"] = e.errno
    a, b = socket.socketpair()   # the agent's own channels to its guests still work
    a.sendall(b"x"); out["socketpair"] = b.recv(1).decode()
    print(json.dumps(out))
""")


def _probe(mode: str) -> dict[str, object]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, str(listener.getsockname()[1]), mode],
                             capture_output=True, text=True, timeout=30, check=True)
    finally:
        listener.close()
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_agent_lockdown_denies_connect_and_exec() -> None:
    import errno

    control = _probe("open")  # negative control: the same code without the filter connects
    assert control == {"connect": "ok", "socket6": "ok", "exec": "ok", "socketpair": "x"}
    locked = _probe("lock")
    assert locked == {"connect": errno.EPERM, "socket6": errno.EPERM, "exec": errno.EPERM,
                      "socketpair": "x"}


def test_running_agents_are_locked_down(region: Region) -> None:
    comps = region.region_json()["components"]
    agents = [c for c in comps.values() if c["kind"] == "agent"]  # type: ignore[union-attr]
    assert len(agents) >= 2
    for a in agents:
        assert seccomp_mode(a["pid"]) == 2  # type: ignore[index]


def test_environment_is_jailed(region: Region) -> None:
    port = region.endpoint.rsplit(":", 1)[1]
    code = textwrap.dedent(f"""
        import os, socket
        def attempt(fn):
            try:
                fn()
                return "allowed"
            except OSError as e:
                return e.errno
        def write_task():
            with open("/var/task/x", "w") as f:
                f.write("x")
        def write_root():
            with open("/evil", "w") as f:
                f.write("x")
        def connect():
            socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
        def shadow():
            open("/etc/shadow").read()
        def handler(event, context):
            with open("/tmp/ok", "w") as f:
                f.write("tmp is writable")
            return {{
                "uid": os.getuid(), "pid": os.getpid(), "hostname": socket.gethostname(),
                "write_task": attempt(write_task), "write_root": attempt(write_root),
                "connect": attempt(connect), "shadow": attempt(shadow),
                "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "root": sorted(os.listdir("/")),
                "tmp": open("/tmp/ok").read(),
            }}
    """)
    name = f"jail-{uuid.uuid4().hex[:8]}"
    region.client.create_function(name, make_zip({"app.py": code}), "app.handler")
    doc = region.client.invoke(name, {}).json()
    import errno

    assert doc["uid"] >= 200_000
    assert doc["pid"] == 1 and doc["procs"] == [1]  # its own pid namespace
    assert doc["hostname"] == "sandbox"
    assert doc["write_task"] == errno.EROFS and doc["write_root"] == errno.EROFS
    assert doc["connect"] in (errno.ENETUNREACH, errno.ECONNREFUSED)  # no network namespace route
    assert doc["shadow"] == errno.ENOENT  # host /etc is not there at all
    assert doc["tmp"] == "tmp is writable"
    assert "home" not in doc["root"] and "cellcloud" not in " ".join(doc["root"])


def test_supervisor_restarts_a_killed_frontend(region: Region) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"
    region.client.create_function(
        name, make_zip({"app.py": "def handler(e, c):\n    return 'alive'\n"}), "app.handler")
    assert region.client.invoke(name, {}).json() == "alive"
    before = region.region_json()["components"]["cell-1-frontend"]  # type: ignore[index]
    os.kill(before["pid"], signal.SIGKILL)
    # Wait for the supervisor's own record of the restart (bounded), then use the region.
    deadline = time.monotonic() + 60
    while True:
        after = region.region_json()["components"]["cell-1-frontend"]  # type: ignore[index]
        if after["pid"] != before["pid"]:
            break
        assert time.monotonic() < deadline, "frontend was not restarted"
        time.sleep(0.1)
    assert after["port"] == before["port"] and after["restarts"] >= 1
    # The function's metadata was durable; the new frontend serves it.
    assert region.client.invoke(name, {}).json() == "alive"


def test_two_regions_on_one_host_never_share_an_environment_uid(
        region: Region, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Each region claims a host-wide uid range for its environments; before, every region's
    # agents counted from 200000, so environments of two regions ran as the same uid.
    def env_uids(r: Region) -> set[int]:
        name = f"uidprobe-{uuid.uuid4().hex[:6]}"
        r.client.create_function(name, make_zip(
            {"app.py": "import os\ndef handler(e, c):\n    return os.getuid()\n"}), "app.handler")
        seen = {int(r.client.invoke(name, {}).json())}  # the uid as the handler sees it
        for cell in r.client.status()["cells"].values():
            for agent in cell["agents"].values():
                seen |= {int(e["uid"]) for e in agent.get("envs", []) if "uid" in e}
        return seen

    with running_region(tmp_path_factory, "second-region", "--agents-per-cell", "1") as other:
        mine, theirs = env_uids(region), env_uids(other)
        assert mine and theirs
        assert not mine & theirs, (mine, theirs)
