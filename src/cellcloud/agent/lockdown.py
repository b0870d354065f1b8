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


def lock_down() -> None:
    build().load()


def seccomp_mode(pid: int | str = "self") -> int:
    """0 = off, 1 = strict, 2 = filter: what /proc/<pid>/status says."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
