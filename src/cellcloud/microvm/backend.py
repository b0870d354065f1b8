"""The ``microvm`` backend: each environment in its own QEMU guest with its own kernel, behind
the jail's interface (``sandbox/backend.py``: start, spawn, kill, close).

``start`` (before the agent's lock-down) builds the agent image if it is missing, asks the
acceleration probe (cached; KVM only when a probe VM boots) and starts the VMM launcher
(``launcher.py``). ``spawn`` hands the launcher the spec and the guest end of a socketpair;
the launcher starts QEMU with that end as the channel's virtserialport. The agent's end speaks
first: the spec (``guest_vm.py``); from then on it is the jail's protocol, unchanged.

Runtimes: the built-in Python, Node.js (its ``node`` on a tree disk of its own, mounted at
/rtx in the guest) and custom runtimes (``bootstrap``); layers are one more disk, mounted at
/opt. Refused at spawn, never ignored: other runtime processes (another Python version) and
container images. An environment with egress gets a network
device: its namespace from the network helper holds a tap (``network/helper.py``), the
launcher opens it there and QEMU gets it as a descriptor; such an environment always boots
fresh (a snapshot's guest had no network device). Without egress the guest has no NIC.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from ..core.limits import DEFAULT_LIMITS, Limits
from ..sandbox.backend import Spawned, Unsupported, control_reply_bytes_max
from ..sandbox.spec import EnvSpec
from ..transport.codec import FrameError, pack, recv_message, send_message
from . import agentsnap, boot, core, image, snapshot

guest_vm_seed_bytes = 32  # guest_vm.seed_bytes (not imported: that module is the guest's)
version_errors_max = 64  # SnapStart versions whose snapshot failed, kept for the status


class MicrovmUnsupported(Unsupported):
    """What this backend cannot run yet (a clear error at create, not a hang)."""


def unsupported(spec: EnvSpec, netns_fd: int | None) -> str | None:
    """Why this backend cannot run ``spec`` yet; None when it can."""
    if spec.image_layers:
        return "container images are not supported on the microvm backend yet"
    why = core.runtime_unsupported(spec.runtime, spec.runtime_argv)
    if why is not None:
        return why
    if bool(spec.network) != (netns_fd is not None):
        return "a microvm environment's network needs both its namespace and its interface"
    if spec.network and not spec.network.get("device"):
        return ("the network helper gave this microvm environment no tap (the agent asks for "
                "one on this backend)")
    return None


def guest_spec(spec: EnvSpec) -> tuple[EnvSpec, str]:
    """The spec as the guest runs it (the runtime process's argv with the guest's paths:
    ``core.guest_runtime_argv``) and the host executable whose tree disk it needs ("")."""
    import cellcloud

    argv, exe = core.guest_runtime_argv(
        list(spec.runtime_argv),
        host_package_dir=os.path.dirname(os.path.realpath(cellcloud.__file__)))
    return dataclasses.replace(spec, runtime_argv=argv), exe


def spec_frame(spec: EnvSpec) -> bytes:
    """The host's first frame to a guest (``guest_vm.py``): the spec, the wall clock and a
    fresh seed (a guest restored from a snapshot applies both before the runtime starts)."""
    return pack({"t": "spec", "spec": spec.to_wire(), "time_ms": int(time.time() * 1000),
                 "seed": os.urandom(guest_vm_seed_bytes)})


class MicrovmBackend:
    name = "microvm"

    def __init__(self, state_dir: str, *, limits: Limits = DEFAULT_LIMITS,
                 machine: str = "microvm", console: bool = False,
                 snapshots: bool = False,
                 snapshot_memory_mib: int | tuple[int, ...] = 0) -> None:
        self.state_dir = state_dir
        self.limits = limits
        self.machine = machine
        self.console = console  # tests and debugging: each guest's console to a file
        self.envs_dir = os.path.join(state_dir, "microvm", "envs")
        self.accel: core.Accel = "tcg"
        self.probe: dict[str, object] = {}
        self.image: image.AgentImage | None = None
        self.qemu = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._lock = threading.Lock()
        # Start environments from the agent guest's snapshot (agentsnap.py), one per guest
        # memory size in snapshot_memory_mib (0 or none: microvm_guest_memory_mib_min; at most
        # microvm_snapshot_sizes_max), each made at start() (or found in the cache by its key);
        # guests of other sizes boot fresh (status: snapshot_info()).
        self.snapshots = snapshots
        sizes = ((snapshot_memory_mib,) if isinstance(snapshot_memory_mib, int)
                 else tuple(snapshot_memory_mib))
        self.snapshot_memory_mibs = tuple(sorted({
            max(limits.microvm_guest_memory_mib_min, m) for m in sizes if m > 0})) or (
            limits.microvm_guest_memory_mib_min,)
        self.snapshot_memory_mib = self.snapshot_memory_mibs[0]
        self.snapshots_by_mib: dict[int, agentsnap.AgentSnapshot] = {}
        self.snapshot: agentsnap.AgentSnapshot | None = None  # the smallest size's
        self.last_start = ""  # the launcher's word on the last spawn: restored or booted
        self.snapshot_error = ""  # why start() made no snapshot (of some size)
        self.starts = {"restored": 0, "booted": 0, "restore_failed": 0, "version_restored": 0}
        # SnapStart: each version's snapshot after its init ("<version id> <memory>" -> its
        # folder and key), made on the version's first environment here; why one could not be.
        self.version_snapshots: dict[str, dict[str, object]] = {}
        self.version_errors: dict[str, str] = {}

    def start(self) -> None:
        """Must run before the agent locks itself down (the probe and the launcher exec)."""
        qemu = boot.qemu_binary()
        if qemu is None:
            raise MicrovmUnsupported(f"no {boot.QEMU} on this host (scripts/setup.sh)")
        self.qemu = qemu
        try:
            self.image = image.ensure_agent(self.state_dir, limits=self.limits)
            base = image.ensure(self.state_dir, limits=self.limits)
        except image.ImageError as e:
            raise MicrovmUnsupported(f"no guest image: {e}") from e
        # The probe runs its own event loop (asyncio.run): in a thread of its own, as the
        # agent calls this from inside its loop (before it serves, so blocking is fine).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            self.probe, _ = pool.submit(boot.probe, self.state_dir, base,
                                        limits=self.limits).result()
        self.accel = "kvm" if self.probe.get("accel") == "kvm" else "tcg"
        if self.snapshots:
            if len(self.snapshot_memory_mibs) > self.limits.microvm_snapshot_sizes_max:
                raise MicrovmUnsupported(
                    f"{len(self.snapshot_memory_mibs)} snapshot memory sizes: at most "
                    f"microvm_snapshot_sizes_max ({self.limits.microvm_snapshot_sizes_max})")
            errors = []
            for mib in self.snapshot_memory_mibs:
                vm = core.VmSpec(self.accel, self.machine, memory_mib=mib)
                try:
                    with concurrent.futures.ThreadPoolExecutor(1) as pool:
                        self.snapshots_by_mib[mib] = pool.submit(
                            asyncio.run, agentsnap.create(self.state_dir, self.image, vm,
                                                          limits=self.limits,
                                                          qemu=qemu)).result()
                except (snapshot.SnapshotError, OSError, RuntimeError) as e:
                    # No snapshot of this size: its environments boot fresh, the agent says why.
                    errors.append(f"{mib} MiB: {type(e).__name__}: {e}")
            self.snapshot = self.snapshots_by_mib.get(self.snapshot_memory_mib)
            self.snapshot_error = "; ".join(errors)
        os.makedirs(self.envs_dir, mode=0o700, exist_ok=True)
        for stale in os.listdir(self.envs_dir):  # a previous agent's, its QEMUs are gone
            shutil.rmtree(os.path.join(self.envs_dir, stale), ignore_errors=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cellcloud.microvm.launcher", str(theirs.fileno()),
             self.envs_dir],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._ctl = ours

    def vm_spec(self, spec: EnvSpec) -> core.VmSpec:
        return core.VmSpec(self.accel, self.machine,
                           memory_mib=max(self.limits.microvm_guest_memory_mib_min,
                                          spec.memory_mb))

    def _spawn_sync(self, request: dict[str, object], guest_end: socket.socket,
                    netns_fd: int | None = None) -> dict[str, object]:
        fds = [guest_end.fileno()] + ([netns_fd] if netns_fd is not None else [])
        with self._lock:
            if self._ctl is None:
                raise RuntimeError("the microvm backend is not started")
            try:
                send_message(self._ctl, request, fds)
                reply, _ = recv_message(self._ctl, control_reply_bytes_max)
            except (OSError, FrameError) as e:
                raise RuntimeError(f"the VMM launcher is gone: {e!r}") from e
        if reply is None:
            raise RuntimeError("the VMM launcher is gone")
        return reply

    async def spawn(self, spec: EnvSpec, netns_fd: int | None = None) -> Spawned:
        why = unsupported(spec, netns_fd)
        if why is not None:
            raise MicrovmUnsupported(why)
        assert self.image is not None, "start() first"
        vm = self.vm_spec(spec)
        spec, tree_exe = guest_spec(spec)
        request: dict[str, object] = {
            "spec": spec.to_wire(), "qemu": self.qemu, "kernel": self.image.kernel,
            "initrd": self.image.initrd, "runtime_disk": self.image.runtime_disk,
            "console": self.console,
            "vm": {"accel": vm.accel, "machine": vm.machine, "memory_mib": vm.memory_mib,
                   "vcpus": vm.vcpus}}
        if tree_exe:
            request["tree_exe"] = tree_exe
        # this size's snapshot (``snapshot``, the smallest size's, may be set on its own)
        snap = self.snapshots_by_mib.get(vm.memory_mib) or self.snapshot
        if (spec.network or netns_fd is not None
                or core.guest_disks(spec.runtime_argv, len(spec.layer_dirs))):
            # A guest with a network device (or a runtime tree's or the layers' disk) cannot
            # load a state saved without one: snapshots are not keyed by the device set yet,
            # so such an environment boots cold.
            pass
        elif spec.snapstart:
            # SnapStart: the version's own snapshot, after its init (made on its first
            # environment here); never the agent guest's.
            version = await self._version_snapshot(spec, vm)
            if version is not None:
                request["version_snapshot"] = version
        elif (snap is not None and (snap.key.memory_mib, snap.key.machine, snap.key.vcpus,
                                    snap.key.accel)
                == (vm.memory_mib, vm.machine, vm.vcpus, vm.accel)):
            request["snapshot"] = {"path": snap.path, "key": snap.key.to_json()}
        spawned = await self._spawn_once(spec, request, netns_fd)
        if self.last_start != "restored":
            self.starts["booted"] += 1
            return spawned
        # A snapshot that passed its digests can still fail in QEMU's load (a state of another
        # machine, truncated and re-digested, a QEMU that reads it differently): QEMU then
        # exits, and the channel ends before the guest's first frame. Waited for here (the
        # agent waits for that frame next anyway): such an environment boots fresh instead.
        if await asyncio.to_thread(self._answers, spawned.channel):
            self.starts["version_restored" if "version_snapshot" in request
                        else "restored"] += 1
            return spawned
        spawned.channel.close()
        self.kill(spawned.pid)
        self.starts["restore_failed"] += 1
        self.starts["booted"] += 1
        return await self._spawn_once(spec, {**request, "retry_cold": True}, netns_fd)

    def _answers(self, chan: socket.socket) -> bool:
        """False when ``chan`` ends before the guest's first byte (its QEMU exited); True once
        a byte is there, or after ``microvm_create_timeout_ms`` (the agent's own wait then
        decides)."""
        p = select.poll()
        p.register(chan, select.POLLIN | select.POLLHUP)
        if not p.poll(self.limits.microvm_create_timeout_ms):
            return True
        try:
            return chan.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def _version_snapshot(self, spec: EnvSpec,
                                vm: core.VmSpec) -> dict[str, object] | None:
        """The version's snapshot (``{"path", "key"}``): known, or made now by the launcher
        (``launcher.snapshot_version``: a jailed boot, the version's init, a save; cached by
        its key on disk). None when it cannot be made (the init failed, the bundle is over
        ``microvm_bundle_disk_mib``, ...): the environment boots cold, the status says why."""
        assert self.image is not None
        name = f"{spec.snapstart} {vm.memory_mib}"
        have = self.version_snapshots.get(name)
        if have is not None:
            return have
        reply = await asyncio.to_thread(self._request_sync, {
            "op": "snapshot_version", "spec": spec.to_wire(), "qemu": self.qemu,
            "vm": {"accel": vm.accel, "machine": vm.machine, "memory_mib": vm.memory_mib,
                   "vcpus": vm.vcpus},
            "image": dataclasses.asdict(self.image)})
        got = reply.get("snapshot")
        if not isinstance(got, dict):
            self.version_errors[spec.snapstart] = str(reply.get("error"))[:500]
            while len(self.version_errors) > version_errors_max:
                del self.version_errors[next(iter(self.version_errors))]
            return None
        self.version_errors.pop(spec.snapstart, None)
        made = {"path": got["path"], "key": got["key"]}
        self.version_snapshots[name] = made
        return made

    def _request_sync(self, request: dict[str, object]) -> dict[str, object]:
        with self._lock:
            if self._ctl is None:
                raise RuntimeError("the microvm backend is not started")
            try:
                send_message(self._ctl, request)
                reply, _ = recv_message(self._ctl, control_reply_bytes_max)
            except (OSError, FrameError) as e:
                raise RuntimeError(f"the VMM launcher is gone: {e!r}") from e
        if reply is None:
            raise RuntimeError("the VMM launcher is gone")
        return reply

    async def _spawn_once(self, spec: EnvSpec, request: dict[str, object],
                          netns_fd: int | None = None) -> Spawned:
        ours, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = await asyncio.to_thread(self._spawn_sync, request, guest_end, netns_fd)
            if "error" in reply:
                raise RuntimeError(str(reply["error"]))
            pid = reply["pid"]
            self.last_start = str(reply.get("start", ""))
            assert isinstance(pid, int)
            # The host speaks first: the spec, then the jail's protocol. It waits in the
            # socket's buffer until the guest opens its port. A copy of a version's guest
            # (SnapStart) is past its spec and init: it gets the restore frame (a fresh seed
            # and the clock) and answers with its ready frame.
            restored_version = ("version_snapshot" in request and not request.get("retry_cold")
                                and self.last_start == "restored")
            ours.sendall(agentsnap.restore_frame() if restored_version else spec_frame(spec))
        except BaseException:
            ours.close()
            raise
        finally:
            guest_end.close()
        return Spawned(pid, ours)

    def snapshot_info(self) -> dict[str, object]:
        """For the agent's status: which guest memory sizes start from a snapshot (the rest
        boot cold), and how environments started."""
        return {"memory_mib": sorted(self.snapshots_by_mib),
                "failed_memory_mib": [m for m in self.snapshot_memory_mibs
                                      if self.snapshots and m not in self.snapshots_by_mib],
                "error": self.snapshot_error, "last_start": self.last_start,
                "version_snapshots": len(self.version_snapshots),
                "version_errors": dict(self.version_errors), **self.starts}

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        if self._ctl is not None:
            self._ctl.close()  # the launcher kills its QEMUs on EOF and exits
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
