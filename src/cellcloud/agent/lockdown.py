"""The agent's seccomp filter: passive communication enforced by the kernel, not by habit.

Once loaded, this process (and every thread it starts) cannot ``connect()`` anything, cannot
create a socket of any family but AF_UNIX (no AF_INET/AF_INET6, AF_PACKET, AF_NETLINK, AF_VSOCK,
...), cannot use io_uring (whose IORING_OP_CONNECT would connect without the ``connect``
syscall the filter sees), and cannot ``execve`` a program — no outbound connection and no
shell, whatever a bug or an attacker makes the Python code do. The sockets it already listens
on keep accepting; its socketpairs to its environments keep working.
"""

from __future__ import annotations

import errno
import os
import socket

import pyseccomp as seccomp

from ..sandbox.seccomp_policy import deny_socket_families_except, require_known

ALLOWED_FAMILIES = (socket.AF_UNIX,)
DENIED_SYSCALLS = ("connect", "execve", "execveat", "ptrace", "process_vm_writev",
                   "kexec_load", "init_module", "finit_module",
                   "io_uring_setup", "io_uring_enter", "io_uring_register")



def build() -> seccomp.SyscallFilter:
    require_known(DENIED_SYSCALLS)
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    deny_socket_families_except(f, ALLOWED_FAMILIES)
    return f


IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def deny_io_uring() -> None:
    """The first, early part of the lock-down: no io_uring, loaded before the event loop
    exists. libuv (uvloop) sets up an io_uring instance when its loop starts and falls back to
    plain syscalls when it cannot; a ring created before :func:`lock_down` would be unusable
    after it (libuv aborts) and would stay a way to connect. Inherited by the zygote and the
    environments, which deny io_uring anyway. Leaves no_new_privs alone (the zygote still
    sets up environments as root)."""
    require_known(IO_URING_SYSCALLS)
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.set_attr(seccomp.Attr.CTL_NNP, 0)
    for name in IO_URING_SYSCALLS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    f.load()


def io_uring_instances() -> list[int]:
    """File descriptors of io_uring instances this process holds."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]":
                out.append(int(fd))
        except OSError:
            continue
    return out


def lock_down() -> None:
    rings = io_uring_instances()
    if rings:  # submissions on a ring made earlier would bypass the connect rule
        raise RuntimeError(f"refusing to lock down with io_uring instances open (fds {rings}); "
                           "call deny_io_uring() before the event loop starts")
    build().load()


def seccomp_mode(pid: int | str = "self") -> int:
    """0 = off, 1 = strict, 2 = filter: what /proc/<pid>/status says."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
