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

import msgpack

from .spec import EnvSpec


@dataclass
class Spawned:
    pid: int  # host pid of the environment's init process; SIGKILL ends the whole environment
    channel: socket.socket  # the agent's end of the environment's channel


class Backend(Protocol):
    name: str

    def start(self) -> None: ...
    async def spawn(self, spec: EnvSpec, netns_fd: int | None = None) -> Spawned: ...
    def kill(self, pid: int) -> None: ...
    def close(self) -> None: ...


class JailBackend:
    """Environments forked by a zygote into namespaces + cgroups (see jail.py, zygote.py)."""

    name = "jail"

    def __init__(self, root_dir: str) -> None:
        self.root_dir = root_dir  # an empty directory each environment mounts its root over
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Must run before the agent locks itself down (it needs fork+exec once)."""
        os.makedirs(self.root_dir, mode=0o755, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cellcloud.sandbox.zygote", str(theirs.fileno()), self.root_dir],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self._ctl = ours

    def _spawn_sync(self, packed: bytes, guest_end: socket.socket,
                    netns_fd: int | None = None) -> dict[str, object]:
        assert self._ctl is not None
        fds = [guest_end.fileno()] + ([netns_fd] if netns_fd is not None else [])
        with self._lock:
            socket.send_fds(self._ctl, [packed], fds)
            reply = self._ctl.recv(65536)
        if not reply:
            raise RuntimeError("the zygote is gone")
        doc: dict[str, object] = msgpack.unpackb(reply, raw=False)
        return doc

    async def spawn(self, spec: EnvSpec, netns_fd: int | None = None) -> Spawned:
        """``netns_fd``: a network namespace for the environment to join (the caller keeps
        and closes it); none: the environment unshares an empty one (loopback only)."""
        ours, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            packed = msgpack.packb(spec.to_wire(), use_bin_type=True)
            reply = await asyncio.to_thread(self._spawn_sync, packed, guest_end, netns_fd)
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
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
