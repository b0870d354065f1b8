"""The VMM jailer's plan, sans-IO: what the jail around one QEMU holds and allows (Firecracker's
jailer, docs/jailer.md there, is the model). ``plan`` turns a ``JailSpec`` into the cgroup's
limits, the files bound read-only into the chroot (under ``/vm``), the devices, and QEMU's argv
with the host's paths replaced by the chroot's. ``jailer.py`` carries the plan out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..core.limits import Limits
from . import core

MiB = 1024 * 1024
JAIL_VM_DIR = "/vm"  # the chroot's folder of the guest's files (kernel, initramfs)
# Host trees bound read-only into the chroot: QEMU runs from the host's /usr (its binary, its
# libraries, its firmware in /usr/share/qemu); on a merged-/usr host /bin, /lib and /lib64 are
# symlinks into it, recreated as such in the chroot.
SYSTEM_TREES = ("/usr",)
MERGED_USR_LINKS = (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                    ("lib64", "usr/lib64"))
DEVICES = ("null", "zero", "urandom", "random")
_VM_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class JailSpec:
    vm_id: str  # names the cgroup and the chroot; [a-z0-9-]
    uid: int  # unprivileged, unique to the VM
    gid: int
    memory_mib: int  # the guest's memory (QEMU's -m)
    vcpus: int
    accel: str  # "kvm" binds /dev/kvm into the chroot, "tcg" does not
    files: tuple[str, ...]  # host paths bound read-only at /vm/<basename>
    cgroup_group: str = "microvm"
    kvm_gid: int | None = None  # the group that may open /dev/kvm (a supplementary group)

    def __post_init__(self) -> None:
        assert _VM_ID.fullmatch(self.vm_id), self.vm_id
        assert self.uid > 0 and self.gid > 0, "the VMM never runs as root"
        assert self.memory_mib > 0 and self.vcpus > 0
        assert self.accel in ("kvm", "tcg")
        names = [f.rsplit("/", 1)[-1] for f in self.files]
        assert len(set(names)) == len(names), "two files with one name"
        assert all(f.startswith("/") for f in self.files)

    @classmethod
    def for_guest(cls, vm_id: str, *, uid: int, gid: int, spec: core.VmSpec, kernel: str,
                  initrd: str, kvm_gid: int | None = None) -> JailSpec:
        return cls(vm_id, uid, gid, spec.memory_mib, spec.vcpus, spec.accel, (kernel, initrd),
                   kvm_gid=kvm_gid)


@dataclass(frozen=True)
class JailPlan:
    spec: JailSpec
    memory_bytes: int  # the cgroup's memory limit: the guest's memory + the VMM's overhead
    pids_max: int
    cpu_quota_us: int  # per cpu_period_us
    cpu_period_us: int
    cpu_weight_mb: int  # the cgroup's CPU weight, as for a function of this much memory
    binds: tuple[tuple[str, str], ...]  # (host path, chroot path), read-only
    devices: tuple[str, ...]  # /dev/<name> bound into the chroot's /dev
    argv: tuple[str, ...]  # QEMU's argv inside the chroot
    groups: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {"vm_id": s.vm_id, "uid": s.uid, "gid": s.gid, "groups": list(self.groups),
                "cgroup_group": s.cgroup_group, "memory_bytes": self.memory_bytes,
                "cpu_weight_mb": self.cpu_weight_mb, "pids_max": self.pids_max,
                "cpu_quota_us": self.cpu_quota_us, "binds": [list(b) for b in self.binds],
                "devices": list(self.devices), "argv": list(self.argv)}


def plan(spec: JailSpec, argv: list[str], limits: Limits) -> JailPlan:
    """The jail for one VMM started with ``argv`` (host paths): the cgroup's limits (memory: the
    guest's plus ``microvm_vmm_overhead_mib``, measured; pids; CPU: one period per vCPU plus
    one for QEMU's own threads, a full weight per vCPU), the binds and QEMU's argv with each bound file's host path
    replaced by its chroot path. A file of ``argv`` that is not bound stays outside: refused."""
    binds = tuple((f, f"{JAIL_VM_DIR}/{f.rsplit('/', 1)[-1]}") for f in spec.files)
    where = dict(binds)
    out = [argv[0]]
    for a in argv[1:]:
        out.append(where.get(a, a))
    for flag in ("-kernel", "-initrd"):
        if flag in out:
            path = out[out.index(flag) + 1]
            if not path.startswith(JAIL_VM_DIR + "/"):
                raise ValueError(f"{flag} {path} is not bound into the jail")
    if "-m" in argv and argv[argv.index("-m") + 1] != str(spec.memory_mib):
        raise ValueError(f"QEMU's -m {argv[argv.index('-m') + 1]} is not the jail's "
                         f"{spec.memory_mib} MiB")
    if not any(argv[0].startswith(t + "/") for t in SYSTEM_TREES):
        raise ValueError(f"{argv[0]} is not under {SYSTEM_TREES}: not reachable in the jail")
    devices = DEVICES + (("kvm",) if spec.accel == "kvm" else ())
    groups = (spec.kvm_gid,) if spec.accel == "kvm" and spec.kvm_gid is not None else ()
    period = limits.env_cpu_period_us
    return JailPlan(
        spec=spec,
        memory_bytes=(spec.memory_mib + limits.microvm_vmm_overhead_mib) * MiB,
        pids_max=limits.microvm_vmm_pids_max,
        cpu_quota_us=(spec.vcpus + 1) * period,
        cpu_period_us=period,
        # A full weight per vCPU (the jail's weight follows memory, one vCPU per
        # memory_mb_per_vcpu): a 128 MiB guest is not starved of its one vCPU under contention.
        cpu_weight_mb=spec.vcpus * limits.memory_mb_per_vcpu,
        binds=binds,
        devices=devices,
        argv=tuple(out),
        groups=groups,
    )
