"""The boot shell (microvm/boot.py) against stand-in VMMs (small scripts given as ``qemu``):
the marker ends the wait, a silent guest is killed at the limit, an exiting VMM is reported
with its status, a flooding console is cut at its cap. No VM, no root."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core
from cellcloud.microvm.image import Image


def _vmm(tmp_path: Any, body: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


IMG = Image("sha256:" + "a" * 64, "/nonexistent", "6.1.0-56-cloud-amd64", 0)
SPEC = core.VmSpec(accel="tcg")


def _boot(qemu: str, timeout_ms: int = 60_000, **kw: Any) -> boot.BootResult:
    return asyncio.run(boot.boot(IMG, SPEC, timeout_ms=timeout_ms, qemu=qemu, **kw))


def test_marker_ends_the_wait_and_the_vmm_is_gone(tmp_path: Any) -> None:
    pidfile = tmp_path / "pid"
    qemu = _vmm(tmp_path, f'echo $$ > {pidfile}\necho "[ 0.1] booting"\n'
                f'echo "{core.GUEST_MARKER} 6.1.0-56-cloud-amd64"\nexec sleep 600\n')
    r = _boot(qemu)
    assert r.guest_release == "6.1.0-56-cloud-amd64" and not r.timed_out
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_silent_guest_is_killed_at_the_limit(tmp_path: Any) -> None:
    pidfile = tmp_path / "pid"
    qemu = _vmm(tmp_path, f"echo $$ > {pidfile}\necho 'tsc: Unable to calibrate'\n"
                "exec sleep 600\n")
    t0 = time.monotonic()
    r = _boot(qemu, timeout_ms=1_000)
    assert r.guest_release is None and r.timed_out
    assert time.monotonic() - t0 < 60
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_vmm_exiting_is_reported_with_its_status(tmp_path: Any) -> None:
    qemu = _vmm(tmp_path, "echo 'KVM: entry failed, hardware error' >&2\nexit 1\n")
    r = _boot(qemu)
    assert (r.guest_release, r.timed_out, r.exit_code) == (None, False, 1)
    assert "hardware error" in r.stderr_tail


def test_console_is_read_up_to_its_cap(tmp_path: Any) -> None:
    qemu = _vmm(tmp_path, "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done\n")
    limits = DEFAULT_LIMITS.__class__(microvm_console_bytes_max=64 * 1024)
    r = _boot(qemu, limits=limits)
    assert r.guest_release is None and not r.timed_out


def test_a_marker_quoted_mid_line_does_not_count(tmp_path: Any) -> None:
    qemu = _vmm(tmp_path, f'echo "init: {core.GUEST_MARKER} 9.9"\n'
                f'echo "{core.GUEST_MARKER} 6.1.0"\nexec sleep 600\n')
    assert _boot(qemu).guest_release == "6.1.0"


def test_probe_outcomes_from_the_shell(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(boot, "_kvm_usable", lambda: True)
    booted = _vmm(tmp_path, f'echo "{core.GUEST_MARKER} 6.1.0"\nexec sleep 600\n')
    out = asyncio.run(boot.run_probe(IMG, qemu=booted))
    assert out.result == "booted"
    assert core.decide_accel(out, timeout_ms=DEFAULT_LIMITS.microvm_probe_timeout_ms).accel == \
        "kvm"
    dies = _vmm(tmp_path, "echo 'emulation failure' >&2\nexit 1\n")
    out = asyncio.run(boot.run_probe(IMG, qemu=dies))
    assert out.result == "exited" and "emulation failure" in out.detail
    monkeypatch.setattr(boot, "_kvm_usable", lambda: False)
    assert asyncio.run(boot.run_probe(IMG, qemu=booted)).result == "no_device"
