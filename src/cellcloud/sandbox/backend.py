"""The interface every execution-environment backend implements, and the ``jail`` backend.

A backend turns an :class:`EnvSpec` into a running environment whose only link to the host is
a stream socket the agent created (its end is returned here). The ``microvm`` backend (a later
issue) implements the same two calls.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Protocol

from ..transport.codec import FrameError, pack, recv_message, send_message
from .spec import EnvSpec

control_reply_bytes_max = 64 * 1024  # the zygote's and its keeper's answers


@dataclass
class Spawned:
    pid: int  # host pid of the environment's init process; SIGKILL ends the whole environment
    channel: socket.socket  # the agent's end of the environment's channel


class Unsupported(RuntimeError):
    """A backend cannot run this environment (yet): the message is for the function's caller
    (the agent answers ``EnvUnsupported``; the frontend passes it on)."""


class Backend(Protocol):
    name: str

    def start(self) -> None: ...
    async def spawn(self, spec: EnvSpec, netns_fd: int | None = None) -> Spawned: ...
    def kill(self, pid: int) -> None: ...
    def close(self) -> None: ...


class ZygoteGone(RuntimeError):
    """The zygote died (its control socket hung up) before it answered."""


class JailBackend:
    """Environments forked by a zygote into namespaces + cgroups (see jail.py, zygote.py).

    The zygote is not started by the agent directly but by a *zygote keeper* (zygote.py's
    ``keeper_main``), a tiny process the agent starts before it locks itself down and whose only
    job is to start a fresh zygote when asked. A zygote that dies is replaced on the next spawn:
    the locked-down agent could not start one itself (its seccomp filter forbids ``execve``, and
    a zygote forked from it would inherit that filter).
    """

    name = "jail"
    zygote_module = "cellcloud.sandbox.zygote"

    def __init__(self, root_dir: str) -> None:
        self.root_dir = root_dir  # an empty directory each environment mounts its root over
        self._ctl: socket.socket | None = None  # the zygote's control socket
        self._proc: subprocess.Popen[bytes] | None = None  # the keeper (or a bench's zygote)
        self._keeper: socket.socket | None = None
        self._zygote_pid = 0
        self.zygote_restarts = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Must run before the agent locks itself down (it needs fork+exec once)."""
        os.makedirs(self.root_dir, mode=0o755, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cellcloud.sandbox.zygote", "--keeper", str(theirs.fileno()),
             self.root_dir, self.zygote_module],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self._keeper = ours
        with self._lock:
            self._new_zygote()

    @property
    def zygote_pid(self) -> int:
        if self._keeper is None and self._proc is not None:
            return self._proc.pid  # started without a keeper (a bench's profiling zygote)
        return self._zygote_pid

    def _new_zygote(self) -> None:
        """Ask the keeper for a fresh zygote (with ``_lock`` held)."""
        if self._keeper is None:
            raise ZygoteGone("the zygote is gone and there is no keeper to start another")
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        send_message(self._keeper, {"t": "zygote"})
        try:
            doc, fds = recv_message(self._keeper, control_reply_bytes_max, 1)
        except FrameError as e:
            raise ZygoteGone(f"the zygote keeper answered garbage: {e}") from e
        if doc is None or len(fds) != 1 or not isinstance(doc.get("pid"), int):
            for fd in fds:
                os.close(fd)
            raise ZygoteGone("the zygote keeper is gone")
        self._ctl = socket.socket(fileno=fds[0])
        self._zygote_pid = doc["pid"]

    def _spawn_sync(self, packed: bytes, guest_end: socket.socket,
                    netns_fd: int | None = None) -> dict[str, object]:
        fds = [guest_end.fileno()] + ([netns_fd] if netns_fd is not None else [])
        with self._lock:
            if self._ctl is None:
                self._new_zygote()
            assert self._ctl is not None
            try:
                socket.send_fds(self._ctl, [packed], fds)
                reply, _ = recv_message(self._ctl, control_reply_bytes_max)
            except OSError as e:  # EPIPE/ECONNRESET: the zygote died
                reply = None
                err: Exception | None = e
            else:
                err = None
            if reply is None:
                # Replace it now, so the next spawn (the caller's retry) finds a live one.
                self._ctl.close()
                self._ctl = None
                self.zygote_restarts += 1
                self._new_zygote()
                raise ZygoteGone(f"the zygote is gone ({err!r}); a new one was started")
        return reply

    async def spawn(self, spec: EnvSpec, netns_fd: int | None = None) -> Spawned:
        """``netns_fd``: a network namespace for the environment to join (the caller keeps
        and closes it); none: the environment unshares an empty one (loopback only)."""
        packed = pack(spec.to_wire())
        for attempt in (0, 1):  # once more on a fresh zygote if the zygote had died
            ours, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                reply = await asyncio.to_thread(self._spawn_sync, packed, guest_end, netns_fd)
            except ZygoteGone:
                ours.close()
                if attempt:
                    raise
                continue
            except BaseException:
                ours.close()
                raise
            finally:
                guest_end.close()
            if "error" in reply:
                ours.close()
                raise RuntimeError(str(reply["error"]))
            pid = reply["pid"]
            assert isinstance(pid, int)
            return Spawned(pid, ours)
        raise AssertionError("unreachable")

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
        if self._keeper is not None:
            self._keeper.close()  # the keeper exits on EOF; its zygote dies with it (PDEATHSIG)
            if self._zygote_pid:
                self.kill(self._zygote_pid)
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
