"""The microVM component's pure decisions (microvm/core.py): the acceleration choice, the image's
content address, the kernel pick, the console marker, QEMU's argv; and the image build on a
fake /boot (no root, no VM)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import pytest

from cellcloud.microvm import core
from cellcloud.microvm import image as image_mod

TIMEOUT = 15_000


def test_kvm_only_when_the_probe_guest_booted_in_time() -> None:
    d = core.decide_accel(core.ProbeOutcome("booted", 420), timeout_ms=TIMEOUT)
    assert (d.accel, d.probe.result) == ("kvm", "booted")
    assert "420 ms" in d.reason
    late = core.decide_accel(core.ProbeOutcome("booted", TIMEOUT + 1), timeout_ms=TIMEOUT)
    assert late.accel == "tcg"


@pytest.mark.parametrize("result", ["timeout", "exited", "no_device", "no_vmm", "error"])
def test_every_other_outcome_is_tcg_with_a_reason(result: Any) -> None:
    d = core.decide_accel(core.ProbeOutcome(result, 10, "emulation failure"), timeout_ms=TIMEOUT)
    assert d.accel == "tcg"
    assert "emulation failure" in d.reason
    assert d.to_json()["probe_result"] == result


def _inputs(**kw: str) -> core.ImageInputs:
    base = {"kernel_release": "6.1.0-56-cloud-amd64", "kernel_sha256": "a" * 64,
            "busybox_sha256": "b" * 64, "init_sha256": "c" * 64}
    return core.ImageInputs(**{**base, **kw})


def test_image_digest_is_the_digest_of_its_inputs() -> None:
    d = _inputs().digest()
    assert d == _inputs().digest()
    assert d.startswith("sha256:") and len(d) == 71
    for field in ("kernel_sha256", "busybox_sha256", "init_sha256"):
        assert _inputs(**{field: "d" * 64}).digest() != d, field
    assert _inputs(kernel_release="6.1.0-57-cloud-amd64").digest() != d
    assert dataclasses.replace(_inputs(), format="other/2").digest() != d
    assert core.image_dir_name(d) == d[len("sha256:"):]
    with pytest.raises(ValueError):
        core.image_dir_name("sha256:../../etc")
    with pytest.raises(AssertionError):
        _inputs(kernel_sha256="not-hex")


def test_pick_kernel_takes_the_newest_cloud_kernel() -> None:
    names = ["vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-56-cloud-amd64",
             "vmlinuz-6.12.0-1-amd64", "initrd.img-6.1.0-56-cloud-amd64",
             "vmlinuz-6.1.0-56-cloud-amd64.dpkg-tmp", "config-6.1.0-60-cloud-amd64"]
    assert core.pick_kernel(names) == "vmlinuz-6.1.0-56-cloud-amd64"
    assert core.pick_kernel(["vmlinuz-6.12.0-1-amd64"]) is None
    assert core.kernel_release("vmlinuz-6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"


def test_the_marker_must_be_a_whole_console_line() -> None:
    assert core.guest_release_from_console(f"{core.GUEST_MARKER} 6.1.0-56-cloud-amd64\r") == \
        "6.1.0-56-cloud-amd64"
    assert core.guest_release_from_console(f"[ 1.0] init: echo {core.GUEST_MARKER} x") is None
    assert core.guest_release_from_console(core.GUEST_MARKER) is None
    # /init prints the marker with the guest's own `uname -r`
    assert core.GUEST_MARKER.encode() in core.init_script()
    assert b"uname -r" in core.init_script()


def test_qemu_argv_has_no_default_devices_and_the_serial_console() -> None:
    argv = core.qemu_argv("/usr/bin/qemu-system-x86_64", "/i/vmlinuz", "/i/initramfs.cpio",
                          core.VmSpec(accel="tcg"))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-M") + 1] == "microvm"
    assert argv[argv.index("-serial") + 1] == "stdio"
    append = argv[argv.index("-append") + 1]
    assert "console=ttyS0" in append and "reboot=t" in append and "panic=-1" in append
    assert "-netdev" not in argv and "-device" not in argv
    # Under TCG the TSC frequency is declared (calibration against the PIT hangs under load)
    assert "tsc_early_khz=" in append
    kvm = core.qemu_argv("q", "k", "i", core.VmSpec(accel="kvm"))
    assert "tsc_early_khz=" not in kvm[kvm.index("-append") + 1]
    with pytest.raises(AssertionError):
        core.VmSpec(accel="hvf")  # type: ignore[arg-type]


def test_host_key_changes_with_what_the_probe_depends_on() -> None:
    base = {"nodename": "h", "host_release": "6.18", "qemu_version": "QEMU 7.2",
            "kvm_device": True, "image_digest": "sha256:" + "a" * 64}
    k = core.host_key(**base)  # type: ignore[arg-type]
    for name, other in (("nodename", "g"), ("host_release", "6.19"),
                        ("qemu_version", "QEMU 8.0"), ("kvm_device", False),
                        ("image_digest", "sha256:" + "b" * 64)):
        assert core.host_key(**{**base, name: other}) != k, name  # type: ignore[arg-type]


def _elf(interp: bool) -> bytes:
    # A minimal ELF64 header with one program header (PT_INTERP = 3 or PT_LOAD = 1).
    import struct

    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 32, 64)  # e_phoff
    struct.pack_into("<HH", hdr, 54, 56, 1)  # e_phentsize, e_phnum
    ph = bytearray(56)
    struct.pack_into("<I", ph, 0, 3 if interp else 1)
    return bytes(hdr + ph)


def test_static_elf_check() -> None:
    assert core.is_static_elf(_elf(interp=False))
    assert not core.is_static_elf(_elf(interp=True))
    assert not core.is_static_elf(b"#!/bin/sh\n" + b"\0" * 100)
    if os.path.exists("/bin/sh"):
        with open(os.path.realpath("/bin/sh"), "rb") as f:
            assert not core.is_static_elf(f.read())  # dash is dynamic


BUSYBOX = next((p for p in image_mod.BUSYBOX_PATHS if os.path.exists(p)), None)


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed (scripts/setup.sh)")
def test_image_build_is_content_addressed_and_cached(tmp_path: Any) -> None:
    import libarchive

    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-56-cloud-amd64").write_bytes(b"not really a kernel")
    state = str(tmp_path / "state")
    img, built = image_mod.build(state, boot_dir=str(boot))
    assert built and img.kernel_release == "6.1.0-56-cloud-amd64"
    again, built_again = image_mod.build(state, boot_dir=str(boot))
    assert (again, built_again) == (img, False)
    assert [i.digest for i in image_mod.list_images(state)] == [img.digest]
    with open(img.kernel, "rb") as f:
        assert f.read() == b"not really a kernel"
    with open(img.initrd, "rb") as f:
        assert f.read(6) == b"070701"  # cpio newc, what the kernel unpacks
    entries = {}
    with libarchive.file_reader(img.initrd) as archive:
        for e in archive:
            entries[e.pathname] = (e.isdir, e.ischr, e.mode & 0o7777, e.uid, e.gid, e.size,
                                   (e.rdevmajor, e.rdevminor) if e.ischr else None)
    assert entries["dev/console"][1] and entries["dev/console"][6] == (5, 1)
    assert entries["init"][2] == 0o755 and entries["init"][5] == len(core.init_script())
    assert entries["bin/busybox"][5] == os.path.getsize(BUSYBOX)
    assert all(v[3] == 0 and v[4] == 0 for v in entries.values())
    # The same inputs give the same bytes (entries owned by root, mtime 0), elsewhere too.
    twin, _ = image_mod.build(str(tmp_path / "twin"), boot_dir=str(boot))
    with open(twin.initrd, "rb") as a, open(img.initrd, "rb") as b:
        assert a.read() == b.read()
    # A different kernel is a different image, beside the first.
    (boot / "vmlinuz-6.1.0-57-cloud-amd64").write_bytes(b"a newer kernel")
    newer, built_newer = image_mod.build(state, boot_dir=str(boot))
    assert built_newer and newer.digest != img.digest
    assert sorted(i.digest for i in image_mod.list_images(state)) == sorted(
        [img.digest, newer.digest])
    # A folder without image.json (a crash mid-build) is not an image and is rebuilt.
    os.remove(os.path.join(newer.path, "image.json"))
    assert [i.digest for i in image_mod.list_images(state)] == [img.digest]
    assert image_mod.build(state, boot_dir=str(boot)) == (newer, True)
    shutil.rmtree(state)


def test_missing_packages_are_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(image_mod.ImageError, match="linux-image-cloud-amd64"):
        image_mod.build(str(tmp_path), boot_dir=str(tmp_path / "empty"))
