"""The environments' seccomp filter: the kernel surface a function may not touch.

Denied calls fail with EPERM (``clone3`` with ENOSYS, so libc falls back to ``clone``, whose
flags a filter *can* inspect). Other architectures' syscall tables are killed by libseccomp's
default bad-arch action, so an x32/i386 entry point is no way around the list.

Sockets: only AF_UNIX, AF_INET and AF_INET6 may be created (functions will get outbound network
through the host's network helper); every other family — AF_NETLINK, AF_PACKET, AF_VSOCK,
AF_ALG, AF_KEY, AF_BLUETOOTH, ... — is EPERM. The loopback bring-up (an AF_INET ioctl) runs
before the filter is loaded.

A name the installed libseccomp does not know is an error when the filter is built
(:class:`UnknownSyscall`), never a rule silently left out.
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
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)


class UnknownSyscall(RuntimeError):
    """The policy names a syscall the installed libseccomp cannot resolve."""


def require_known(names: tuple[str, ...] | list[str]) -> None:
    """Raise unless libseccomp knows every name (a name it knows but this architecture lacks
    resolves to a negative pseudo-number other than -1 and is fine: nothing can call it)."""
    unknown = [n for n in names if seccomp.resolve_syscall(seccomp.Arch.NATIVE, n) == -1]
    if unknown:
        raise UnknownSyscall(f"libseccomp does not know {', '.join(unknown)}: refusing to "
                             "build a seccomp filter that would silently leave them allowed")


def deny_socket_families_except(f: seccomp.SyscallFilter, allowed: tuple[int, ...]) -> None:
    """EPERM for socket()/socketpair() with any family not in ``allowed``. The comparisons
    are on the full 64-bit argument, so a family with high bits set (which the kernel would
    truncate) is above max(allowed) and denied too."""
    top = max(allowed)
    for call in ("socket", "socketpair"):
        for family in range(top):
            if family not in allowed:
                f.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.EQ, family))
        f.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.GT, top))


def build() -> seccomp.SyscallFilter:
    require_known(list(DENIED) + ["clone3", "clone", "socket", "socketpair"])
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NEW_NAMESPACE_FLAGS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    deny_socket_families_except(f, ALLOWED_FAMILIES)
    return f


_prepared: seccomp.SyscallFilter | None = None


def prepare() -> None:
    """Build the filter once in this process (the zygote, before it forks environments):
    each environment then only compiles and installs its copy. Building it — resolving every
    name, adding ~60 rules — cost 1.4 to 24 ms per environment on a loaded 2-core host, the
    largest single step of a jailed start (docs/benchmarks.md, task start profile); the
    rules are the same every time."""
    global _prepared
    if _prepared is None:
        _prepared = build()


def load(*, set_no_new_privs: bool = True) -> None:
    """Install the filter on the calling thread (and its future children). libseccomp sets
    no_new_privs with it unless told not to, which only a privileged caller may do."""
    f = _prepared if _prepared is not None else build()
    f.set_attr(seccomp.Attr.CTL_NNP, 1 if set_no_new_privs else 0)
    f.load()
