"""The VMM launcher: the process that starts an environment's QEMU for the agent.

The agent locks itself down (seccomp: no ``execve``) once it serves, so, like the jail's zygote
keeper, a small process started before that does the process work: for each spawn request on
its SOCK_SEQPACKET control socket (the spec, the VM's shape and the channel's guest end as
SCM_RIGHTS) it writes the bundle into a small read-only ext4 image, creates the environment's
cgroup (the function's memory plus the VMM's overhead), starts QEMU in it with the channel's
fd, answers ``{"pid"}`` (or ``{"error"}``), and reaps QEMU when it exits (removing its files).
On EOF (the agent closed it or died) it kills every QEMU it started and exits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

from ..core.limits import DEFAULT_LIMITS
from ..sandbox import cgroups, linux
from ..sandbox.spec import EnvSpec
from ..transport.codec import FrameError, recv_message, send_message
from . import core, image

request_bytes_max = 1024 * 1024
_ENV_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_children: dict[int, str] = {}  # QEMU pid -> its environment's folder


def _reap(signum: int, frame: Any) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        folder = _children.pop(pid, None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def bundle_disk(bundle_dir: str, path: str) -> None:
    """The bundle as an ext4 image (``mkfs.ext4 -d``): the guest mounts it read-only."""
    size_kib = (_dir_bytes(bundle_dir) * 3 // 2) // 1024 + 4096
    r = subprocess.run([image.MKFS, "-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0",
                        "-d", bundle_dir, path, f"{size_kib}k"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{image.MKFS} failed: {r.stderr.strip()[-300:]}")


def spawn(doc: dict[str, Any], chan_fd: int, envs_dir: str) -> int:
    spec = EnvSpec.from_wire(doc["spec"])
    if not _ENV_ID.fullmatch(spec.env_id):
        raise ValueError(f"bad env id {spec.env_id!r}")
    vm = core.VmSpec(**doc["vm"])
    folder = os.path.join(envs_dir, spec.env_id)
    os.makedirs(folder, mode=0o700)
    try:
        task = os.path.join(folder, "task.ext4")
        bundle_disk(spec.bundle_dir, task)
        argv = core.agent_qemu_argv(
            str(doc["qemu"]), str(doc["kernel"]), str(doc["initrd"]), vm,
            runtime_disk=str(doc["runtime_disk"]), bundle_disk=task, chan_fd=chan_fd,
            console=os.path.join(folder, "console.log") if doc.get("console") else "")
        cg = cgroups.Cgroup(spec.cgroup_group, spec.env_id)
        if cg.version:
            cg.create(cgroups.Limits(
                (spec.memory_mb + DEFAULT_LIMITS.microvm_vmm_overhead_mib) * 1024 * 1024,
                spec.pids_max, spec.memory_mb,
                cgroups.cpu_quota_us(spec.memory_mb, init=True)))
        elif not spec.allow_unlimited:
            raise RuntimeError(f"no cgroup hierarchy found at {cgroups.ROOT}: the VMM's memory "
                               "and CPU cannot be limited (the agent's --allow-unlimited "
                               "permits this)")
        with open(os.path.join(folder, "qemu.log"), "wb") as log:
            proc = subprocess.Popen(
                argv, pass_fds=(chan_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=(lambda: cg.join(0)) if cg.version else None)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _children[proc.pid] = folder
    proc.returncode = 0  # reaped by _reap, never by Popen (its __del__ must not wait)
    return proc.pid


def serve(ctl: socket.socket, envs_dir: str) -> None:
    while True:
        try:
            doc, fds = recv_message(ctl, request_bytes_max, 1)
        except InterruptedError:
            continue
        except FrameError as e:
            send_message(ctl, {"error": f"FrameError: {e}"})
            continue
        if doc is None:
            return
        try:
            if len(fds) != 1:
                raise ValueError("spawn needs the channel's guest end")
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:  # registered before the reaper can see it exit
                reply: dict[str, Any] = {"pid": spawn(doc, fds[0], envs_dir)}
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        send_message(ctl, reply)


def main() -> None:
    ctl_fd, envs_dir = int(sys.argv[1]), sys.argv[2]
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before we armed PDEATHSIG
        sys.exit(1)
    ctl = socket.socket(fileno=ctl_fd)
    signal.signal(signal.SIGCHLD, _reap)
    try:
        serve(ctl, envs_dir)
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for pid in list(_children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for folder in _children.values():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
