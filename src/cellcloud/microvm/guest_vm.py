"""The guest agent's start inside a microVM (run by the agent image's /init, chrooted into the
read-only runtime disk): find the channel's virtio-serial port, wait for the host agent's
first frame (the environment's spec: the host speaks first, the guest only answers), set the
environment up and hand over to the same guest agent as the jail's (``sandbox/guest.py``).

    agent -> guest  {"t": "spec", "spec": EnvSpec wire, "time_ms": the host's wall clock,
                     "seed": 32 bytes of the host's os.urandom}
    (then the jail's protocol: guest -> agent "ready", agent -> guest "invoke", ...)

Setting up: the seed into the guest kernel's pool, credited (``RNDADDENTROPY``), and the CRNG
rekeyed from it at once (``RNDRESEEDCRNG``), as the snapshot guest's helper does
(``snapcore.reseed_helper``): a guest restored from a snapshot would otherwise draw from the
snapshot's CRNG state, and a cold TCG guest with no RDRAND and no devices has an uninitialised
CRNG for its first seconds; then the guest's clock from ``time_ms`` (an emulated guest's own may be far off), the
bundle (the second block device) read-only at /var/task, /tmp a tmpfs of the function's
ephemeral storage, /var/runtime a small tmpfs with the attestation document, Lambda's
environment variables; an environment with egress (``spec.network``: the network helper's
address, prefix, gateway and resolver) configures the guest's one NIC (virtio-net on the tap
in its namespace) with them and binds a resolv.conf naming the resolver over the runtime
disk's empty one (``configure_network``); then the function's uid and gid (the VM is the
isolation boundary, the uid is defence in depth, as Lambda's ``sbx_user``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from ..core.limits import DEFAULT_LIMITS
from ..sandbox import guest as guest_agent
from ..sandbox import linux
from ..sandbox.guest import FdStream, channel_frame_bytes_max
from ..sandbox.guest import run as run_guest
from ..sandbox.spec import EnvSpec
from ..transport.codec import StreamChannel
from . import core

PORTS_DIR = "/sys/class/virtio-ports"
BUNDLE_DEVICE = "/dev/vdb"
port_wait_s = 30.0


def find_port(name: str) -> str | None:
    """``/dev/vportNpM`` of the virtserialport called ``name`` (no udev here to make the
    ``/dev/virtio-ports/<name>`` link)."""
    try:
        ports = sorted(os.listdir(PORTS_DIR))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(PORTS_DIR, port, "name")) as f:
                if f.read().strip() == name:
                    return "/dev/" + port
        except OSError:
            continue
    return None


seed_bytes = 32  # what the host sends; 256 bits credited
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07), as snapcore's helper uses them
# (not imported from there: snapcore's imports cost the guest's start ~0.3 s under TCG).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# <linux/fs.h>: _IO(0x12, 97). A guest restored from a snapshot probed the snapshot's bundle
# disk (its first blocks are in the page cache); the restored one is another file.
BLKFLSBUF = 0x1261


def ext4_label(device: str) -> str:
    """An ext4 file system's volume name (the superblock at 1024, ``s_volume_name`` at 120)."""
    with open(device, "rb") as f:
        f.seek(1024 + 120)
        return f.read(16).split(b"\0", 1)[0].decode(errors="replace")


def find_disk(label: str, deadline: float) -> str | None:
    """The virtio block device whose ext4 label is ``label`` (waits for it until
    ``deadline``)."""
    while True:
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("vd"):
                try:
                    if ext4_label(f"/dev/{name}") == label:
                        return f"/dev/{name}"
                except OSError:
                    pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)  # polling for a device node the kernel creates, bounded


def flush_cached_blocks(device: str) -> None:
    """Drop the kernel's cached blocks of ``device`` before it is mounted."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def apply_seed(fd: int, seed: bytes) -> None:
    """Credit ``seed`` (the host's os.urandom) to the kernel's pool through ``fd`` (/dev/urandom)
    and rekey the CRNG from it now: the next read depends on it. A plain write would only mix
    it in, uncredited, until the next scheduled reseed. Needs CAP_SYS_ADMIN (the guest agent
    runs it as root, before dropping to the function's uid). ``struct rand_pool_info``:
    ``int entropy_count`` (bits), ``int buf_size`` (bytes), the bytes."""
    if len(seed) != seed_bytes:
        raise ValueError(f"the seed is {len(seed)} bytes, not {seed_bytes}")
    fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
    fcntl.ioctl(fd, RNDRESEEDCRNG)


def restore_helper(seed_fd: int, answer_fd: int, rnd_fd: int) -> NoReturn:
    """A version snapshot's guest (the spec frame's ``snapstart``): this child of the guest
    agent stays root when the agent drops to the function's uid, so that every restored copy
    can still be reseeded and its clock set (both need root). It reads records of the seed
    (``seed_bytes``) and the host's clock (8 bytes, ms) from ``seed_fd`` and answers one status
    byte (0: done) on ``answer_fd``; nothing else. The function's code, in the agent's process,
    could write records too: its own guest's seed and clock only (the VM is the boundary)."""
    record = seed_bytes + 8
    while True:
        data = b""
        while len(data) < record:
            chunk = os.read(seed_fd, record - len(data))
            if not chunk:
                os._exit(0)  # the agent is gone
            data += chunk
        status = 0
        try:
            apply_seed(rnd_fd, data[:seed_bytes])
        except (OSError, ValueError):
            status |= 1
        try:
            (ms,) = struct.unpack("<Q", data[seed_bytes:])
            time.clock_settime(time.CLOCK_REALTIME, ms / 1000)
        except (OSError, ValueError, OverflowError):
            status |= 2
        os.write(answer_fd, bytes([status]))


# SnapStart's runtime hooks, as Lambda's Python runtime offers them (the module
# ``snapshot_restore_py``): functions registered with register_before_snapshot run after the
# init, before the version's snapshot is saved; with register_after_restore, in each restored
# copy after its seed and clock, before its first invocation. Only a version snapshot's guest
# calls them; elsewhere registering is harmless, as on Lambda without SnapStart.
_before_snapshot: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
_after_restore: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []


def install_hooks_module(task_roots: tuple[str, ...] = ("/var/task", "/opt/python")) -> None:
    """``snapshot_restore_py`` for the function to import, unless its bundle or a layer brings
    its own (theirs then wins, as it would on the path)."""
    for root in task_roots:
        if (os.path.exists(os.path.join(root, "snapshot_restore_py.py"))
                or os.path.isdir(os.path.join(root, "snapshot_restore_py"))):
            return
    import types

    mod = types.ModuleType("snapshot_restore_py", "SnapStart's runtime hooks (cellcloud)")

    def register_before_snapshot(func: Callable[..., Any], *args: Any,
                                 **kwargs: Any) -> Callable[..., Any]:
        _before_snapshot.append((func, args, kwargs))
        return func

    def register_after_restore(func: Callable[..., Any], *args: Any,
                               **kwargs: Any) -> Callable[..., Any]:
        _after_restore.append((func, args, kwargs))
        return func

    mod.register_before_snapshot = register_before_snapshot  # type: ignore[attr-defined]
    mod.register_after_restore = register_after_restore  # type: ignore[attr-defined]
    mod.get_before_snapshot = lambda: list(_before_snapshot)  # type: ignore[attr-defined]
    mod.get_after_restore = lambda: list(_after_restore)  # type: ignore[attr-defined]
    sys.modules["snapshot_restore_py"] = mod


def run_before_snapshot() -> dict[str, Any] | None:
    """The before-snapshot hooks, last registered first (as Lambda runs them); the first that
    raises fails the init, so no snapshot is saved (the version's environments boot cold)."""
    for func, args, kwargs in reversed(_before_snapshot):
        try:
            func(*args, **kwargs)
        except Exception as e:
            return {"errorType": "Runtime.BeforeSnapshotError",
                    "errorMessage": f"a before-snapshot hook raised {type(e).__name__}: {e}"}
    return None


def restore_hook(seed_w: int, answer_r: int) -> Callable[[dict[str, Any]], int]:
    """``sandbox.guest.on_restore`` of a version snapshot's guest: the restored copy's seed and
    clock through the root helper, then Python's own ``random`` reseeded from the new CRNG
    (its state was drawn before the snapshot, the same in every copy). The status: 0 all
    applied; bits: 1 the seed, 2 the clock, 4 no seed in the frame, 8 the helper is gone."""
    def hook(msg: dict[str, Any]) -> int:
        seed = msg.get("seed")
        if not isinstance(seed, bytes) or len(seed) != seed_bytes:
            return 4
        os.write(seed_w, seed + struct.pack("<Q", int(msg.get("time_ms") or 0)))
        answer = os.read(answer_r, 1)
        random.seed()
        status = answer[0] if answer else 8
        for func, args, kwargs in _after_restore:  # in registration order, as Lambda
            try:
                func(*args, **kwargs)
            except Exception as e:
                sys.stderr.write(f"cellcloud-guest: an after-restore hook raised "
                                 f"{type(e).__name__}: {e}\n")
                status |= 16
                break
        return status
    return hook


NET_DIR = "/sys/class/net"
RESOLV_CONF = "/etc/resolv.conf"
# <linux/sockios.h>, <linux/if.h>, <linux/route.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2
RTENTRY_BYTES = 120  # sizeof(struct rtentry) on 64-bit Linux
IFREQ_BYTES = 40


def sockaddr_in(address: str) -> bytes:
    """``struct sockaddr_in`` (16 bytes) for ``address``, port 0."""
    return struct.pack("=H2x4s8x", socket.AF_INET, socket.inet_aton(address))


def ifreq(name: str, payload: bytes) -> bytes:
    """``struct ifreq``: the interface's name, then the union (an address, the flags)."""
    if not 0 < len(name) < 16:
        raise ValueError(f"bad interface name {name!r}")
    return struct.pack("16s", name.encode()) + payload.ljust(IFREQ_BYTES - 16, b"\0")


def default_route(gateway: str) -> bytes:
    """``struct rtentry`` for ``0.0.0.0/0 via gateway`` (the kernel finds the interface)."""
    zero = sockaddr_in("0.0.0.0")
    rt = struct.pack("@L16s16s16sHhLPhPLLH", 0, zero, sockaddr_in(gateway), zero,
                     RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
    return rt.ljust(RTENTRY_BYTES, b"\0")


def resolv_conf(resolver: str) -> str:
    """As the jail's (``sandbox/jail.py``): the one resolver, the network helper's forwarder."""
    return f"nameserver {resolver}\noptions timeout:2 attempts:2\n" if resolver else ""


def nics() -> list[str]:
    """The guest's network interfaces but loopback (a guest without egress has none)."""
    try:
        return sorted(n for n in os.listdir(NET_DIR) if n != "lo")
    except OSError:
        return []


def _up(s: socket.socket, name: str) -> None:
    flags = struct.unpack_from("h", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq(name, b"")), 16)[0]
    fcntl.ioctl(s, SIOCSIFFLAGS, ifreq(name, struct.pack("h", flags | IFF_UP)))


def configure_network(net: dict[str, Any], deadline: float) -> str:
    """The guest's NIC with the environment's address, its prefix and a default route via the
    gateway, loopback up (as in the jail's namespace), and ``/etc/resolv.conf`` naming the
    resolver: written on the /var/runtime tmpfs, bound read-only over the runtime disk's empty
    file and unlinked there. Returns the interface's name."""
    found = nics()
    while not found:
        if time.monotonic() > deadline:
            raise OSError("no network device in the guest")
        time.sleep(0.01)  # polling for the driver's probe, bounded
        found = nics()
    name = found[0]
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")  # IPv4 only, as the jail's (the agent's bridge drops IPv6)
    except OSError:
        pass
    netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{int(net['prefixlen'])}").netmask)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, ifreq(name, sockaddr_in(str(net["address"]))))
        fcntl.ioctl(s, SIOCSIFNETMASK, ifreq(name, sockaddr_in(netmask)))
        _up(s, name)
        _up(s, "lo")
        fcntl.ioctl(s, SIOCADDRT, default_route(str(net["gateway"])))
    staged = "/var/runtime/.resolv.conf"
    with open(staged, "w") as f:
        f.write(resolv_conf(str(net.get("resolver") or "")))
    os.chmod(staged, 0o644)
    linux.mount(staged, RESOLV_CONF, None, linux.MS_BIND)
    linux.mount(None, RESOLV_CONF, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
                | linux.MS_NOSUID | linux.MS_NODEV)
    os.unlink(staged)
    return name


def _fail(msg: str) -> NoReturn:
    sys.stderr.write(f"cellcloud-guest: {msg}\n")
    sys.exit(1)  # /init powers the guest off; the host sees the channel close


def main(argv: list[str]) -> None:
    started = time.monotonic()
    name = argv[0]
    deadline = started + port_wait_s
    path = find_port(name)
    while path is None or not os.path.exists(path):
        if time.monotonic() > deadline:
            _fail(f"no virtio-serial port named {name}")
        time.sleep(0.01)  # polling for a device node the kernel creates, bounded
        path = find_port(name)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    chan = StreamChannel(FdStream(fd), channel_frame_bytes_max)  # type: ignore[arg-type]
    first = chan.recv()
    if not isinstance(first, dict) or first.get("t") != "spec":
        _fail("the host's first frame is not the spec")
    spec = EnvSpec.from_wire(first["spec"])
    seed = first.get("seed")
    if not isinstance(seed, bytes):
        _fail("the host's first frame has no seed")
    rnd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        apply_seed(rnd, seed)
    except (OSError, ValueError) as e:
        _fail(f"could not seed the kernel's CRNG: {e}")
    finally:
        os.close(rnd)
    time.clock_settime(time.CLOCK_REALTIME, int(first["time_ms"]) / 1000)
    started = time.monotonic()  # the init phase starts now, as in the jail after the fork
    try:
        flush_cached_blocks(BUNDLE_DEVICE)
    except OSError as e:
        _fail(f"could not flush {BUNDLE_DEVICE}'s cached blocks: {e}")
    linux.mount(BUNDLE_DEVICE, "/var/task", "ext4", linux.MS_RDONLY | linux.MS_NODEV
                | linux.MS_NOSUID, "")
    for label, at in core.guest_disks(spec.runtime_argv, len(spec.layer_dirs)):
        # A runtime's tree (at /rtx) and the layers (at /opt): found by their labels.
        device = find_disk(label, time.monotonic() + port_wait_s)
        if device is None:
            _fail(f"no disk labelled {label}")
        linux.mount(device, at, "ext4", linux.MS_RDONLY | linux.MS_NODEV | linux.MS_NOSUID, "")
    ephemeral_mb = max(1, min(spec.ephemeral_mb, DEFAULT_LIMITS.ephemeral_mb_max))
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NODEV | linux.MS_NOSUID,
                f"size={ephemeral_mb}m,mode=0700,uid={spec.uid},gid={spec.gid}")
    linux.mount("tmpfs", "/var/runtime", "tmpfs", linux.MS_NODEV | linux.MS_NOSUID,
                "size=1m,mode=0755")
    if spec.attestation:
        with open("/var/runtime/attestation.json", "w") as f:
            f.write(spec.attestation)
    # Loopback up in every guest, as in the jail's namespace: a runtime process (Node, a
    # bootstrap) and extensions reach the Runtime API there.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _up(s, "lo")
    if spec.network:
        try:
            configure_network(spec.network, time.monotonic() + port_wait_s)
        except (OSError, ValueError, KeyError) as e:
            _fail(f"could not configure the network: {e}")
    os.environ.clear()
    os.environ.update(spec.lambda_environment())
    os.chdir("/var/task")
    # The jail's rlimits (sandbox/jail.py); /tmp's size is the tmpfs's, memory the guest's.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile_max, spec.nofile_max))
    resource.setrlimit(resource.RLIMIT_NPROC, (spec.pids_max, spec.pids_max))
    if first.get("snapstart"):
        seed_r, seed_w = os.pipe2(os.O_CLOEXEC)
        answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
        if os.fork() == 0:
            os.closerange(0, 3)
            for keep_out in (fd, seed_w, answer_r):
                os.close(keep_out)
            rnd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            restore_helper(seed_r, answer_w, rnd)
        os.close(seed_r)
        os.close(answer_w)
        guest_agent.on_restore = restore_hook(seed_w, answer_r)
        guest_agent.before_ready = run_before_snapshot
    install_hooks_module()
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    run_guest(spec, fd, started)


if __name__ == "__main__":
    main(sys.argv[1:])
