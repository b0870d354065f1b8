"""The guest agent: the first code in every environment (pid 1 of its namespaces).

It serves the Lambda Runtime API (runtime_api.py) to the function's runtime and relays
invocations between that API and the host agent, over the one channel the host agent created:

    guest -> agent  {"t": "ready", "init_error": None | {...}, "init_ms": float, "logs"}
    agent -> guest  {"t": "invoke", "id", "payload": bytes, "deadline_ms", "arn"}
    guest -> agent  {"t": "logs", "request_id", "logs": bytes}   (while it runs, every 0.5 s:
                    its complete lines so far; the result carries the rest)
    guest -> agent  {"t": "result", "id", "ok", "payload": bytes, "logs": bytes,
                     "duration_ms", "max_rss_kb", "error_type", "fatal": bool}
    (with extensions that got the invocation, the result goes as soon as the runtime posted
    it, with "phase": "pending"; the Invoke phase's end follows when they all asked for
    their next event:)
    guest -> agent  {"t": "done", "id", "logs": bytes, "duration_ms", "max_rss_kb", "fatal"}
    agent -> guest  {"t": "shutdown", "reason": "spindown"|"timeout"|"failure"}
    guest -> agent  {"t": "bye", "logs": bytes}   (then the guest exits)

External extensions (executables in /opt/extensions, started before the runtime) and the
Telemetry API are served on the Runtime API's address (extensions.py): see the lifecycle there.

The runtime is either the built-in Python runtime running as a thread here (the host's own
interpreter: no interpreter start, no HTTP inside one process) or a process — a custom
runtime's ``bootstrap`` or another Python version running ``pyruntime.py`` — that polls the
Runtime API over HTTP on the environment's loopback. Both run the same Runtime API state
machine; the built-in one also runs the same loop (``pyruntime.run_loop``).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import queue
import random
import re
import resource
import shutil
import signal
import socket
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from ..core import messages as m
from ..core import tracing
from ..core.limits import DEFAULT_LIMITS
from ..transport.codec import StreamChannel
from . import pyruntime
from .extensions import Extensions, Telemetry
from .runtime_api import Invocation, RuntimeApi, serve_http
from .spec import EnvSpec

response_bytes_max = 6 * 1024 * 1024
log_bytes_max = 256 * 1024
log_drain_timeout_s = 1.0
live_interval_s = 0.5  # a running invocation's lines go to the agent this often
init_timeout_s = 10.0  # Lambda's init phase limit
RUNTIME_API_ADDRESS = ("127.0.0.1", 9001)
EXTENSIONS_DIR = "/opt/extensions"
_SENTINEL = re.compile(rb"\x00cellcloud-log-cut-\d+\x00")


class _LineTap:
    """Splits a byte stream into lines for the Telemetry API (``function``/``extension``)."""

    def __init__(self, telemetry: Telemetry, kind: str) -> None:
        self._telemetry = telemetry
        self._kind = kind
        self._partial = b""
        self._lock = threading.Lock()  # fed by the runtime's thread and a pipe's drain

    def feed(self, data: bytes) -> None:
        if not self._telemetry.wants(self._kind):
            return
        with self._lock:
            data = self._partial + _SENTINEL.sub(b"", data)
            *lines, self._partial = data.split(b"\n")
            if len(self._partial) > log_bytes_max:  # a line without an end: cut it
                lines.append(self._partial)
                self._partial = b""
        for line in lines:
            self._telemetry.emit(self._kind, line.decode("utf-8", "replace"))


class _LogCapture:
    """Captures one invocation's output.

    Python-level writes (``print``, ``logging``) from the built-in runtime land in the buffer
    directly. fd 1 and 2 — subprocesses, C extensions, runtime processes — go into a pipe that
    a thread drains into the same buffer; only when that pipe saw bytes since the last cut does
    :meth:`cut` pay for a marker round trip to find where this invocation's output ends.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        os.dup2(w, 1)
        os.dup2(w, 2)
        self._marker_fd = os.dup(w)
        os.close(w)
        self._r = r
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._seq = 0
        self._drained = 0  # bytes the drain thread has taken from the pipe
        self._drained_at_cut = 0
        self._cut_lock = threading.RLock()
        self.tap: _LineTap | None = None  # the function's lines, for telemetry subscribers
        sys.stdout = _BufferStream(self, 1)
        sys.stderr = _BufferStream(self, 2)
        threading.Thread(target=self._drain, name="log-drain", daemon=True).start()

    def append(self, data: bytes, tap: bool = True) -> None:
        if tap and self.tap is not None:
            self.tap.feed(data)
        with self._cond:
            self._buf += data
            if len(self._buf) > 2 * log_bytes_max:
                del self._buf[: len(self._buf) - log_bytes_max]

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._r, 65536)
            except OSError:
                return
            if not data:
                return
            if self.tap is not None:
                self.tap.feed(data)
            with self._cond:
                self._drained += len(data)
                self._buf += data
                if len(self._buf) > 2 * log_bytes_max:
                    del self._buf[: len(self._buf) - log_bytes_max]
                self._cond.notify_all()

    def repair(self) -> None:
        """A handler may close fd 1 or 2; give the next invocation working ones again."""
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:
                os.dup2(self._marker_fd, fd)

    def write_line(self, text: str) -> None:
        self.append(text.encode() + b"\n", tap=False)  # the platform's lines, not the function's

    def _pipe_pending(self) -> int:
        try:
            buf = fcntl.ioctl(self._r, termios.FIONREAD, b"\0\0\0\0")
            return int.from_bytes(buf, sys.byteorder)
        except OSError:
            return 0

    def cut(self) -> bytes:
        """Everything written since the previous cut (the tail, if it was too long)."""
        with self._cut_lock:  # one cutter at a time (the relay, the live flusher, a shutdown)
            return self._cut()

    def cut_lines(self) -> bytes:
        """Like :meth:`cut`, but only whole lines: a line still being written stays for the
        next cut (unless it is already as long as the log may be)."""
        with self._cut_lock:
            out = self._cut()
            end = out.rfind(b"\n") + 1
            if end == len(out) or len(out) - end >= log_bytes_max // 2:
                return out
            with self._cond:
                self._buf[:0] = out[end:]
            return out[:end]

    def _cut(self) -> bytes:
        with self._cond:
            quiet = self._drained == self._drained_at_cut and not self._pipe_pending()
            if quiet:  # the fast path: nothing came through the pipe
                out = bytes(self._buf)
                self._buf.clear()
                return out[-log_bytes_max:]
        self._seq += 1
        sentinel = f"\x00cellcloud-log-cut-{self._seq}\x00".encode()
        try:
            os.write(self._marker_fd, sentinel)
        except OSError:
            pass
        deadline = time.monotonic() + log_drain_timeout_s
        with self._cond:
            while (idx := self._buf.find(sentinel)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:  # the handler closed our pipe: return what we have
                    out = bytes(self._buf)
                    self._buf.clear()
                    self._drained_at_cut = self._drained
                    return out[-log_bytes_max:]
                self._cond.wait(left)
            out = bytes(self._buf[:idx])
            del self._buf[: idx + len(sentinel)]
            self._drained_at_cut = self._drained
        return out[-log_bytes_max:]


class _LiveLogs:
    """Sends a running invocation's complete lines to the agent every ``live_interval_s``
    (GuestLogs), so that they are seen while it runs; the result then carries the rest.
    ``lock`` orders it with the relay: whoever holds it cuts *and* sends, so lines never
    arrive after the result that follows them."""

    def __init__(self, logs: _LogCapture, chan: _Channel) -> None:
        self.logs = logs
        self.chan = chan
        self.lock = threading.Lock()
        self.request_id: str | None = None
        self._running = threading.Event()
        threading.Thread(target=self._run, name="live-logs", daemon=True).start()

    def begin(self, request_id: str) -> None:
        with self.lock:
            self.request_id = request_id
        self._running.set()

    def end(self) -> None:
        """Called with ``lock`` held, before the relay's own cut and send."""
        self.request_id = None
        self._running.clear()

    def _run(self) -> None:
        while True:
            self._running.wait()
            time.sleep(live_interval_s)  # a periodic flush, not a wait for a condition
            with self.lock:
                if self.request_id is None:
                    continue
                data = self.logs.cut_lines()
                if data:
                    try:
                        self.chan.send(m.GuestLogs(self.request_id, data).to_wire())
                    except OSError:
                        return


class _BufferStream(io.TextIOBase):
    """sys.stdout/sys.stderr for the built-in runtime: text goes straight to the buffer."""

    def __init__(self, capture: _LogCapture, fd: int) -> None:
        self._capture = capture
        self._fd = fd

    def write(self, s: str) -> int:
        self._capture.append(s.encode("utf-8", "backslashreplace"))
        return len(s)

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


channel_frame_bytes_max = 64 * 1024 * 1024  # an agent frame: a 6 MB payload and its envelope

# The agent's end of the channel: frames (core/messages.py) in the one framing (transport/codec).
# Its send is locked: results come from the relay, "bye" from the reader thread.
_Channel = StreamChannel


def _runtime_trace(ask: m.GuestInvoke, now_ms: int) -> tuple[str, tuple[str, str] | None]:
    """The trace header the runtime gets (``Lambda-Runtime-Trace-Id``) and, when the agent
    asked for spans, (this environment's span id, its parent: the agent's span). An agent that
    sent no valid header (an older one) still gets the function a valid, new trace id."""
    trace = tracing.parse(ask.trace_id)
    if trace is None:
        return tracing.begin(None, now_ms=now_ms, rng=random.Random(os.urandom(16)),
                             sample=False)[0].format(), None
    if not ask.span:
        return trace.format(), None
    span_id = os.urandom(8).hex()
    if span_id == "0" * 16:
        span_id = "0" * 15 + "1"
    return trace.child(span_id).format(), (span_id, trace.parent or "")


class _InProcessClient:
    """The Runtime API client of the built-in runtime: direct calls on the state machine."""

    def __init__(self, api: RuntimeApi) -> None:
        self._api = api

    def next(self) -> tuple[str, bytes, int, str, str]:
        inv = self._api.next()
        return inv.request_id, inv.payload, inv.deadline_ms, inv.arn, inv.trace_id

    def respond(self, request_id: str, body: bytes) -> None:
        self._api.respond(request_id, body)

    def error(self, request_id: str, body: bytes) -> None:
        self._api.error(request_id, body)

    def init_error(self, body: bytes) -> None:
        self._api.init_fail(body)


class _ExtensionOutput:
    """The extensions' stdout/stderr: one pipe, drained into the invocation's logs (as Lambda
    puts them in the function's log stream) and to ``extension`` telemetry subscribers."""

    def __init__(self, logs: _LogCapture, telemetry: Telemetry) -> None:
        self._r, self.w = os.pipe()
        os.set_inheritable(self._r, False)
        self._logs = logs
        self._tap = _LineTap(telemetry, "extension")
        self._cond = threading.Condition()
        self._seen = 0
        self._seq = 0
        threading.Thread(target=self._drain, name="ext-log-drain", daemon=True).start()

    def _drain(self) -> None:
        while data := os.read(self._r, 65536):
            marks = len(_SENTINEL.findall(data))
            data = _SENTINEL.sub(b"", data)
            self._tap.feed(data)
            self._logs.append(data, tap=False)
            if marks:
                with self._cond:
                    self._seen += marks
                    self._cond.notify_all()

    def sync(self, timeout_s: float) -> None:
        """Wait (bounded) until everything written so far is in the logs."""
        self._seq += 1
        try:
            os.write(self.w, f"\x00cellcloud-log-cut-{self._seq}\x00".encode())
        except OSError:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._seen >= self._seq, timeout_s)


def _find_extensions() -> list[str]:
    """Every executable file directly in /opt/extensions, in alphabetical order (as Lambda)."""
    try:
        names = sorted(os.listdir(EXTENSIONS_DIR))
    except OSError:
        return []
    return [n for n in names
            if os.path.isfile(os.path.join(EXTENSIONS_DIR, n))
            and os.access(os.path.join(EXTENSIONS_DIR, n), os.X_OK)]


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal: {signal.Signals(os.WTERMSIG(status)).name.lower()[3:]}"
    return f"exit status {os.WEXITSTATUS(status)}"


class _Environment:
    """What runs in this environment besides the guest: the runtime process (if any) and the
    external extensions, and who is told when one of them exits."""

    def __init__(self, spec: EnvSpec, api: RuntimeApi, logs: _LogCapture) -> None:
        self.spec = spec
        self.api = api
        self.logs = logs
        self.telemetry = Telemetry()
        self.ready_info: tuple[float, int] = (0.0, 0)  # the init's ms, extensions registered
        arn = spec.function_arn.split(":")
        self.extensions = Extensions(spec.function_name, spec.function_version, spec.handler,
                                     _find_extensions(), arn[4] if len(arn) > 4 else "")
        self.extensions.on_register = lambda name, events: self.telemetry.emit(
            "platform.extension", {"name": name, "state": "Ready", "events": events})
        logs.tap = _LineTap(self.telemetry, "function")
        self.runtime_pid: int | None = None
        self.children: dict[int, str] = {}  # pid -> extension name
        self.ext_output: _ExtensionOutput | None = None
        self.shutting_down = threading.Event()
        self._reaper_lock = threading.Lock()
        self._reaping = False

    def serve(self) -> None:
        serve_http(self.api, *RUNTIME_API_ADDRESS, extensions=self.extensions,
                   telemetry=self.telemetry)

    def env_vars(self) -> dict[str, str]:
        host, port = RUNTIME_API_ADDRESS
        return dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"{host}:{port}")

    def start_extensions(self) -> None:
        """The extension-init phase: start them all, wait until each registered (or died)."""
        if not self.extensions.external:
            return
        self.ext_output = _ExtensionOutput(self.logs, self.telemetry)
        actions = [(os.POSIX_SPAWN_DUP2, self.ext_output.w, 1),
                   (os.POSIX_SPAWN_DUP2, self.ext_output.w, 2)]
        env = self.env_vars()
        for name in self.extensions.external:
            path = os.path.join(EXTENSIONS_DIR, name)
            try:
                with self._reaper_lock:  # known before the reaper can see it exit
                    pid = os.posix_spawn(path, [path], env, file_actions=actions)
                    self.children[pid] = name
            except OSError as e:
                self.extensions.extension_exited(name, f"cannot start {path}: {e}")
                continue
            if self.spec.runtime_argv == []:
                # The built-in runtime runs here: no catch-all reaper (it would steal the
                # handler's subprocesses' exit statuses); one waiter per extension.
                threading.Thread(target=self._wait_one, args=(pid,), daemon=True).start()
        if self.spec.runtime_argv:
            self._start_reaper()
        self.extensions.wait_registered(init_timeout_s)

    def _wait_one(self, pid: int) -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        with self._reaper_lock:
            self._child_exited(pid, status)

    def _child_exited(self, pid: int, status: int) -> None:
        why = _exit_reason(status)
        if pid == self.runtime_pid:
            self.api.runtime_exited(why)
        elif pid in self.children:
            name = self.children.pop(pid)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            self.extensions.extension_exited(
                name, f"exit code {code}" if code is not None else why)

    def _start_reaper(self) -> None:
        with self._reaper_lock:
            if self._reaping:
                return
            self._reaping = True

        def reap() -> None:
            # pid 1 of the namespace: reap everything, report the runtime's and extensions'.
            while True:
                try:
                    child, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    with self._reaper_lock:  # no child now; a spawn after this starts a reaper
                        try:
                            child, status = os.waitpid(-1, os.WNOHANG)
                        except ChildProcessError:
                            self._reaping = False
                            return
                        if child:
                            self._child_exited(child, status)
                    continue
                with self._reaper_lock:  # a child spawned under the lock is known by now
                    self._child_exited(child, status)

        threading.Thread(target=reap, name="reaper", daemon=True).start()

    def start_runtime(self) -> None:
        api, spec = self.api, self.spec
        argv = list(spec.runtime_argv)
        if argv == ["bootstrap"]:
            task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
            for cand in (os.path.join(task_root, "bootstrap"), "/opt/bootstrap"):
                if os.access(cand, os.X_OK):
                    argv = [cand]
                    break
            else:
                api.init_fail(json.dumps({
                    "errorType": "Runtime.InvalidEntrypoint",
                    "errorMessage": "Couldn't find valid bootstrap(s): [/var/task/bootstrap "
                                    "/opt/bootstrap]"}).encode())
                return
        if "/" not in argv[0]:  # an image's ENTRYPOINT may name a command on its PATH
            argv[0] = shutil.which(argv[0], path=os.environ.get("PATH")) or argv[0]
        try:
            with self._reaper_lock:  # known before the reaper can see it exit
                self.runtime_pid = os.posix_spawn(argv[0], argv, self.env_vars())
        except OSError as e:
            api.init_fail(json.dumps({"errorType": "Runtime.InvalidEntrypoint",
                                      "errorMessage": f"cannot start {argv[0]}: {e}"}).encode())
            return
        self._start_reaper()

    def shutdown(self, chan: _Channel, reason: str) -> NoReturn:
        """Lambda's SHUTDOWN phase: with extensions registered, SIGTERM to the runtime and the
        SHUTDOWN event to the external extensions, within the budget (2 s with external
        extensions, 500 ms with internal ones only); none without. Then the remaining logs go
        to the agent, and the environment ends."""
        self.shutting_down.set()
        ext = self.extensions
        lim = DEFAULT_LIMITS
        budget_ms = (lim.env_shutdown_ms_with_extensions if ext.external_registered
                     else lim.env_shutdown_ms_internal_extensions if ext.registered else 0)
        end = time.monotonic() + budget_ms / 1000
        if ext.registered:
            if self.runtime_pid is not None and self.api.exited is None:
                try:
                    os.kill(self.runtime_pid, signal.SIGTERM)
                except OSError:
                    pass
            elif self.runtime_pid is None and callable(signal.getsignal(signal.SIGTERM)):
                # The built-in runtime is this process: a handler the function installed for
                # SIGTERM (graceful shutdown) runs on the main thread.
                signal.raise_signal(signal.SIGTERM)
            if ext.external_registered:
                ext.shutdown(reason, int(time.time() * 1000) + budget_ms,
                             max(0.0, end - time.monotonic()))
            if self.runtime_pid is not None:
                self.api.wait_exited(max(0.0, end - time.monotonic()))
        if self.telemetry.active:
            self.telemetry.flush(max(0.0, end - time.monotonic()))
        if self.ext_output is not None:
            self.ext_output.sync(max(0.05, end - time.monotonic()))
        try:
            chan.send({"t": "bye", "logs": self.logs.cut()})  # GuestBye
        except OSError:
            pass
        os._exit(0)


class FdStream:
    """The socket calls :class:`StreamChannel` makes, on a stream that is not a socket: a
    microVM's virtio-serial port (``/dev/vportNpM``), a character device."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def recv_into(self, buf: bytearray) -> int:
        return os.readv(self._fd, [buf])

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def sendmsg(self, views: list[memoryview]) -> int:
        return os.writev(self._fd, views)

    def close(self) -> None:
        os.close(self._fd)


def run(spec: EnvSpec, chan_fd: int, started: float | None = None) -> NoReturn:
    """Serve invocations until the host agent closes the channel or shuts the environment down.
    ``chan_fd``: the jail's socket, or a microVM's virtio-serial port (microvm/guest_vm.py)."""
    started = time.monotonic() if started is None else started
    os.set_inheritable(chan_fd, False)  # a runtime process must not inherit the channel
    sock: Any
    if stat.S_ISSOCK(os.fstat(chan_fd).st_mode):
        sock = socket.socket(fileno=chan_fd)
        sock.setblocking(True)
    else:
        sock = FdStream(chan_fd)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logs = _LogCapture()
    api = RuntimeApi(response_bytes_max, DEFAULT_LIMITS.response_stream_bytes_max)
    env = _Environment(spec, api, logs)
    env.telemetry.emit("platform.initStart", {
        "initializationType": "on-demand", "phase": "init",
        "runtimeVersion": spec.runtime, "functionName": spec.function_name,
        "functionVersion": spec.function_version})
    inline: tuple[Any, _InProcessClient] | None = None
    if spec.runtime_argv or env.extensions.external:
        env.serve()  # the Runtime, Extensions and Telemetry APIs on the loopback
    env.start_extensions()
    if env.extensions.error is not None:
        pass  # an extension failed its init: the runtime is not started (as on Lambda)
    elif spec.runtime_argv:
        env.start_runtime()
    else:
        # The built-in runtime runs inline on this (the main) thread, as on Lambda: handlers
        # may use signals, and an invocation costs no thread hand-off at all.
        pyruntime.setup_logging()
        fn, init_error = pyruntime.init(spec.handler)
        if init_error is not None:
            api.init_fail(json.dumps(init_error).encode())
        else:
            inline = (fn, _InProcessClient(api))
            api.mark_ready()
    _relay(env, _Channel(sock, channel_frame_bytes_max), started, inline)
    os._exit(0)


@contextlib.contextmanager
def _live_ended(live: _LiveLogs | None) -> Iterator[None]:
    """The live flusher stopped for this invocation, held off while the relay cuts and sends
    its result (a no-op without one)."""
    if live is None:
        yield
        return
    with live.lock:
        live.end()
        yield


# A microVM guest saved after its init (a function version's snapshot, microvm/agentsnap.py)
# sets this (microvm/guest_vm.py): the host's first frame to each restored copy is
# {"t": "restore", "seed", "time_ms"}; the hook applies them and returns its status (0: all
# applied). The copy then answers as an environment does after its init: the ready frame (the
# init's duration, done once before the snapshot), with "restored": the status.
on_restore: Callable[[dict[str, Any]], int] | None = None
# ... and this: the function's before-snapshot hooks, run after its init and before the ready
# frame (the host saves the guest once it has it); an error dict fails the init.
before_ready: Callable[[], dict[str, Any] | None] | None = None


def _next_message(env: _Environment, chan: _Channel) -> dict[str, Any]:
    """The agent's next frame; a shutdown is handled here (and ends the process), as is the
    channel's end, and a restored guest's restore frame."""
    msg = chan.recv()
    if msg is None:
        os._exit(0)
    if not isinstance(msg, dict):
        os._exit(1)  # not the agent's: nothing more to trust on this channel
    if msg.get("t") == "shutdown":
        env.shutdown(chan, str(msg.get("reason") or "spindown"))
    if msg.get("t") == "restore" and on_restore is not None:
        status = on_restore(msg)
        init_ms, registered = env.ready_info
        error = None if status == 0 else {
            "errorType": "Runtime.SandboxSetupError",
            "errorMessage": f"the restored guest could not apply its seed and clock "
                            f"(status {status})"}
        chan.send({**m.GuestReady(init_ms, error, b"", registered).to_wire(),
                   "restored": status})
    return msg


def _read_channel(env: _Environment, chan: _Channel, inbox: queue.Queue[dict[str, Any]]) -> None:
    """With extensions registered, the channel has a reader thread of its own: a shutdown is
    handled even while an invocation runs (one that timed out, say), so the extensions get
    their SHUTDOWN event."""
    while True:
        inbox.put(_next_message(env, chan))


def _chunk_sender(chan: _Channel) -> Callable[[str, bytes, str], None]:
    def send(request_id: str, data: bytes, content_type: str) -> None:
        chan.send({"t": "chunk", "request_id": request_id, "data": data,  # GuestChunk
                   "content_type": content_type})
    return send


def _relay(env: _Environment, chan: _Channel, started: float,
           inline: tuple[Any, _InProcessClient] | None) -> None:
    """Between the host agent's channel and the Runtime API, one invocation at a time."""
    spec, api, logs, ext, telemetry = env.spec, env.api, env.logs, env.extensions, env.telemetry
    deadline = started + init_timeout_s
    if ext.error is None:
        # Init ends when the runtime asked for its first invocation and every extension
        # called next once (all within Lambda's init limit).
        if not api.wait_ready(max(0.0, deadline - time.monotonic())):
            api.init_fail(json.dumps({
                "errorType": "Runtime.InitTimeout",
                "errorMessage": f"init did not finish within {init_timeout_s:.0f} s"}).encode())
        elif not ext.wait_init_done(max(0.0, deadline - time.monotonic())):
            api.init_fail(json.dumps({
                "errorType": "Extension.InitTimeout",
                "errorMessage": f"extensions did not finish their init within "
                                f"{init_timeout_s:.0f} s"}).encode())
    ext.end_init()
    init_error = ext.error or api.init_error
    if init_error is None and api.exited is not None:
        init_error = {"errorType": "Runtime.ExitError",
                      "errorMessage": f"Runtime exited with error: {api.exited}"}
    if init_error is None and before_ready is not None:
        init_error = before_ready()  # a version snapshot's beforeCheckpoint hooks
    init_ms = (time.monotonic() - started) * 1000
    status = "success" if init_error is None else "error"
    telemetry.emit("platform.initRuntimeDone", {
        "initializationType": "on-demand", "phase": "init", "status": status,
        **({"errorType": init_error["errorType"]} if init_error else {})})
    telemetry.emit("platform.initReport", {
        "initializationType": "on-demand", "phase": "init", "status": status,
        "metrics": {"durationMs": round(init_ms, 3)}})
    telemetry.end_init()
    with_extensions = ext.registered > 0  # fixed from here on: registration is closed
    env.ready_info = (init_ms, ext.registered)  # a restored copy's ready frame says the same
    chan.send(m.GuestReady(init_ms, init_error, logs.cut(), ext.registered).to_wire())
    live: _LiveLogs | None = None  # started with the first invocation of this dialect
    inbox: queue.Queue[dict[str, Any]] | None = None
    if with_extensions:
        inbox = queue.Queue()
        threading.Thread(target=_read_channel, args=(env, chan, inbox), name="channel",
                         daemon=True).start()
    first = True
    while True:
        # Without extensions, the fast path: this thread reads the channel, no hand-off.
        msg = inbox.get() if inbox is not None else _next_message(env, chan)
        if msg.get("t") != "invoke":
            continue
        received_ms = int(time.time() * 1000)
        try:
            ask = m.GuestInvoke.from_wire(msg, received_ms)
        except m.MessageError:
            os._exit(1)  # the agent reads the closed channel as a crash
        request_id = ask.request_id
        trace_id, env_span = _runtime_trace(ask, received_ms)
        span_start_ns = time.time_ns()
        logs.write_line(f"START RequestId: {request_id} Version: {spec.function_version}")
        if not ask.legacy:  # an agent of this dialect reads GuestLogs frames
            if live is None:
                live = _LiveLogs(logs, chan)
            live.begin(request_id)
        if telemetry.active:
            telemetry.emit("platform.start", {"requestId": request_id,
                                              "version": spec.function_version})
        t0 = time.monotonic()
        error_type: str | None
        fatal = False
        answered = False  # the response went back before the Invoke phase ended
        if init_error is None and ext.error is not None:  # an extension died since
            init_error, fatal = ext.error, True
        if init_error is not None:
            err = dict(init_error, requestId=request_id)
            logs.write_line(f"[ERROR] {err['errorType']}: {err['errorMessage']}")
            ok, payload, error_type = False, json.dumps(err).encode(), "Unhandled"
        else:
            deadline_ms = received_ms + ask.timeout_ms
            # A streamed invocation: the response's bytes go to the agent as the runtime
            # streams them (GuestChunk frames), before the result (whose payload is then empty).
            api.chunk_sink = _chunk_sender(chan) if ask.stream else None
            api.submit(Invocation(request_id, ask.payload, deadline_ms, ask.arn, trace_id))
            notified = ext.begin_invoke({
                "eventType": "INVOKE", "deadlineMs": deadline_ms, "requestId": request_id,
                "invokedFunctionArn": ask.arn,
                "tracing": {"type": "X-Amzn-Trace-Id", "value": trace_id},
            }) if with_extensions else []
            if inline is not None:
                try:
                    pyruntime.handle_one(*inline)
                except SystemExit as e:  # the handler ended the runtime, as sys.exit() does
                    api.runtime_exited(f"exit status {e.code if isinstance(e.code, int) else 1}")
                except BaseException as e:
                    api.runtime_exited(f"runtime failed: {e!r}")
            outcome = api.wait_outcome()
            ok, payload, error_type = outcome.ok, outcome.payload, outcome.error_type
            if telemetry.active:
                runtime_ms = (time.monotonic() - t0) * 1000
                telemetry.emit("platform.runtimeDone", {
                    "requestId": request_id,
                    "status": "success" if ok else ("failure" if api.exited else "error"),
                    "metrics": {"durationMs": round(runtime_ms, 3),
                                "producedBytes": len(payload)}})
            if with_extensions and ext.error is not None:  # an extension died meanwhile
                err = dict(ext.error, requestId=request_id)
                logs.write_line(f"[ERROR] {err['errorType']}: {err['errorMessage']}")
                ok, payload, error_type, fatal = False, json.dumps(err).encode(), "Unhandled", True
            elif notified:
                # As on Lambda, the response goes back as soon as the runtime posted it; the
                # Invoke phase goes on until every extension that got the event asked for the
                # next one (the agent holds the environment, bounded by the function's
                # timeout: an extension that overruns it gets the environment reset).
                with _live_ended(live):
                    chan.send(m.GuestResult(
                        request_id, payload, None if ok else (error_type or "Unhandled"),
                        logs.cut(), (time.monotonic() - t0) * 1000, 0, env_alive=True,
                        phase_pending=True, legacy=ask.legacy).to_wire())
                answered = True
                ext.wait_done(notified)
                if ext.error is not None:  # crashed after the response: the env is reset
                    err = ext.error
                    logs.write_line(f"[ERROR] {err['errorType']}: {err['errorMessage']}")
                    fatal = True
        if env.shutting_down.is_set():
            threading.Event().wait()  # the reader thread is ending this environment
        duration_ms = (time.monotonic() - t0) * 1000
        max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = (
            f"END RequestId: {request_id}\n"
            f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
            f"Billed Duration: {max(1, math.ceil(duration_ms))} ms\t"
            f"Memory Size: {spec.memory_mb} MB\tMax Memory Used: {max_rss_kb // 1024} MB"
        )
        metrics: dict[str, Any] = {
            "durationMs": round(duration_ms, 3), "billedDurationMs": max(1, math.ceil(duration_ms)),
            "memorySizeMB": spec.memory_mb, "maxMemoryUsedMB": max_rss_kb // 1024}
        if first:
            report += f"\tInit Duration: {init_ms:.2f} ms"
            metrics["initDurationMs"] = round(init_ms, 3)
            first = False
        logs.write_line(report)
        if telemetry.active:
            telemetry.emit("platform.report", {
                "requestId": request_id, "status": "success" if ok else "error",
                "metrics": metrics})
        logs.repair()
        fatal = fatal or api.exited is not None
        if answered:  # the Invoke phase's end: its remaining logs, the REPORT among them
            chan.send(m.GuestPhaseDone(request_id, logs.cut(), duration_ms, max_rss_kb,
                                       env_alive=not fatal, legacy=ask.legacy).to_wire())
        else:
            with _live_ended(live):
                chan.send(m.GuestResult(
                    request_id, payload, None if ok else (error_type or "Unhandled"),
                    logs.cut(), duration_ms, max_rss_kb, env_alive=not fatal,
                    legacy=ask.legacy,
                    span=m.Span("environment", env_span[0], env_span[1], span_start_ns,
                                time.time_ns()) if env_span else None).to_wire())
        if fatal:
            if not with_extensions:
                os._exit(1)  # the runtime is gone: this environment is done
            # The agent shuts it down (reason "failure": the extensions get SHUTDOWN), or we go.
            env.shutting_down.wait(init_timeout_s)
            if not env.shutting_down.is_set():
                os._exit(1)
            threading.Event().wait()
