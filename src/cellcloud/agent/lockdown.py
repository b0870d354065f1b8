"""The agent's seccomp filter: passive communication enforced by the kernel, not by habit.

Once loaded, this process (and every thread it starts) cannot ``connect()`` anything, cannot
create an AF_INET/AF_INET6/AF_PACKET/AF_NETLINK socket, and cannot ``execve`` a program — no
outbound connection and no shell, whatever a bug or an attacker makes the Python code do. The
sockets it already listens on keep accepting.
"""

from __future__ import annotations

import errno
import socket

import pyseccomp as seccomp

DENIED_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET, socket.AF_NETLINK)
DENIED_SYSCALLS = ("connect", "execve", "execveat", "ptrace", "process_vm_writev",
                   "kexec_load", "init_module", "finit_module")


def lock_down() -> None:
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    for family in DENIED_FAMILIES:
        f.add_rule(seccomp.ERRNO(errno.EPERM), "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.load()


def seccomp_mode(pid: int | str = "self") -> int:
    """0 = off, 1 = strict, 2 = filter: what /proc/<pid>/status says."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
