"""A function version's snapshot (SnapStart's mechanism, issue #18), at host level: the agent
guest boots with the version's bundle, runs its init once (the handler module imported) and is
saved; two copies restored from it each take a restore frame (a fresh seed and the host's
clock, applied by the guest's root helper; Python's ``random`` reseeded) and answer with
status 0, then serve invocations with the init done before the snapshot (the same
module-level value in both) but different random bytes, different ``random.random()`` and the
host's clock. A state with a flipped byte is refused (the caller boots cold)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import agentsnap, boot, core, image, snapshot
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel
from tests.integration.microvm_envs import (
    NEEDS_GUEST,
    flipped_copy,
    invoke_once,
    invoke_ready,
    write_bundle,
)

pytestmark = NEEDS_GUEST

VM = core.VmSpec(accel="tcg", memory_mib=DEFAULT_LIMITS.microvm_guest_memory_mib_min)
HANDLER = ("import os, random, time\n"
           "from snapshot_restore_py import register_after_restore, register_before_snapshot\n"
           "INIT = os.urandom(8).hex()\n"
           "INIT_AT = time.time()\n"
           "HOOKS = []\n"
           "@register_before_snapshot\n"
           "def first():\n"
           "    HOOKS.append('before-1')\n"
           "register_before_snapshot(HOOKS.append, 'before-2')\n"
           "@register_after_restore\n"
           "def after():\n"
           "    HOOKS.append('after:' + os.urandom(4).hex())\n"
           "def handler(event, context):\n"
           "    return {'init': INIT, 'init_at': INIT_AT, 'random': os.urandom(16).hex(),\n"
           "            'py_random': random.random(), 'now': time.time(), 'hooks': HOOKS}\n")
VERSION = "arn:aws:lambda:cc-local-1:000000000000:function:snapstart:1 sha256-test"


def _spec(bundle: str) -> EnvSpec:
    return EnvSpec(env_id="snapstart-1", function_name="snapstart", function_version="1",
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:snapstart:1",
                   handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=30,
                   bundle_dir=bundle, uid=1000, gid=1000, cgroup_group="snapstart",
                   allow_unlimited=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory: Any) -> tuple[Any, agentsnap.VersionSnapshot, str, float]:
    state = str(tmp_path_factory.mktemp("microvm-snapstart"))
    bundle = write_bundle(os.path.join(state, "bundle"), HANDLER)
    img = image.ensure_agent(state)
    qemu = boot.qemu_binary()
    assert qemu is not None
    before = time.time()
    snap = asyncio.run(agentsnap.create_version(state, img, VM, spec_wire=_spec(bundle).to_wire(),
                                                bundle_dir=bundle, version_id=VERSION,
                                                qemu=qemu))
    assert snap.built and snap.state_bytes > 0 and snap.init_ms > 0
    again = asyncio.run(agentsnap.create_version(state, img, VM,
                                                 spec_wire=_spec(bundle).to_wire(),
                                                 bundle_dir=bundle, version_id=VERSION,
                                                 qemu=qemu))
    assert (again.path, again.built) == (snap.path, False)  # cached by its key
    return img, snap, qemu, before


def restored_invoke(path: str, img: Any, qemu: str) -> tuple[int, dict[str, Any]]:
    ours, theirs = socket.socketpair()

    async def go() -> tuple[int, dict[str, Any]]:
        st = await agentsnap.start_version(path, img, VM, version_id=VERSION, chan=theirs,
                                           qemu=qemu)
        theirs.close()
        try:
            ours.sendall(agentsnap.restore_frame())
            chan = StreamChannel(ours, 64 << 20)  # type: ignore[arg-type]
            ours.settimeout(120)
            restored = await asyncio.to_thread(chan.recv)
            # answered as an environment after its init: ready, with the init's duration
            assert restored and restored.get("t") == "ready", restored
            assert restored["init_error"] is None and restored["init_ms"] > 0, restored
            return int(restored["restored"]), await invoke_ready(
                chan, "arn:aws:lambda:cc-local-1:000000000000:function:snapstart:1")
        finally:
            ours.close()
            await st.guest.close()

    return asyncio.run(go())


def test_restored_copies_share_the_init_and_get_fresh_randomness_and_clock(made: Any) -> None:
    img, snap, qemu, before = made
    restored_at = time.time()
    sa, a = restored_invoke(snap.path, img, qemu)
    sb, b = restored_invoke(snap.path, img, qemu)
    assert (sa, sb) == (0, 0)  # seed credited, CRNG rekeyed, clock set: all done
    assert a["init"] == b["init"] and a["init_at"] == b["init_at"]  # one init, before the save
    assert before - 1 <= a["init_at"] <= restored_at + 1
    assert a["random"] != b["random"] and a["py_random"] != b["py_random"]
    # SnapStart's runtime hooks: before the snapshot in reverse order of registration, once;
    # after each restore, in that copy (its own random bytes: after the reseed).
    assert a["hooks"][:2] == b["hooks"][:2] == ["before-2", "before-1"]
    assert len(a["hooks"]) == len(b["hooks"]) == 3 and a["hooks"][2] != b["hooks"][2]
    for r in (a, b):
        assert restored_at - 1 <= r["now"] <= time.time() + 1


def test_a_before_snapshot_hook_that_raises_makes_no_snapshot(made: Any,
                                                              tmp_path: Any) -> None:
    img, _, qemu, _ = made
    bundle = write_bundle(str(tmp_path / "bundle"),
                          "from snapshot_restore_py import register_before_snapshot\n"
                          "@register_before_snapshot\n"
                          "def no():\n"
                          "    raise ValueError('not now')\n"
                          "def handler(event, context):\n"
                          "    return 1\n")
    with pytest.raises(snapshot.SnapshotError, match="BeforeSnapshotError.*not now"):
        asyncio.run(agentsnap.create_version(str(tmp_path), img, VM,
                                             spec_wire=_spec(bundle).to_wire(),
                                             bundle_dir=bundle, version_id=VERSION + " hooks",
                                             qemu=qemu))
    assert not os.listdir(agentsnap.version_snapshots_dir(str(tmp_path)))  # nothing kept


def test_a_flipped_byte_in_the_version_snapshot_is_refused(made: Any, tmp_path: Any) -> None:
    img, snap, qemu, _ = made
    bad = flipped_copy(snap.path, str(tmp_path / "snap"), snap.state_bytes)
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(snapshot.SnapshotError, match="SHA-256"):
            asyncio.run(agentsnap.start_version(bad, img, VM, version_id=VERSION, chan=theirs,
                                                qemu=qemu))
        with pytest.raises(snapshot.SnapshotError, match="another|differ|key|image"):
            asyncio.run(agentsnap.start_version(snap.path, img, VM, version_id=VERSION + "x",
                                                chan=theirs, qemu=qemu))
    finally:
        ours.close()
        theirs.close()


def _backend_env(backend: Any, bundle: str, n: int, snapstart: str) -> dict[str, Any]:
    spec = EnvSpec(env_id=f"ss-{os.getpid()}-{n}", function_name="snapstart",
                   function_version="1",
                   function_arn="arn:aws:lambda:cc-local-1:000000000000:function:snapstart:1",
                   handler="app.handler", runtime="python3.11", memory_mb=128, timeout_s=30,
                   bundle_dir=bundle, uid=1000 + n, gid=1000 + n, cgroup_group="snapstart-vm",
                   allow_unlimited=True, snapstart=snapstart)

    ready, out = invoke_once(backend, spec)
    return {**out, "restored": ready.get("restored")}


@pytest.mark.slow
def test_the_backend_restores_a_snapstart_version_through_the_jailer(tmp_path: Any) -> None:
    """``MicrovmBackend``: a spec with ``snapstart`` makes the version's snapshot through the
    launcher (jailed) on its first environment and restores every environment from it; one
    whose init fails boots cold and the status says why."""
    from cellcloud.microvm.backend import MicrovmBackend

    bundle = write_bundle(str(tmp_path / "bundle"), HANDLER)
    broken = write_bundle(str(tmp_path / "broken"), "raise RuntimeError('init fails')\n")
    backend = MicrovmBackend(str(tmp_path / "state"))
    backend.start()
    try:
        a = _backend_env(backend, bundle, 1, VERSION)
        assert backend.last_start == "restored"
        b = _backend_env(backend, bundle, 2, VERSION)
        assert backend.last_start == "restored"
        assert (a["restored"], b["restored"]) == (0, 0)
        assert a["init"] == b["init"] and a["random"] != b["random"]
        info = backend.snapshot_info()
        assert (info["version_restored"], info["version_snapshots"]) == (2, 1), info
        with pytest.raises(AssertionError, match="init fails"):
            _backend_env(backend, broken, 3, VERSION + " broken")
        assert backend.last_start == "booted: no snapshot"
        assert "init fails" in str(backend.snapshot_info()["version_errors"])
    finally:
        backend.close()
