"""The VMM jailer on the real host (root, cgroup v1 or v2): a jailed QEMU boots the snapshot
guest, saves it and restores it; while it runs, the host sees it under the VM's unprivileged
uid, in the VM's cgroup with the memory limit set, with no capabilities, under a seccomp
filter, in its own namespaces, rooted in a chroot holding /usr, /dev and the guest's files
only; the cgroup is gone when QEMU is. A syscall an unprivileged process may make
(ptrace(PTRACE_TRACEME)) is denied in the jail and allowed outside it as the same uid."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core, jailcore, jailer, snapshot
from cellcloud.sandbox import cgroups

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
    pytest.mark.skipif(cgroups.version() == 0, reason="no cgroups"),
]

SPEC = core.VmSpec(accel="tcg")
UID = 290_017  # apart from the agents' environment uids (200,000 + slot)
PROBE = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
         "r = libc.ptrace(0, 0, None, None); print(r, ctypes.get_errno())")  # PTRACE_TRACEME


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _check_jailed(js: jailcore.JailSpec) -> None:
    pid = jailer.vmm_pid(js)
    assert pid is not None
    st = _status(pid)
    assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(UID)] * 4
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    with open(f"/proc/{pid}/cgroup") as f:
        assert f"/cellcloud/microvm/{js.vm_id}" in f.read()
    cg = cgroups.Cgroup("microvm", js.vm_id)
    limit_file = ("memory/" + cg.rel + "/memory.limit_in_bytes" if cg.version == 1
                  else cg.rel + "/memory.max")
    with open(os.path.join(cgroups.ROOT, limit_file)) as f:
        assert int(f.read()) == (SPEC.memory_mib + DEFAULT_LIMITS.microvm_vmm_overhead_mib) * 2**20
    for ns in ("mnt", "net", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    root = f"/proc/{pid}/root"
    assert os.stat(root).st_dev != os.stat("/").st_dev  # pivoted into the jail's own tmpfs
    assert sorted(os.listdir(root)) == ["bin", "dev", "lib", "lib64", "sbin", "usr", "vm"]
    assert sorted(os.listdir(root + "/vm")) == ["initramfs.cpio", "vmlinuz"]
    assert sorted(os.listdir(root + "/dev")) == ["null", "random", "urandom", "zero"]
    print(f"jailed VMM: memory peak {cg.usage().memory_peak_bytes / 2**20:.0f} MiB "
          f"for a {SPEC.memory_mib} MiB guest")


def test_jailed_vmm_boots_saves_and_restores(tmp_path: Any) -> None:
    state = str(tmp_path)
    img = snapshot.snapshot_image(state)
    js = jailcore.JailSpec.for_guest(f"t{os.getpid()}", uid=UID, gid=UID, spec=SPEC,
                                     kernel=img.kernel, initrd=img.initrd)
    spawn = jailer.spawner(js)

    def cgroup_gone() -> bool:
        return not any(os.path.exists(os.path.join(cgroups.ROOT, c, "cellcloud/microvm",
                                                   js.vm_id))
                       for c in ("", "memory", "pids", "cpu"))

    async def run() -> None:
        snap = await snapshot.create(state, img, SPEC, spawn=spawn)
        assert snap.built
        assert cgroup_gone()  # QEMU quit: the jailer removed the VM's cgroup
        st = await snapshot.start_guest(snap.path, img, SPEC, spawn=spawn)
        try:
            assert st.how == "restored", st.reason
            assert st.fresh.reseed_status == 0
            _check_jailed(js)
            # SIGTERM to the jailer (what Guest.close sends when QMP does not answer): it
            # forwards it to QEMU, PID 1 of the VM's namespace, and still cleans up.
            st.guest.proc.terminate()
            assert await asyncio.wait_for(st.guest.proc.wait(), 60) is not None
        finally:
            await st.guest.close()

    asyncio.run(run())
    assert cgroup_gone()


def _jailed(argv: list[str], vm_id: str) -> subprocess.CompletedProcess[str]:
    js = jailcore.JailSpec(vm_id, UID, UID, 128, 1, "tcg", ())
    doc = {**jailcore.plan(js, argv, DEFAULT_LIMITS).to_json(), "keep_fds": []}
    return subprocess.run([sys.executable, "-m", "cellcloud.microvm.jailer", json.dumps(doc)],
                          capture_output=True, text=True, timeout=60)


def test_a_syscall_the_uid_may_make_is_denied_in_the_jail() -> None:
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3 to run the probe in the jail")
    outside = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=60,
                             user=UID, group=UID, extra_groups=[])
    assert outside.stdout.split() == ["0", "0"], outside  # the control: allowed as that uid
    inside = _jailed([python, "-c", PROBE], f"p{os.getpid()}")
    assert inside.stdout.split() == ["-1", "1"], inside  # EPERM from the filter
