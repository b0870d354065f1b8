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
                      ("virtio.ko", ["virtio_ring.ko"])):
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
    assert "runtime process" in str(unsupported(_spec(runtime_argv=["/node"]), None))
    assert "layers" in str(unsupported(_spec(layer_dirs=["/l"]), None))
    assert "container images" in str(unsupported(_spec(image_layers=["/l"]), None))
    assert "network" in str(unsupported(_spec(network={"address": "x"}), None))
    assert "network" in str(unsupported(_spec(), 5))


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
