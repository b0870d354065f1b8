"""The volume helper: a privileged process per agent that attaches its tasks' managed volumes
on the host (issue #19, docs/volumes.md#ecs-managed-volumes). The agent may not open a
connection, mount or exec once locked down, so it starts this process before its lock-down
and reaches it only over the SOCK_SEQPACKET socketpair made then, as it does the network
helper. The control plane took each volume's attachment (its record names the task and the
``attach_epoch``) before the task was placed; this process only mounts what it is told to.

Operations (msgpack, one per datagram; answered in order, one at a time):

- ``attach(key, account, volume_id, size_gib, attach_epoch, replicated, target) -> {path,
  loop_device, formatted}``: the volume as ``volumes/attach.py`` attaches it — one FUSE file
  (served by a ``VolumeClient`` over the region's storage servers as client
  ``<target>@<attach_epoch>``, or the volume's local ``FileBlockStore`` file), a loop device,
  ext4 (made on the first attach) — mounted at ``<run dir>/<key>/mnt``, which the jail then
  bind-mounts at the container's ``containerPath``.
- ``detach(key) -> {}``: unmount, free the loop device, end the FUSE process (its client
  detaches from the volume's config cell).

It ends when its channel closes (its agent is gone) or on SIGTERM, detaching every volume it
attached. What it can do beyond the agent: mount and unmount (FUSE, loop devices, ext4 under
its run directory), and reach the storage servers and the store colony as role ``volume``
(docs/threat-model.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import msgpack

from .attach import Attached, AttachError, ReplicatedVolume, attach_file, attach_replicated, detach
from .blockdev import volume_file

KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,400}$")  # <task id>-<volume name>
ACCOUNT = re.compile(r"^[0-9]{12}$")
VOLUME_ID = re.compile(r"^vol-[0-9a-f]{8,17}$")
message_bytes_max = 64 * 1024
GiB = 1024 ** 3


class Helper:
    def __init__(self, run_dir: str, data_dir: str, colony: str, servers: str, pki_dir: str,
                 region: str) -> None:
        self.run_dir, self.data_dir = run_dir, data_dir
        self.colony, self.servers, self.pki_dir, self.region = colony, servers, pki_dir, region
        self.attached: dict[str, Attached] = {}

    async def attach(self, msg: dict[str, Any]) -> dict[str, Any]:
        key, account, vol = str(msg.get("key")), str(msg.get("account")), str(msg.get("volume_id"))
        if not KEY.match(key) or not ACCOUNT.match(account) or not VOLUME_ID.match(vol):
            raise ValueError("attach: key, account (12 digits) and volume_id (vol-...) "
                             "are required")
        if key in self.attached:
            raise ValueError(f"{key} is attached already")
        size_gib, epoch = msg.get("size_gib"), msg.get("attach_epoch")
        if not isinstance(size_gib, int) or not isinstance(epoch, int) or size_gib < 1:
            raise ValueError("attach: size_gib and attach_epoch are integers")
        # one directory per key; a key past a path component's length is shortened with its
        # hash (distinct keys, distinct directories)
        name = key if len(key) <= 200 else \
            f"{key[:150]}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
        base = os.path.join(self.run_dir, name)
        mnt, fuse_dir = os.path.join(base, "mnt"), os.path.join(base, "fuse")
        os.makedirs(base, mode=0o700, exist_ok=True)
        if msg.get("replicated"):
            if not self.colony:
                raise ValueError(f"{vol} is replicated: this host has no storage servers "
                                 "configured (the agent's --volumes-colony)")
            att = await attach_replicated(ReplicatedVolume(
                vol, self.colony, self.servers, f"{msg.get('target')}@{epoch}", self.pki_dir,
                self.region), fuse_dir, mnt)
        else:
            path = volume_file(self.data_dir, account, vol)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            att = await attach_file(path, size_gib * GiB, fuse_dir, mnt)
        self.attached[key] = att
        return {"path": mnt, "loop_device": att.loop_device, "formatted": att.formatted}

    async def detach(self, msg: dict[str, Any]) -> dict[str, Any]:
        att = self.attached.pop(str(msg.get("key")), None)
        if att is not None:
            await detach(att)
        return {}

    async def detach_all(self) -> None:
        for key in list(self.attached):
            try:
                await self.detach({"key": key})
            except (AttachError, OSError) as e:
                sys.stderr.write(f"volume helper: detaching {key} failed: {e}\n")


def serve(sock: socket.socket, helper: Helper) -> None:
    loop = asyncio.new_event_loop()
    stop = threading.Event()

    def on_term(_sig: int, _frame: Any) -> None:
        stop.set()
        sock.shutdown(socket.SHUT_RD)  # the recv below returns b"": the same path as EOF

    signal.signal(signal.SIGTERM, on_term)
    sock.send(msgpack.packb({"ready": True}))
    try:
        while not stop.is_set():
            try:
                data = sock.recv(message_bytes_max)
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                msg = msgpack.unpackb(data, raw=False)
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "attach":
                    out = loop.run_until_complete(helper.attach(msg))
                elif op == "detach":
                    out = loop.run_until_complete(helper.detach(msg))
                else:
                    out = {"error": f"unknown op {str(op)[:40]!r}"}
            except (AttachError, ValueError, OSError, subprocess.SubprocessError) as e:
                out = {"error": str(e)[-2000:]}
            try:
                sock.send(msgpack.packb(out, use_bin_type=True))
            except OSError:
                break
    finally:
        loop.run_until_complete(helper.detach_all())
        loop.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cellcloud.volumes.helper")
    p.add_argument("fd", type=int)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--colony", default="")
    p.add_argument("--servers", default="")
    p.add_argument("--pki-dir", default="")
    p.add_argument("--region", default="cc-local-1")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    os.makedirs(args.run_dir, mode=0o700, exist_ok=True)
    serve(sock, Helper(args.run_dir, args.data_dir, args.colony, args.servers, args.pki_dir,
                       args.region))


if __name__ == "__main__":
    main()
