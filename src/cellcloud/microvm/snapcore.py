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
import struct
from dataclasses import dataclass
from typing import Any

from . import core

# Bump when the manifest, the snapshot guest's /init or the argv's meaning changes.
SNAPSHOT_FORMAT = "cellcloud-microvm-snapshot/2"

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
    """The snapshot guest's /init (busybox, plus ``reseed_helper`` which it writes out to
    /bin/reseed with printf). It mounts /proc, /sys and devtmpfs, turns the console's echo off
    (the host's seed is not echoed), prints the ready marker and then serves the host's lines
    ``SEED <hex> TIME <epoch>`` on the console: for each, before anything else, it adds the seed
    to the kernel's pool and reseeds the CRNG (``/bin/reseed``: RNDADDENTROPY, RNDRESEEDCRNG)
    and sets the wall clock, and answers ``CELLCLOUD-GUEST-FRESH <16 random bytes, hex> <its
    clock, epoch s> <reseed's exit status>``. A malformed line is answered
    ``CELLCLOUD-GUEST-FRESH bad``; the end of input powers the guest off."""
    bb = "/bin/busybox"
    return (
        f"#!{bb} sh\n"
        f"{bb} mount -t proc proc /proc\n"
        f"{bb} mount -t sysfs sysfs /sys\n"
        f"{bb} mount -t devtmpfs devtmpfs /dev\n"
        f"{bb} stty -echo\n"
        f"{bb} printf '{_printf_octal(reseed_helper())}' > /bin/reseed\n"
        f"{bb} chmod 0755 /bin/reseed\n"
        f'{bb} echo "{READY_MARKER} $({bb} uname -r)"\n'
        "while read -r word seed tword epoch; do\n"
        '  case "$word/$tword" in SEED/TIME) ;; *) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        '  case "$seed" in ""|*[!0-9a-f]*) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        '  case "$epoch" in ""|*[!0-9]*) '
        f'{bb} echo "{FRESH_MARKER} bad"; continue;; esac\n'
        f'  {bb} echo "$seed" | /bin/reseed; reseeded=$?\n'
        f'  {bb} date -s "@$epoch" > /dev/null\n'
        f'  {bb} echo "{FRESH_MARKER} $({bb} head -c 16 /dev/urandom | {bb} od -An -tx1 | '
        f"{bb} tr -d ' \\n') $({bb} date +%s) $reseeded\"\n"
        "done\n"
        f"{bb} sync\n"
        f"{bb} reboot -f\n"
    ).encode()


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
_BASE = 0x400000  # the helper's load address
_HDR = 64 + 56  # ELF header + one program header
RESEED_INPUT_BYTES_MAX = 256


def reseed_helper() -> bytes:
    """A static x86-64 ELF of under 300 bytes for the guest (which has no compiler, Python or
    loader), written here instruction by instruction (each with its assembly beside it). It
    reads up to 256 bytes from stdin (the seed in hex and a newline), adds them to the kernel's
    pool with ``ioctl(RNDADDENTROPY)`` crediting 4 bits per hex digit (the seed comes from the
    host's os.urandom), then ``ioctl(RNDRESEEDCRNG)``: the CRNG is rekeyed from the pool at
    once, so the next read of /dev/urandom already depends on the seed. A guest whose CRNG was
    not yet initialised (no RDRAND under TCG, no devices: common at snapshot time) is
    initialised by the credit itself (256 bits). Exit status 0; 1 nothing read, 2 open
    failed, 3 RNDADDENTROPY failed, 4 RNDRESEEDCRNG failed (EPERM without CAP_SYS_ADMIN). One
    RWX segment holds the code, the path and, zero-filled past the file's end, the
    ``rand_pool_info`` buffer."""
    code = bytearray()
    labels: dict[str, int] = {}
    fix32: list[tuple[int, str]] = []  # (offset of a rip-relative rel32, its label)
    fix8: list[tuple[int, str]] = []  # (offset of a short jump's rel8, its label)

    def emit(b: bytes) -> None:
        code.extend(b)

    def rel32(op: bytes, label: str) -> None:
        emit(op)
        fix32.append((len(code), label))
        emit(b"\0\0\0\0")

    def jcc8(op: bytes, label: str) -> None:
        emit(op)
        fix8.append((len(code), label))
        emit(b"\0")

    def mov_eax(n: int) -> None:
        emit(b"\xb8" + struct.pack("<I", n))

    # read(0, buf + 8, RESEED_INPUT_BYTES_MAX)
    emit(b"\x31\xff")                       # xor edi, edi
    rel32(b"\x48\x8d\x35", "seed")          # lea rsi, [rip+seed]
    emit(b"\xba" + struct.pack("<I", RESEED_INPUT_BYTES_MAX))  # mov edx, N
    emit(b"\x31\xc0")                       # xor eax, eax  (read)
    emit(b"\x0f\x05")                       # syscall
    emit(b"\x85\xc0")                       # test eax, eax
    jcc8(b"\x7e", "fail_read")              # jle fail_read
    rel32(b"\x48\x8d\x1d", "info")          # lea rbx, [rip+info]
    emit(b"\x89\x43\x04")                   # mov [rbx+4], eax   buf_size = n
    emit(b"\x8d\x04\x85\xfc\xff\xff\xff")   # lea eax, [rax*4-4]: 4 bits per hex digit
    emit(b"\x89\x03")                       # mov [rbx], eax
    rel32(b"\x48\x8d\x3d", "path")          # lea rdi, [rip+path]
    emit(b"\xbe\x01\x00\x00\x00")           # mov esi, O_WRONLY
    mov_eax(2)                              # mov eax, SYS_open
    emit(b"\x0f\x05")                       # syscall
    emit(b"\x85\xc0")                       # test eax, eax
    jcc8(b"\x78", "fail_open")              # js fail_open
    emit(b"\x41\x89\xc4")                   # mov r12d, eax
    emit(b"\x44\x89\xe7")                   # mov edi, r12d
    emit(b"\xbe" + struct.pack("<I", RNDADDENTROPY))  # mov esi, RNDADDENTROPY
    emit(b"\x48\x89\xda")                   # mov rdx, rbx       &rand_pool_info
    mov_eax(16)                             # mov eax, SYS_ioctl
    emit(b"\x0f\x05")                       # syscall
    emit(b"\x85\xc0")                       # test eax, eax
    jcc8(b"\x75", "fail_add")               # jnz fail_add
    emit(b"\x44\x89\xe7")                   # mov edi, r12d
    emit(b"\xbe" + struct.pack("<I", RNDRESEEDCRNG))  # mov esi, RNDRESEEDCRNG
    emit(b"\x31\xd2")                       # xor edx, edx
    mov_eax(16)                             # mov eax, SYS_ioctl
    emit(b"\x0f\x05")                       # syscall
    emit(b"\x85\xc0")                       # test eax, eax
    jcc8(b"\x75", "fail_reseed")            # jnz fail_reseed
    emit(b"\x31\xff")                       # xor edi, edi
    jcc8(b"\xeb", "exit")                   # jmp exit
    for status, label in enumerate(("fail_read", "fail_open", "fail_add", "fail_reseed"), 1):
        labels[label] = len(code)
        emit(b"\xbf" + struct.pack("<I", status))  # mov edi, status
        jcc8(b"\xeb", "exit")                      # jmp exit
    labels["exit"] = len(code)
    mov_eax(60)                             # mov eax, SYS_exit
    emit(b"\x0f\x05")                       # syscall
    labels["path"] = len(code)
    emit(b"/dev/urandom\0")
    while len(code) % 8:
        emit(b"\0")
    labels["info"] = len(code)   # struct rand_pool_info, in the zero-filled tail
    labels["seed"] = len(code) + 8
    memsz_extra = 8 + RESEED_INPUT_BYTES_MAX
    for pos, label in fix32:
        code[pos:pos + 4] = struct.pack("<i", labels[label] - (pos + 4))
    for pos, label in fix8:
        d = labels[label] - (pos + 1)
        assert -128 <= d < 128
        code[pos] = d & 0xff
    filesz = _HDR + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 0x3e, 1, _BASE + _HDR, 64, 0, 0, 64, 56, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, _BASE, _BASE, filesz, filesz + memsz_extra, 0x1000)
    return ehdr + phdr + bytes(code)


def _printf_octal(data: bytes) -> str:
    """``data`` as a busybox printf format of octal escapes (no byte is taken literally)."""
    return "".join(f"\\{b:03o}" for b in data)


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
    reseed_status: int  # /bin/reseed's exit status: 0 when both ioctls succeeded


def parse_fresh_reply(line: str) -> FreshReply | None:
    """The guest's answer to ``fresh_identity_line``; None for any other console line."""
    m = re.fullmatch(re.escape(FRESH_MARKER) + r" ([0-9a-f]{32}) (\d+) (\d+)\s*", line)
    return FreshReply(m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def is_ready_line(line: str) -> bool:
    return core.guest_release_from_console(line) is not None


# The guest kernel zeroes pages as it frees them: QEMU's migration stream writes a zero page as
# a flag, so the state file holds only the memory in use (87 -> 49 MiB for the snapshot guest),
# and memory the guest freed before the snapshot (data of the boot, of anything run before it)
# is not in the file that every restore shares.
SNAPSHOT_KERNEL_ARGS = ("init_on_free=1",)


def guest_argv(qemu: str, kernel: str, initrd: str, spec: core.VmSpec, *, console_fd: int,
               qmp_fd: int, incoming: bool = False) -> list[str]:
    """``core.qemu_argv`` with ``SNAPSHOT_KERNEL_ARGS`` added to the kernel's command line, the
    serial console and a QMP monitor on sockets the host made (socketpairs handed to QEMU by
    descriptor), and, to restore, ``-incoming defer``: QEMU
    waits paused for ``migrate-incoming``. Same machine, devices, memory, kernel and initramfs
    as the snapshot's guest, or the migration stream does not load."""
    argv = core.qemu_argv(qemu, kernel, initrd, spec)
    a = argv.index("-append")
    argv[a + 1] += " " + " ".join(SNAPSHOT_KERNEL_ARGS)
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
