"""Snapshot and restore of a microVM guest under TCG (root: the Debian kernel in /boot is
readable by root only). One snapshot of the snapshot guest booted to its marker; two restores
of it take the host's fresh seed into the kernel's pool and reseed the CRNG (the guest reports
the helper's status), answer with different random bytes and keep the clock the host sent; a
snapshot with one flipped byte is refused by its digest and the guest boots fresh instead."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from typing import Any

import pytest

from cellcloud.microvm import boot, core, snapshot
from tests.integration.microvm_envs import flipped_copy

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
]

SPEC = core.VmSpec(accel="tcg")


@pytest.fixture(scope="module")
def made(tmp_path_factory: Any) -> tuple[str, Any, snapshot.Snapshot]:
    state = str(tmp_path_factory.mktemp("microvm-snap"))
    img = snapshot.snapshot_image(state)
    snap = asyncio.run(snapshot.create(state, img, SPEC))
    assert snap.built and snap.state_bytes > 0
    again = asyncio.run(snapshot.create(state, img, SPEC))  # cached by its key
    assert (again.path, again.built) == (snap.path, False)
    return state, img, snap


async def _start(path: str | None, img: Any) -> snapshot.Started:
    st = await snapshot.start_guest(path, img, SPEC)
    await st.guest.close()
    return st


def test_two_restores_of_one_snapshot_get_fresh_identities(made: Any) -> None:
    _, img, snap = made
    before = int(time.time())
    a = asyncio.run(_start(snap.path, img))
    b = asyncio.run(_start(snap.path, img))
    for st in (a, b):
        assert (st.how, st.reason) == ("restored", "digests match")
        assert st.fresh.reseed_status == 0  # RNDADDENTROPY and RNDRESEEDCRNG succeeded
        # The guest set its clock to the host's (it was saved minutes ago, at boot time).
        assert before <= st.fresh.guest_epoch_s <= int(time.time()) + 1
    assert a.fresh.random_hex != b.fresh.random_hex
    print(f"restores: {a.ready_ms} ms, {b.ready_ms} ms (verify {a.verify_ms} ms), "
          f"load {os.getloadavg()}")


def test_a_flipped_byte_is_refused_and_the_guest_boots_fresh(made: Any, tmp_path: Any) -> None:
    _, img, snap = made
    bad = flipped_copy(snap.path, str(tmp_path / "snap"), snap.state_bytes)
    st = asyncio.run(_start(bad, img))
    assert st.how == "booted"
    assert "state file's SHA-256" in st.reason
    assert len(st.fresh.random_hex) == 32 and st.fresh.reseed_status == 0


def test_a_state_that_passes_its_digest_but_does_not_load_boots_fresh(made: Any,
                                                                       tmp_path: Any) -> None:
    """The fallback behind the digest: a truncated state whose manifest was rewritten to match
    (no digest can catch that) fails in QEMU's load, and the guest boots fresh."""
    _, img, snap = made
    bad = str(tmp_path / "snap")
    shutil.copytree(snap.path, bad)
    state = os.path.join(bad, "state.bin")
    with open(state, "r+b") as f:
        f.truncate(snap.state_bytes // 2)
    with open(os.path.join(bad, "manifest.json")) as f:
        doc = json.load(f)
    doc["state"] = snapshot.file_digest(state, bytes_max=snap.state_bytes).to_json()  # type: ignore[union-attr]
    with open(os.path.join(bad, "manifest.json"), "w") as f:
        json.dump(doc, f)
    st = asyncio.run(_start(bad, img))
    assert st.how == "booted"
    assert st.reason.startswith("the restore failed"), st.reason
    assert st.fresh.reseed_status == 0
