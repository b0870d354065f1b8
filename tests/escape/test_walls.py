"""Walls of issue #11: the CPU cap, the cgroup namespace, the empty capability bounding set, the
socket families and io_uring the filters deny, and negative controls for closed descriptors and
the IPC namespace. Same shape as test_escape.py: the attack is contained, a host-side oracle
(one the jail did not write) confirms it, and a negative control shows it working with the
layer switched off."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from .conftest import Sandbox
from .test_escape import attempt_code, result

pytestmark = pytest.mark.integration

_libc = ctypes.CDLL(None, use_errno=True)


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of a process (all its threads), from the host's /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


# -- CPU ---------------------------------------------------------------------------------------

SPIN = """
    import time
    def handler(event, context):
        end = time.monotonic() + event["wall_s"]
        n = 0
        while time.monotonic() < end:
            n += 1
        return n
"""
SPIN_WALL_S = 3.0
CPU_S_CAPPED_MAX = 0.5  # the cap at 128 MB is 0.072 vCPU: ~0.22 s of CPU in 3 s


def _spin(sandbox: Sandbox, disabled: list[str]) -> tuple[float, float]:
    """Spin a 128 MB function for SPIN_WALL_S; returns (CPU seconds, wall seconds) of the
    invocation, both measured from the host."""
    env = sandbox.create(textwrap.dedent(SPIN), memory_mb=128, timeout_s=60, disabled=disabled)
    pid = sandbox.agent.envs[env].spawned.pid
    cpu0, wall0 = cpu_seconds_of(pid), time.monotonic()
    res = sandbox.invoke(env, json.dumps({"wall_s": SPIN_WALL_S}).encode(), timeout_s=60)
    cpu1, wall1 = cpu_seconds_of(pid), time.monotonic()
    spins = result(res)
    assert isinstance(spins, int) and spins > 0
    sandbox.destroy(env)
    return cpu1 - cpu0, wall1 - wall0


def test_cpu_is_capped_in_proportion_to_memory(sandbox: Sandbox) -> None:
    cpu_s, wall_s = _spin(sandbox, [])
    assert wall_s >= SPIN_WALL_S
    assert cpu_s < CPU_S_CAPPED_MAX, f"{cpu_s:.2f} s of CPU in {wall_s:.2f} s at 128 MB"
    # Negative control: without the quota the same spin takes whatever CPU it is given (on an
    # idle machine the full 3 s; beside two CPU burners on two cores still ~1 s).
    cpu_s, wall_s = _spin(sandbox, ["cgroup_cpu"])
    assert cpu_s > CPU_S_CAPPED_MAX, f"{cpu_s:.2f} s of CPU in {wall_s:.2f} s uncapped"


# -- cgroup namespace, capabilities -----------------------------------------------------------------

def test_cgroup_namespace_hides_the_agents_cgroup_paths(sandbox: Sandbox) -> None:
    code = attempt_code("""
        result = open("/proc/self/cgroup").read()
    """)
    env, res = sandbox.run(code)
    inside = result(res)["ok"]  # type: ignore[index]
    lines = inside.strip().splitlines()
    assert lines and all(line.split(":", 2)[2] == "/" for line in lines), inside
    # Host-side: the environment really is in its cgroup; only its view is rooted there.
    with open(f"/proc/{sandbox.agent.envs[env].spawned.pid}/cgroup") as f:
        assert f"/cellcloud/{sandbox.group}/{env}" in f.read()
    sandbox.destroy(env)
    # Negative control: without the cgroup namespace the agent's ids are in plain sight.
    env, res = sandbox.run(code, disabled=["cgroup_ns"])
    assert f"/cellcloud/{sandbox.group}/{env}" in result(res)["ok"]  # type: ignore[index]
    sandbox.destroy(env)


CAPS = """
    caps = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            caps[key] = int(value, 16)
    result = caps
"""


def test_capability_bounding_set_is_empty(sandbox: Sandbox) -> None:
    env, res = sandbox.run(attempt_code(CAPS))
    caps = result(res)["ok"]  # type: ignore[index]
    assert caps == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}
    host_view = proc_status(sandbox.agent.envs[env].spawned.pid)  # an oracle from outside
    assert int(host_view["CapBnd"], 16) == 0 and int(host_view["CapEff"], 16) == 0
    sandbox.destroy(env)
    # Negative control: the uid change alone empties the effective and permitted sets but
    # leaves the bounding set full; the explicit drop is what empties it.
    env, res = sandbox.run(attempt_code(CAPS), disabled=["capbset"])
    caps = result(res)["ok"]  # type: ignore[index]
    assert caps["CapEff"] == 0 and caps["CapBnd"] != 0
    sandbox.destroy(env)


# -- seccomp: io_uring and socket families ------------------------------------------------------------

IO_URING = """
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(425, 8, params)  # io_uring_setup(8 entries)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    os.close(fd)
    result = "ring"
"""


def _io_uring_works_here() -> bool:
    params = ctypes.create_string_buffer(120)
    fd = _libc.syscall(425, 8, params)
    if fd < 0:
        return False
    os.close(fd)
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return f.read().strip() == "0"  # 1: only privileged users; 2: nobody
    except FileNotFoundError:
        return True


def test_io_uring_is_denied(sandbox: Sandbox) -> None:
    env, res = sandbox.run(attempt_code(IO_URING))
    assert result(res) == {"errno": errno.EPERM}
    sandbox.destroy(env)
    if not _io_uring_works_here():
        pytest.skip("this kernel gives unprivileged users no io_uring: no negative control")
    env, res = sandbox.run(attempt_code(IO_URING), disabled=["seccomp"])
    assert result(res) == {"ok": "ring"}  # the filter is what stops it
    sandbox.destroy(env)


FAMILIES = {  # family: socket type
    "AF_VSOCK": (40, socket.SOCK_STREAM),
    "AF_NETLINK": (16, socket.SOCK_RAW),
    "AF_ALG": (38, socket.SOCK_SEQPACKET),
    "AF_KEY": (15, socket.SOCK_RAW),
    "AF_BLUETOOTH": (31, socket.SOCK_RAW),
    "AF_PACKET": (17, socket.SOCK_RAW),
    "AF_APPLETALK": (5, socket.SOCK_DGRAM),
    "AF_UNIX": (1, socket.SOCK_STREAM),
    "AF_INET": (2, socket.SOCK_STREAM),
    "AF_INET6": (10, socket.SOCK_STREAM),
}
SOCKETS = f"""
    out = {{}}
    for name, (family, kind) in {({k: (f, int(t)) for k, (f, t) in FAMILIES.items()})!r}.items():
        try:
            socket.socket(family, kind).close()
            out[name] = "ok"
        except OSError as e:
            out[name] = e.errno
    # A family with high bits set, which the kernel would truncate to AF_VSOCK.
    fd = libc.syscall(41, (1 << 32) | 40, 1, 0)
    out["AF_VSOCK+high"] = "ok" if fd >= 0 else ctypes.get_errno()
    if fd >= 0:
        os.close(fd)
    result = out
"""


def test_socket_families_the_environment_has_no_use_for(sandbox: Sandbox) -> None:
    env, res = sandbox.run(attempt_code(SOCKETS))
    inside = result(res)["ok"]  # type: ignore[index]
    assert {k: v for k, v in inside.items() if k in ("AF_UNIX", "AF_INET", "AF_INET6")} == {
        "AF_UNIX": "ok", "AF_INET": "ok", "AF_INET6": "ok"}
    denied = {k: v for k, v in inside.items() if k not in ("AF_UNIX", "AF_INET", "AF_INET6")}
    assert set(denied.values()) == {errno.EPERM}, denied
    sandbox.destroy(env)
    # Negative control: the same calls without the filter (the uid drop still applies) reach
    # the kernel; vsock and netlink sockets open for an unprivileged process on this host.
    env, res = sandbox.run(attempt_code(SOCKETS), disabled=["seccomp"])
    control = result(res)["ok"]  # type: ignore[index]
    assert control["AF_VSOCK"] == "ok" or control["AF_VSOCK"] == errno.EAFNOSUPPORT, control
    assert control["AF_NETLINK"] == "ok", control
    sandbox.destroy(env)


AGENT_PROBE = textwrap.dedent("""
    import ctypes, json, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.argv[1] == "lock":
        from cellcloud.agent.lockdown import lock_down
        lock_down()
    out = {}
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 8, params)
    out["io_uring"] = "ok" if fd >= 0 else ctypes.get_errno()
    for name, family, kind in (("vsock", 40, socket.SOCK_STREAM),
                               ("netlink", 16, socket.SOCK_RAW)):
        try:
            socket.socket(family, kind).close()
            out[name] = "ok"
        except OSError as e:
            out[name] = e.errno
    a, b = socket.socketpair()  # the agent's channels to its environments still work
    a.sendall(b"x"); out["socketpair"] = b.recv(1).decode()
    print(json.dumps(out))
""")


def test_agent_lockdown_denies_io_uring_and_other_socket_families() -> None:
    def probe(mode: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-c", AGENT_PROBE, mode], capture_output=True,
                             text=True, timeout=60, check=True)
        doc: dict[str, object] = json.loads(out.stdout)
        return doc

    control = probe("open")  # negative control: the same process without the filter
    assert control["netlink"] == "ok" and control["socketpair"] == "x"
    if _io_uring_works_here():
        assert control["io_uring"] == "ok"
    locked = probe("lock")
    assert locked == {"io_uring": errno.EPERM, "vsock": errno.EPERM, "netlink": errno.EPERM,
                      "socketpair": "x"}


@pytest.mark.parametrize("module,names", [("cellcloud.sandbox.seccomp_policy", "DENIED"),
                                          ("cellcloud.agent.lockdown", "DENIED_SYSCALLS")])
def test_a_syscall_libseccomp_does_not_know_fails_the_filter_build(module: str,
                                                                   names: str) -> None:
    load = "load" if module.endswith("seccomp_policy") else "lock_down"
    code = (f"import {module} as m\n"
            f"m.{names} = tuple(m.{names}) + ('no_such_syscall_cc',)\n"
            f"m.{load}()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "no_such_syscall_cc" in out.stderr, out


def test_the_filter_prepared_once_in_the_zygote_is_the_one_each_child_loads() -> None:
    """seccomp_policy.prepare() (the zygote builds the filter once): children forked after
    it load the same rules, with or without no_new_privs as each asks."""
    code = """
import errno, os
from cellcloud.sandbox import linux, seccomp_policy as m
m.prepare()
for nnp in (False, True):
    pid = os.fork()
    if pid == 0:
        m.load(set_no_new_privs=nnp)
        try:
            linux.unshare(linux.CLONE_NEWUTS)
            code = 10
        except OSError as e:
            code = 0 if e.errno == errno.EPERM else 11
        with open("/proc/self/status") as f:
            flag = next(ln.split()[1] for ln in f if ln.startswith("NoNewPrivs:"))
        os._exit(code + (0 if flag == ("1" if nnp else "0") else 20))
    _, status = os.waitpid(pid, 0)
    print(nnp, os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split("\n")[:2] == ["False 0", "True 0"], out


# -- negative controls for closed descriptors and the IPC namespace ------------------------------

FDS = """
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.fstat(int(fd)).st_ino)
        except OSError:
            pass
    result = out
"""


def _zygote_socket_inodes(sandbox: Sandbox) -> set[int]:
    """Host-side: the sockets the zygote holds (its control socket, opened by the agent's
    host process and passed to the zygote inheritable, without CLOEXEC). The zygote, not its
    keeper: the keeper starts zygotes and hands each its own control socket."""
    pid = sandbox.backend.zygote_pid
    assert pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:["):-1]))
    return inodes


def test_inherited_descriptors_are_closed(sandbox: Sandbox) -> None:
    host = _zygote_socket_inodes(sandbox)
    assert host
    env, res = sandbox.run(attempt_code(FDS))
    assert host.isdisjoint(result(res)["ok"])  # type: ignore[index]
    sandbox.destroy(env)
    # Negative control: without the closing step the zygote's control socket (a host fd
    # without CLOEXEC) is open inside the environment.
    env, res = sandbox.run(attempt_code(FDS), disabled=["close_fds"])
    assert host & set(result(res)["ok"])  # type: ignore[index]
    sandbox.destroy(env)


IPC_CREAT, IPC_RMID = 0o1000, 0
SYSV = """
    shm = libc.shmget(event["shm_key"], 0, 0)
    if shm < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    msg = libc.msgget(event["msg_key"], 0)
    if msg < 0:
        raise OSError(ctypes.get_errno(), "msgget")
    result = [shm, msg]
"""


def test_host_sysv_ipc_is_invisible(sandbox: Sandbox) -> None:
    key = 0x43430000 | (uuid.uuid4().int & 0xFFFF)
    shm = _libc.shmget(key, 4096, IPC_CREAT | 0o666)
    msg = _libc.msgget(key + 1, IPC_CREAT | 0o666)
    assert shm >= 0 and msg >= 0, ctypes.get_errno()
    event = json.dumps({"shm_key": key, "msg_key": key + 1}).encode()
    try:
        env, res = sandbox.run(attempt_code(SYSV), event)
        assert result(res) == {"errno": errno.ENOENT}
        sandbox.destroy(env)
        # Negative control: in the host's IPC namespace the same keys find the host's objects.
        env, res = sandbox.run(attempt_code(SYSV), event, disabled=["ipc_ns"])
        assert result(res) == {"ok": [shm, msg]}
        sandbox.destroy(env)
    finally:
        _libc.shmctl(shm, IPC_RMID, None)
        _libc.msgctl(msg, IPC_RMID, None)

