"""The microVM component's decisions, sans-IO: the guest image's content address and layout,
the kernel to use, the VMM's command line, reading the guest's serial console, and the choice
of acceleration from a probe's outcome.

Nothing here opens a file, starts a process or reads a clock: the shells (``image.py``,
``boot.py``) read the inputs, run QEMU and pass what they saw (and the time) in.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Literal

from ..core.limits import DEFAULT_LIMITS

# Bump when the image's layout or /init changes meaning: it is part of every image's digest.
IMAGE_FORMAT = "cellcloud-microvm-image/1"

# /init prints this, a space and the guest kernel's `uname -r` on the serial console (8250).
GUEST_MARKER = "CELLCLOUD-GUEST-UP"

Accel = Literal["kvm", "tcg"]


def init_script() -> bytes:
    """The guest's /init: busybox only, no symlinks needed. It mounts /proc and /sys, prints
    the marker with the guest kernel's release and powers the guest off (``reboot=t`` on the
    kernel command line plus QEMU's ``-no-reboot`` make the reset end QEMU)."""
    return (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox mount -t sysfs sysfs /sys\n"
        f'/bin/busybox echo "{GUEST_MARKER} $(/bin/busybox uname -r)"\n'
        "/bin/busybox sync\n"
        "/bin/busybox reboot -f\n"
    ).encode()


@dataclass(frozen=True)
class Entry:
    """One entry of the initramfs (cpio newc): a directory, a character device or a file."""

    path: str
    kind: Literal["dir", "chardev", "file"]
    mode: int
    source: str = ""  # for "file": the name of the image input it holds
    rdev: tuple[int, int] = (0, 0)  # for "chardev": (major, minor)


def initramfs_layout() -> list[Entry]:
    """The initramfs, in archive order: parents before children, /init last."""
    return [
        Entry("bin", "dir", 0o755),
        Entry("dev", "dir", 0o755),
        Entry("proc", "dir", 0o555),
        Entry("sys", "dir", 0o555),
        Entry("tmp", "dir", 0o1777),
        Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
        Entry("dev/null", "chardev", 0o666, rdev=(1, 3)),
        Entry("bin/busybox", "file", 0o755, source="busybox"),
        Entry("init", "file", 0o755, source="init"),
    ]


def is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without a program interpreter (PT_INTERP): it runs in a guest
    that holds no dynamic loader or libraries."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phentsize < 4 or e_phoff + e_phnum * e_phentsize > len(data):
        return False
    return all(struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] != 3  # PT_INTERP
               for i in range(e_phnum))


@dataclass(frozen=True)
class ImageInputs:
    """What an image is made of, by content: its digest is the digest of these."""

    kernel_release: str
    kernel_sha256: str
    busybox_sha256: str
    init_sha256: str
    format: str = IMAGE_FORMAT

    def __post_init__(self) -> None:
        for name in ("kernel_sha256", "busybox_sha256", "init_sha256"):
            assert re.fullmatch(r"[0-9a-f]{64}", getattr(self, name)), name
        assert self.kernel_release and "/" not in self.kernel_release

    def digest(self) -> str:
        """``sha256:<hex>`` over the canonical JSON of the inputs (stable key order)."""
        doc = json.dumps(
            {
                "format": self.format,
                "kernel_release": self.kernel_release,
                "kernel_sha256": self.kernel_sha256,
                "busybox_sha256": self.busybox_sha256,
                "init_sha256": self.init_sha256,
                "initramfs": [[e.path, e.kind, e.mode, e.source, list(e.rdev)]
                              for e in initramfs_layout()],
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def image_dir_name(digest: str) -> str:
    """The image's folder under ``<state>/microvm/images/``."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise ValueError(f"not an image digest: {digest!r}")
    return hexpart


_CLOUD_KERNEL = re.compile(r"vmlinuz-(\d+)\.(\d+)\.(\d+)-(\d+)-cloud-amd64")


def pick_kernel(names: list[str]) -> str | None:
    """The newest Debian cloud kernel among the file names of ``/boot`` (``vmlinuz-6.1.0-56-
    cloud-amd64``), by version then ABI number; None when there is none."""
    best: tuple[tuple[int, ...], str] | None = None
    for name in names:
        m = _CLOUD_KERNEL.fullmatch(name)
        if not m:
            continue
        key = tuple(int(g) for g in m.groups())
        if best is None or key > best[0]:
            best = (key, name)
    return best[1] if best else None


def kernel_release(vmlinuz_name: str) -> str:
    assert vmlinuz_name.startswith("vmlinuz-"), vmlinuz_name
    return vmlinuz_name[len("vmlinuz-"):]


@dataclass(frozen=True)
class VmSpec:
    accel: Accel
    machine: str = "microvm"  # QEMU's minimal machine; boots under TCG here with reboot=t
    memory_mib: int = 128
    vcpus: int = 1

    def __post_init__(self) -> None:
        assert self.accel in ("kvm", "tcg")
        assert self.machine in ("microvm", "pc")
        assert 64 <= self.memory_mib <= 16_384
        assert 1 <= self.vcpus <= 64


def kernel_cmdline(spec: VmSpec) -> str:
    """8250 console on ttyS0; a panic or a reset ends the guest at once (``panic=-1`` and
    ``reboot=t``: a triple fault, which ``-no-reboot`` turns into QEMU's exit on every
    machine, where ``-M microvm`` has no other reset QEMU honours)."""
    args = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
    if spec.accel == "tcg":
        args += TCG_CLOCK_ARGS
    return " ".join(args)


# Under TCG the emulated PIT runs at the host's pace, so on a loaded host the guest's TSC
# calibration against it fails ("tsc: Unable to calibrate against PIT"); ``-M microvm`` has no
# HPET or PM timer to fall back on, and the boot then hangs (3 of 6 boots at load ~2.5 here).
# A declared TSC frequency skips the calibration (8 of 8 boots); the guest's clock may run at
# the wrong rate, which nothing in it relies on yet. Under KVM the guest has kvm-clock.
TCG_CLOCK_ARGS = ["tsc_early_khz=2500000", "tsc=reliable", "no_timer_check"]


def qemu_argv(qemu: str, kernel: str, initrd: str, spec: VmSpec) -> list[str]:
    """QEMU's argv: no default devices, no config files, no display, no network, the serial
    console on stdio (the shell gives it /dev/null as stdin), no monitor."""
    return [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-accel", spec.accel,
        "-M", spec.machine,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-no-reboot",
        "-serial", "stdio",
        "-kernel", kernel,
        "-initrd", initrd,
        "-append", kernel_cmdline(spec),
    ]


def guest_release_from_console(line: str) -> str | None:
    """The guest kernel's release when ``line`` is /init's marker line, else None. The marker
    must start the line (a kernel message quoting it does not count)."""
    m = re.fullmatch(re.escape(GUEST_MARKER) + r" (\S+)\s*", line)
    return m.group(1) if m else None


# -- the acceleration probe ----------------------------------------------------------------

ProbeResult = Literal["booted", "timeout", "exited", "no_device", "no_vmm", "error"]


@dataclass(frozen=True)
class ProbeOutcome:
    """What the shell saw when it tried to boot a guest under KVM."""

    result: ProbeResult
    elapsed_ms: int = 0
    detail: str = ""  # QEMU's last stderr line, the exit status, the exception

    def __post_init__(self) -> None:
        assert self.elapsed_ms >= 0


@dataclass(frozen=True)
class AccelDecision:
    accel: Accel
    reason: str
    probe: ProbeOutcome = field(default_factory=lambda: ProbeOutcome("error"))

    def to_json(self) -> dict[str, object]:
        return {"accel": self.accel, "reason": self.reason, "probe_result": self.probe.result,
                "probe_elapsed_ms": self.probe.elapsed_ms, "probe_detail": self.probe.detail}


def decide_accel(outcome: ProbeOutcome, *, timeout_ms: int) -> AccelDecision:
    """KVM only when the probe guest really booted to its marker in time; TCG otherwise.

    ``/dev/kvm`` existing is not enough: on this machine it is a nested PVM that runs stock
    kernels into an emulation failure (QEMU exits) or a hang (the time limit)."""
    if outcome.result == "booted":
        if outcome.elapsed_ms <= timeout_ms:
            return AccelDecision("kvm", f"a KVM guest booted in {outcome.elapsed_ms} ms", outcome)
        return AccelDecision("tcg", f"the KVM guest booted only after {outcome.elapsed_ms} ms "
                             f"(limit {timeout_ms} ms)", outcome)
    reasons = {
        "no_device": "no usable /dev/kvm",
        "no_vmm": "no QEMU on this host",
        "timeout": f"the KVM guest printed no marker within {timeout_ms} ms",
        "exited": "QEMU under KVM exited before the guest's marker",
        "error": "the KVM probe failed",
    }
    reason = reasons[outcome.result]
    if outcome.detail:
        reason += f" ({outcome.detail})"
    return AccelDecision("tcg", reason, outcome)


def host_key(*, nodename: str, host_release: str, qemu_version: str, kvm_device: bool,
             image_digest: str) -> str:
    """A probe result holds for this host, kernel, QEMU, /dev/kvm and guest image; any change
    asks for a new probe."""
    doc = json.dumps([nodename, host_release, qemu_version, kvm_device, image_digest])
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


# -- the agent image: the guest agent over virtio-serial (docs/microvm.md) ------------------

# Bump when the agent initramfs's layout, its /init or the runtime disk's layout changes.
AGENT_FORMAT = "cellcloud-microvm-agent/3"  # 2: virtio_net, /etc/resolv.conf; 3: /rtx

# The virtserialport the host agent's channel is plugged into (/sys/class/virtio-ports/*/name).
AGENT_PORT_NAME = "cellcloud.agent"

# Kernel modules the agent guest needs (the cloud kernel builds them as modules): the
# virtio-mmio transport of ``-M microvm`` (or PCI's for ``-M pc``), the console's ports (the
# channel), the block devices (the runtime disk and the bundle) and the network device (only
# an environment with egress has one; the driver is loaded in every guest).
GUEST_MODULES = ("virtio_mmio", "virtio_pci", "virtio_console", "virtio_blk", "virtio_net")

# Where the runtime disk keeps cellcloud's guest code and the few packages it imports.
GUEST_PYLIB = "/pylib"


def module_load_order(modules_dep: str, wanted: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """The ``.ko`` paths (relative to ``/lib/modules/<release>``) to insmod, every module after
    the ones it depends on, each once, from the text of ``modules.dep``. Raises ``KeyError``
    naming a wanted module the kernel does not ship."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if not sep:
            continue
        deps[path] = rest.split()
        base = path.rsplit("/", 1)[-1]
        by_name[base.split(".ko", 1)[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str, depth: int) -> None:
        assert depth < 64, "modules.dep has a cycle"
        if path in order:
            return
        # modules.dep lists a module's dependencies with the deepest last.
        for dep in reversed(deps.get(path, [])):
            visit(dep, depth + 1)
        order.append(path)

    for name in wanted:
        visit(by_name[name], 0)
    return order


def agent_init_script(module_paths: list[str]) -> bytes:
    """The agent guest's /init (busybox): the modules in order, the runtime disk (the first
    block device) read-only as the new root, then the guest agent (``microvm/guest_vm.py``)
    in it as pid 1's only child; when it ends the guest powers off. A failing step is printed
    on the console and ends the guest."""
    lines = [
        "#!/bin/busybox sh",
        "B=/bin/busybox",
        "fail() { $B echo \"cellcloud-init: $*\"; $B poweroff -f; }",
        "$B mount -t proc proc /proc",
        "$B mount -t sysfs sysfs /sys",
        "$B mount -t devtmpfs devtmpfs /dev || fail devtmpfs",
    ]
    for p in module_paths:
        lines.append(f"$B insmod /lib/modules/{p} || fail insmod {p}")
    lines += [
        "n=0",
        "while [ ! -b /dev/vda ]; do n=$((n+1)); [ $n -gt 500 ] && fail no runtime disk;"
        " $B usleep 10000; done",
        "$B mount -t ext4 -o ro,nodev /dev/vda /rt || fail mount runtime disk",
        "$B mount --move /dev /rt/dev",
        "$B mount --move /proc /rt/proc",
        "$B mount --move /sys /rt/sys",
        f"PATH=/usr/bin:/bin PYTHONPATH={GUEST_PYLIB} PYTHONDONTWRITEBYTECODE=1"
        " $B chroot /rt /usr/local/bin/python3 -m cellcloud.microvm.guest_vm"
        f" {AGENT_PORT_NAME}",
        "$B echo \"cellcloud-init: guest agent exited ($?)\"",
        "$B poweroff -f",
    ]
    return ("\n".join(lines) + "\n").encode()


def agent_initramfs_layout(module_paths: list[str]) -> list[Entry]:
    """The agent initramfs: the base image's entries (with its own /init) plus ``/rt`` (the
    runtime disk's mount point) and the modules under ``lib/modules/``."""
    dirs: list[str] = ["lib", "lib/modules"]
    for p in module_paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
    base = [e for e in initramfs_layout() if e.path != "init"]
    return (base + [Entry("rt", "dir", 0o755)]
            + [Entry(d, "dir", 0o755) for d in dirs]
            + [Entry("lib/modules/" + p, "file", 0o644, source="module:" + p)
               for p in module_paths]
            + [Entry("init", "file", 0o755, source="init")])


@dataclass(frozen=True)
class AgentInputs:
    """What an agent image is made of, by content: the base image (kernel and busybox), the
    modules, /init and the runtime disk's files (path, mode and SHA-256 of each)."""

    base_digest: str
    modules_sha256: str
    init_sha256: str
    runtime_sha256: str
    format: str = AGENT_FORMAT

    def digest(self) -> str:
        doc = json.dumps({"format": self.format, "base": self.base_digest,
                          "modules": self.modules_sha256, "init": self.init_sha256,
                          "runtime": self.runtime_sha256}, sort_keys=True,
                         separators=(",", ":"))
        return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def agent_kernel_cmdline(spec: VmSpec, *, console: bool) -> str:
    """The agent guest's command line: as the probe guest's, without the console's messages
    unless debugging (``console=`` empty sends the kernel's to nowhere)."""
    args = (["console=ttyS0"] if console else []) + ["quiet", "panic=-1", "reboot=t"]
    if spec.accel == "tcg":
        args += TCG_CLOCK_ARGS
    return " ".join(args)


def agent_qemu_argv(qemu: str, kernel: str, initrd: str, spec: VmSpec, *, runtime_disk: str,
                    bundle_disk: str, chan_fd: int, console: str = "",
                    tcg_cache_mib: int = DEFAULT_LIMITS.microvm_tcg_cache_mib,
                    tap_fd: int | None = None, mac: str = "",
                    extra_disks: tuple[str, ...] = ()) -> list[str]:
    """QEMU for one environment: no default devices, no network, no display or monitor; the
    runtime disk and the bundle as read-only virtio block devices, the channel as a
    virtserialport whose host end is ``chan_fd`` (a connected socket the host created: QEMU
    neither listens nor connects), the serial console to ``console`` (a file, ``stdio``: QEMU's
    stdout, as in the VMM jailer, which has no writable path) or nowhere. ``tap_fd``: an
    environment with egress: a virtio-net device (``mac``) on that open tap (the network
    helper made the tap in the environment's namespace; QEMU gets it as a descriptor and needs
    no privilege); without it the guest has no network device at all. ``extra_disks``: more
    read-only block devices after the bundle (a runtime tree, the layers: ``guest_disks``),
    found in the guest by their ext4 labels."""
    mmio = spec.machine == "microvm"
    blk = "virtio-blk-device" if mmio else "virtio-blk-pci"
    serial = "virtio-serial-device" if mmio else "virtio-serial-pci"
    # Under TCG the translation cache is QEMU's biggest allocation (1 GiB by default).
    accel = f"tcg,tb-size={tcg_cache_mib}" if spec.accel == "tcg" else spec.accel
    return [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-accel", accel,
        "-M", spec.machine,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-no-reboot",
        "-serial", ("stdio" if console == "stdio" else f"file:{console}") if console else "none",
        "-kernel", kernel,
        "-initrd", initrd,
        "-append", agent_kernel_cmdline(spec, console=bool(console)),
        "-drive", f"file={runtime_disk},if=none,id=rt,format=raw,readonly=on",
        "-device", f"{blk},drive=rt",
        "-drive", f"file={bundle_disk},if=none,id=task,format=raw,readonly=on",
        "-device", f"{blk},drive=task",
        *[a for i, d in enumerate(extra_disks)
          for a in ("-drive", f"file={d},if=none,id=x{i},format=raw,readonly=on",
                    "-device", f"{blk},drive=x{i}")],
        "-chardev", f"socket,id=agent,fd={chan_fd}",
        "-device", serial,
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        *(net_argv(spec, tap_fd, mac) if tap_fd is not None else []),
    ]


def net_argv(spec: VmSpec, tap_fd: int, mac: str) -> list[str]:
    """The guest's one network device: virtio-net on the tap QEMU was handed (``fd=``), with
    the MAC the network helper pinned for its slot (QEMU's default is the same in every
    guest)."""
    if not _MAC.fullmatch(mac):
        raise ValueError(f"bad MAC address {mac!r}")
    dev = "virtio-net-device" if spec.machine == "microvm" else "virtio-net-pci"
    return ["-netdev", f"tap,id=net0,fd={tap_fd}",
            "-device", f"{dev},netdev=net0,mac={mac}"]


_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")


# -- runtimes with a process and layers (docs/microvm.md) ----------------------------------

# Where the guest mounts a runtime's tree disk (an empty folder on the runtime disk), and the
# ext4 labels by which the guest finds the extra disks (``guest_disks``).
RUNTIME_TREE_MOUNT = "/rtx"
TREE_LABEL = "cc-tree"
LAYERS_LABEL = "cc-layers"
# Runtimes with a runtime process that this backend runs: Node.js (the node binary on its own
# disk; ``noderuntime/runtime.cjs`` is cellcloud's, on the runtime disk) and custom runtimes
# (the bundle's or a layer's ``bootstrap``: no tree of their own).
NODE_RUNTIMES = ("nodejs20.x", "nodejs22.x", "nodejs24.x")
PROVIDED_RUNTIMES = ("provided.al2023",)


def runtime_unsupported(runtime: str, argv: list[str]) -> str | None:
    """Why the microvm backend cannot run this runtime process; None when it can."""
    if not argv or runtime in PROVIDED_RUNTIMES:
        return None
    if runtime in NODE_RUNTIMES:
        return None
    return (f"runtime {runtime} needs a runtime tree the microvm guest does not carry (it "
            f"runs the built-in Python, {', '.join(NODE_RUNTIMES)} and "
            f"{', '.join(PROVIDED_RUNTIMES)})")


def guest_runtime_argv(argv: list[str], *, host_package_dir: str) -> tuple[list[str], str]:
    """The runtime process's argv as the guest sees it, and the host executable whose tree
    disk the guest needs ("" for none): a Node runtime's ``node`` is ``/rtx/bin/node`` (its
    own disk), cellcloud's files (``runtime.cjs``) are under ``GUEST_PYLIB``;
    ``["bootstrap"]`` is resolved in the guest, as in the jail."""
    if not argv or argv == ["bootstrap"]:
        return list(argv), ""
    exe = argv[0]
    out = [f"{RUNTIME_TREE_MOUNT}/bin/{exe.rsplit('/', 1)[-1]}"]
    top = host_package_dir.rstrip("/")
    parent = top.rsplit("/", 1)[0]
    for a in argv[1:]:
        out.append(GUEST_PYLIB + a[len(parent):] if a.startswith(top + "/") else a)
    return out, exe


def guest_disks(runtime_argv: list[str], layers: int) -> list[tuple[str, str]]:
    """The extra disks of a guest, in QEMU's order: (ext4 label, mount point). The host
    attaches them and the guest mounts them from the same list."""
    out: list[tuple[str, str]] = []
    if runtime_argv and runtime_argv[0].startswith(RUNTIME_TREE_MOUNT + "/"):
        out.append((TREE_LABEL, RUNTIME_TREE_MOUNT))
    if layers:
        out.append((LAYERS_LABEL, "/opt"))
    return out
