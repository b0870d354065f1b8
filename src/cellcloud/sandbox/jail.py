"""The ``jail`` backend's isolation steps, run inside the new environment before any of the
function's code. The order matters; each step says what it stops (see docs/threat-model.md).

Called in the first process of fresh mount/pid/ipc/uts/net/cgroup namespaces (pid 1 there), as
root in the host's user namespace; returns as an unprivileged, capability-less process (checked,
not assumed: see :func:`privilege_problems`) whose root is a read-only tmpfs holding only what
the runtime needs.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from typing import Any

from . import linux, seccomp_policy
from .spec import EnvSpec

# Host trees every Python environment needs, bound read-only at the same path (so the forked
# interpreter's import paths stay valid after pivot_root). Symlinked tops (merged /usr) are
# recreated as symlinks instead.
_SYSTEM_TREES = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_DEVICES = ("null", "zero", "random", "urandom", "full")

NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWCGROUP
)


class JailSetupError(RuntimeError):
    """A jail step did not have the effect it must have; the environment does not start."""

# Every layer, by name. Tests switch single layers off (EnvSpec.disabled_layers) to show that
# each one alone is what stops an attack; production environments always get all of them.
LAYERS = (
    "mount_ns",  # private mount namespace + pivot_root into a minimal root
    "readonly",  # read-only root, bundle, runtime and layers
    "nosuid",  # nosuid/nodev on every mount
    "pid_ns",
    "net_ns",
    "ipc_ns",
    "uts_ns",
    "cgroup_ns",  # own cgroup namespace: /proc/self/cgroup shows "/", not the agent's ids
    "cgroup_memory",
    "cgroup_pids",
    "cgroup_cpu",  # CPU capped at the memory's share of a vCPU (CFS quota)
    "rlimits",
    "tmp_size",  # /tmp capped at the ephemeral size
    "uid",  # unprivileged uid/gid unique to the environment, all capabilities dropped
    "capbset",  # the capability bounding set emptied explicitly (and ambient caps cleared)
    "no_new_privs",
    "nondumpable",  # no ptrace or /proc/<pid>/mem access by same-uid processes
    "seccomp",
    "close_fds",
)


def namespaces(disabled: list[str]) -> int:
    flags = NAMESPACES
    for layer, flag in (
        ("mount_ns", linux.CLONE_NEWNS),
        ("pid_ns", linux.CLONE_NEWPID),
        ("net_ns", linux.CLONE_NEWNET),
        ("ipc_ns", linux.CLONE_NEWIPC),
        ("uts_ns", linux.CLONE_NEWUTS),
        ("cgroup_ns", linux.CLONE_NEWCGROUP),
    ):
        if layer in disabled:
            flags &= ~flag
    return flags


def runtime_trees() -> list[str]:
    """Directories the Python runtime (and cellcloud's guest agent) is loaded from."""
    import cellcloud

    trees = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    trees.add(os.path.dirname(os.path.realpath(cellcloud.__file__)))
    for p in sys.path:
        if p and "site-packages" in p and os.path.isdir(p):
            trees.add(os.path.realpath(p))
    # Drop any tree already inside another one.
    out: list[str] = []
    for t in sorted(trees):
        if not any(t.startswith(o + os.sep) for o in out) and not t.startswith("/usr/"):
            out.append(t)
    return out


def _bind(src: str, dst: str, flags: int) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    linux.mount(src, dst, None, linux.MS_BIND)
    if flags:
        linux.mount(None, dst, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _volume_mount(spec: EnvSpec, root: str, vm: dict[str, Any], nosuid: int) -> None:
    """Bind a task volume's host mount (its helper's ext4) at its containerPath; the path's
    components are made real directories of the root first (no link leads the bind out)."""
    target = str(vm["target"])
    _own_dir(root, target)
    dst = root + target
    linux.mount(str(vm["source"]), dst, None, linux.MS_BIND)
    if vm.get("read_only"):
        linux.mount(None, dst, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | nosuid)
    else:
        # Each container runs as an unprivileged uid of its own: the first to mount the
        # volume owns its top directory (a fresh volume's is root's), and every container of
        # the task may create there (0777), as Fargate containers' root users all could.
        if os.stat(dst).st_uid == 0:
            os.chown(dst, spec.uid, spec.gid)
        os.chmod(dst, 0o777)
        if nosuid:
            linux.mount(None, dst, None, linux.MS_BIND | linux.MS_REMOUNT | nosuid)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Write a file of the root, never through a link: an image may ship one at this path
    (pointing at a host file); it is replaced (in the image root's private upper layer)."""
    if os.path.islink(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _own_dir(root: str, rel: str) -> None:
    """Make ``root/rel`` a real directory of the image root, each component checked without
    following links: an image's ``/tmp -> /host/path`` (or a file where a mount point goes)
    is replaced in the private upper layer, so no mount or write below lands on the host."""
    path = root
    for part in [p for p in rel.split("/") if p]:
        path = os.path.join(path, part)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)  # overlayfs: a whiteout in the private upper layer
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)


def _image_root(spec: EnvSpec, root: str, nosuid: int, trees: list[str]) -> str:
    """An image's root: its unpacked layers as read-only lower dirs (shared by every
    environment of the image), a private upper and work dir on a small tmpfs of its own.
    Returns the merged root (what the environment pivots into)."""
    linux.mount("tmpfs", root, "tmpfs", nosuid, "size=16m,mode=0755")
    for d in ("upper", "work", "merged"):
        os.mkdir(os.path.join(root, d), 0o755)
    lower = ":".join(reversed(spec.image_layers))  # overlayfs: the leftmost is the top
    merged = root + "/merged"
    linux.mount("overlay", merged, "overlay", nosuid,
                f"lowerdir={lower},upperdir={root}/upper,workdir={root}/work")
    for rel in ["/tmp", "/dev", "/proc", "/etc", "/var/runtime", "/.old_root",
                spec.image_workdir or "/", *trees]:
        _own_dir(merged, rel)
    for name in ("passwd", "group", "hosts", "resolv.conf", "hostname"):
        if os.path.lexists(f"{merged}/etc/{name}"):
            os.unlink(f"{merged}/etc/{name}")  # written afresh below, never through a link
    return merged


def build_root(spec: EnvSpec, root: str, trees: list[str], tmp_device: str | None = None) -> str:
    """Assemble the environment's root filesystem on a fresh tmpfs mounted at ``root`` (an
    image's: an overlay of its layers). Returns the directory to pivot into."""
    off = spec.disabled_layers
    nosuid = 0 if "nosuid" in off else linux.MS_NOSUID | linux.MS_NODEV
    ro = (0 if "readonly" in off else linux.MS_RDONLY) | nosuid
    # Nothing we mount may propagate back to the host, and nothing of the host's may leak in.
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    image = bool(spec.image_layers)
    if image:
        root = _image_root(spec, root, nosuid, trees + list(spec.extra_trees))
    else:
        linux.mount("tmpfs", root, "tmpfs", nosuid, "size=4m,mode=0755")
    # /tmp: private and writable, capped at the function's ephemeral storage. Mounted first,
    # so a runtime tree that lives under the host's /tmp (a checkout there) is bound on top
    # of it below rather than hidden by it.
    os.makedirs(root + "/tmp", exist_ok=True)
    if tmp_device is not None:
        # A private ext4 of the ephemeral size (ephemeral.py): full means ENOSPC, and its
        # pages are not charged to the function's memory cgroup the way tmpfs pages are.
        linux.mount(tmp_device, root + "/tmp", "ext4", nosuid)
        os.rmdir(root + "/tmp/lost+found")
        os.chown(root + "/tmp", spec.uid, spec.gid)
        os.chmod(root + "/tmp", 0o700)
    else:
        size = "" if "tmp_size" in off else f"size={spec.ephemeral_mb}m,"
        linux.mount(
            "tmpfs",
            root + "/tmp",
            "tmpfs",
            nosuid,
            f"{size}mode=0700,uid={spec.uid},gid={spec.gid}",
        )
    for top in () if image else _SYSTEM_TREES:  # an image brings its own /usr, /lib, /bin
        if os.path.islink(top):
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            _bind(top, root + top, ro)
    # The guest agent's own trees (it runs the Runtime API inside the environment, as
    # Lambda's init does in a container image), at their host paths, read-only.
    for tree in trees + [t for t in spec.extra_trees if t not in trees]:
        _bind(tree, root + tree, ro)
    if not image:
        _bind(spec.bundle_dir, root + "/var/task", ro)
        os.makedirs(root + "/opt", exist_ok=True)
    if len(spec.layer_dirs) == 1:
        _bind(spec.layer_dirs[0], root + "/opt", ro)
    elif spec.layer_dirs:
        # Lambda extracts layers into /opt in order, later ones winning: an overlay whose
        # leftmost (top) lower dir is the last layer. No upper dir, so /opt stays read-only.
        lower = ":".join(reversed(spec.layer_dirs))
        linux.mount("overlay", root + "/opt", "overlay", ro, f"lowerdir={lower}")
    os.makedirs(root + "/var/runtime", exist_ok=True)
    if spec.attestation:  # pushed in by the agent: no guest-to-agent call is ever needed
        _write(root + "/var/runtime/attestation.json", spec.attestation)
    os.makedirs(root + "/dev", exist_ok=True)
    linux.mount(
        "tmpfs", root + "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "size=64k,mode=0755"
    )
    for dev in _DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            open(f"{root}/dev/{dev}", "a").close()
            _bind(f"/dev/{dev}", f"{root}/dev/{dev}", 0)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/etc", exist_ok=True)
    _write(
        root + "/etc/passwd",
        f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sbx_user:x:{spec.uid}:{spec.gid}:sandbox:/tmp:/usr/sbin/nologin\n",
    )
    _write(root + "/etc/group", f"root:x:0:\nsbx_user:x:{spec.gid}:\n")
    # sandbox.localdomain: where extensions' Telemetry API listeners are reached, as on Lambda.
    host = f" {spec.hostname}" if spec.hostname else ""
    _write(root + "/etc/hosts",
           f"127.0.0.1 localhost sandbox.localdomain{host}\n::1 localhost\n")
    resolver = spec.network.get("resolver")
    # The one resolver an environment may reach: the network helper's forwarder.
    _write(root + "/etc/resolv.conf",
           f"nameserver {resolver}\noptions timeout:2 attempts:2\n" if resolver else "")
    _write(root + "/etc/hostname", f"{spec.hostname or 'sandbox'}\n")
    for vm in spec.volume_mounts:  # a task's volumes (ECS mountPoints), last: on top
        _volume_mount(spec, root, vm, nosuid)
    os.makedirs(root + "/proc", exist_ok=True)
    os.makedirs(root + "/.old_root", exist_ok=True)
    return root


def enter(
    spec: EnvSpec, root: str, keep_fds: tuple[int, ...], tmp_device: str | None = None
) -> None:
    """Everything from the mount namespace to the seccomp filter. Raises on any failed step:
    an environment that is not fully jailed never runs function code."""
    off = spec.disabled_layers
    cap_last = linux.cap_last_cap()  # read from the host's /proc, before it is out of sight
    if "mount_ns" not in off:
        root = build_root(spec, root, runtime_trees(), tmp_device)
        os.chdir(root)
        linux.pivot_root(".", ".old_root")
        os.chdir("/")
        linux.umount2("/.old_root", linux.MNT_DETACH)
        os.rmdir("/.old_root")
        if "pid_ns" not in off:
            # /proc of the new pid namespace: the function sees only its own processes.
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        if "readonly" not in off:
            linux.mount(
                None,
                "/",
                None,
                linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV,
            )
        task_root = (spec.image_workdir or "/") if spec.image_layers else "/var/task"
    else:
        task_root = spec.bundle_dir
    if "uts_ns" not in off:
        socket.sethostname(spec.hostname or "sandbox")
    if "net_ns" not in off:
        linux.bring_loopback_up()  # the environment's own loopback, for the Runtime API
    if "rlimits" not in off:
        _limits(spec)
    if "close_fds" not in off:
        _close_fds(keep_fds)
    os.environ.clear()
    os.environ.update(spec.process_environment())
    if not spec.image_layers:  # an image's task root is its ENV's (else /var/task)
        os.environ["LAMBDA_TASK_ROOT"] = task_root
    os.chdir(task_root)
    if "no_new_privs" not in off:
        linux.set_no_new_privs()
    if "seccomp" not in off:
        # Loaded while still root, so it does not depend on no_new_privs; nothing below
        # needs a denied call.
        seccomp_policy.load(set_no_new_privs="no_new_privs" not in off)
    if "capbset" not in off:
        # Empty the bounding set while we still hold CAP_SETPCAP: no file capability, setuid
        # binary or later bug can hand a capability back. Ambient capabilities go too.
        linux.drop_bounding_set(cap_last)
        linux.clear_ambient_capabilities()
    if "uid" not in off:
        # Drop to the environment's own uid/gid; with it go every capability (no keep-caps).
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        problems = privilege_problems(
            os.getresuid(), os.getresgid(), os.getgroups(), linux.capability_sets(cap_last),
            uid=spec.uid, gid=spec.gid, bounding_set_empty="capbset" not in off)
        if problems:  # a real check, not an assert: it holds under python -O as well
            raise JailSetupError("the environment is still privileged: " + "; ".join(problems))
    # The uid change already made us non-dumpable; say so explicitly (and let tests undo it).
    linux.prctl(linux.PR_SET_DUMPABLE, 1 if "nondumpable" in off else 0)


def privilege_problems(
    resuid: tuple[int, int, int], resgid: tuple[int, int, int], groups: list[int],
    caps: dict[str, int], *, uid: int, gid: int, bounding_set_empty: bool = True,
) -> list[str]:
    """What is wrong with a process that should have dropped to ``uid``/``gid`` with no
    capability at all (``caps``: CapInh/CapPrm/CapEff/CapBnd/CapAmb masks). Empty: nothing."""
    out = []
    if tuple(resuid) != (uid, uid, uid):
        out.append(f"real/effective/saved uid {tuple(resuid)}, expected {uid}")
    if tuple(resgid) != (gid, gid, gid):
        out.append(f"real/effective/saved gid {tuple(resgid)}, expected {gid}")
    if groups:
        out.append(f"supplementary groups {sorted(groups)}")
    names = ["CapInh", "CapPrm", "CapEff", "CapAmb"] + (["CapBnd"] if bounding_set_empty else [])
    for name in names:
        if name not in caps:
            out.append(f"{name} unknown")
        elif caps[name]:
            out.append(f"{name} {caps[name]:016x}")
    return out


def _limits(spec: EnvSpec) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile_max, spec.nofile_max))
    resource.setrlimit(resource.RLIMIT_NPROC, (spec.pids_max, spec.pids_max))
    fsize = spec.ephemeral_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))


def _close_fds(keep: tuple[int, ...]) -> None:
    keep_set = set(keep) | {0, 1, 2}
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep_set:
            try:
                os.close(fd)
            except OSError:
                pass
