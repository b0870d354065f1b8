"""The escape suite against the microvm backend (issue #18): the attacks of ``test_escape.py``
and ``test_walls.py`` that apply to a VM, run from inside a guest by a real agent on
``MicrovmBackend`` (QEMU, TCG here). A VM has its own kernel, so the question is not which
host layer stops an attack but that nothing of the host is reachable at all: the host's files,
processes, loopback, the agent's sockets and state, other environments' bundles and data, and
that inside the guest the function is still unprivileged (the guest's kernel is the boundary;
its uid is defence in depth, as Lambda's ``sbx_user``).

TCG boots take seconds (tens on a loaded machine), so the default run boots ONE guest and runs
every attack in one invocation; attacks that need a second guest are ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cellcloud.microvm import boot, core
from cellcloud.microvm.backend import MicrovmBackend

from .conftest import Sandbox, processes_of_uid

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
    pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                       is None, reason="no Debian cloud kernel (scripts/setup.sh)"),
]

MEMORY_MB = 256
TIMEOUT_S = 60  # a bound for the attacks' invocation under TCG on a busy machine

# Every attack in one handler; each entry is what happened ("ok: ..." or the errno's name).
ATTACKS = textwrap.dedent("""
    import ctypes, errno, os, socket
    libc = ctypes.CDLL(None, use_errno=True)

    def attempt(fn):
        try:
            return "ok: " + repr(fn())[:200]
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))

    def call(rc):
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return rc

    def read(path):
        with open(path, "rb") as f:
            return f.read(64)

    def connect(family, addr):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(addr)
        finally:
            s.close()
        return "connected"

    def write(path):
        with open(path, "w") as f:
            f.write("pwned")
        return "written"

    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def handler(event, context):
        r = {}
        # Its own kernel: the release, the boot id and /proc are the guest's.
        r["release"] = os.uname().release
        r["boot_id"] = read("/proc/sys/kernel/random/boot_id").decode().strip()
        r["proc_version"] = read("/proc/version").decode()
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        r["pids"] = pids
        r["cmdlines"] = [cmdline(p) for p in pids]
        r["host_pids"] = {str(p): attempt(lambda p=p: read(f"/proc/{p}/cmdline"))
                          for p in event["host_pids"]}
        r["uid"] = os.getuid()
        # The host's files, another environment's bundle, the agent's state.
        r["files"] = {p: attempt(lambda p=p: read(p)) for p in event["paths"]}
        # The host's network: its loopback, the agent's unix socket, the host over vsock.
        r["loopback"] = {h: attempt(lambda h=h: connect(socket.AF_INET6 if ":" in h
                                                        else socket.AF_INET,
                                                        (h, event["port"])))
                         for h in ("127.0.0.1", "::1", event["host_ip"])}
        r["unix"] = attempt(lambda: connect(socket.AF_UNIX, event["unix"]))
        r["vsock_host"] = attempt(lambda: connect(40, (2, event["port"])))
        r["interfaces"] = sorted(os.listdir("/sys/class/net"))
        # Privileges inside the guest.
        r["setuid0"] = attempt(lambda: os.setuid(0))
        os.makedirs("/tmp/m", exist_ok=True)
        r["mount"] = attempt(lambda: call(libc.mount(b"tmpfs", b"/tmp/m", b"tmpfs", 0, None)))
        r["module"] = attempt(lambda: call(libc.syscall(313, os.open("/dev/null", os.O_RDONLY),
                                                         b"", 0)))  # finit_module
        r["ptrace_init"] = attempt(lambda: call(libc.ptrace(16, 1, None, None)))  # ATTACH
        r["raw_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                        socket.IPPROTO_ICMP).close())
        r["writes"] = {p: attempt(lambda p=p: write(p))
                       for p in ("/var/task/pwned", "/pwned", "/usr/pwned", "/etc/pwned")}
        # Devices: the disks, memory, the host's KVM.
        r["devices"] = {d: attempt(lambda d=d: read(d))
                        for d in ("/dev/vda", "/dev/vdb", "/dev/mem", "/dev/kmem",
                                  "/dev/port", "/dev/kvm")}
        return r
""")


@pytest.fixture(scope="module")
def vm_sandbox() -> Iterator[Sandbox]:
    d = tempfile.mkdtemp(prefix="cellcloud-escape-vm-")
    os.chmod(d, 0o755)
    sb = Sandbox(d, MicrovmBackend(d))
    sb.create_timeout_ms = 180_000  # a TCG boot on a loaded machine
    try:
        yield sb
    finally:
        sb.close()
        shutil.rmtree(d, ignore_errors=True)


def _host_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _guest_release() -> str:
    name = core.pick_kernel(os.listdir("/boot"))
    assert name is not None
    return core.kernel_release(name)


def _host_ip() -> str:
    """An address of this host other than loopback (a guest on a host network would reach it);
    loopback's when it has none."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: picks the route's source address
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_vmm_jailed(pid: int, uid: int, cgroup: str) -> None:
    """Host-side: the environment's QEMU runs through the VMM jailer (microvm/jailer.py): as
    the environment's uid, no capabilities, under seccomp, in its own namespaces and cgroup,
    rooted in the jail's tmpfs that holds only /usr, /dev and the guest's files."""
    st = _status(pid)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    with open(f"/proc/{pid}/cgroup") as f:
        assert cgroup in f.read()
    for ns in ("mnt", "net", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    root = f"/proc/{pid}/root"
    assert os.stat(root).st_dev != os.stat("/").st_dev  # pivoted into the jail's own tmpfs
    assert sorted(os.listdir(root)) == ["bin", "dev", "lib", "lib64", "sbin", "usr", "vm"]
    assert sorted(os.listdir(root + "/vm")) == ["initramfs.cpio", "runtime.ext4", "task.ext4",
                                                "vmlinuz"]
    assert sorted(os.listdir(root + "/dev")) == ["null", "random", "urandom", "zero"]


def _payload(res: dict[str, Any]) -> Any:
    assert res["function_error"] is None, res
    return json.loads(res["payload"])


def test_attacks_from_inside_a_guest_reach_nothing_of_the_host(vm_sandbox: Sandbox,
                                                               tmp_path: Any) -> None:
    sb = vm_sandbox
    secret = uuid.uuid4().hex
    marker = os.path.join(sb.agent.state_dir, "host-secret")
    with open(marker, "w") as f:
        f.write(secret)
    os.chmod(marker, 0o644)  # world-readable on the host: only the VM boundary stops it
    _, victim = sb.bundle_dir("SECRET = 'victim'\ndef handler(e, c):\n    return 1\n")
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))  # every host address, v4 and v6
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    unix_path = os.path.join(sb.agent.state_dir, "agent.sock")  # world-connectable
    agent_sock = socket.socket(socket.AF_UNIX)
    agent_sock.bind(unix_path)
    os.chmod(unix_path, 0o777)
    agent_sock.listen(4)
    agent_sock.setblocking(False)
    try:
        env = sb.create(ATTACKS, memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
        rec = sb.agent.envs[env]
        qemu_pid = rec.spawned.pid
        assert_vmm_jailed(qemu_pid, rec.spec.uid, f"/{sb.group}/{env}")
        paths = [marker, "/etc/shadow", "/etc/machine-id", os.path.join(victim, "app.py"),
                 os.path.join(sb.agent.state_dir, "bundles"), rec.spec.bundle_dir + "/app.py",
                 f"/proc/{qemu_pid}/root/etc/passwd"]
        event = {"paths": paths, "host_pids": [os.getpid(), qemu_pid], "port": port,
                 "host_ip": _host_ip(), "unix": unix_path}
        r = _payload(sb.invoke(env, json.dumps(event).encode(), TIMEOUT_S))
        bundle_files = sorted(os.listdir(rec.spec.bundle_dir))
        sb.destroy(env)
    finally:
        listener_got = _accepted(listener)
        agent_got = _accepted(agent_sock)
        listener.close()
        agent_sock.close()

    # Its own kernel: not the host's release, boot id or processes.
    assert r["release"] == _guest_release() != os.uname().release
    assert r["release"] in r["proc_version"]
    assert r["boot_id"] != _host_boot_id()
    assert not any(w in c for c in r["cmdlines"] for w in ("pytest", "qemu")), r["cmdlines"]
    assert len(r["pids"]) < 200  # the guest's few processes and kernel threads
    for pid, got in r["host_pids"].items():  # the host's pids are not the guest's processes
        assert got == "ENOENT" or ("pytest" not in got and "qemu" not in got), (pid, got)
    assert r["uid"] == rec.spec.uid != 0

    # The host's files, another tenant's bundle and the agent's state do not exist there.
    for path in paths:
        assert r["files"][path] == "ENOENT", (path, r["files"][path])
    assert secret not in json.dumps(r)

    # The host's network: nothing connected, the guest has only loopback, no vsock to the host.
    for host, got in r["loopback"].items():
        assert got in ("ECONNREFUSED", "ENETUNREACH", "EADDRNOTAVAIL"), (host, got)
    assert not listener_got, "a connection from the guest reached the host"
    assert r["unix"] == "ENOENT" and not agent_got
    assert not r["vsock_host"].startswith("ok"), r["vsock_host"]
    assert r["interfaces"] == ["lo"]

    # Unprivileged inside its own kernel: no root, mounts, modules, ptrace of init, raw sockets,
    # writes outside /tmp, or devices.
    assert r["setuid0"] == "EPERM"
    assert r["mount"] == "EPERM"
    assert r["module"] == "EPERM"
    assert r["ptrace_init"] == "EPERM"
    assert r["raw_socket"] == "EPERM"
    for path, got in r["writes"].items():
        assert got in ("EROFS", "EACCES"), (path, got)
    assert "pwned" not in bundle_files  # host-side: the bundle is untouched
    for dev, got in r["devices"].items():
        assert got in ("EACCES", "ENOENT", "EPERM"), (dev, got)
    assert r["devices"]["/dev/kvm"] == "ENOENT"


def _accepted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.slow
def test_another_guests_tmp_and_processes_are_unreachable(vm_sandbox: Sandbox) -> None:
    sb = vm_sandbox
    writer = sb.create("import os\ndef handler(e, c):\n"
                       "    open('/tmp/secret', 'w').write('s3cr3t')\n"
                       "    return os.getpid()\n", memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
    writer_pid = _payload(sb.invoke(writer, timeout_s=TIMEOUT_S))
    qemu_pid = sb.agent.envs[writer].spawned.pid
    reader = sb.create(textwrap.dedent("""
        import errno
        def handler(event, context):
            out = {}
            for p in event["paths"]:
                try:
                    out[p] = open(p).read()
                except OSError as e:
                    out[p] = errno.errorcode[e.errno]
            return out
    """), memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
    paths = ["/tmp/secret", f"/proc/{qemu_pid}/root/tmp/secret",
             f"/proc/{writer_pid}/root/tmp/secret"]
    got = _payload(sb.invoke(reader, json.dumps({"paths": paths}).encode(), TIMEOUT_S))
    assert "s3cr3t" not in json.dumps(got), got
    assert got["/tmp/secret"] == "ENOENT"
    # Each VM is its own QEMU process (and uid's environment) on the host.
    assert sb.agent.envs[reader].spawned.pid != qemu_pid
    sb.destroy(writer)
    sb.destroy(reader)


@pytest.mark.slow
def test_a_fork_bomb_and_a_memory_hog_stay_inside_their_guest(vm_sandbox: Sandbox) -> None:
    sb = vm_sandbox
    bomb = textwrap.dedent("""
        import os, errno
        def handler(event, context):
            n, err = 0, None
            try:
                while n < 100000:
                    if os.fork() == 0:
                        import time
                        time.sleep(30)
                        os._exit(0)
                    n += 1
            except OSError as e:
                err = errno.errorcode[e.errno]
            hog = []
            try:
                while True:
                    hog.append(bytearray(16 * 1024 * 1024))
            except MemoryError:
                pass
            return {"forked": n, "err": err}
    """)
    env = sb.create(bomb, memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
    uid = sb.agent.envs[env].spec.uid
    res = sb.invoke(env, timeout_s=TIMEOUT_S)
    # Contained either way: the guest's limits stop the fork bomb (EAGAIN) and the guest's
    # memory ends the hog, or the guest's OOM killer ends the invocation.
    if res["function_error"] is None:
        out = json.loads(res["payload"])
        assert out["err"] == "EAGAIN" and out["forked"] < 100000, out
    # Host-side: none of the guest's processes exist on the host; its QEMU stays in its cgroup.
    assert processes_of_uid(uid) == []
    sb.destroy(env)
    env2, res2 = sb.run("def handler(e, c):\n    return 'fine'\n", memory_mb=MEMORY_MB,
                        timeout_s=TIMEOUT_S)
    assert _payload(res2) == "fine"
    sb.destroy(env2)

