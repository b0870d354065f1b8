"""The agent guest's snapshot (issue #18, docs/microvm.md "The plan for the rest", step 3): the
environment's guest saved at its waiting point and started from there.

``create`` boots the agent image (``image.ensure_agent``) with an empty bundle disk of
``microvm_bundle_disk_mib`` and a channel nobody writes to, waits for QEMU's
``VSERPORT_CHANGE`` event (the guest agent opened its port: it now waits for the host's spec
frame, before it touches the bundle disk) and saves it with QEMU's migration, as
``snapshot.create`` does but without pausing it first (see ``create``); the folder is named by the key's digest (agent image, QEMU's
version, the argv's shape, machine, memory, vCPUs, accel). ``start`` checks the snapshot's
digests (``snapshot.check``: a corrupt or mismatched one is refused and the guest boots
fresh), starts QEMU with the environment's bundle disk (the same size) and channel and
``-incoming defer``, loads the state from the descriptor that was hashed, resumes it. The
host's first frame (``backend.spec_frame``: a fresh seed and the wall clock) is then applied
by the guest before the runtime starts; the guest drops the snapshot's cached blocks of the
bundle disk (``BLKFLSBUF``) before it mounts it.

The backend's launcher starts environments from it through the VMM jailer (``verify_state``,
``restore_argv``); ``start`` here runs plain children (tests, benchmarks).

A function version's snapshot (SnapStart; ``create_version``, ``start_version``,
``verify_version``; docs/microvm.md "SnapStart"): the same guest booted with the version's
bundle, saved after its init, every copy sent ``restore_frame`` instead of the spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.limits import DEFAULT_LIMITS, Limits
from . import core, image, snapcore, snapshot

PORT_ID = "agentport"  # the virtserialport's device id: QEMU names it in VSERPORT_CHANGE
_RUNTIME_IN_KEY = "/vm/runtime.ext4"  # the key's argv uses these paths: the shape is per image
_BUNDLE_IN_KEY = "/vm/task.ext4"


def argv(qemu: str, img: image.AgentImage, vm: core.VmSpec, *, bundle_disk: str,
         chan_fd: int, console_fd: int, qmp_fd: int, runtime_disk: str | None = None,
         incoming: bool = False, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """``core.agent_qemu_argv`` with the serial console and a QMP monitor on sockets the host
    made, the port's device id (for its event) and, to restore, ``-incoming defer``."""
    a = core.agent_qemu_argv(qemu, img.kernel, img.initrd, vm,
                             runtime_disk=runtime_disk or img.runtime_disk,
                             bundle_disk=bundle_disk, chan_fd=chan_fd,
                             tcg_cache_mib=limits.microvm_tcg_cache_mib)
    i = a.index("-serial")
    assert a[i + 1] == "none"
    a[i:i + 2] = ["-chardev", f"socket,id=con,fd={console_fd}", "-serial", "chardev:con",
                  "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    port = f"virtserialport,chardev=agent,name={core.AGENT_PORT_NAME}"
    a[a.index(port)] = port + f",id={PORT_ID}"
    if incoming:
        a += ["-incoming", "defer"]
    return a


def key(img: image.AgentImage, vm: core.VmSpec, qemu: str, *,
        limits: Limits = DEFAULT_LIMITS) -> snapcore.SnapshotKey:
    shape = argv(qemu, img, vm, bundle_disk=_BUNDLE_IN_KEY, runtime_disk=_RUNTIME_IN_KEY,
                  chan_fd=3, console_fd=4, qmp_fd=5, limits=limits)
    return snapcore.SnapshotKey.of(image_digest=img.digest,
                                   qemu_version=snapshot.qemu_version(qemu), spec=vm,
                                   argv=shape, kernel=img.kernel, initrd=img.initrd)


def snapshots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "agent-snapshots")


async def _start_qemu(qemu: str, img: image.AgentImage, vm: core.VmSpec, *, bundle_disk: str,
                      chan: socket.socket, incoming: bool, limits: Limits,
                      spawn: snapshot.Spawn,
                      inside: Callable[[str], str] | None = None) -> snapshot.Guest:
    """``inside``: the path QEMU sees for a host path (a jailed QEMU: its chroot's)."""
    if inside is not None:
        img = dataclasses.replace(img, kernel=inside(img.kernel), initrd=inside(img.initrd),
                                  runtime_disk=inside(img.runtime_disk))
        bundle_disk = inside(bundle_disk)
    qa, qb = socket.socketpair()
    ca, cb = socket.socketpair()
    try:
        a = argv(qemu, img, vm, bundle_disk=bundle_disk, chan_fd=chan.fileno(),
                 console_fd=cb.fileno(), qmp_fd=qb.fileno(), incoming=incoming, limits=limits)
        proc = await spawn(a, (qb.fileno(), cb.fileno(), chan.fileno()))
    except BaseException:
        qa.close()
        ca.close()
        raise
    finally:
        qb.close()
        cb.close()
    g = snapshot.Guest(proc, await asyncio.open_connection(sock=qa),
                       await asyncio.open_connection(sock=ca), limits, qa)
    try:
        await asyncio.wait_for(g.handshake(), limits.microvm_qmp_timeout_ms / 1000)
    except BaseException as e:
        await g.close()
        if isinstance(e, TimeoutError):
            raise snapshot.SnapshotError("no QMP greeting within microvm_qmp_timeout_ms") from None
        raise
    return g


def empty_bundle_disk(path: str, limits: Limits) -> None:
    from .launcher import bundle_disk  # the launcher's mkfs; imported here, not at load
    with tempfile.TemporaryDirectory(prefix=".bundle-") as empty:
        bundle_disk(empty, path, size_kib=limits.microvm_bundle_disk_mib * 1024)


def key_from_json(doc: dict[str, Any]) -> snapcore.SnapshotKey:
    return snapcore.SnapshotKey(str(doc["image_digest"]), str(doc["qemu_version"]),
                                tuple(str(a) for a in doc["argv_shape"]), str(doc["machine"]),
                                int(doc["memory_mib"]), int(doc["vcpus"]), str(doc["accel"]),
                                str(doc["format"]))


def verify_state(snapshot_path: str, k: snapcore.SnapshotKey, *, kernel: str, initrd: str,
                 state_fd: int, limits: Limits = DEFAULT_LIMITS) -> snapcore.Verdict:
    """``snapcore.verify`` over the open state file (the descriptor QEMU then loads from) and
    the image's kernel and initramfs."""
    kd = snapshot.file_digest(kernel, bytes_max=limits.microvm_image_input_bytes_max)
    idg = snapshot.file_digest(initrd, bytes_max=limits.microvm_image_input_bytes_max)
    if kd is None or idg is None:
        return snapcore.Verdict(False, "the image's files are missing")
    state = snapshot.fd_digest(state_fd, bytes_max=limits.microvm_snapshot_bytes_max)
    os.lseek(state_fd, 0, os.SEEK_SET)
    return snapcore.verify(snapshot.read_manifest(snapshot_path), k, state=state, kernel=kd,
                           initrd=idg, state_bytes_max=limits.microvm_snapshot_bytes_max)


def restore_argv(agent_argv: list[str], state_fd: int) -> list[str]:
    """The launcher's ``core.agent_qemu_argv`` (console on ``stdio``: the snapshot's guest
    has a serial port) made to load the snapshot from ``state_fd`` at start (``-incoming
    fd:``; QEMU runs the guest once it is loaded). No QMP monitor: the jailed QEMU needs none."""
    a = list(agent_argv)
    port = f"virtserialport,chardev=agent,name={core.AGENT_PORT_NAME}"
    a[a.index(port)] = port + f",id={PORT_ID}"
    return [*a, "-incoming", f"fd:{state_fd}"]


@dataclass(frozen=True)
class AgentSnapshot:
    path: str
    key: snapcore.SnapshotKey
    state_bytes: int
    save_ms: int
    built: bool

    @property
    def state(self) -> str:
        return os.path.join(self.path, "state.bin")


async def create(state_dir: str, img: image.AgentImage, vm: core.VmSpec, *,
                 limits: Limits = DEFAULT_LIMITS, qemu: str,
                 spawn: snapshot.Spawn = snapshot.spawn_plain) -> AgentSnapshot:
    """The agent guest's snapshot at its waiting point: the cached one, else made now."""
    k = key(img, vm, qemu, limits=limits)
    root = snapshots_dir(state_dir)
    final = os.path.join(root, k.dir_name())
    have = snapshot.read_manifest(final)
    if have is not None:
        try:
            return AgentSnapshot(final, k, int(have["state"]["size_bytes"]),
                                 int(have["save_ms"]), False)
        except (KeyError, TypeError, ValueError):
            pass  # a malformed manifest: made again below
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=root)
    ours, theirs = socket.socketpair()
    try:
        disk = os.path.join(tmp, "bundle.ext4")
        empty_bundle_disk(disk, limits)
        state_path = os.path.join(tmp, "state.bin")
        g = await _start_qemu(qemu, img, vm, bundle_disk=disk, chan=theirs, incoming=False,
                              limits=limits, spawn=spawn)
        theirs.close()
        try:
            await g.wait_event("VSERPORT_CHANGE",
                               lambda d: d.get("id") == PORT_ID and d.get("open") is True,
                               limits.microvm_boot_timeout_ms)
            save_ms = await _save_state(g, state_path, limits)
        finally:
            await g.close()
        os.unlink(disk)
        state = snapshot.file_digest(state_path, bytes_max=limits.microvm_snapshot_bytes_max)
        if state is None:
            raise snapshot.SnapshotError("the saved state is over microvm_snapshot_bytes_max")
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        doc = snapcore.manifest(
            k, state=state, kernel=snapshot.must_digest(img.kernel, limits),
            initrd=snapshot.must_digest(img.initrd, limits), created_at_s=int(time.time()),
            save_ms=save_ms)
        image.publish(tmp, final, "manifest.json", doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ours.close()
        theirs.close()
    return AgentSnapshot(final, k, state.size_bytes, save_ms, True)


async def _save_state(g: snapshot.Guest, state_path: str, limits: Limits) -> int:
    """Save the running guest into a new ``state_path`` (QEMU's migration to the file's
    descriptor, passed over QMP); returns how long the save took, in ms. Saved running (QEMU
    pauses it at the end): the stream's run state is "running", so a QEMU started with
    ``-incoming`` runs the guest once it is loaded, with no monitor to ``cont`` it (the jailed
    one has none). Idle, it converges at once."""
    t0 = time.monotonic()
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await g.pass_fd("state", fd)
    finally:
        os.close(fd)
    await g.qmp("migrate", uri="fd:state")
    await snapshot.wait_migration(g, limits.microvm_snapshot_save_timeout_ms)
    return int((time.monotonic() - t0) * 1000)


@dataclass
class Started:
    guest: snapshot.Guest
    how: str  # "restored" or "booted"
    reason: str  # why the snapshot was not used, or "digests match"
    start_ms: int  # from the call to QEMU running (restored: resumed)


async def start(snapshot_path: str | None, img: image.AgentImage, vm: core.VmSpec, *,
                bundle_disk: str, chan: socket.socket, qemu: str,
                limits: Limits = DEFAULT_LIMITS,
                spawn: snapshot.Spawn = snapshot.spawn_plain) -> Started:
    """The environment's QEMU with ``chan`` as its channel: restored from ``snapshot_path``
    when its digests match (and ``bundle_disk`` is the snapshot's size), booted fresh
    otherwise. The caller then sends the spec frame on its end and closes ``.guest``."""
    t0 = time.monotonic()
    reason = "no snapshot"
    if snapshot_path is not None:
        try:
            size = os.stat(bundle_disk).st_size
        except OSError:
            size = -1
        k = key(img, vm, qemu, limits=limits)
        try:
            state_fd: int | None = os.open(os.path.join(snapshot_path, "state.bin"),
                                           os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            state_fd = None
        try:
            if size != limits.microvm_bundle_disk_mib * 1024 * 1024:
                verdict = snapcore.Verdict(False, "the bundle disk is not "
                                           "microvm_bundle_disk_mib")
            elif state_fd is None:
                verdict = snapcore.Verdict(False, "the state file is missing")
            else:
                verdict = snapshot.check(snapshot_path, k, img,  # type: ignore[arg-type]
                                         limits=limits, state_fd=state_fd)
            reason = verdict.reason
            if verdict.ok:
                assert state_fd is not None
                os.lseek(state_fd, 0, os.SEEK_SET)
                g = await _start_qemu(qemu, img, vm, bundle_disk=bundle_disk, chan=chan,
                                      incoming=True, limits=limits, spawn=spawn)
                try:
                    await g.pass_fd("state", state_fd)
                    await g.qmp("migrate-incoming", uri="fd:state")
                    await snapshot.wait_loaded(g, limits)
                    await g.qmp("cont")
                except snapshot.SnapshotError as e:
                    await g.close()
                    reason = f"the restore failed: {e}"
                except BaseException:
                    await g.close()
                    raise
                else:
                    return Started(g, "restored", reason,
                                   int((time.monotonic() - t0) * 1000))
        finally:
            if state_fd is not None:
                os.close(state_fd)
    g = await _start_qemu(qemu, img, vm, bundle_disk=bundle_disk, chan=chan, incoming=False,
                          limits=limits, spawn=spawn)
    return Started(g, "booted", reason, int((time.monotonic() - t0) * 1000))


# A function version's snapshot (SnapStart, issue #18): the agent guest booted with the
# version's bundle, its init run (the handler imported, the guest's "ready" sent), then saved
# running. Every restored copy gets, before anything else, a restore frame with a fresh seed
# and the host's clock (guest_vm.restore_hook, through a root helper the guest kept for it)
# and answers "restored"; it then serves invocations with the init it did once.

def version_snapshots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "version-snapshots")


def version_key(img: image.AgentImage, vm: core.VmSpec, qemu: str, version_id: str, *,
                limits: Limits = DEFAULT_LIMITS) -> snapcore.SnapshotKey:
    """The agent guest's key with the version's identity (its ARN and code digest: the
    caller's ``version_id``) folded into the image digest: one snapshot per version and shape."""
    import hashlib

    k = key(img, vm, qemu, limits=limits)
    mixed = "sha256:" + hashlib.sha256(f"{k.image_digest}\0{version_id}".encode()).hexdigest()
    return snapcore.SnapshotKey(mixed, k.qemu_version, k.argv_shape, k.machine, k.memory_mib,
                                k.vcpus, k.accel, k.format)


def version_spec_frame(spec_wire: dict[str, Any]) -> bytes:
    """``backend.spec_frame`` for the snapshot's guest: ``snapstart`` keeps the guest's root
    helper for the restored copies' seeds and clocks."""
    from ..transport.codec import pack
    return pack({"t": "spec", "spec": spec_wire, "time_ms": int(time.time() * 1000),
                 "seed": os.urandom(32), "snapstart": True})


def restore_frame() -> bytes:
    from ..transport.codec import pack
    return pack({"t": "restore", "time_ms": int(time.time() * 1000), "seed": os.urandom(32)})


@dataclass(frozen=True)
class VersionSnapshot:
    path: str
    key: snapcore.SnapshotKey
    state_bytes: int
    save_ms: int
    init_ms: float  # the version's init, done once before the save
    built: bool

    @property
    def bundle_disk(self) -> str:
        return os.path.join(self.path, "bundle.ext4")


async def _recv_frame(chan: socket.socket, timeout_ms: int) -> Any:
    from ..transport.codec import StreamChannel

    def recv() -> Any:
        chan.settimeout(timeout_ms / 1000)
        try:
            return StreamChannel(chan, 64 << 20).recv()
        finally:
            chan.settimeout(None)
    return await asyncio.to_thread(recv)


async def create_version(state_dir: str, img: image.AgentImage, vm: core.VmSpec, *,
                         spec_wire: dict[str, Any], bundle_dir: str, version_id: str,
                         qemu: str, limits: Limits = DEFAULT_LIMITS,
                         spawn: snapshot.Spawn = snapshot.spawn_plain,
                         spawn_for: Callable[[str], snapshot.Spawn] | None = None,
                         inside: Callable[[str], str] | None = None) -> VersionSnapshot:
    """The version's snapshot after its init: the cached one, else made now. An init error,
    a bundle over ``microvm_bundle_disk_mib`` or a failed save raise ``SnapshotError``.
    ``spawn_for(bundle_disk)``: the spawn to use given the bundle disk's path (the launcher's
    jail binds it); else ``spawn``. ``inside``: the path a jailed QEMU sees for a host path."""
    from .launcher import bundle_disk as make_bundle_disk

    k = version_key(img, vm, qemu, version_id, limits=limits)
    root = version_snapshots_dir(state_dir)
    final = os.path.join(root, k.dir_name())
    have = snapshot.read_manifest(final)
    if have is not None:
        try:
            return VersionSnapshot(final, k, int(have["state"]["size_bytes"]),
                                   int(have["save_ms"]), float(have["init_ms"]), False)
        except (KeyError, TypeError, ValueError):
            pass  # a malformed manifest: made again below
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=root)
    ours, theirs = socket.socketpair()
    try:
        disk = os.path.join(tmp, "bundle.ext4")
        try:
            make_bundle_disk(bundle_dir, disk, size_kib=limits.microvm_bundle_disk_mib * 1024)
        except RuntimeError as e:
            raise snapshot.SnapshotError(f"the bundle does not fit microvm_bundle_disk_mib: "
                                         f"{e}") from e
        state_path = os.path.join(tmp, "state.bin")
        g = await _start_qemu(qemu, img, vm, bundle_disk=disk, chan=theirs, incoming=False,
                              limits=limits,
                              spawn=spawn_for(disk) if spawn_for is not None else spawn,
                              inside=inside)
        theirs.close()
        try:
            ours.sendall(version_spec_frame(spec_wire))
            try:
                ready = await _recv_frame(ours, limits.microvm_boot_timeout_ms)
            except (TimeoutError, OSError) as e:
                raise snapshot.SnapshotError(f"the version's guest did not get ready: {e}") from e
            if not isinstance(ready, dict) or ready.get("t") != "ready":
                raise snapshot.SnapshotError(f"the version's guest answered {ready!r}")
            if ready.get("init_error"):
                raise snapshot.SnapshotError(f"the version's init failed: {ready['init_error']}")
            save_ms = await _save_state(g, state_path, limits)
        finally:
            await g.close()
        state = snapshot.file_digest(state_path, bytes_max=limits.microvm_snapshot_bytes_max)
        if state is None:
            raise snapshot.SnapshotError("the saved state is over microvm_snapshot_bytes_max")
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(disk, 0o444)
        doc = snapcore.manifest(
            k, state=state, kernel=snapshot.must_digest(img.kernel, limits),
            initrd=snapshot.must_digest(img.initrd, limits), created_at_s=int(time.time()),
            save_ms=save_ms)
        doc["bundle"] = snapshot.must_digest(disk, limits).to_json()
        doc["init_ms"] = float(ready.get("init_ms") or 0.0)
        doc["version_id"] = version_id
        image.publish(tmp, final, "manifest.json", doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ours.close()
        theirs.close()
    return VersionSnapshot(final, k, state.size_bytes, save_ms, float(doc["init_ms"]), True)


def verify_version(snapshot_path: str, k: snapcore.SnapshotKey, *, kernel: str, initrd: str,
                   state_fd: int, limits: Limits = DEFAULT_LIMITS) -> snapcore.Verdict:
    """``verify_state`` and the version's bundle disk against its manifest (the restored guest
    has it mounted: another file under it would be read through the snapshot's page cache)."""
    verdict = verify_state(snapshot_path, k, kernel=kernel, initrd=initrd, state_fd=state_fd,
                           limits=limits)
    if not verdict.ok:
        return verdict
    doc = snapshot.read_manifest(snapshot_path) or {}
    have = snapshot.file_digest(os.path.join(snapshot_path, "bundle.ext4"),
                                bytes_max=limits.microvm_image_input_bytes_max)
    if have is None or have.to_json() != doc.get("bundle"):
        return snapcore.Verdict(False, "the version's bundle disk's SHA-256 is not the "
                                "manifest's")
    return verdict


async def start_version(snapshot_path: str, img: image.AgentImage, vm: core.VmSpec, *,
                        version_id: str, chan: socket.socket, qemu: str,
                        limits: Limits = DEFAULT_LIMITS,
                        spawn: snapshot.Spawn = snapshot.spawn_plain) -> Started:
    """A copy of the version's initialised guest on ``chan`` when the snapshot's digests (state,
    kernel, initramfs and its bundle disk) match; raises ``SnapshotError`` (the caller boots
    cold: a fresh environment and its init) otherwise. The caller then sends ``restore_frame``
    and reads the guest's ``restored`` answer before any invocation."""
    t0 = time.monotonic()
    k = version_key(img, vm, qemu, version_id, limits=limits)
    try:
        state_fd = os.open(os.path.join(snapshot_path, "state.bin"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise snapshot.SnapshotError("the state file is missing") from e
    try:
        verdict = snapshot.check(snapshot_path, k, img,  # type: ignore[arg-type]
                                 limits=limits, state_fd=state_fd)
        if verdict.ok:
            doc = snapshot.read_manifest(snapshot_path) or {}
            disk = os.path.join(snapshot_path, "bundle.ext4")
            have = snapshot.file_digest(disk, bytes_max=limits.microvm_image_input_bytes_max)
            if have is None or have.to_json() != doc.get("bundle"):
                verdict = snapcore.Verdict(False, "the bundle disk's SHA-256 is not the "
                                           "manifest's")
        if not verdict.ok:
            raise snapshot.SnapshotError(f"refused: {verdict.reason}")
        os.lseek(state_fd, 0, os.SEEK_SET)
        g = await _start_qemu(qemu, img, vm, bundle_disk=disk, chan=chan, incoming=True,
                              limits=limits, spawn=spawn)
        try:
            await g.pass_fd("state", state_fd)
            await g.qmp("migrate-incoming", uri="fd:state")
            await snapshot.wait_loaded(g, limits)
            await g.qmp("cont")
        except BaseException:
            await g.close()
            raise
        return Started(g, "restored", verdict.reason, int((time.monotonic() - t0) * 1000))
    finally:
        os.close(state_fd)
