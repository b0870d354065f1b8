"""A task's managed volume on a real agent with the real jail (agent/tasks.py, volumes/helper.py,
jail.build_root): the volume helper attaches the volume (here the control plane's local file:
no storage servers) and the jail bind-mounts its ext4 at each container's path — read-write
for one container (its user owns the top directory), read-only for another (EROFS) —; a
mount path through a link the image ships stays inside the root; a live update hands the
helper's channel to the successor, the volume stays mounted under the running container, and
the successor's task_destroy detaches it."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from cellcloud.agent.server import Agent
from cellcloud.core import messages as m
from cellcloud.transport import OpError
from cellcloud.volumes.helper_client import VolumeHelperClient
from tests.escape.conftest import Sandbox
from tests.escape.test_image_env import push_layers
from tests.escape.test_tasks import PY, _container, _hand_over, _lines, _wait, task_image

pytestmark = pytest.mark.integration

ACCOUNT = "111122223333"
PROBE = ("import os\n"
         "for line in open('/proc/self/mountinfo'):\n"
         "    f = line.split()\n"
         "    if f[4] in ('/data', '/ro'):\n"
         "        print('mount', f[4], f[f.index('-') + 1], f[5].split(',')[0], flush=True)\n"
         "try:\n"
         "    open('/ro/x', 'w')\n"
         "except OSError as e:\n"
         "    print('ro', e.errno, flush=True)\n"
         "with open('/data/note', 'w') as f:\n"
         "    f.write('from the container')\n"
         "    f.flush()\n"
         "    os.fsync(f.fileno())\n"
         "print('wrote', os.stat('/data').st_uid == os.getuid(), oct(os.stat('/data').st_mode & 0o777), flush=True)\n"
         "import time; time.sleep(600)\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    layout = str(tmp_path_factory.mktemp("task-image") / "img")
    return layout, task_image(layout)


def _mounted(path: str) -> bool:
    return any(line.split()[4] == path for line in open("/proc/self/mountinfo"))


def test_a_task_volume_is_bind_mounted_and_survives_a_live_update(
        sandbox: Sandbox, image: tuple[str, list[str]], tmp_path: Path) -> None:
    layout, layers = image
    push_layers(sandbox, layout, layers)
    old = sandbox.agent
    helper = VolumeHelperClient(str(tmp_path / "vols"), str(tmp_path / "data"))
    helper.start()
    old.volumes = helper
    try:
        _run(sandbox, old, layers, tmp_path)
    finally:
        helper.close()


def _run(sandbox: Sandbox, old: Agent, layers: list[str], tmp_path: Path) -> None:
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    vol = m.TaskVolume("data", "vol-0123456789abcdef0", 1, 1, False)
    req = m.TaskCreateRequest(task_id, ACCOUNT, 256, 512, (
        _container("w", layers, [PY, "-u", "-c", PROBE], mounts=(
            m.TaskMount("data", "/data"), m.TaskMount("data", "/ro", True))),), volumes=(vol,))
    # a mount of a volume the task does not have: refused by name before anything is made
    bad = m.TaskCreateRequest(task_id, ACCOUNT, 256, 512, (
        _container("w", layers, ["/bin/true"], mounts=(m.TaskMount("nope", "/x"),)),),
        volumes=(vol,))
    with pytest.raises(OpError, match="not a task volume"):
        sandbox._run(old.tasks.task_create(bad.to_wire()))
    sandbox._run(old.tasks.task_create(req.to_wire()))
    host_path = old.tasks.volume_paths[task_id]["data"]
    assert _mounted(host_path)
    sandbox._run(old.tasks.container_start({"task_id": task_id, "container": "w"}))
    doc = _wait(sandbox, task_id, lambda d: any(t.startswith("wrote") for t in _lines(d, "w"))
                or d["containers"]["w"]["state"] == "exited")
    lines = _lines(doc, "w")
    assert "mount /data ext4 rw" in lines and "mount /ro ext4 ro" in lines, doc
    assert "ro 30" in lines  # EROFS
    assert "wrote True 0o777" in lines  # its user owns the volume's top directory
    assert Path(host_path, "note").read_text() == "from the container"
    assert not os.path.exists("/data/note") and not os.path.exists("/ro")  # not the host's

    # A live update: the successor gets the helper's channel; the volume stays mounted.
    extras: dict[str, socket.socket] = {}
    handed_tasks = _hand_over(sandbox, old, str(tmp_path / "handover.sock"), extras)
    assert set(extras) == {"volumes"}
    old.tasks.tasks.clear()  # the old process exits here, touching nothing
    assert old.volumes is not None
    old.volumes.forget()
    new = Agent(old.agent_id, old.state_dir, old.backend, uid_base=old.uid_base, pids_max=64,
                cgroup_group=old.cgroup_group)
    new.volumes = VolumeHelperClient.adopt(extras["volumes"])
    try:
        assert sandbox._run(new.tasks.adopt(handed_tasks)) == 1
        assert _mounted(host_path)
        out = m.TaskExecReply.from_wire(sandbox._run(new.tasks.task_exec(
            {"task_id": task_id, "container": "w", "timeout_s": 60,
             "command": [PY, "-c", "print(open('/data/note').read())"]})))
        assert out.exit_code == 0 and out.output == b"from the container\n"
        assert sandbox._run(new.tasks.task_destroy({"task_id": task_id})) == {"destroyed": True}
        assert not _mounted(host_path)  # detached by the successor's destroy
    finally:
        new.volumes.close()
