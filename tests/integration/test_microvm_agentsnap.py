"""The agent guest's snapshot at its waiting point (issue #18, step 3), at host level: one
snapshot of the agent image's guest (saved when its port opened); two environments restored
from it, each with its own bundle disk and channel, answer the spec frame with ``ready`` and run
their handler, which prints different random bytes (each applied its own fresh seed) and sees
the host's clock; a snapshot with a flipped byte is refused and the environment boots fresh."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import agentsnap, boot, core, image, launcher
from cellcloud.microvm.backend import spec_frame
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel
from tests.integration.microvm_envs import (
    NEEDS_GUEST,
    flip_byte,
    flipped_copy,
    invoke_once,
    invoke_ready,
    write_bundle,
)

pytestmark = NEEDS_GUEST

VM = core.VmSpec(accel="tcg", memory_mib=DEFAULT_LIMITS.microvm_guest_memory_mib_min)
HANDLER = ("import os, time\n"
           "def handler(event, context):\n"
           "    return {'random': os.urandom(16).hex(), 'now': time.time()}\n")


@pytest.fixture(scope="module")
def made(tmp_path_factory: Any) -> tuple[str, Any, agentsnap.AgentSnapshot, str]:
    state = str(tmp_path_factory.mktemp("microvm-agentsnap"))
    img = image.ensure_agent(state)
    qemu = boot.qemu_binary()
    assert qemu is not None
    snap = asyncio.run(agentsnap.create(state, img, VM, qemu=qemu))
    assert snap.built and snap.state_bytes > 0
    again = asyncio.run(agentsnap.create(state, img, VM, qemu=qemu))  # cached by its key
    assert (again.path, again.built) == (snap.path, False)
    return state, img, snap, qemu


def run_env(snap_path: str | None, img: Any, qemu: str, work: str,
            n: int) -> tuple[agentsnap.Started, dict[str, Any], float]:
    """One environment: its bundle disk, QEMU, spec frame, ready, one invocation."""
    bundle = write_bundle(os.path.join(work, f"bundle{n}"), HANDLER)
    disk = os.path.join(work, f"task{n}.ext4")
    launcher.bundle_disk(bundle, disk,
                         size_kib=DEFAULT_LIMITS.microvm_bundle_disk_mib * 1024)
    spec = EnvSpec(env_id=f"snap-{n}", function_name="snap", function_version="$LATEST",
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:snap",
                   handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=30,
                   bundle_dir=bundle, uid=1000, gid=1000, cgroup_group="snap",
                   allow_unlimited=True)
    ours, theirs = socket.socketpair()

    async def go() -> tuple[agentsnap.Started, dict[str, Any], float]:
        t0 = time.monotonic()
        st = await agentsnap.start(snap_path, img, VM, bundle_disk=disk, chan=theirs,
                                   qemu=qemu)
        theirs.close()
        try:
            ours.sendall(spec_frame(spec))
            chan = StreamChannel(ours, 64 << 20)  # type: ignore[arg-type]
            ours.settimeout(120)
            ready = await asyncio.to_thread(chan.recv)
            ready_ms = (time.monotonic() - t0) * 1000
            assert ready and ready.get("t") == "ready" and not ready.get("init_error"), ready
            return st, await invoke_ready(chan, spec.function_arn), ready_ms
        finally:
            ours.close()
            await st.guest.close()

    return asyncio.run(go())


def test_two_restored_environments_print_different_random_bytes(made: Any,
                                                                tmp_path: Any) -> None:
    _, img, snap, qemu = made
    before = time.time()
    a, ra, ms_a = run_env(snap.path, img, qemu, str(tmp_path), 1)
    b, rb, ms_b = run_env(snap.path, img, qemu, str(tmp_path), 2)
    for st, r in ((a, ra), (b, rb)):
        assert (st.how, st.reason) == ("restored", "digests match")
        # The clock the host sent (the snapshot was saved before either started).
        assert before - 1 <= r["now"] <= time.time() + 1
    assert ra["random"] != rb["random"]
    print(f"restored to ready: {ms_a:.0f} ms, {ms_b:.0f} ms; load {os.getloadavg()}")


def test_a_flipped_byte_is_refused_and_the_environment_boots_fresh(made: Any,
                                                                   tmp_path: Any) -> None:
    _, img, snap, qemu = made
    bad = flipped_copy(snap.path, str(tmp_path / "snap"), snap.state_bytes)
    st, r, _ = run_env(bad, img, qemu, str(tmp_path), 3)
    assert st.how == "booted"
    assert "state file's SHA-256" in st.reason
    assert len(r["random"]) == 32


def _backend_env(backend: Any, bundle: str, n: int) -> dict[str, Any]:
    spec = EnvSpec(env_id=f"bsnap-{os.getpid()}-{n}", function_name="snap",
                   function_version="$LATEST",
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:snap",
                   handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=30,
                   bundle_dir=bundle, uid=1000, gid=1000, cgroup_group="snap-microvm",
                   allow_unlimited=True)
    return invoke_once(backend, spec)[1]


@pytest.mark.slow
def test_the_backend_restores_jailed_environments_and_refuses_a_corrupt_snapshot(
        made: Any, tmp_path: Any) -> None:
    """Through ``MicrovmBackend(snapshots=True)``: the launcher's jailed QEMUs load the
    snapshot (``-incoming fd:``); two environments print different random bytes; with the
    state file corrupted, the next environment boots fresh and says why."""
    from cellcloud.microvm.backend import MicrovmBackend

    state = made[0]
    bundle = write_bundle(str(tmp_path / "bundle"), HANDLER)
    backend = MicrovmBackend(state, snapshots=True)
    backend.start()
    try:
        assert backend.snapshot is not None
        a = _backend_env(backend, bundle, 1)
        assert backend.last_start == "restored"
        b = _backend_env(backend, bundle, 2)
        assert backend.last_start == "restored"
        assert a["random"] != b["random"]
        _flip(backend.snapshot)
        try:
            c = _backend_env(backend, bundle, 3)
        finally:
            _flip(backend.snapshot)  # the module's snapshot, whole again
        assert backend.last_start.startswith("booted: ") and "SHA-256" in backend.last_start
        assert len(c["random"]) == 32
    finally:
        backend.close()


def _flip(snap: agentsnap.AgentSnapshot) -> None:
    flip_byte(snap.state, snap.state_bytes // 2)


@pytest.mark.slow
def test_a_snapshot_that_cannot_be_made_leaves_the_backend_booting_fresh(tmp_path: Any) -> None:
    """A save over ``microvm_snapshot_bytes_max``: the backend starts without a snapshot,
    says why, and its environments boot fresh."""
    import dataclasses

    from cellcloud.microvm.backend import MicrovmBackend

    bundle = write_bundle(str(tmp_path / "bundle"), HANDLER)
    limits = dataclasses.replace(DEFAULT_LIMITS, microvm_snapshot_bytes_max=1 << 20)
    backend = MicrovmBackend(str(tmp_path / "state"), snapshots=True, limits=limits)
    backend.start()
    try:
        assert backend.snapshot is None
        assert "microvm_snapshot_bytes_max" in backend.snapshot_error
        r = _backend_env(backend, bundle, 4)
        assert backend.last_start == "booted: no snapshot"
        assert len(r["random"]) == 32
    finally:
        backend.close()


def test_a_snapshot_that_fails_qemus_load_boots_the_environment_cold(made: Any,
                                                                     tmp_path: Any) -> None:
    """A state file cut in half whose manifest was re-digested passes ``verify`` but fails in
    the jailed QEMU's load (QEMU exits): the backend sees the channel end before the guest's
    first frame and starts the environment again, cold, instead of failing its create; the
    reason is QEMU's own words, and the status counts it."""
    from cellcloud.microvm import snapshot
    from cellcloud.microvm.backend import MicrovmBackend

    state, _, snap, _ = made
    bad = str(tmp_path / "truncated")
    shutil.copytree(snap.path, bad)
    state_path = os.path.join(bad, "state.bin")
    os.truncate(state_path, snap.state_bytes // 2)
    digest = snapshot.file_digest(state_path, bytes_max=DEFAULT_LIMITS.microvm_snapshot_bytes_max)
    assert digest is not None
    with open(os.path.join(bad, "manifest.json")) as f:
        doc = json.load(f)
    doc["state"] = digest.to_json()
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        json.dump(doc, f)
    bundle = write_bundle(str(tmp_path / "bundle"), HANDLER)
    backend = MicrovmBackend(state, snapshots=True)
    backend.start()
    try:
        truncated = agentsnap.AgentSnapshot(bad, snap.key, digest.size_bytes, 0, False)
        backend.snapshot = truncated
        backend.snapshots_by_mib = {snap.key.memory_mib: truncated}
        r = _backend_env(backend, bundle, 5)
        assert backend.last_start.startswith("booted: the restore failed in QEMU: "), \
            backend.last_start
        assert "migration" in backend.last_start or "load" in backend.last_start
        assert len(r["random"]) == 32
        info = backend.snapshot_info()
        assert (info["restore_failed"], info["restored"], info["booted"]) == (1, 0, 1)
        assert info["memory_mib"] == [snap.key.memory_mib]
    finally:
        backend.close()
