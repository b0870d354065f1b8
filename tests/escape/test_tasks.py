"""The agent's task runner (agent/tasks.py) on a real agent with the real jail: a two-container
task whose containers share one network namespace (a web server and a client that reads it over
localhost), each with its own image root; logs, exit codes, health-check commands, stop with a
grace period and kill, the task's cgroup sized from its cpu/memory and gone after destroy."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from cellcloud.core import messages as m
from cellcloud.sandbox import cgroups
from cellcloud.transport import OpError
from tests.escape.conftest import Sandbox, processes_of_uid, wait_no_processes
from tests.escape.test_image_env import push_layers
from tests.oci_images import host_python_layers, image_layout, layer_tar

PY = sys.executable
CLIENT = """
import time, urllib.request
for _ in range(600):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8080/hello.txt", timeout=5).read()
        break
    except OSError:
        time.sleep(0.1)
print("got", body.decode().strip(), flush=True)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(600)
"""


def task_image(layout: str) -> list[str]:
    """An image of this host's Python's libraries (the interpreter is the guest's tree) with
    /srv/hello.txt and the scripts above under /app; its layer digests."""
    app = layer_tar({"srv/hello.txt": b"hello from the web container\n",
                     "app/client.py": CLIENT.encode(), "app/stubborn.py": STUBBORN.encode()})
    img = image_layout(layout, [], config_doc={"Cmd": ["/bin/true"]},
                       blobs=[host_python_layers()[0], app])
    return list(img["layers"])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    layout = str(tmp_path_factory.mktemp("task-image") / "img")
    return layout, task_image(layout)


def _container(name: str, layers: list[str], argv: list[str], **kw: Any) -> m.TaskContainer:
    return m.TaskContainer(name, tuple(layers), tuple(argv), **kw)


def _wait(sb: Sandbox, task_id: str, ok: Callable[[dict[str, Any]], bool],
          timeout_s: float = 60.0, runner: Any = None) -> dict[str, Any]:
    """Poll the task (all its logs so far) until ``ok`` holds (a bound, not a deadline)."""
    deadline = time.monotonic() + timeout_s
    runner = runner or sb.agent.tasks
    while True:
        doc: dict[str, Any] = sb._run(runner.task_poll({"task_id": task_id}))
        if ok(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def _lines(doc: dict[str, Any], name: str) -> list[str]:
    return [ln["text"] for ln in doc["logs"].get(name, [])]


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))


def _cgroup_file(group: str, name: str, controller: str, file: str) -> str:
    if cgroups.version() == 2:
        return os.path.join(cgroups.ROOT, "cellcloud", group, name, file)
    return os.path.join(cgroups.ROOT, controller, "cellcloud", group, name, file)


def test_a_two_container_task_shares_localhost_and_ends_cleanly(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    layout, layers = image
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    req = m.TaskCreateRequest(task_id, "111122223333", cpu_units=512, memory_mib=1024,
                              hostname="web-task", containers=(
        _container("web", layers, [PY, "-u", "-m", "http.server", "8080",
                                   "--bind", "127.0.0.1"], workdir="/srv",
                   env={"GREETING": "hi"},
                   port_mappings=(m.TaskPortMapping(8080),)),
        _container("client", layers, [PY, "/app/client.py"]),
        _container("stubborn", layers, [PY, "/app/stubborn.py"])))
    tasks = sandbox.agent.tasks
    with pytest.raises(OpError) as missing:
        sandbox._run(tasks.task_create(req.to_wire()))
    assert missing.value.type == "LayerMissing" and missing.value.data["digest"] == layers[0]
    assert task_id not in tasks.tasks
    push_layers(sandbox, layout, layers)
    reply = m.TaskCreateReply.from_wire(sandbox._run(tasks.task_create(req.to_wire())))
    assert reply == m.TaskCreateReply(task_id, "")  # no network helper: loopback only
    with pytest.raises(OpError) as dup:
        sandbox._run(tasks.task_create(req.to_wire()))
    assert dup.value.type == "TaskExists"
    cg_name = f"task-{task_id}"
    group = sandbox.agent.cgroup_group
    if cgroups.version() == 1:  # sized from the task's memory and cpu (512 units: half a vCPU)
        with open(_cgroup_file(group, cg_name, "memory", "memory.limit_in_bytes")) as f:
            assert int(f.read()) == 1024 * 2**20
        with open(_cgroup_file(group, cg_name, "cpu", "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 50_000
        with open(_cgroup_file(group, cg_name, "cpu", "cpu.shares")) as f:
            assert int(f.read()) == 512
    elif cgroups.version() == 2:
        with open(_cgroup_file(group, cg_name, "", "memory.max")) as f:
            assert int(f.read()) == 1024 * 2**20
        with open(_cgroup_file(group, cg_name, "", "cpu.max")) as f:
            assert f.read().split()[0] == "50000"

    doc = sandbox._run(tasks.task_poll({"task_id": task_id}))
    assert {n: c["state"] for n, c in doc["containers"].items()} == {
        "web": "pending", "client": "pending", "stubborn": "pending"}
    web_pid = sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))["pid"]
    sandbox._run(tasks.container_start({"task_id": task_id, "container": "client"}))
    sandbox._run(tasks.container_start({"task_id": task_id, "container": "stubborn"}))
    with pytest.raises(OpError) as running:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))
    assert running.value.type == "ContainerRunning"

    # The client reaches the web container over localhost and exits 0; the server logged it.
    doc = _wait(sandbox, task_id, lambda d: d["containers"]["client"]["state"] == "exited"
                and any("GET /hello.txt" in t for t in _lines(d, "web"))
                and any("ignoring" in t for t in _lines(d, "stubborn")))
    client = doc["containers"]["client"]
    assert client["exit_code"] == 0, (client, doc["logs"])
    assert "got hello from the web container" in _lines(doc, "client")
    assert any('"GET /hello.txt HTTP/1.1" 200' in t for t in _lines(doc, "web")), doc["logs"]
    assert any(ln["stream"] == "stderr" for ln in doc["logs"]["web"])  # http.server's log
    assert client["started_ms"] <= client["exited_ms"]
    assert doc["cpu_usage_ns"] > 0 and doc["memory_bytes"] > 0
    # Cursors: a poll from the cursors it gave has nothing new for the exited client.
    again = sandbox._run(tasks.task_poll({"task_id": task_id, "logs_after": doc["cursors"]}))
    assert "client" not in again["logs"]

    # Health checks run inside the container: its root, workdir, environment, hostname.
    probe = [PY, "-c", "import os, socket, sys; print(os.getcwd(), os.environ['GREETING'], "
             "socket.gethostname(), os.path.exists('/app/client.py'), os.getuid()); "
             "sys.exit(3)"]
    out = m.TaskExecReply.from_wire(sandbox._run(tasks.task_exec(
        {"task_id": task_id, "container": "web", "command": probe, "timeout_s": 30})))
    assert out.exit_code == 3 and not out.timed_out
    # ... as the container's own unprivileged uid (its guest's), not root
    assert out.output.decode().split() == ["/srv", "hi", "web-task", "True", str(_uid(web_pid))]
    assert _uid(web_pid) >= sandbox.agent.uid_base
    slow = m.TaskExecReply.from_wire(sandbox._run(tasks.task_exec(
        {"task_id": task_id, "container": "web",
         "command": [PY, "-c", "import time; time.sleep(60)"], "timeout_s": 1})))
    assert slow.timed_out and slow.exit_code is None
    missing_cmd = m.TaskExecReply.from_wire(sandbox._run(tasks.task_exec(
        {"task_id": task_id, "container": "web", "command": ["/no/such"], "timeout_s": 5})))
    assert missing_cmd.exit_code is None and "/no/such" in missing_cmd.error
    with pytest.raises(OpError) as not_running:
        sandbox._run(tasks.task_exec({"task_id": task_id, "container": "client",
                                      "command": ["true"], "timeout_s": 5}))
    assert not_running.value.type == "ContainerNotRunning"

    # Stop: SIGTERM ends the web server (128 + 15); a process that ignores it is killed
    # after the grace period (128 + 9).
    stopped = sandbox._run(tasks.container_stop(
        {"task_id": task_id, "container": "web", "grace_s": 30}))
    assert stopped == {"exit_code": 143}
    t0 = time.monotonic()
    killed = sandbox._run(tasks.container_stop(
        {"task_id": task_id, "container": "stubborn", "grace_s": 1}))
    assert killed == {"exit_code": 137}
    assert time.monotonic() - t0 >= 1.0  # the grace period was given
    doc = sandbox._run(tasks.task_poll({"task_id": task_id}))
    assert {n: (c["state"], c["exit_code"]) for n, c in doc["containers"].items()} == {
        "web": ("exited", 143), "client": ("exited", 0), "stubborn": ("exited", 137)}

    # A container starts again after it exited (a restart): a new run, logged on.
    sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))
    doc = _wait(sandbox, task_id, lambda d: d["containers"]["web"]["state"] == "running")
    assert doc["containers"]["web"]["exit_code"] is None

    # Destroy: everything is killed, the cgroup removed; a second destroy finds nothing.
    uids = {_uid(tasks.tasks[task_id].containers["web"].pid)}
    assert all(processes_of_uid(uid) for uid in uids)  # the restarted web runs as its uid
    assert sandbox._run(tasks.task_destroy({"task_id": task_id})) == {"destroyed": True}
    assert sandbox._run(tasks.task_destroy({"task_id": task_id})) == {"destroyed": False}
    assert not os.path.exists(_cgroup_file(group, cg_name, "memory", ""))
    assert not os.path.exists(_cgroup_file(group, cg_name, "pids", ""))
    for uid in uids:
        assert wait_no_processes(uid) == []
    assert not os.path.exists(f"/proc/{web_pid}/ns")  # the first web run's guest is gone
    with pytest.raises(OpError) as gone:
        sandbox._run(tasks.task_poll({"task_id": task_id}))
    assert gone.value.type == "TaskNotFound"
    holders = sandbox.agent.images._holds
    assert not [h for h in holders if h.startswith(f"task:{task_id}/")]  # layers released


def test_bad_task_requests_are_refused_by_name(
        sandbox: Sandbox, image: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, layers = image
    tasks = sandbox.agent.tasks

    def create(**kw: Any) -> str:
        doc = {"task_id": "t-bad", "account": "1", "cpu_units": 256, "memory_mib": 512,
               "containers": [_container("a", layers, [PY]).to_wire()], **kw}
        with pytest.raises(OpError) as e:
            sandbox._run(tasks.task_create(doc))
        return f"{e.value.type}: {e.value.message}"

    assert create(task_id="../x").startswith("InvalidRequest: task_id")
    assert create(cpu_units=1).startswith("InvalidRequest: cpu_units")
    assert create(containers=[]).startswith("InvalidRequest: a task has 1 to 10")
    two = [_container("a", layers, [PY]).to_wire()] * 2
    assert create(containers=two).startswith("InvalidRequest: container name 'a'")
    assert create(containers=[_container("a", layers, []).to_wire()]).startswith(
        "InvalidImage")
    ports = [_container(n, layers, [PY], port_mappings=(m.TaskPortMapping(80),)).to_wire()
             for n in ("a", "b")]
    assert "mapped twice" in create(containers=ports)
    assert create(network="egress").startswith("NetworkUnavailable")
    assert create(network="bogus").startswith("InvalidNetwork")
    assert create(containers="x").startswith("InvalidRequest")
    for kw, why in (({"memory_mib": 1024}, "a: memory_mib"),
                    ({"memory_mib": 64, "memory_reservation_mib": 128},
                     "a: memory_reservation_mib"),
                    ({"cpu_units": 512}, "a: cpu_units")):  # a container's own, over the task's
        own = [_container("a", layers, [PY], **kw).to_wire()]
        assert create(containers=own).startswith(f"InvalidRequest: {why}")
    assert "t-bad" not in tasks.tasks
    from cellcloud.agent import tasks as runner

    monkeypatch.setattr(runner, "DEFAULT_LIMITS",
                        dataclasses.replace(runner.DEFAULT_LIMITS, agent_tasks_max=0))
    assert create().startswith("AgentFull: 0 tasks")
    monkeypatch.undo()
    assert create(memory_mib=10**9).startswith("InvalidRequest: memory_mib")
    with pytest.raises(OpError) as e:
        sandbox._run(tasks.container_start({"task_id": "nope", "container": "a"}))
    assert e.value.type == "TaskNotFound"


def test_a_task_destroyed_while_its_container_spawns_runs_nothing(
        sandbox: Sandbox, image: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawn gets its own copy of the task's namespace fd (the destroy closes the task's,
    whose number must not come to name another namespace under the spawn), and what it
    spawned for a task destroyed meanwhile is killed at once."""
    import asyncio

    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 512, (
        _container("web", layers, [PY, "/app/stubborn.py"]),)).to_wire()))
    real_spawn = sandbox.agent.backend.spawn
    spawned: list[int] = []

    async def spawn_then_destroy(spec: Any, netns_fd: int | None = None) -> Any:
        out = await real_spawn(spec, netns_fd=netns_fd)
        spawned.append(out.pid)
        await tasks.task_destroy({"task_id": task_id})  # lands while the start is under way
        return out

    monkeypatch.setattr(sandbox.agent.backend, "spawn", spawn_then_destroy)
    with pytest.raises(OpError) as e:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))
    assert e.value.type == "TaskNotFound"
    assert task_id not in tasks.tasks and len(spawned) == 1

    async def gone(pid: int) -> bool:
        for _ in range(1000):  # polling /proc (bounded: 20 s)
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(
                    ")")[-1].split()[0] in ("Z", "X"):
                return True
            await asyncio.sleep(0.02)
        return False

    assert sandbox._run(gone(spawned[0]))


def test_out_of_memory_and_a_missing_program_say_why(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    """The task's memory limit holds (the kernel kills the container: 137 and ECS's
    OutOfMemoryError), and a program that does not exist is 127 with CannotStartContainerError."""
    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 64, (
        _container("hog", layers, [PY, "-c", "x = b'x' * (512 << 20); print('survived')"]),
        _container("typo", layers, ["/app/no-such-program"]))).to_wire()))
    try:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "hog"}))
        doc = _wait(sandbox, task_id, lambda d: d["containers"]["hog"]["state"] == "exited")
        hog = doc["containers"]["hog"]
        assert (hog["exit_code"], hog["reason"]) == (
            137, "OutOfMemoryError: Container killed due to memory usage"), doc
        assert doc["oom_kills"] >= 1 and "survived" not in _lines(doc, "hog")
        with pytest.raises(OpError) as e:
            sandbox._run(tasks.container_start({"task_id": task_id, "container": "typo"}))
        assert e.value.type == "ContainerStartFailed" and "no-such-program" in e.value.message
        typo = sandbox._run(tasks.task_poll({"task_id": task_id}))["containers"]["typo"]
        assert typo["state"] == "exited" and typo["exit_code"] == 127
        assert typo["reason"].startswith("CannotStartContainerError: /app/no-such-program")
    finally:
        sandbox._run(tasks.task_destroy({"task_id": task_id}))


def test_a_containers_own_memory_limit_kills_it_alone(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    """Issue #17: a container's own ``memory`` (ECS's hard limit) is enforced in a cgroup of its
    own under the task's: 200 MiB in a container limited to 64 MiB is OOM-killed (137,
    OutOfMemoryError) while its sibling without a limit keeps running and the task's usage
    counts the kill; the same allocation in a container without a limit (the task's 512 MiB
    only) survives. Destroy removes the children with the task's cgroup."""
    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    alloc = [PY, "-c", "x = b'x' * (200 << 20); print('survived', flush=True)"]
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 512, 512, (
        _container("hog", layers, alloc, memory_mib=64, memory_reservation_mib=32,
                   cpu_units=256),
        _container("free", layers, alloc),
        _container("sibling", layers, [PY, "/app/stubborn.py"]))).to_wire()))
    group, cg_name = sandbox.agent.cgroup_group, f"task-{task_id}"
    try:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "sibling"}))
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "hog"}))
        if cgroups.version() == 1:  # the container's own cgroup, with its own limits
            with open(_cgroup_file(group, f"{cg_name}/hog", "memory",
                                   "memory.limit_in_bytes")) as f:
                assert int(f.read()) == 64 * 2**20
            with open(_cgroup_file(group, f"{cg_name}/hog", "memory",
                                   "memory.soft_limit_in_bytes")) as f:
                assert int(f.read()) == 32 * 2**20
            with open(_cgroup_file(group, f"{cg_name}/hog", "cpu", "cpu.shares")) as f:
                assert int(f.read()) == 256
            with open(_cgroup_file(group, cg_name, "pids", "cgroup.procs")) as f:
                assert f.read().split() == []  # no process in the task's cgroup itself
        elif cgroups.version() == 2:
            with open(_cgroup_file(group, f"{cg_name}/hog", "", "memory.max")) as f:
                assert int(f.read()) == 64 * 2**20
        doc = _wait(sandbox, task_id, lambda d: d["containers"]["hog"]["state"] == "exited")
        hog = doc["containers"]["hog"]
        assert (hog["exit_code"], hog["reason"]) == (
            137, "OutOfMemoryError: Container killed due to memory usage"), doc
        assert "survived" not in _lines(doc, "hog") and doc["oom_kills"] >= 1
        assert doc["containers"]["sibling"]["state"] == "running", doc

        sandbox._run(tasks.container_start({"task_id": task_id, "container": "free"}))
        doc = _wait(sandbox, task_id, lambda d: d["containers"]["free"]["state"] == "exited")
        free = doc["containers"]["free"]
        assert (free["exit_code"], free["reason"]) == (0, ""), doc
        assert "survived" in _lines(doc, "free")
        assert doc["containers"]["sibling"]["state"] == "running", doc
    finally:
        sandbox._run(tasks.task_destroy({"task_id": task_id}))
    assert not os.path.exists(_cgroup_file(group, cg_name, "memory", ""))
    assert not os.path.exists(_cgroup_file(group, cg_name, "pids", ""))


def test_a_live_update_hands_running_tasks_over(
        sandbox: Sandbox, image: tuple[str, list[str]], tmp_path: Any) -> None:
    """handover.py with tasks: the successor agent gets each task's network namespace and its
    running containers' channels, serves them (logs, exec, stop, destroy) and hands out no
    uid a running container has."""
    from cellcloud.agent.server import Agent

    layout, layers = image
    push_layers(sandbox, layout, layers)
    old = sandbox.agent
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox._run(old.tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 512, (
        _container("web", layers, [PY, "-u", "-m", "http.server", "8080", "--bind",
                                   "127.0.0.1"], workdir="/srv"),
        _container("later", layers, [PY, "/app/client.py"]))).to_wire()))
    web_pid = sandbox._run(old.tasks.container_start(
        {"task_id": task_id, "container": "web"}))["pid"]
    doc = _wait(sandbox, task_id, lambda d: any("Serving HTTP" in t for t in _lines(d, "web")))
    assert any("Serving HTTP" in t for t in _lines(doc, "web")), doc
    cursors = doc["cursors"]

    handed_tasks = _hand_over(sandbox, old, str(tmp_path / "handover.sock"), {})
    old.tasks.tasks.clear()  # the old process exits here, touching nothing
    new = Agent(old.agent_id, old.state_dir, old.backend, uid_base=old.uid_base, pids_max=64,
                cgroup_group=old.cgroup_group)
    assert sandbox._run(new.tasks.adopt(handed_tasks)) == 1
    tasks = new.tasks
    web_uid = _uid(web_pid)
    assert new.uid_base + new.alloc_slot() != web_uid  # the running container's uid is taken

    # The successor reads the web container's channel: a request made now is logged to it.
    fetch = [PY, "-c", "import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:8080/hello.txt', timeout=10).read().decode())"]
    out = m.TaskExecReply.from_wire(sandbox._run(tasks.task_exec(
        {"task_id": task_id, "container": "web", "command": fetch, "timeout_s": 60})))
    assert out.exit_code == 0 and out.output == b"hello from the web container\n\n"
    doc = sandbox._run(tasks.task_poll({"task_id": task_id, "logs_after": cursors}))
    assert doc["containers"]["web"]["state"] == "running"
    assert doc["containers"]["later"]["state"] == "pending"
    assert any("GET /hello.txt" in t for t in _lines(doc, "web")), doc
    assert doc["cursors"]["web"] > cursors["web"]
    # A container started by the successor shares the handed-over namespace.
    sandbox._run(tasks.container_start({"task_id": task_id, "container": "later"}))
    doc = _wait(sandbox, task_id, lambda d: d["containers"]["later"]["state"] == "exited",
                runner=tasks)
    assert doc["containers"]["later"]["exit_code"] == 0, doc
    assert sandbox._run(tasks.container_stop(
        {"task_id": task_id, "container": "web", "grace_s": 30})) == {"exit_code": 143}
    assert sandbox._run(tasks.task_destroy({"task_id": task_id})) == {"destroyed": True}
    assert not os.path.exists(_cgroup_file(old.cgroup_group, f"task-{task_id}", "pids", ""))
    assert wait_no_processes(web_uid) == []
    assert not [h for h in new.images._holds if h.startswith(f"task:{task_id}/")]


async def _on_loop(fn: Callable[[], Any]) -> Any:
    return fn()


def _hand_over(sandbox: Sandbox, old: Any, path: str, extras: dict[str, Any]
               ) -> list[tuple[dict[str, Any], list[int]]]:
    """A live update's handover (handover.py) from the agent ``old`` to a successor in this
    process, over the unix socket ``path``: the tasks handed over; ``extras`` gets the
    channels handed beside them."""
    import socket
    import threading

    from cellcloud.agent import handover

    hsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hsock.bind(path)
    hsock.listen(1)
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))

    def old_side() -> None:  # as serve_handover does once its successor asked
        conn, _ = hsock.accept()
        conn.recv(65536)
        handed = sandbox._run(_on_loop(old.tasks.hand_over))
        handover._send(conn, old, os.dup(listen.fileno()), handed)

    t = threading.Thread(target=old_side)
    t.start()
    handed_tasks: list[tuple[dict[str, Any], list[int]]] = []
    listener, _ = handover.receive(path, extras, handed_tasks)
    t.join(60)
    listener.close()
    listen.close()
    hsock.close()
    return handed_tasks


def test_a_container_never_runs_outside_its_tasks_cgroup(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    """A task cgroup gone from under a start (cgroup v1's join would silently leave the
    process in the zygote's cgroup, unlimited): the start fails, nothing runs."""
    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 512, (
        _container("web", layers, [PY, "/app/stubborn.py"]),)).to_wire()))
    try:
        assert tasks.tasks[task_id].cgroup.destroy()  # empty: removed in every controller
        with pytest.raises(OpError) as e:
            sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))
        assert e.value.type == "ContainerStartFailed" and "is gone" in e.value.message
    finally:
        sandbox._run(tasks.task_destroy({"task_id": task_id}))


def test_a_container_cannot_signal_its_guest(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    """Signals from the container to its pid 1 (the guest) are not delivered: its exit is
    still reported as it was (Python's own SIGINT handler would have ended the guest)."""
    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    rude = ("import os, signal\n"
            "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):\n"
            "    os.kill(1, s)\n"
            "print('still here', flush=True)\n"
            "raise SystemExit(5)\n")
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 512, (
        _container("rude", layers, [PY, "-c", rude]),)).to_wire()))
    try:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "rude"}))
        doc = _wait(sandbox, task_id, lambda d: d["containers"]["rude"]["state"] == "exited")
        assert doc["containers"]["rude"]["exit_code"] == 5, doc
        assert "still here" in _lines(doc, "rude")
    finally:
        sandbox._run(tasks.task_destroy({"task_id": task_id}))


def test_a_layer_changed_on_the_host_stops_the_containers_on_it(
        sandbox: Sandbox, image: tuple[str, list[str]]) -> None:
    """The agent's periodic re-measure covers running task containers as it does
    environments: a container whose layer changed under it is killed, saying why."""
    layout, layers = image
    push_layers(sandbox, layout, layers)
    tasks = sandbox.agent.tasks
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    sandbox._run(tasks.task_create(m.TaskCreateRequest(task_id, "1", 256, 512, (
        _container("web", layers, [PY, "/app/stubborn.py"]),)).to_wire()))
    planted = os.path.join(sandbox.agent.images.layer_dir(layers[-1]), "planted.py")
    try:
        sandbox._run(tasks.container_start({"task_id": task_id, "container": "web"}))
        with open(planted, "w") as f:
            f.write("x = 1\n")
        sandbox._run(sandbox.agent.remeasure())
        web = sandbox._run(tasks.task_poll({"task_id": task_id}))["containers"]["web"]
        assert (web["state"], web["exit_code"]) == ("exited", 137)
        assert "changed on the host" in web["reason"]
    finally:
        if os.path.exists(planted):
            os.unlink(planted)
        sandbox._run(tasks.task_destroy({"task_id": task_id}))
