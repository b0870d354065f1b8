"""The VMM jailer's plan (microvm/jailcore.py): the cgroup's limits from the guest's size, the
files bound into the chroot and QEMU's argv rewritten to them, and what the plan refuses."""

from __future__ import annotations

import dataclasses

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import core, jailcore

SPEC = core.VmSpec(accel="tcg", memory_mib=256, vcpus=2)
K, INITRD = "/state/microvm/images/ab/vmlinuz", "/state/microvm/images/ab/initramfs.cpio"
ARGV = core.qemu_argv("/usr/bin/qemu-system-x86_64", K, INITRD, SPEC)


def _spec(**kw: object) -> jailcore.JailSpec:
    base = jailcore.JailSpec.for_guest("vm-1", uid=300_001, gid=300_001, spec=SPEC, kernel=K,
                                       initrd=INITRD)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_plan_limits_binds_and_argv() -> None:
    p = jailcore.plan(_spec(), ARGV, DEFAULT_LIMITS)
    assert p.memory_bytes == (256 + DEFAULT_LIMITS.microvm_vmm_overhead_mib) * 2**20
    assert p.pids_max == DEFAULT_LIMITS.microvm_vmm_pids_max
    assert p.cpu_quota_us == 3 * DEFAULT_LIMITS.env_cpu_period_us  # two vCPUs + QEMU's own
    assert p.binds == ((K, "/vm/vmlinuz"), (INITRD, "/vm/initramfs.cpio"))
    argv = list(p.argv)
    assert argv[argv.index("-kernel") + 1] == "/vm/vmlinuz"
    assert argv[argv.index("-initrd") + 1] == "/vm/initramfs.cpio"
    assert K not in argv and INITRD not in argv
    assert "kvm" not in p.devices and p.groups == ()  # TCG: no /dev/kvm in the jail
    kvm = jailcore.plan(_spec(accel="kvm", kvm_gid=993),
                        core.qemu_argv("/usr/bin/qemu-system-x86_64", K, INITRD,
                                       dataclasses.replace(SPEC, accel="kvm")), DEFAULT_LIMITS)
    assert "kvm" in kvm.devices and kvm.groups == (993,)


def test_plan_refuses_what_the_jail_cannot_hold() -> None:
    with pytest.raises(ValueError, match="not bound"):  # the kernel would be outside the jail
        jailcore.plan(_spec(files=(INITRD,)), ARGV, DEFAULT_LIMITS)
    with pytest.raises(ValueError, match="not under"):  # a VMM outside the bound /usr
        jailcore.plan(_spec(), ["/opt/qemu", *ARGV[1:]], DEFAULT_LIMITS)
    with pytest.raises(ValueError, match="-m"):  # the cgroup must be sized for the guest
        jailcore.plan(_spec(memory_mib=128), ARGV, DEFAULT_LIMITS)
    with pytest.raises(AssertionError):
        _spec(uid=0)  # never root
    with pytest.raises(AssertionError):
        _spec(vm_id="../x")
