"""Snapshot and restore of microVM guests, sans-IO: the snapshot guest's /init, QEMU's argv for
a guest the host drives over QMP and a console socket, the snapshot's content address and
manifest, and the decision whether a snapshot on disk may be restored.

The shell (``snapshot.py``) runs QEMU, hashes the files and passes what it read in; nothing here
opens a file, starts a process, reads a clock or draws a random number (the seed and the wall
clock of a restored guest's first message are arguments).

A snapshot is a folder ``<state>/microvm/snapshots/<key>/`` holding ``state.bin`` (QEMU's
migration stream, written while the guest is paused) and ``manifest.json``. Its key is the
digest of what the state depends on (``SnapshotKey``: the image, QEMU's version, the argv's
shape, the machine, memory and vCPUs); the manifest adds the SHA-256 and size of the state file
and of the image's kernel and initramfs. ``verify`` refuses a snapshot whose manifest does not
match what the caller is about to start or whose files do not hash to the manifest's digests;
the caller then boots the guest fresh.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from . import core

# Bump when the manifest, the snapshot guest's /init or the argv's meaning changes.
SNAPSHOT_FORMAT = "cellcloud-microvm-snapshot/1"

# The snapshot guest prints this line when it is ready (booted, or restored and reseeded).
READY_MARKER = core.GUEST_MARKER
# The host's first line to a (restored or fresh) guest, and the guest's answer.
FRESH_MARKER = "CELLCLOUD-GUEST-FRESH"

# Placeholders in an argv's shape: what differs from one start to the next (file descriptors,
# the image's folder) is replaced, everything else must match the snapshot's argv exactly.
_FD = "<fd>"
_KERNEL = "<kernel>"
_INITRD = "<initrd>"


def snapshot_init_script() -> bytes:
    """The snapshot guest's /init (busybox only). It mounts /proc, /sys and devtmpfs, turns the
    console's echo off (the host's seed is not echoed), prints the ready marker and then serves
    the host's lines ``SEED <hex> TIME <epoch>`` on the console: for each, before anything else,
    it mixes the seed into the kernel's pool (a write to /dev/urandom: mixed into the input pool,
    not credited; the CRNG takes it in at its next reseed) and sets the wall clock, and answers
    ``CELLCLOUD-GUEST-FRESH <16 random bytes, hex> <its clock, epoch s>``. A malformed line is
    answered ``CELLCLOUD-GUEST-FRESH bad``; the end of input powers the guest off."""
    bb = "/bin/busybox"
    return (
        f"#!{bb} sh\n"
        f"{bb} mount -t proc proc /proc\n"
        f"{bb} mount -t sysfs sysfs /sys\n"
        f"{bb} mount -t devtmpfs devtmpfs /dev\n"
        f"{bb} stty -echo\n"
        f'{bb} echo "{READY_MARKER} $({bb} uname -r)"\n'
        "while read -r word seed tword epoch; do\n"
        '  case "$word/$tword" in SEED/TIME) ;; *) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        '  case "$seed" in ""|*[!0-9a-f]*) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        '  case "$epoch" in ""|*[!0-9]*) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        f'  {bb} echo "$seed" > /dev/urandom\n'
        f'  {bb} date -s "@$epoch" > /dev/null\n'
        f'  {bb} echo "{FRESH_MARKER} $({bb} head -c 16 /dev/urandom | {bb} od -An -tx1 | '
        f"{bb} tr -d ' \\n') $({bb} date +%s)\"\n"
        "done\n"
        f"{bb} sync\n"
        f"{bb} reboot -f\n"
    ).encode()


def fresh_identity_line(seed: bytes, epoch_s: int) -> bytes:
    """The host's first line to a restored guest: a fresh seed (the shell draws it from
    os.urandom) and the wall clock."""
    assert 16 <= len(seed) <= 64, len(seed)
    assert epoch_s >= 0
    return f"SEED {seed.hex()} TIME {epoch_s}\n".encode()


@dataclass(frozen=True)
class FreshReply:
    random_hex: str  # 16 bytes the guest read from /dev/urandom after the reseed
    guest_epoch_s: int  # the guest's clock right after it was set


def parse_fresh_reply(line: str) -> FreshReply | None:
    """The guest's answer to ``fresh_identity_line``; None for any other console line."""
    m = re.fullmatch(re.escape(FRESH_MARKER) + r" ([0-9a-f]{32}) (\d+)\s*", line)
    return FreshReply(m.group(1), int(m.group(2))) if m else None


def is_ready_line(line: str) -> bool:
    return core.guest_release_from_console(line) is not None


def guest_argv(qemu: str, kernel: str, initrd: str, spec: core.VmSpec, *, console_fd: int,
               qmp_fd: int, incoming: bool = False) -> list[str]:
    """``core.qemu_argv`` with the serial console and a QMP monitor on sockets the host made
    (socketpairs handed to QEMU by descriptor), and, to restore, ``-incoming defer``: QEMU
    waits paused for ``migrate-incoming``. Same machine, devices, memory, kernel and initramfs
    as the snapshot's guest, or the migration stream does not load."""
    argv = core.qemu_argv(qemu, kernel, initrd, spec)
    i = argv.index("-serial")
    assert argv[i + 1] == "stdio"
    argv[i:i + 2] = ["-chardev", f"socket,id=con,fd={console_fd}", "-serial", "chardev:con",
                     "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def argv_shape(argv: list[str], *, kernel: str, initrd: str) -> list[str]:
    """The argv with what varies per start replaced by placeholders, without ``-incoming`` and
    QEMU's own path: two starts with the same shape load each other's migration stream."""
    out: list[str] = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "-incoming":
            skip = True
            continue
        if a == kernel:
            a = _KERNEL
        elif a == initrd:
            a = _INITRD
        a = re.sub(r"\bfd=\d+", "fd=" + _FD, a)
        out.append(a)
    return out


@dataclass(frozen=True)
class SnapshotKey:
    """What a snapshot's state depends on; its digest names the snapshot's folder."""

    image_digest: str
    qemu_version: str
    argv_shape: tuple[str, ...]
    machine: str
    memory_mib: int
    vcpus: int
    accel: str
    format: str = SNAPSHOT_FORMAT

    def __post_init__(self) -> None:
        core.image_dir_name(self.image_digest)  # raises on a malformed digest
        assert self.qemu_version, "QEMU's version is part of the key"

    @classmethod
    def of(cls, *, image_digest: str, qemu_version: str, spec: core.VmSpec,
           argv: list[str], kernel: str, initrd: str) -> SnapshotKey:
        return cls(image_digest, qemu_version, tuple(argv_shape(argv, kernel=kernel,
                                                               initrd=initrd)),
                   spec.machine, spec.memory_mib, spec.vcpus, spec.accel)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "image_digest": self.image_digest,
                "qemu_version": self.qemu_version, "argv_shape": list(self.argv_shape),
                "machine": self.machine, "memory_mib": self.memory_mib, "vcpus": self.vcpus,
                "accel": self.accel}

    def digest(self) -> str:
        doc = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()

    def dir_name(self) -> str:
        return self.digest().removeprefix("sha256:")


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        assert re.fullmatch(r"[0-9a-f]{64}", self.sha256), self.sha256
        assert self.size_bytes >= 0

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size_bytes": self.size_bytes}


def manifest(key: SnapshotKey, *, state: FileDigest, kernel: FileDigest, initrd: FileDigest,
             created_at_s: int, save_ms: int) -> dict[str, Any]:
    """manifest.json: the key, the digests of the state and the image's files, and when and
    how fast it was made (for the record only)."""
    return {"key": key.to_json(), "digest": key.digest(), "state": state.to_json(),
            "kernel": kernel.to_json(), "initrd": initrd.to_json(),
            "created_at": created_at_s, "save_ms": save_ms}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def _file_digest(doc: Any) -> FileDigest | None:
    try:
        return FileDigest(str(doc["sha256"]), int(doc["size_bytes"]))
    except (KeyError, TypeError, ValueError, AssertionError):
        return None


def verify(manifest_doc: Any, key: SnapshotKey, *, state: FileDigest | None,
           kernel: FileDigest, initrd: FileDigest, state_bytes_max: int) -> Verdict:
    """May the snapshot described by ``manifest_doc`` be restored into a guest started as
    ``key`` describes, given the digests the shell computed of the state file (None: it is
    missing or over ``state_bytes_max``, so the shell did not read it) and of the image's kernel
    and initramfs? Every mismatch refuses, with the reason; the caller boots fresh."""
    if not isinstance(manifest_doc, dict):
        return Verdict(False, "no readable manifest.json")
    if manifest_doc.get("key") != key.to_json() or manifest_doc.get("digest") != key.digest():
        want, have = key.to_json(), manifest_doc.get("key")
        diff = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k])
        return Verdict(False, f"the snapshot was made for another guest ({', '.join(diff)} "
                       "differ)" if diff else "the manifest's digest is not its key's")
    for name, actual in (("kernel", kernel), ("initrd", initrd), ("state", state)):
        recorded = _file_digest(manifest_doc.get(name))
        if recorded is None:
            return Verdict(False, f"the manifest has no {name} digest")
        if name == "state" and recorded.size_bytes > state_bytes_max:
            return Verdict(False, f"the state is {recorded.size_bytes} bytes, over "
                           f"microvm_snapshot_bytes_max ({state_bytes_max})")
        if actual is None:
            return Verdict(False, f"the {name} file is missing or over its limit")
        if actual.size_bytes != recorded.size_bytes:
            return Verdict(False, f"the {name} file is {actual.size_bytes} bytes, the manifest "
                           f"says {recorded.size_bytes}")
        if actual.sha256 != recorded.sha256:
            return Verdict(False, f"the {name} file's SHA-256 is not the manifest's (corrupt or "
                           "replaced)")
    return Verdict(True, "digests match")
