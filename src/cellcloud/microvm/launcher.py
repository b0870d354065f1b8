"""The VMM launcher: the process that starts an environment's QEMU for the agent.

The agent locks itself down (seccomp: no ``execve``) once it serves, so, like the jail's zygote
keeper, a small process started before that does the process work: for each spawn request on
its SOCK_SEQPACKET control socket (the spec, the VM's shape and the channel's guest end as
SCM_RIGHTS) it writes the bundle into a small read-only ext4 image, creates the environment's
cgroup (the function's memory plus the VMM's overhead), starts QEMU in it with the channel's
fd, answers ``{"pid"}`` (or ``{"error"}``), and reaps QEMU when it exits (removing its files).
An environment with egress comes with its network namespace's fd (the network helper made a tap
in it): the launcher opens the tap there for QEMU's virtio-net, and QEMU joins the namespace.
On EOF (the agent closed it or died) it kills every QEMU it started and exits.

Snapshots: a spawn request may name the agent guest's snapshot (``snapshot``) or a function
version's (``version_snapshot``, SnapStart); the state is verified and handed to the jailed
QEMU as ``-incoming fd:N`` (refused: a cold boot). ``retry_cold`` asks for the same environment
again, cold, after its restored QEMU exited before the guest answered (a failed load); the
old jailer is reaped first and the tail of its log is the reason. ``{"op":
"snapshot_version"}`` makes a version's snapshot after its init (a jailed boot, the init, a
save: this process serves nothing else meanwhile) and answers its folder and key.
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from ..core.limits import DEFAULT_LIMITS
from ..sandbox import cgroups, linux
from ..sandbox.spec import EnvSpec
from ..transport.codec import FrameError, recv_message, send_message
from . import agentsnap, core, image, jailcore

request_bytes_max = 1024 * 1024
# The environment id names its folder here and is the VMM jail's vm_id (jailcore._VM_ID's
# rule: no leading dot, so never "." or "..", at most 64 bytes).
_ENV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_children: dict[int, tuple[str, int]] = {}  # jailer pid -> (its environment's folder, QEMU pid)
jailer_start_timeout_s = 60.0  # the jailer's start to its fork (a Python start, a loaded host)
# Environments restored from a snapshot (their folders): when one's QEMU exits, the tail of its
# log (QEMU's "load of migration failed: ...") is kept under its environment id for the
# backend's cold retry (``spawn(..., retry_cold=True)``) to report; the oldest go first.
_restored: set[str] = set()
_last_words: dict[str, str] = {}
last_words_max = 64
last_words_bytes_max = 300


def _reap(signum: int, frame: Any) -> None:
    # Only the jailers of environments: a version snapshot's QEMU (``snapshot_version``) is
    # asyncio's child, reaped by its own watcher.
    for pid in list(_children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            child = _children.pop(pid, None)
            if child:
                _remove(child[0])


def _log_tail(folder: str) -> str:
    try:
        with open(os.path.join(folder, "qemu.log"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - last_words_bytes_max))
            return " ".join(f.read().decode(errors="replace").split())
    except OSError:
        return ""


def _remove(folder: str) -> None:
    """An environment's folder, once its jailer is gone; a restored one's log tail kept."""
    if folder in _restored:
        _restored.discard(folder)
        _last_words[os.path.basename(folder)] = _log_tail(folder)
        while len(_last_words) > last_words_max:
            del _last_words[next(iter(_last_words))]
    shutil.rmtree(folder, ignore_errors=True)


def _wait_gone(folder: str) -> None:
    """The previous QEMU of the environment whose folder this is (a restore that failed in
    QEMU's load: the backend retries it cold under the same id): killed if still there, its
    jailer reaped (it removed the VM's cgroup first), its folder removed. Bounded by
    ``jailer_start_timeout_s``; SIGCHLD is blocked here (``serve``), so ``_reap`` cannot race."""
    for jpid, (f, vmm) in list(_children.items()):
        if f != folder:
            continue
        try:
            os.kill(vmm, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + jailer_start_timeout_s
        while True:
            try:
                done, _ = os.waitpid(jpid, os.WNOHANG)
            except ChildProcessError:
                done = jpid
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(jpid, signal.SIGKILL)
            time.sleep(0.005)  # the jailer's cgroup removal, bounded by the deadline
        _children.pop(jpid, None)
        _remove(f)


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def bundle_disk(bundle_dir: str, path: str, *, size_kib: int | None = None) -> None:
    """The bundle as an ext4 image (``mkfs.ext4 -d``): the guest mounts it read-only.
    ``size_kib``: exactly this size (a guest restored from a snapshot saw a disk of it)."""
    if size_kib is None:
        size_kib = (_dir_bytes(bundle_dir) * 3 // 2) // 1024 + 4096
    r = subprocess.run([image.MKFS, "-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0",
                        "-d", bundle_dir, path, f"{size_kib}k"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{image.MKFS} failed: {r.stderr.strip()[-300:]}")


def layers_disk(layer_dirs: list[str], path: str, stage: str) -> None:
    """The function's layers as one ext4 image labelled ``core.LAYERS_LABEL`` (the guest
    mounts it read-only at /opt): each layer copied over the ones before it, as Lambda
    extracts them in order (the jail's overlay has the last layer on top, the same view)."""
    os.makedirs(stage)
    try:
        for d in layer_dirs:
            shutil.copytree(d, stage, symlinks=True, dirs_exist_ok=True)
        size_kib = (_dir_bytes(stage) * 3 // 2) // 1024 + 4096
        r = subprocess.run([image.MKFS, "-q", "-F", "-O", "^has_journal", "-L",
                            core.LAYERS_LABEL, "-E", "root_owner=0:0", "-d", stage, path,
                            f"{size_kib}k"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"{image.MKFS} failed: {r.stderr.strip()[-300:]}")
        # /opt as Lambda's: the layers' files only (mke2fs always makes lost+found).
        r = subprocess.run(["debugfs", "-w", "-R", "rmdir /lost+found", path],
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"debugfs failed: {r.stderr.strip()[-300:]}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _kvm_gid() -> int | None:
    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


def jail_spec(spec: EnvSpec, vm: core.VmSpec, files: tuple[str, ...]) -> jailcore.JailSpec:
    """The jail around one environment's QEMU: the environment's own uid/gid and cgroup (the
    agent's group, named by the environment: the agent reads its usage and caps its CPU there),
    the guest's memory, and the kernel, initramfs and both disks bound read-only under /vm."""
    return jailcore.JailSpec(spec.env_id, spec.uid, spec.gid, vm.memory_mib, vm.vcpus,
                             vm.accel, files, cgroup_group=spec.cgroup_group,
                             kvm_gid=_kvm_gid() if vm.accel == "kvm" else None)


# <linux/if_tun.h>; the tap's name is the network helper's (EnvSpec.network["device"]).
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_IFNAME = re.compile(r"[a-z][a-z0-9]{0,14}")


def open_tap(netns_fd: int, name: str) -> int:
    """An open descriptor on the tap ``name`` of the namespace ``netns_fd`` (attaching to it
    takes CAP_NET_ADMIN: here, not in the jailed QEMU, which gets the descriptor). On a thread
    of its own: ``setns`` moves only the calling thread."""
    if not _IFNAME.fullmatch(name):
        raise ValueError(f"bad tap name {name!r}")
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            linux.setns(netns_fd, linux.CLONE_NEWNET)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                       IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            out["fd"] = fd
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    t = threading.Thread(target=run, name="tap")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return int(out["fd"])


def _inside(path: str) -> str:
    return f"{jailcore.JAIL_VM_DIR}/{os.path.basename(path)}"


def _wait_vmm_pid(proc: subprocess.Popen[bytes], log_path: str) -> int:
    """The jailer's one child (PID 1 of the VM's namespaces, QEMU once it execs): its host pid,
    which the agent reports and kills. Bounded by ``jailer_start_timeout_s``."""
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.monotonic() + jailer_start_timeout_s
    while time.monotonic() < deadline:
        # Only the VM's child lives in the PID namespace the jailer unshared for its children
        # (the jailer's own start may run short-lived helpers, such as ctypes' ldconfig).
        try:
            with open(children) as f:
                pids = f.read().split()
            vm_ns = os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")
            if vm_ns == os.readlink(f"/proc/{proc.pid}/ns/pid"):
                pids = []  # not unshared yet: a child now is one of those helpers
        except OSError:
            pids, vm_ns = [], ""
        for pid in pids:
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") == vm_ns:
                    return int(pid)
            except OSError:
                continue
        if proc.poll() is not None:
            break
        time.sleep(0.005)  # polling for the jailer's fork, bounded by the deadline
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    with open(log_path, "rb") as f:
        tail = f.read()[-500:].decode(errors="replace").strip()
    raise RuntimeError(f"the VMM jailer did not start QEMU (exit {proc.returncode}): {tail}")


last_start = ""  # how the last environment started: "restored" or "booted: <why>"


def _snapshot_state(doc: dict[str, Any], spec: EnvSpec) -> int | None:
    """The agent guest snapshot's state file, open and verified (``agentsnap.verify_state``),
    when the environment can start from it; None (and ``last_start`` says why) otherwise: a
    bundle over ``microvm_bundle_disk_mib`` or a snapshot refused boots fresh."""
    global last_start
    snap = doc["snapshot"]
    if (_dir_bytes(spec.bundle_dir) * 3 // 2 + (4 << 20)
            > DEFAULT_LIMITS.microvm_bundle_disk_mib << 20):
        last_start = "booted: the bundle is over microvm_bundle_disk_mib"
        return None
    return _open_verified(doc, snap, agentsnap.verify_state, "the state file is missing")


def _version_state(doc: dict[str, Any]) -> int | None:
    """A function version's snapshot (SnapStart): its state file, open and verified with its
    bundle disk (``agentsnap.verify_version``); None (and ``last_start`` says why) when
    refused: the environment boots cold and runs its init."""
    return _open_verified(doc, doc["version_snapshot"], agentsnap.verify_version,
                          "the version snapshot's state file is missing")


def _open_verified(doc: dict[str, Any], snap: dict[str, Any], verify: Any,
                   missing: str) -> int | None:
    """A snapshot's state file, open (inheritable) once ``verify`` accepts it; None, and
    ``last_start`` says why, when it is missing or refused."""
    global last_start
    path = str(snap["path"])
    try:
        fd = os.open(os.path.join(path, "state.bin"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        last_start = f"booted: {missing}"
        return None
    verdict = verify(path, agentsnap.key_from_json(snap["key"]), kernel=str(doc["kernel"]),
                     initrd=str(doc["initrd"]), state_fd=fd)
    if not verdict.ok:
        os.close(fd)
        last_start = f"booted: {verdict.reason}"
        return None
    os.set_inheritable(fd, True)
    last_start = "restored"
    return fd


def snapshot_version(doc: dict[str, Any], state_dir: str) -> dict[str, Any]:
    """A function version's snapshot after its init (``agentsnap.create_version``), its QEMU
    run through the VMM jailer as the environment's uid in a cgroup of its own: the cached one,
    else made now (this launcher serves nothing else meanwhile: a boot, the init and a save)."""
    import asyncio

    from . import jailer, snapshot

    spec = EnvSpec.from_wire(doc["spec"])
    if not _ENV_ID.fullmatch(spec.env_id):
        raise ValueError(f"bad env id {spec.env_id!r}")
    vm = core.VmSpec(**doc["vm"])
    img = image.AgentImage(**doc["image"])
    js = jailcore.JailSpec(f"{spec.env_id}-snap", spec.uid, spec.gid, vm.memory_mib, vm.vcpus,
                           vm.accel, (img.kernel, img.initrd, img.runtime_disk),
                           cgroup_group=spec.cgroup_group,
                           kvm_gid=_kvm_gid() if vm.accel == "kvm" else None)

    def spawn_for(disk: str) -> snapshot.Spawn:
        return jailer.spawner(jailcore.JailSpec(
            js.vm_id, js.uid, js.gid, js.memory_mib, js.vcpus, js.accel, (*js.files, disk),
            cgroup_group=js.cgroup_group, kvm_gid=js.kvm_gid))

    snap = asyncio.run(agentsnap.create_version(
        state_dir, img, vm, spec_wire=spec.to_wire(), bundle_dir=spec.bundle_dir,
        version_id=spec.snapstart, qemu=str(doc["qemu"]), spawn_for=spawn_for,
        inside=_inside))
    return {"path": snap.path, "key": snap.key.to_json(), "built": snap.built,
            "init_ms": snap.init_ms, "save_ms": snap.save_ms}


def spawn(doc: dict[str, Any], chan_fd: int, envs_dir: str, netns_fd: int | None = None) -> int:
    """Start one environment's QEMU through the VMM jailer (``jailer.py``); the pid returned is
    QEMU's (the jailer stays outside as root and removes the cgroup when QEMU is gone).
    ``netns_fd``: an environment with egress (its tap's namespace, which QEMU joins).
    ``retry_cold``: the backend saw this environment's restored QEMU exit before its guest
    answered (its load failed inside QEMU); the old one is waited for and it boots fresh."""
    global last_start
    spec = EnvSpec.from_wire(doc["spec"])
    if bool(spec.network) != (netns_fd is not None):
        raise ValueError("an environment's network needs both its namespace and its interface")
    if not _ENV_ID.fullmatch(spec.env_id):
        raise ValueError(f"bad env id {spec.env_id!r}")
    folder = os.path.join(envs_dir, spec.env_id)
    if doc.get("retry_cold"):
        _wait_gone(folder)
        why = _last_words.pop(spec.env_id, "") or "QEMU exited before the guest answered"
        last_start = f"booted: the restore failed in QEMU: {why}"
    vm = core.VmSpec(**doc["vm"])
    if not cgroups.version() and not spec.allow_unlimited:
        raise RuntimeError(f"no cgroup hierarchy found at {cgroups.ROOT}: the VMM's memory "
                           "and CPU cannot be limited (the agent's --allow-unlimited "
                           "permits this)")
    os.makedirs(folder, mode=0o700)
    tap_fd = -1
    try:
        task = os.path.join(folder, "task.ext4")
        state_fd = (_snapshot_state(doc, spec)
                    if doc.get("snapshot") and not doc.get("retry_cold") else None)
        version_fd = (_version_state(doc)
                      if doc.get("version_snapshot") and not doc.get("retry_cold") else None)
        if version_fd is not None:
            # The version's own bundle disk (the guest mounted it before the save; read-only,
            # shared by every copy): bound into the jail under its own name.
            state_fd = version_fd
            task = os.path.join(str(doc["version_snapshot"]["path"]), "bundle.ext4")
        else:
            bundle_disk(spec.bundle_dir, task, size_kib=None if state_fd is None
                        else DEFAULT_LIMITS.microvm_bundle_disk_mib * 1024)
            os.chown(task, spec.uid, spec.gid)  # QEMU opens it as the environment's uid
            os.chmod(task, 0o400)
        extra: list[str] = []
        if doc.get("tree_exe"):  # a runtime process's executable (Node): its own disk
            extra.append(image.ensure_tree_disk(os.path.dirname(os.path.dirname(envs_dir)),
                                                str(doc["tree_exe"])))
        if spec.layer_dirs:
            extra.append(os.path.join(folder, "layers.ext4"))
            layers_disk(spec.layer_dirs, extra[-1], os.path.join(folder, "layers"))
            os.chown(extra[-1], spec.uid, spec.gid)
            os.chmod(extra[-1], 0o400)
        files = (str(doc["kernel"]), str(doc["initrd"]), str(doc["runtime_disk"]), task, *extra)
        js = jail_spec(spec, vm, files)
        if netns_fd is not None:
            tap_fd = open_tap(netns_fd, str(spec.network["device"]))
        # QEMU's argv with the paths it has inside the jail; the console (debugging only) goes
        # to QEMU's stdout, which is the jailer's, a file here.
        argv = core.agent_qemu_argv(
            str(doc["qemu"]), _inside(files[0]), _inside(files[1]), vm,
            runtime_disk=_inside(files[2]), bundle_disk=_inside(task), chan_fd=chan_fd,
            console="stdio" if doc.get("console") or state_fd is not None else "",
            tap_fd=tap_fd if tap_fd >= 0 else None,
            mac=str(spec.network.get("mac", "")) if tap_fd >= 0 else "",
            extra_disks=tuple(_inside(x) for x in extra))
        keep = [chan_fd] + ([tap_fd] if tap_fd >= 0 else [])
        if state_fd is not None:
            argv = agentsnap.restore_argv(argv, state_fd)
            keep.append(state_fd)
        plan = jailcore.plan(js, argv, DEFAULT_LIMITS)
        log_path = os.path.join(folder, "qemu.log")
        jail_doc = {**plan.to_json(), "keep_fds": keep}
        if netns_fd is not None:
            jail_doc["netns_fd"] = netns_fd  # joined, then closed, by the jailer's child
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cellcloud.microvm.jailer", json.dumps(jail_doc)],
                    pass_fds=tuple(keep) + ((netns_fd,) if netns_fd is not None else ()),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            if state_fd is not None:
                os.close(state_fd)  # QEMU holds its own copy
            if tap_fd >= 0:
                os.close(tap_fd)  # likewise
                tap_fd = -1
        vmm_pid = _wait_vmm_pid(proc, log_path)
    except BaseException:
        if tap_fd >= 0:
            os.close(tap_fd)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _children[proc.pid] = (folder, vmm_pid)
    if state_fd is not None:
        _restored.add(folder)
    proc.returncode = 0  # reaped by _reap, never by Popen (its __del__ must not wait)
    return vmm_pid


def serve(ctl: socket.socket, envs_dir: str) -> None:
    global last_start
    while True:
        try:
            doc, fds = recv_message(ctl, request_bytes_max, 2)
        except InterruptedError:
            continue
        except FrameError as e:
            send_message(ctl, {"error": f"FrameError: {e}"})
            continue
        if doc is None:
            return
        if doc.get("op") == "snapshot_version":
            for fd in fds:
                os.close(fd)
            try:
                reply_v: dict[str, Any] = {"snapshot": snapshot_version(
                    doc, os.path.dirname(os.path.dirname(envs_dir)))}
            except Exception as e:
                reply_v = {"error": f"{type(e).__name__}: {e}"}
            send_message(ctl, reply_v)
            continue
        try:
            if len(fds) not in (1, 2):
                raise ValueError("spawn needs the channel's guest end (and a namespace)")
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:  # registered before the reaper can see it exit
                last_start = "booted: no snapshot"
                reply: dict[str, Any] = {"pid": spawn(doc, fds[0], envs_dir,
                                                      fds[1] if len(fds) == 2 else None),
                                         "start": last_start}
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        send_message(ctl, reply)


def main() -> None:
    ctl_fd, envs_dir = int(sys.argv[1]), sys.argv[2]
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before we armed PDEATHSIG
        sys.exit(1)
    ctl = socket.socket(fileno=ctl_fd)
    signal.signal(signal.SIGCHLD, _reap)
    try:
        serve(ctl, envs_dir)
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # QEMU first: its jailer then removes the VM's cgroup and exits on its own.
        for _, vmm in list(_children.values()):
            try:
                os.kill(vmm, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for folder, _ in _children.values():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
