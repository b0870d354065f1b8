"""The environments' seccomp filter: the kernel surface a function may not touch.

Denied calls fail with EPERM (``clone3`` with ENOSYS, so libc falls back to ``clone``, whose
flags a filter *can* inspect). Other architectures' syscall tables are killed by libseccomp's
default bad-arch action, so an x32/i386 entry point is no way around the list.
"""

from __future__ import annotations

import errno
import socket

import pyseccomp as seccomp

from . import linux

DENIED = (
    # Mounts and namespaces: the jail's own walls.
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    # Other processes' memory.
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    # Kernel code, kernel state, whole-machine effects.
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "syslog", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "vhangup", "lookup_dcookie", "uselib", "fanotify_init",
    # Keyrings, file handles, userfaultfd, io_uring (a large, separately audited surface).
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
)
_NEW_NAMESPACE_FLAGS = (
    linux.CLONE_NEWNS, linux.CLONE_NEWCGROUP, linux.CLONE_NEWUTS, linux.CLONE_NEWIPC,
    linux.CLONE_NEWUSER, linux.CLONE_NEWPID, linux.CLONE_NEWNET,
)
_DENIED_FAMILIES = (socket.AF_PACKET, socket.AF_NETLINK)


def load(*, set_no_new_privs: bool = True) -> None:
    """Install the filter on the calling thread (and its future children). libseccomp sets
    no_new_privs with it unless told not to, which only a privileged caller may do."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    if not set_no_new_privs:
        f.set_attr(seccomp.Attr.CTL_NNP, 0)
    for name in DENIED:
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):  # unknown to this libseccomp/arch
            continue
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NEW_NAMESPACE_FLAGS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    for family in _DENIED_FAMILIES:
        f.add_rule(seccomp.ERRNO(errno.EPERM), "socket", seccomp.Arg(0, seccomp.EQ, family))
    f.load()
