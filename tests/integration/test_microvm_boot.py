"""microVM guest image and acceleration probe on the real host (root: the Debian kernel in
/boot is readable by root only). The guest boots under TCG to /init, which prints a marker and
the guest kernel's `uname -r` on the serial console; that kernel is not the host's."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core, image
from cellcloud.microvm_cli import status_field

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
]


def _cli(state: str, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "cellcloud", "microvm", *args, "--json",
                          "--state-dir", state], capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def built(tmp_path_factory: Any) -> tuple[str, image.Image]:
    state = str(tmp_path_factory.mktemp("microvm-state"))
    doc = _cli(state, "image", "build")
    assert doc["built"] is True
    img = image.ensure(state)
    assert img.digest == doc["digest"]
    return state, img


def test_image_build_then_ls_from_the_cli(built: tuple[str, image.Image]) -> None:
    state, img = built
    again = _cli(state, "image", "build")
    assert (again["digest"], again["built"]) == (img.digest, False)  # cached by its digest
    listed = _cli(state, "image", "ls")
    assert [d["digest"] for d in listed] == [img.digest]
    assert listed[0]["kernel_release"].endswith("-cloud-amd64")


def test_guest_boots_under_tcg_with_its_own_kernel(built: tuple[str, image.Image]) -> None:
    _, img = built
    r = asyncio.run(boot.boot(img, core.VmSpec(accel="tcg"),
                              timeout_ms=DEFAULT_LIMITS.microvm_boot_timeout_ms))
    assert r.guest_release is not None, (r.console_tail, r.stderr_tail)
    assert r.guest_release == img.kernel_release
    assert r.guest_release != os.uname().release  # the guest's kernel, not the host's
    print(f"microvm TCG boot to /init's marker: {r.elapsed_ms} ms, load {os.getloadavg()}")


def test_probe_has_a_time_limit_and_is_cached(built: tuple[str, image.Image]) -> None:
    state, img = built
    limits = DEFAULT_LIMITS.__class__(microvm_probe_timeout_ms=5_000)
    t0 = time.monotonic()
    record, cached = boot.probe(state, img, limits=limits)
    took = time.monotonic() - t0
    assert not cached
    # The probe ends by its limit (plus QEMU's start and kill), whatever KVM does.
    assert took < 5 + 60, took
    assert record["accel"] in ("kvm", "tcg")
    assert (record["accel"] == "kvm") == (record["probe_result"] == "booted")
    # (On the development machine, a nested PVM KVM, this is TCG: the guest hangs under KVM.)
    print(f"probe: {record['accel']} ({record['reason']}) in {took:.1f} s")
    # The CLI finds the same host's record in the cache, and status shows it.
    doc = _cli(state, "probe")
    assert doc["cached"] is True and doc["accel"] == record["accel"]
    shown = status_field(state)
    assert shown is not None and shown["accel"] == record["accel"]
