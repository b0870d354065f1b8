"""The Linux syscalls Python 3.11 lacks (DESIGN rule 7), through ctypes, in one place.

Each wrapper raises ``OSError`` with the real errno, like the ``os`` module does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Namespaces (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# prctl(2) options (linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS = {  # syscall numbers for the calls glibc 2.36 has no wrapper for
    "x86_64": {"pivot_root": 155, "capset": 126, "capget": 125},
    "aarch64": {"pivot_root": 41, "capset": 91, "capget": 90},
}[platform.machine()]

CAP_LAST_CAP_MAX = 63


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {source} on {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(_SYS["pivot_root"]), new_root.encode(), put_old.encode()),
        "pivot_root",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        "prctl",
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def cap_last_cap() -> int:
    """The kernel's highest capability number (``/proc/sys/kernel/cap_last_cap``)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    if not 0 < last <= CAP_LAST_CAP_MAX:
        raise OSError(f"implausible cap_last_cap {last}")
    return last


def drop_bounding_set(last: int) -> None:
    """PR_CAPBSET_DROP every capability up to ``last``; any failure raises."""
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)


def clear_ambient_capabilities() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def capability_sets(last: int) -> dict[str, int]:
    """This process's capability sets as /proc/self/status names them (CapInh, CapPrm,
    CapEff, CapBnd, CapAmb), from the syscalls (capget, PR_CAPBSET_READ, PR_CAP_AMBIENT) and,
    where /proc is mounted, OR-ed with what /proc/self/status says: a bit set in either
    view counts."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(
        _libc.syscall(ctypes.c_long(_SYS["capget"]), ctypes.byref(header), ctypes.byref(data)),
        "capget",
    )
    sets = {
        "CapInh": data[0].inheritable | (data[1].inheritable << 32),
        "CapPrm": data[0].permitted | (data[1].permitted << 32),
        "CapEff": data[0].effective | (data[1].effective << 32),
        "CapBnd": sum(1 << c for c in range(last + 1) if prctl(PR_CAPBSET_READ, c)),
        "CapAmb": sum(1 << c for c in range(last + 1)
                      if prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c)),
    }
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in sets:
                    sets[key] |= int(value.strip(), 16)
    except OSError:
        pass
    return sets


def drop_all_capabilities() -> None:
    """Empty the bounding set, then the effective, permitted and inheritable sets."""
    drop_bounding_set(cap_last_cap())
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(
        _libc.syscall(ctypes.c_long(_SYS["capset"]), ctypes.byref(header), ctypes.byref(data)),
        "capset",
    )


def capabilities_effective() -> int:
    """The effective capability mask of this process (bits of both 32-bit words)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(
        _libc.syscall(ctypes.c_long(_SYS["capget"]), ctypes.byref(header), ctypes.byref(data)),
        "capget",
    )
    return data[0].effective | (data[1].effective << 32)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def bring_loopback_up() -> None:
    """A new network namespace's ``lo`` starts down; the Runtime API lives on it."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return bool(prctl(PR_GET_NO_NEW_PRIVS))


def new_netns_fd() -> int:
    """A new, empty network namespace (its loopback still down), as an fd the caller closes.
    Made on a thread of its own, which then ends: ``unshare`` changes only the calling
    thread's namespace, so no other thread of the process leaves the host's."""
    import threading

    out: dict[str, int | BaseException] = {}

    def make() -> None:
        try:
            unshare(CLONE_NEWNET)
            out["fd"] = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net",
                                os.O_RDONLY | os.O_CLOEXEC)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=make, name="netns", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    fd = out["fd"]
    assert isinstance(fd, int)
    return fd
