"""The escape and abuse suite (issue #3). Every case: the attack is contained (a stated result
or a Lambda-shaped error), a host-side check confirms it had no effect, and where it is safe a
negative control shows it succeeding with the stopping layer(s) switched off."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import textwrap

import pytest

from .conftest import Sandbox, processes_of_uid, wait_no_processes

pytestmark = pytest.mark.integration


def attempt_code(body: str) -> str:
    """A handler that runs ``body`` (which sets ``result``) and reports errno on OSError."""
    return textwrap.dedent("""
        import ctypes, errno, json, os, socket, sys, time
        libc = ctypes.CDLL(None, use_errno=True)
        def handler(event, context):
            try:
        {body}
            except OSError as e:
                return {{"errno": e.errno}}
            return {{"ok": result}}
    """).format(body=textwrap.indent(textwrap.dedent(body), " " * 8))


def result(res: dict[str, object]) -> object:
    assert res["function_error"] is None, res
    return json.loads(res["payload"])  # type: ignore[arg-type]


def other_function_still_answers(sb: Sandbox) -> None:
    # A generous bound (a 128 MB function has 0.072 vCPU; the machine may be busy).
    env, res = sb.run("def handler(e, c):\n    return 'fine'\n", timeout_s=60)
    assert result(res) == "fine"
    sb.destroy(env)


# -- resources ----------------------------------------------------------------------------------

FORK_BOMB = """
    import os, time
    def handler(event, context):
        n = 0
        for _ in range(event["n"]):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        return n
"""


def test_fork_bomb(sandbox: Sandbox) -> None:
    env, res = sandbox.run(textwrap.dedent(FORK_BOMB), b'{"n": 100}', memory_mb=1024)
    assert result(res) < 64  # pids cgroup (64 here) and RLIMIT_NPROC
    uid = sandbox.uid_of(env)
    sandbox.destroy(env)
    assert wait_no_processes(uid) == []  # nothing left behind
    other_function_still_answers(sandbox)
    # Negative control: without the pids cgroup and rlimits the same (bounded) bomb runs through.
    env, res = sandbox.run(textwrap.dedent(FORK_BOMB), b'{"n": 100}', memory_mb=1024,
                           disabled=["cgroup_pids", "rlimits"])
    assert result(res) == 100
    uid = sandbox.uid_of(env)
    sandbox.destroy(env)
    assert wait_no_processes(uid) == []


HOG = """
    def handler(event, context):
        blocks = [bytearray(16 * 1024 * 1024) for _ in range(event["blocks"])]
        return len(blocks)
"""


def test_memory_hog_is_oom_killed_and_reported(sandbox: Sandbox) -> None:
    # Bounds, not deadlines: at 128 MB the function has 0.072 vCPU, and before the OOM kill
    # the kernel retries reclaim in the cgroup, which on a busy machine takes seconds. The
    # invoke waits up to 60 s for the outcome (the OOM kill ends it long before).
    env, res = sandbox.run(textwrap.dedent(HOG), b'{"blocks": 20}', memory_mb=128,
                           timeout_s=60)
    assert res["function_error"] is not None and not res["env_alive"], res
    err = json.loads(res["payload"])
    assert err["errorType"] == "Runtime.ExitError" and "out of memory" in err["errorMessage"]
    assert env not in sandbox.agent.envs  # the next invoke gets a fresh environment
    other_function_still_answers(sandbox)
    env, res = sandbox.run(textwrap.dedent(HOG), b'{"blocks": 20}', memory_mb=128,
                           timeout_s=60, disabled=["cgroup_memory"])
    assert result(res) == 20
    sandbox.destroy(env)


def test_cpu_spin_past_timeout(sandbox: Sandbox) -> None:
    env, res = sandbox.run("def handler(e, c):\n    while True:\n        pass\n", timeout_s=1)
    assert json.loads(res["payload"])["errorType"] == "Sandbox.Timedout"
    assert env not in sandbox.agent.envs


def test_never_returns_and_ignores_sigterm(sandbox: Sandbox) -> None:
    code = ("import signal, time\n"
            "def handler(e, c):\n"
            "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    while True:\n        time.sleep(1)\n")
    env = sandbox.create(code, timeout_s=1)
    uid = sandbox.uid_of(env)
    res = sandbox.invoke(env, timeout_s=1)
    assert json.loads(res["payload"])["errorType"] == "Sandbox.Timedout"
    assert wait_no_processes(uid) == []


FILL_TMP = """
    written = 0
    try:
        for i in range(event["mb"]):
            with open(f"/tmp/f{i}", "wb") as f:
                f.write(b"x" * (1024 * 1024))
            written += 1
    except OSError as e:
        result = {"written_mb": written, "errno": e.errno}
    else:
        result = {"written_mb": written}
"""


def test_filling_tmp(sandbox: Sandbox) -> None:
    env, res = sandbox.run(attempt_code(FILL_TMP), b'{"mb": 40}', ephemeral_mb=16)
    out = result(res)["ok"]  # type: ignore[index]
    assert out["written_mb"] <= 16 and out["errno"] in (errno.ENOSPC, errno.EFBIG)  # type: ignore[index]
    sandbox.destroy(env)
    env, res = sandbox.run(attempt_code(FILL_TMP), b'{"mb": 24}', ephemeral_mb=16,
                           disabled=["tmp_size", "rlimits"])
    assert result(res) == {"ok": {"written_mb": 24}}
    sandbox.destroy(env)


# -- the filesystem -----------------------------------------------------------------------------

def test_writing_outside_tmp(sandbox: Sandbox) -> None:
    code = attempt_code("""
        with open(event["path"], "w") as f:
            f.write("pwned")
        result = "written"
    """)
    for path in ("/var/task/pwned", "/pwned", "/usr/pwned", "/etc/pwned"):
        env, res = sandbox.run(code, json.dumps({"path": path}).encode())
        assert result(res) == {"errno": errno.EROFS}, path
        sandbox.destroy(env)
    # Negative control: with the read-only layer off the write lands in the host's bundle.
    env, res = sandbox.run(code, b'{"path": "/var/task/pwned"}', disabled=["readonly", "uid"])
    assert result(res) == {"ok": "written"}
    host_bundle = sandbox.agent.envs[env].spec.bundle_dir
    assert os.path.exists(os.path.join(host_bundle, "pwned"))
    os.unlink(os.path.join(host_bundle, "pwned"))
    sandbox.destroy(env)


def test_reading_host_secrets_other_bundles_and_agent_state(sandbox: Sandbox) -> None:
    _, victim = sandbox.bundle_dir("SECRET = 'victim'\ndef handler(e, c):\n    return 1\n")
    code = attempt_code("""
        result = open(event["path"]).read()[:20]
    """)
    for path in ("/etc/shadow", os.path.join(victim, "app.py"),
                 os.path.join(sandbox.agent.state_dir, "bundles")):
        env, res = sandbox.run(code, json.dumps({"path": path}).encode())
        assert result(res)["errno"] in (errno.ENOENT, errno.EISDIR), path  # type: ignore[index]
        if path.startswith(sandbox.agent.state_dir + "/bundles"):
            assert result(res)["errno"] == errno.ENOENT  # type: ignore[index]
        sandbox.destroy(env)
    # Negative control: another tenant's bundle (world-readable on the host) is readable
    # with the mount namespace off; /etc/shadow needs the uid layer off as well.
    env, res = sandbox.run(code, json.dumps({"path": os.path.join(victim, "app.py")}).encode(),
                           disabled=["mount_ns"])
    assert result(res) == {"ok": "SECRET = 'victim'\nde"}
    sandbox.destroy(env)
    env, res = sandbox.run(code, b'{"path": "/etc/shadow"}', disabled=["mount_ns"])
    assert result(res) == {"errno": errno.EACCES}  # the uid layer alone still stops it
    sandbox.destroy(env)
    env, res = sandbox.run(code, b'{"path": "/etc/shadow"}', disabled=["mount_ns", "uid"])
    assert "ok" in result(res)  # type: ignore[operator]
    sandbox.destroy(env)


def test_another_environments_tmp_is_invisible(sandbox: Sandbox) -> None:
    writer = sandbox.create(
        "def handler(e, c):\n    open('/tmp/secret', 'w').write('s3cr3t')\n    return 1\n")
    assert result(sandbox.invoke(writer)) == 1
    pid = sandbox.agent.envs[writer].spawned.pid
    code = attempt_code("""
        result = open(event["path"]).read()
    """)
    for path in (f"/proc/{pid}/root/tmp/secret", "/tmp/secret"):
        env, res = sandbox.run(code, json.dumps({"path": path}).encode())
        assert result(res) == {"errno": errno.ENOENT}
        sandbox.destroy(env)
    sandbox.destroy(writer)


# -- the network ----------------------------------------------------------------------------------

def test_no_connection_to_host_loopback(sandbox: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = attempt_code("""
        s = socket.create_connection((event["host"], event["port"]), timeout=2)
        s.close()
        result = "connected"
    """)
    try:
        for host in ("127.0.0.1", "::1", "localhost"):
            env, res = sandbox.run(code, json.dumps({"host": host, "port": port}).encode())
            assert result(res)["errno"] in (  # type: ignore[index]
                errno.ENETUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL), host
            sandbox.destroy(env)
        with pytest.raises(BlockingIOError):
            listener.accept()  # host-side: no connection arrived
        # Negative control: in the host's network namespace the same code connects.
        env, res = sandbox.run(code, json.dumps({"host": "127.0.0.1", "port": port}).encode(),
                               disabled=["net_ns"])
        assert result(res) == {"ok": "connected"}
        conn, _ = listener.accept()
        conn.close()
        sandbox.destroy(env)
    finally:
        listener.close()


def test_raw_and_packet_sockets(sandbox: Sandbox) -> None:
    code = attempt_code("""
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.close()
        result = "raw"
    """)
    env, res = sandbox.run(code)
    assert result(res) == {"errno": errno.EPERM}
    sandbox.destroy(env)
    env, res = sandbox.run(code, disabled=["uid"])  # root in its own empty netns: harmless
    assert result(res) == {"ok": "raw"}
    sandbox.destroy(env)
    packet = attempt_code("""
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
        result = "packet"
    """)
    for disabled in ([], ["uid"], ["seccomp"]):  # each of the two layers alone stops it
        env, res = sandbox.run(packet, disabled=disabled)
        assert result(res) == {"errno": errno.EPERM}, disabled
        sandbox.destroy(env)


# -- privileges and the kernel ----------------------------------------------------------------------

MOUNT = """
    os.makedirs("/tmp/m", exist_ok=True)
    if libc.mount(b"tmpfs", b"/tmp/m", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
    result = "mounted"
"""


def test_mount(sandbox: Sandbox) -> None:
    for disabled in ([], ["seccomp"], ["uid"]):
        env, res = sandbox.run(attempt_code(MOUNT), disabled=disabled)
        assert result(res) == {"errno": errno.EPERM}, disabled
        sandbox.destroy(env)
    # Both layers off: it works (inside the environment's private mount namespace).
    env, res = sandbox.run(attempt_code(MOUNT), disabled=["seccomp", "uid"])
    assert result(res) == {"ok": "mounted"}
    sandbox.destroy(env)


MODULE = """
    # finit_module(fd=-1): with the syscall allowed and the capability held the kernel gets as
    # far as the fd check (EBADF); nothing is ever loaded.
    if libc.syscall(313, -1, b"", 0) != 0:
        raise OSError(ctypes.get_errno(), "finit_module")
    result = "loaded"
"""


def test_loading_kernel_modules(sandbox: Sandbox) -> None:
    # A kernel built without module support answers ENOSYS once the filter lets the call by.
    reached_kernel = errno.EBADF if os.path.exists("/proc/modules") else errno.ENOSYS
    for disabled in ([], ["uid"]):
        env, res = sandbox.run(attempt_code(MODULE), disabled=disabled)
        assert result(res) == {"errno": errno.EPERM}, disabled
        sandbox.destroy(env)
    env, res = sandbox.run(attempt_code(MODULE), disabled=["seccomp"])
    assert result(res) in ({"errno": errno.EPERM}, {"errno": reached_kernel})
    sandbox.destroy(env)
    env, res = sandbox.run(attempt_code(MODULE), disabled=["seccomp", "uid"])
    assert result(res) == {"errno": reached_kernel}
    sandbox.destroy(env)


PTRACE = """
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    rc = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    err = ctypes.get_errno()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    if rc != 0:
        raise OSError(err, "ptrace")
    result = "attached"
"""


def test_ptrace(sandbox: Sandbox) -> None:
    env, res = sandbox.run(attempt_code(PTRACE))
    assert result(res) == {"errno": errno.EPERM}
    sandbox.destroy(env)
    for disabled in (["seccomp"], ["nondumpable"]):  # each layer alone stops it
        env, res = sandbox.run(attempt_code(PTRACE), disabled=disabled)
        assert result(res) == {"errno": errno.EPERM}, disabled
        sandbox.destroy(env)
    env, res = sandbox.run(attempt_code(PTRACE), disabled=["seccomp", "nondumpable"])
    assert result(res) == {"ok": "attached"}
    sandbox.destroy(env)
    # A sibling environment's process is not even visible.
    other = sandbox.create("def handler(e, c):\n    return 1\n")
    host_pid = sandbox.agent.envs[other].spawned.pid
    code = attempt_code(f"""
        if libc.ptrace(16, {host_pid}, None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        result = "attached"
    """)
    env, res = sandbox.run(code, disabled=["seccomp"])
    assert result(res) == {"errno": errno.ESRCH}
    sandbox.destroy(env)
    sandbox.destroy(other)


SETUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("%d", (int)geteuid()); return 0; }
"""


@pytest.fixture(scope="module")
def setuid_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not os.path.exists("/usr/bin/cc") and not os.path.exists("/usr/bin/gcc"):
        pytest.skip("no C compiler to build the setuid probe")
    d = tmp_path_factory.mktemp("suid")
    src = d / "probe.c"
    src.write_text(SETUID_C)
    out = d / "probe"
    subprocess.run(["cc", "-o", str(out), str(src)], check=True)
    return str(out)


def test_setuid_binaries(sandbox: Sandbox, setuid_binary: str) -> None:
    code = attempt_code("""
        import subprocess
        result = int(subprocess.run(["/var/task/probe"], capture_output=True, check=True).stdout)
    """)
    sha, bundle = sandbox.bundle_dir(code)
    import shutil

    dest = os.path.join(bundle, "probe")
    if not os.path.exists(dest):
        shutil.copy(setuid_binary, dest)
        os.chown(dest, 0, 0)
        os.chmod(dest, 0o4755 | stat.S_IXUSR)
        sandbox.reseal(bundle)
    for disabled in ([], ["nosuid"], ["no_new_privs"]):
        env, res = sandbox.run(code, disabled=disabled)
        assert result(res) == {"ok": sandbox.uid_of(env)}, disabled  # euid unchanged
        sandbox.destroy(env)
    env, res = sandbox.run(code, disabled=["nosuid", "no_new_privs"])
    assert result(res) == {"ok": 0}  # both off: the setuid bit would have made it root
    sandbox.destroy(env)


def test_cannot_create_namespaces(sandbox: Sandbox) -> None:
    code = attempt_code("""
        if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER: the classic privilege ladder
            raise OSError(ctypes.get_errno(), "unshare")
        result = "unshared"
    """)
    env, res = sandbox.run(code)
    assert result(res) == {"errno": errno.EPERM}
    sandbox.destroy(env)


# -- the channel ----------------------------------------------------------------------------------

def test_closing_stdout_and_stderr(sandbox: Sandbox) -> None:
    code = ("import os\n"
            "def handler(e, c):\n"
            "    print('before')\n"
            "    os.close(1)\n    os.close(2)\n"
            "    return 'still here'\n")
    env, res = sandbox.run(code)
    assert result(res) == "still here"
    assert b"before" in res["logs"]
    assert result(sandbox.invoke(env)) == "still here"  # and again, on the same environment
    sandbox.destroy(env)


GARBAGE = """
    import os, stat
    def handler(event, context):
        for fd in range(3, 64):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.write(fd, bytes.fromhex(event["hex"]))
            except OSError:
                pass
        return "wrote"
"""


def test_garbage_on_the_channel(sandbox: Sandbox) -> None:
    import msgpack

    forged = msgpack.packb({"t": "result", "id": "someone-else", "ok": True, "payload": b"1"})
    for payload in (b"\xc1\xc1garbage", forged):
        env = sandbox.create(textwrap.dedent(GARBAGE))
        uid = sandbox.uid_of(env)
        res = sandbox.invoke(env, json.dumps({"hex": payload.hex()}).encode())
        assert res["function_error"] is not None and not res["env_alive"]
        assert json.loads(res["payload"])["errorType"] in ("Runtime.ExitError",
                                                           "Runtime.InvalidResponse")
        assert env not in sandbox.agent.envs
        assert wait_no_processes(uid) == []
    other_function_still_answers(sandbox)


def test_no_processes_leak_after_destroy(sandbox: Sandbox) -> None:
    env = sandbox.create("import subprocess\ndef handler(e, c):\n"
                         "    subprocess.Popen(['sleep', '60'])\n    return 1\n")
    uid = sandbox.uid_of(env)
    assert result(sandbox.invoke(env)) == 1
    assert len(processes_of_uid(uid)) >= 2
    sandbox.destroy(env)
    assert wait_no_processes(uid) == []
