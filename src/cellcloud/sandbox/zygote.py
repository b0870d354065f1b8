"""The zygote: a pre-initialised interpreter that forks new environments, so a cold start costs
two forks and the jail set-up, not an interpreter start (issue #3's fast-start idea).

It is started by the agent's *zygote keeper* (``keeper_main`` below; the agent starts the keeper
before it locks itself down), and serves exactly one operation over a SOCK_SEQPACKET socketpair:
``spawn(spec) + [channel fd] -> {"pid"} | {"error"}``. It is a child subreaper, so environments
are its children (not the agent's) and are reaped here; it dies with its keeper, and the keeper
with the agent (PDEATHSIG). When a zygote dies, the agent asks the keeper for a new one.

Spawning: fork A (joins the env's cgroup, unshares the namespaces), A forks B — pid 1 of the new
pid namespace — reports B's host pid and exits. B jails itself and becomes the guest agent.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

from .. import eventlog
from ..core.messages import GuestReady
from ..transport.codec import FrameError, pack, recv_message, send_message
from . import cgroups, container_guest, guest, jail, linux, seccomp_policy
from .ephemeral import PERMANENT_LOOP_ERRORS, LoopPool
from .spec import EnvSpec

spec_bytes_max = 256 * 1024


def _reap(*_: Any) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def spawn(spec: EnvSpec, chan_fd: int, root: str, pool: LoopPool | None = None,
          netns_fd: int = -1) -> int:
    """Start one environment; returns its host pid (the pid 1 of its namespaces). With a
    ``netns_fd`` (a namespace the network helper wired), the environment joins it instead of
    unsharing an empty one."""
    tmp_device: str | None = None
    loop_fd = -1
    if pool is not None and pool.available and "tmp_size" not in spec.disabled_layers:
        pool.want(spec.ephemeral_mb)
        try:
            loop = pool.take(spec.ephemeral_mb)
            tmp_device, loop_fd = loop.path, loop.fd
        except OSError as e:  # fall back to a sized tmpfs for this one environment
            if e.errno in PERMANENT_LOOP_ERRORS:  # and for good, if loop devices can't work here
                pool.available = False
            pool.fallbacks += 1
            sys.stderr.write(eventlog.line(
                "zygote", "WARNING", "tmp_fallback",
                f"disk-backed /tmp unavailable ({e}); using tmpfs", env=spec.env_id))
    r, w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid_a = os.fork()
        if pid_a == 0:  # A
            try:
                os.close(r)
                off = spec.disabled_layers
                cg = cgroups.Cgroup(spec.cgroup_group, spec.cgroup_name or spec.env_id)
                if cg.version and spec.cgroup_name:
                    if not cg.exists():  # never run outside it (a task destroyed meanwhile)
                        raise RuntimeError(f"the cgroup {spec.cgroup_name} is gone")
                    cg.join(0)  # the agent made and sized it (a task's, agent/tasks.py)
                elif cg.version:
                    unlimited = cgroups.UNLIMITED
                    cg.create(cgroups.Limits(
                        unlimited if "cgroup_memory" in off else spec.memory_mb * 1024 * 1024,
                        unlimited if "cgroup_pids" in off else spec.pids_max,
                        spec.memory_mb,
                        # The init burst; the agent caps it when the environment is ready.
                        unlimited if "cgroup_cpu" in off
                        else cgroups.cpu_quota_us(spec.memory_mb, init=True)))
                    cg.join(0)
                elif not spec.allow_unlimited:
                    raise RuntimeError(
                        f"no cgroup hierarchy found at {cgroups.ROOT}: memory, pids and CPU "
                        "limits cannot be enforced (the agent's --allow-unlimited permits this)")
                # The cgroup namespace is unshared after the join, so the environment's
                # cgroup is the root of its view (/proc/self/cgroup shows "/").
                flags = jail.namespaces(off)
                if netns_fd >= 0 and flags & linux.CLONE_NEWNET:
                    linux.setns(netns_fd, linux.CLONE_NEWNET)
                    flags &= ~linux.CLONE_NEWNET
                linux.unshare(flags)
                pid_b = os.fork()
                if pid_b == 0:  # B
                    os.close(w)
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _become_environment(spec, chan_fd, root, tmp_device)
                os.write(w, b"%d" % pid_b)
                os._exit(0)
            except BaseException:
                os.write(w, ("E" + traceback.format_exc()[-2000:]).encode())
                os._exit(1)
        os.close(w)
        if loop_fd >= 0:
            os.close(loop_fd)  # the environment holds it now (and then its mount does)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.close(r)
        os.waitpid(pid_a, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if not data or data.startswith(b"E"):
        raise RuntimeError(f"spawn failed: {data[1:].decode(errors='replace')}")
    return int(data)


def _become_environment(spec: EnvSpec, chan_fd: int, root: str, tmp_device: str | None) -> None:
    try:
        jail.enter(spec, root, keep_fds=(chan_fd,), tmp_device=tmp_device)
    except BaseException:
        # The environment never ran function code; say why on its channel and vanish.
        try:
            sock = socket.socket(fileno=chan_fd)
            sock.sendall(pack(GuestReady(0.0, {
                "errorType": "Runtime.SandboxSetupError",
                "errorMessage": traceback.format_exc()[-2000:], "stackTrace": []}).to_wire()))
        finally:
            os._exit(1)
    try:
        if spec.guest == "container":
            container_guest.run(spec, chan_fd)
        guest.run(spec, chan_fd)
    finally:
        os._exit(1)


def serve(ctl: socket.socket, root: str, pool: LoopPool | None = None) -> None:
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    seccomp_policy.prepare()  # once here, not in every environment it forks
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        # Idle time tops up the pool of ready /tmp devices, one at a time, never delaying a
        # spawn request by more than one device's set-up.
        while pool is not None and not select.select([ctl], [], [], 0)[0]:
            if not pool.refill_one():
                break
        try:
            doc, fds = recv_message(ctl, spec_bytes_max, 2)
        except InterruptedError:
            continue
        except FrameError as e:
            send_message(ctl, {"error": f"FrameError: {e}"})
            continue
        if doc is None:
            return  # the agent is gone
        try:
            if len(fds) not in (1, 2):
                raise ValueError("spawn needs a channel fd (and optionally a netns fd)")
            spec = EnvSpec.from_wire(doc)
            netns_fd = fds[1] if len(fds) == 2 else -1
            reply: dict[str, Any] = {"pid": spawn(spec, fds[0], root, pool, netns_fd)}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        send_message(ctl, reply)


def keeper_main(ctl_fd: int, root: str, module: str) -> None:
    """The zygote keeper: started by the agent before its lock-down, it starts a fresh zygote
    (``python -m <module> <fd> <root>``) each time the agent asks (any message on the
    SOCK_SEQPACKET control socket) and hands back its pid and the agent's end of the new
    zygote's control socket (SCM_RIGHTS). Nothing else. It exits when the agent closes the
    socket or dies (PDEATHSIG)."""
    import subprocess

    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before we armed PDEATHSIG
        sys.exit(1)
    ctl = socket.socket(fileno=ctl_fd)
    signal.signal(signal.SIGCHLD, _reap)  # dead zygotes are reaped as they die
    while True:
        try:
            msg = ctl.recv(64)
        except InterruptedError:
            continue
        if not msg:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(theirs.fileno()), root],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
            send_message(ctl, {"pid": proc.pid}, [ours.fileno()])
        finally:
            ours.close()
            theirs.close()


def main() -> None:
    if sys.argv[1] == "--keeper":
        keeper_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    ctl_fd, root = int(sys.argv[1]), sys.argv[2]
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the keeper died before we armed PDEATHSIG
        sys.exit(1)
    ctl = socket.socket(fileno=ctl_fd)
    pool = LoopPool(root.rstrip("/") + "-ephemeral")
    if pool.available:
        pool.want(512)  # Lambda's default ephemeral size
    serve(ctl, root, pool)


if __name__ == "__main__":
    main()
