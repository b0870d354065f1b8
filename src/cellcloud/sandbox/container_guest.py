"""The guest of a task's container (agent/tasks.py): pid 1 of the container's namespaces.

Jailed exactly as a function's environment is (jail.py: namespaces, image root, seccomp, its
own unprivileged uid; the task's cgroup and network namespace), it runs the container's
ENTRYPOINT + CMD as its child — not a Lambda runtime: there is no Runtime API — and relays
over the one channel the agent created:

    guest -> agent  {"t": "started", "pid", "started_ms"}  (or an "exit" with "error": the
                    process could not be started, 127 not found / 126 not executable)
    guest -> agent  {"t": "out", "stream": "stdout"|"stderr", "lines": [[time_ms, bytes]]}
                    complete lines as the process writes them (a line longer than
                    task_log_line_bytes_max is cut there)
    agent -> guest  {"t": "stop", "grace_s"}   SIGTERM to the process, SIGKILL to every
                    process of the container after grace_s
    agent -> guest  {"t": "exec", "id", "command", "timeout_s", "output_max"}
    guest -> agent  {"t": "exec_result", "id", "exit_code", "output", "timed_out", "error"}
    guest -> agent  {"t": "exit", "code", "exited_ms"}   the process ended (a signal: 128 + it);
                    then the guest exits, and with it every process left in the container

The guest reaps every child itself (it is pid 1: orphans come to it too), so an exit status
is never lost to another waiter.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from typing import Any, NoReturn

from ..core.limits import DEFAULT_LIMITS
from ..transport.codec import StreamChannel
from .spec import EnvSpec

channel_frame_bytes_max = 1024 * 1024  # what the agent may send (stop, exec)
drain_after_exit_s = 1.0  # output still in the pipes when the process exited


def _now_ms() -> int:
    return int(time.time() * 1000)


def exit_code(status: int) -> int:
    """A wait status as a shell (and ECS) reports it: the code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class _Reaper:
    """Every child's exit status, by pid, from one ``waitpid(-1)`` loop."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done: dict[int, int] = {}
        self._watched: set[int] = set()

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        with self._cond:  # registered before the loop can report it
            proc = subprocess.Popen(argv, **kw)
            self._watched.add(proc.pid)
            return proc

    def loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.05)  # a wait for the next child's start, not for a condition
                continue
            except InterruptedError:
                continue
            with self._cond:
                if pid in self._watched:
                    self._watched.discard(pid)
                    self._done[pid] = exit_code(status)
                    self._cond.notify_all()

    def wait(self, pid: int, timeout_s: float | None = None) -> int | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while pid not in self._done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self._done.pop(pid)


def _pump(fd: int, stream: str, chan: StreamChannel) -> None:
    """Lines of ``fd`` to the agent until EOF (a last line without its newline included)."""
    cut = DEFAULT_LIMITS.task_log_line_bytes_max
    partial = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        now = _now_ms()
        if not data:
            if partial:
                chan.send({"t": "out", "stream": stream, "lines": [[now, partial]]})
            os.close(fd)
            return
        *lines, partial = (partial + data).split(b"\n")
        while len(partial) >= cut:  # a line without an end: cut it
            lines.append(partial[:cut])
            partial = partial[cut:]
        if lines:
            chan.send({"t": "out", "stream": stream,
                       "lines": [[now, ln[:cut]] for ln in lines]})


def _exec(reaper: _Reaper, chan: StreamChannel, msg: dict[str, Any]) -> None:
    """A health check's command: its output (bounded) and exit code, killed at its timeout."""
    req_id = msg.get("id")
    command = [str(a) for a in msg.get("command") or []]
    timeout_s = float(msg.get("timeout_s") or 5.0)
    output_max = int(msg.get("output_max") or DEFAULT_LIMITS.task_exec_output_bytes_max)
    reply: dict[str, Any] = {"t": "exec_result", "id": req_id, "exit_code": None,
                             "output": b"", "timed_out": False, "error": ""}
    try:
        proc = reaper.spawn(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        reply["error"] = f"{command[0] if command else ''}: {e.strerror or e}"
        chan.send(reply)
        return
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    out = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    eof = False
    while not eof and (left := deadline - time.monotonic()) > 0:
        if not sel.select(left):
            continue
        data = os.read(proc.stdout.fileno(), 65536)
        eof = not data
        out += data[:max(0, output_max - len(out))]  # the rest is read and dropped
    sel.close()
    proc.stdout.close()
    code = reaper.wait(proc.pid, max(0.0, deadline - time.monotonic())) if eof else None
    if code is None:
        reply["timed_out"] = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        reaper.wait(proc.pid, 5.0)
    reply["exit_code"] = code
    reply["output"] = bytes(out)
    chan.send(reply)


def _stop(proc: subprocess.Popen[bytes], exited: threading.Event, grace_s: float) -> None:
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not exited.wait(max(0.0, grace_s)):
        os.kill(-1, signal.SIGKILL)  # every process of the container but this one


def run(spec: EnvSpec, chan_fd: int) -> NoReturn:
    """Run the container's process and relay until it exits (or the agent hangs up)."""
    os.set_inheritable(chan_fd, False)
    sock = socket.socket(fileno=chan_fd)
    sock.setblocking(True)
    chan = StreamChannel(sock, channel_frame_bytes_max)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    reaper = _Reaper()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = reaper.spawn(list(spec.runtime_argv), stdin=subprocess.DEVNULL, stdout=out_w,
                            stderr=err_w)
    except OSError as e:
        code = 127 if e.errno == errno.ENOENT else 126
        chan.send({"t": "exit", "code": code, "exited_ms": _now_ms(),
                   "error": f"{spec.runtime_argv[0] if spec.runtime_argv else ''}: "
                            f"{e.strerror or e}"})
        os._exit(0)
    os.close(out_w)
    os.close(err_w)
    chan.send({"t": "started", "pid": proc.pid, "started_ms": _now_ms()})
    pumps = [threading.Thread(target=_pump, args=(fd, name, chan), daemon=True)
             for fd, name in ((out_r, "stdout"), (err_r, "stderr"))]
    for t in pumps:
        t.start()
    threading.Thread(target=reaper.loop, name="reaper", daemon=True).start()
    exited = threading.Event()

    def serve() -> None:
        while True:
            msg = chan.recv()
            if not isinstance(msg, dict):
                os._exit(1)  # the agent hung up (or is not the agent): the container ends
            if msg.get("t") == "stop":
                threading.Thread(target=_stop, daemon=True,
                                 args=(proc, exited, float(msg.get("grace_s") or 0))).start()
            elif msg.get("t") == "exec":
                threading.Thread(target=_exec, args=(reaper, chan, msg), daemon=True).start()

    threading.Thread(target=serve, name="channel", daemon=True).start()
    status = reaper.wait(proc.pid)
    exited.set()
    exited_ms = _now_ms()
    for t in pumps:  # what the process wrote before it ended (bounded: a grandchild may
        t.join(drain_after_exit_s)  # still hold the pipe)
    chan.send({"t": "exit", "code": status, "exited_ms": exited_ms})
    os._exit(0)
