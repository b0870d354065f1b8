"""The VMM jailer: QEMU in its own cgroup, namespaces and chroot, as an unprivileged uid under
a seccomp filter (Firecracker's jailer is the model; ``jailcore.plan`` decides, this carries it
out).

``spawner(spec)`` returns a ``snapshot.Spawn``: it starts ``python -m cellcloud.microvm.jailer
<plan>``, which, as root,

1. creates the VM's cgroup (``cellcloud/<group>/<vm_id>``: memory = the guest's + the VMM's
   overhead, pids, a CPU quota),
2. unshares mount, IPC, UTS, network (empty; or, for a guest with egress, joins the
   namespace the network helper wired, which holds its tap: ``netns_fd``) and PID namespaces and
   forks; the child, PID 1 of the new namespace, killed if the jailer dies,
3. joins the cgroup, builds the chroot on a fresh tmpfs: the host's /usr bound read-only (QEMU,
   its libraries and firmware; /bin, /lib, /lib64 as links into it), /dev with null, zero,
   random, urandom (and kvm under KVM), the guest's kernel and initramfs bound read-only under
   /vm; remounts it read-only and pivots into it (the old root detached),
4. closes every descriptor but stdio and the ones QEMU is given (its console and QMP sockets;
   the snapshot's state file reaches it later over QMP, never by a path), sets no_new_privs,
   loads the environments' seccomp filter (``sandbox/seccomp_policy.py``), empties the
   capability bounding set, drops to the VM's uid/gid, and execs QEMU.

The jailer itself stays outside as root, waits for QEMU, forwards SIGTERM/SIGINT, and removes
the cgroup (killing what is left in it) when QEMU is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.limits import DEFAULT_LIMITS, Limits
from ..sandbox import cgroups, linux, seccomp_policy
from . import jailcore

if TYPE_CHECKING:  # the jailer process itself imports neither asyncio nor the snapshot shell
    import asyncio

    from .snapshot import Spawn

JAIL_BASE = "/run/cellcloud/microvm-jail"  # an empty mount point per VM; the tmpfs is private
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # from the jailer to QEMU


def cgroup_of(plan_doc: dict[str, Any]) -> cgroups.Cgroup:
    return cgroups.Cgroup(str(plan_doc["cgroup_group"]), str(plan_doc["vm_id"]))


def spawner(spec: jailcore.JailSpec, *, limits: Limits = DEFAULT_LIMITS) -> Spawn:
    """A ``snapshot.Spawn`` that runs the VMM jailed as ``spec`` says."""

    async def spawn(argv: list[str], fds: Sequence[int]) -> asyncio.subprocess.Process:
        import asyncio  # here, not at the top: the jailer process starts faster without it

        plan = jailcore.plan(spec, argv, limits)
        doc = {**plan.to_json(), "keep_fds": list(fds)}
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cellcloud.microvm.jailer", json.dumps(doc),
            pass_fds=tuple(fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)

    return spawn


def vmm_pid(spec: jailcore.JailSpec) -> int | None:
    """The jailed VMM's pid as the host sees it (the only task of its cgroup), or None."""
    pids = cgroups.Cgroup(spec.cgroup_group, spec.vm_id).pids()
    return pids[0] if len(pids) == 1 else None


def _bind(src: str, dst: str, flags: int) -> None:
    linux.mount(src, dst, None, linux.MS_BIND | linux.MS_REC)
    # A bind mount takes ro/nosuid/nodev only on a remount.
    linux.mount(None, dst, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _build_chroot(doc: dict[str, Any], root: str) -> None:
    nosuid = linux.MS_NOSUID | linux.MS_NODEV
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("tmpfs", root, "tmpfs", nosuid, "size=64k,mode=0755")
    for tree in jailcore.SYSTEM_TREES:
        os.makedirs(root + tree)
        _bind(tree, root + tree, linux.MS_RDONLY | nosuid)
    for name, target in jailcore.MERGED_USR_LINKS:
        if os.path.islink("/" + name):
            os.symlink(target, f"{root}/{name}")
    os.makedirs(root + "/dev")
    for dev in doc["devices"]:
        open(f"{root}/dev/{dev}", "a").close()
        _bind(f"/dev/{dev}", f"{root}/dev/{dev}", linux.MS_NOSUID | linux.MS_NOEXEC)
    os.makedirs(root + jailcore.JAIL_VM_DIR)
    for host, inside in doc["binds"]:
        open(root + inside, "a").close()
        _bind(host, root + inside, linux.MS_RDONLY | nosuid | linux.MS_NOEXEC)
    os.makedirs(root + "/.old")
    linux.pivot_root(root, root + "/.old")
    os.chdir("/")
    linux.umount2("/.old", linux.MNT_DETACH)
    os.rmdir("/.old")
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY | nosuid)


def _child(doc: dict[str, Any], root: str) -> None:
    """PID 1 of the VM's namespaces: build the jail, then exec QEMU. Never returns."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        netns = doc.get("netns_fd")
        if netns is not None:  # an environment with egress: the namespace with its tap
            linux.setns(int(netns), linux.CLONE_NEWNET)
            os.close(int(netns))
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
                      | (0 if netns is not None else linux.CLONE_NEWNET))
        cgroup_of(doc).join(0)
        cap_last = linux.cap_last_cap()  # read from /proc while the host's is still visible
        keep = {0, 1, 2, *doc["keep_fds"]}
        for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the listing's own descriptor, already closed
        _build_chroot(doc, root)
        socket.sethostname(str(doc["vm_id"]))
        linux.set_no_new_privs()
        seccomp_policy.load()
        linux.drop_bounding_set(cap_last)
        linux.clear_ambient_capabilities()
        uid, gid = int(doc["uid"]), int(doc["gid"])
        os.setgroups([int(g) for g in doc["groups"]])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or linux.capabilities_effective() != 0:
            raise RuntimeError("the VMM is still privileged")
        argv = [str(a) for a in doc["argv"]]
        os.execve(argv[0], argv, {"PATH": "/usr/bin"})
    except BaseException as e:  # noqa: BLE001 - report and end the child, whatever it was
        os.write(2, f"jailer: {type(e).__name__}: {e}\n".encode())
        os._exit(126)


def main(arg: str) -> int:
    doc = json.loads(arg)
    cg = cgroup_of(doc)
    cg.create(cgroups.Limits(memory_bytes=int(doc["memory_bytes"]),
                             pids_max=int(doc["pids_max"]), memory_mb=int(doc["cpu_weight_mb"]),
                             cpu_quota_us=int(doc["cpu_quota_us"])))
    root = os.path.join(JAIL_BASE, str(doc["vm_id"]))
    os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        # The PID namespace is the children's; the others are unshared by the child alone, so
        # its pivot_root leaves the jailer in the host's mounts (it removes the cgroup there).
        linux.unshare(linux.CLONE_NEWPID)
        # Blocked across the fork: a signal before the forwarding handlers exist is held, not
        # fatal to the jailer (which would leave the cgroup behind).
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # the mask survives exec
            _child(doc, root)
        for sig in FORWARDED:
            signal.signal(sig, lambda s, _f: os.kill(pid, s))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                status = 0
                break
            except InterruptedError:
                continue
        return os.waitstatus_to_exitcode(status)
    finally:
        # QEMU's threads leave the cgroup a moment after its reaping: bounded retries.
        for _ in range(500):
            cg.kill_all()
            if cg.destroy():
                break
            time.sleep(0.01)
        else:
            print(f"jailer: cgroup {cg.rel} not removed", file=sys.stderr)
        try:
            os.rmdir(root)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
