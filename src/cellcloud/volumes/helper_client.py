"""The agent's side of the volume helper (``helper.py`` describes it): started before the
agent's lock-down, then reached only over the socketpair made then. Light to import (the
agent imports it; the helper's own imports — FUSE, the volume client — stay in its process)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from typing import Any

import msgpack

message_bytes_max = 64 * 1024
ready_timeout_s = 60.0
# attach: the FUSE process's own start (attach.fuse_ready_timeout_s, 60 s) plus losetup, mkfs
# and mount (each bounded by attach.command_timeout_s); detach likewise.
call_timeout_s = 600.0
close_timeout_s = 120.0  # detaching everything on close


class VolumeHelperClient:
    """The agent's side: started before the lock-down, then reached only over the socketpair.
    Calls are one at a time (a lock), each from a thread (``asyncio.to_thread``)."""

    def __init__(self, run_dir: str, data_dir: str, colony: str = "", servers: str = "",
                 pki_dir: str = "", region: str = "cc-local-1") -> None:
        self.argv = ["--run-dir", run_dir, "--data-dir", data_dir, "--region", region]
        for flag, value in (("--colony", colony), ("--servers", servers),
                            ("--pki-dir", pki_dir)):
            if value:
                self.argv += [flag, value]
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ready = False

    def start(self) -> None:
        """Fork+exec the helper (before the agent's lock-down); its ready message is read by
        the first call, so the agent's own start does not wait for the helper's imports."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cellcloud.volumes.helper", str(theirs.fileno()),
             *self.argv], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._ctl = ours
        self._ready = False

    def _wait_ready(self, ctl: socket.socket) -> None:
        ctl.settimeout(ready_timeout_s)
        try:
            doc = msgpack.unpackb(ctl.recv(message_bytes_max), raw=False)
        except (TimeoutError, ValueError) as e:
            raise RuntimeError(f"the volume helper did not start: {e!r}") from e
        finally:
            ctl.settimeout(call_timeout_s)
        if not isinstance(doc, dict) or not doc.get("ready"):
            raise RuntimeError(f"the volume helper failed to start: {doc!r}")
        self._ready = True

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._ctl is None:
            raise RuntimeError("the volume helper is not running")
        with self._lock:
            if not self._ready:
                self._wait_ready(self._ctl)
            self._ctl.send(msgpack.packb(msg, use_bin_type=True))
            data = self._ctl.recv(message_bytes_max)
        if not data:
            raise RuntimeError("the volume helper is gone")
        doc: dict[str, Any] = msgpack.unpackb(data, raw=False)
        if "error" in doc:
            raise RuntimeError(str(doc["error"]))
        return doc

    def channel_for_handover(self) -> int:
        """Live update: the channel's fd, for the successor (SCM_RIGHTS); the helper lives as
        long as any copy of it is open, so the volumes stay attached under the containers."""
        if self._ctl is None:
            raise RuntimeError("the volume helper is not running")
        with self._lock:
            if not self._ready:
                self._wait_ready(self._ctl)
        return self._ctl.fileno()

    @classmethod
    def adopt(cls, ctl: socket.socket) -> VolumeHelperClient:
        """The successor's side of a handover: the running helper, over the channel given."""
        c = cls("", "")
        c._ctl, c._ready = ctl, True
        ctl.setblocking(True)
        ctl.settimeout(call_timeout_s)
        return c

    def forget(self) -> None:
        """After a handover: drop this process's end; the successor's copy keeps the helper."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self._proc = None

    def attach(self, key: str, account: str, volume_id: str, size_gib: int, attach_epoch: int,
               replicated: bool, target: str) -> str:
        doc = self.call({"op": "attach", "key": key, "account": account,
                         "volume_id": volume_id, "size_gib": size_gib,
                         "attach_epoch": attach_epoch, "replicated": replicated,
                         "target": target})
        return str(doc["path"])

    def detach(self, key: str) -> None:
        self.call({"op": "detach", "key": key})

    def close(self) -> None:
        """Closing the channel makes the helper detach everything and exit."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=close_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
