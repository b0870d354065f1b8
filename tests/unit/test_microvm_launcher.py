"""The VMM launcher (microvm/launcher.py) against a stand-in QEMU: it starts the VMM with the
channel's fd and the bundle as an ext4 image, answers its pid, reaps it and removes its files
when it dies, refuses a bad request with an error (and goes on serving), and kills every VMM
it started when the agent's end closes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import recv_message, send_message

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="no e2fsprogs")


def _wait_for(cond: Any, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)  # polling a condition, bounded
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _request(tmp: str, env_id: str) -> dict[str, Any]:
    spec = EnvSpec(env_id=env_id, function_name="f", function_version="1", function_arn="arn",
                   handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=3,
                   bundle_dir=os.path.join(tmp, "bundle"), uid=1000, gid=1000,
                   cgroup_group="g", allow_unlimited=True)
    return {"spec": spec.to_wire(), "qemu": os.path.join(tmp, "fake-qemu"), "kernel": "k",
            "initrd": "i", "runtime_disk": "r", "console": False,
            "vm": {"accel": "tcg", "machine": "microvm", "memory_mib": 128, "vcpus": 1}}


def test_launcher_starts_reaps_and_ends_its_vmms(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    os.makedirs(os.path.join(tmp, "bundle"))
    with open(os.path.join(tmp, "bundle", "app.py"), "w") as f:
        f.write("def handler(e, c):\n    return 1\n")
    fake = os.path.join(tmp, "fake-qemu")
    with open(fake, "w") as f:
        f.write('#!/bin/sh\necho "$@" > "$(dirname "$0")/argv-$$"\nexec sleep 300\n')
    os.chmod(fake, 0o755)
    envs = os.path.join(tmp, "envs")
    os.makedirs(envs)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, CELLCLOUD_CGROUP_ROOT=os.path.join(tmp, "no-cgroups"))
    proc = subprocess.Popen([sys.executable, "-m", "cellcloud.microvm.launcher",
                             str(theirs.fileno()), envs], pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    pids = []
    try:
        for n in range(2):
            host, guest = socket.socketpair()
            send_message(ours, _request(tmp, f"env-{n}"), [guest.fileno()])
            guest.close()
            reply, _ = recv_message(ours, 1 << 16)
            assert reply is not None and "pid" in reply, reply
            pid = reply["pid"]
            pids.append(pid)
            argv_file = os.path.join(tmp, f"argv-{pid}")
            assert _wait_for(lambda f=argv_file: os.path.exists(f))
            with open(argv_file) as f:
                argv = f.read().split()
            fd = next(a for a in argv if a.startswith("socket,id=agent,fd=")).rsplit("=", 1)[1]
            assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            task = os.path.join(envs, f"env-{n}", "task.ext4")
            assert f"file={task},if=none,id=task,format=raw,readonly=on" in argv
            with open(task, "rb") as f:
                f.seek(1024 + 56)
                assert f.read(2) == b"\x53\xef"  # the ext4 superblock's magic
            host.close()
        # A bad request is refused with a reason; the launcher goes on serving.
        host, guest = socket.socketpair()
        send_message(ours, _request(tmp, "../escape"), [guest.fileno()])
        guest.close()
        host.close()
        reply, _ = recv_message(ours, 1 << 16)
        assert reply is not None and "bad env id" in str(reply.get("error")), reply
        assert not os.path.exists(os.path.join(tmp, "escape"))
        # A VMM that dies is reaped and its files removed.
        os.kill(pids[0], signal.SIGKILL)
        assert _wait_for(lambda: not os.path.exists(os.path.join(envs, "env-0")))
        assert not _alive(pids[0])
        # The agent's end closes: every VMM still running is killed, the launcher exits.
        ours.close()
        assert proc.wait(60) is not None
        assert _wait_for(lambda: not _alive(pids[1]))
        assert os.listdir(envs) == []
    finally:
        ours.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
