"""The guest agent: the first code in every environment (pid 1 of its namespaces).

It serves the Lambda Runtime API (runtime_api.py) to the function's runtime and relays
invocations between that API and the host agent, over the one channel the host agent created:

    guest -> agent  {"t": "ready", "init_error": None | {...}, "init_ms": float, "logs"}
    agent -> guest  {"t": "invoke", "id", "payload": bytes, "deadline_ms", "arn"}
    guest -> agent  {"t": "result", "id", "ok", "payload": bytes, "logs": bytes,
                     "duration_ms", "max_rss_kb", "error_type", "fatal": bool}

The runtime is either the built-in Python runtime running as a thread here (the host's own
interpreter: no interpreter start, no HTTP inside one process) or a process — a custom
runtime's ``bootstrap`` or another Python version running ``pyruntime.py`` — that polls the
Runtime API over HTTP on the environment's loopback. Both run the same Runtime API state
machine; the built-in one also runs the same loop (``pyruntime.run_loop``).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import resource
import signal
import socket
import sys
import termios
import threading
import time
from typing import Any, NoReturn

import msgpack

from . import pyruntime
from .runtime_api import Invocation, RuntimeApi, serve_http
from .spec import EnvSpec

response_bytes_max = 6 * 1024 * 1024
log_bytes_max = 256 * 1024
log_drain_timeout_s = 1.0
init_timeout_s = 10.0  # Lambda's init phase limit
RUNTIME_API_ADDRESS = ("127.0.0.1", 9001)


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
        sys.stdout = _BufferStream(self, 1)
        sys.stderr = _BufferStream(self, 2)
        threading.Thread(target=self._drain, name="log-drain", daemon=True).start()

    def append(self, data: bytes) -> None:
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
        self.append(text.encode() + b"\n")

    def _pipe_pending(self) -> int:
        try:
            buf = fcntl.ioctl(self._r, termios.FIONREAD, b"\0\0\0\0")
            return int.from_bytes(buf, sys.byteorder)
        except OSError:
            return 0

    def cut(self) -> bytes:
        """Everything written since the previous cut (the tail, if it was too long)."""
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


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024 * 1024)
        self._packer = msgpack.Packer(use_bin_type=True)

    def send(self, doc: dict[str, Any]) -> None:
        self._sock.sendall(self._packer.pack(doc))

    def recv(self) -> dict[str, Any] | None:
        while True:
            for doc in self._unpacker:
                return doc
            data = self._sock.recv(1 << 20)
            if not data:
                return None
            self._unpacker.feed(data)


class _InProcessClient:
    """The Runtime API client of the built-in runtime: direct calls on the state machine."""

    def __init__(self, api: RuntimeApi) -> None:
        self._api = api

    def next(self) -> tuple[str, bytes, int, str]:
        inv = self._api.next()
        return inv.request_id, inv.payload, inv.deadline_ms, inv.arn

    def respond(self, request_id: str, body: bytes) -> None:
        self._api.respond(request_id, body)

    def error(self, request_id: str, body: bytes) -> None:
        self._api.error(request_id, body)

    def init_error(self, body: bytes) -> None:
        self._api.init_fail(body)


def _start_process(api: RuntimeApi, spec: EnvSpec) -> None:
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
    serve_http(api, *RUNTIME_API_ADDRESS)
    host, port = RUNTIME_API_ADDRESS
    env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"{host}:{port}")
    try:
        pid = os.posix_spawn(argv[0], argv, env)
    except OSError as e:
        api.init_fail(json.dumps({"errorType": "Runtime.InvalidEntrypoint",
                                  "errorMessage": f"cannot start {argv[0]}: {e}"}).encode())
        return

    def reap() -> None:
        # pid 1 of the namespace: reap everything, report the runtime's own exit.
        while True:
            try:
                child, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            if child == pid:
                if os.WIFSIGNALED(status):
                    why = f"signal: {signal.Signals(os.WTERMSIG(status)).name.lower()[3:]}"
                else:
                    why = f"exit status {os.WEXITSTATUS(status)}"
                api.runtime_exited(why)

    threading.Thread(target=reap, name="reaper", daemon=True).start()


def run(spec: EnvSpec, chan_fd: int) -> NoReturn:
    """Serve invocations until the host agent closes the channel."""
    started = time.monotonic()
    os.set_inheritable(chan_fd, False)  # a runtime process must not inherit the channel
    sock = socket.socket(fileno=chan_fd)
    sock.setblocking(True)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logs = _LogCapture()
    api = RuntimeApi(response_bytes_max)
    inline: tuple[Any, _InProcessClient] | None = None
    if spec.runtime_argv:
        _start_process(api, spec)
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
    _relay(spec, _Channel(sock), api, logs, started, inline)
    os._exit(0)


def _relay(spec: EnvSpec, chan: _Channel, api: RuntimeApi, logs: _LogCapture, started: float,
           inline: tuple[Any, _InProcessClient] | None) -> None:
    """Between the host agent's channel and the Runtime API, one invocation at a time."""
    if not api.wait_ready(init_timeout_s):
        api.init_fail(json.dumps({"errorType": "Runtime.InitTimeout", "errorMessage":
                                  f"init did not finish within {init_timeout_s:.0f} s"}).encode())
    init_error = api.init_error
    if init_error is None and api.exited is not None:
        init_error = {"errorType": "Runtime.ExitError",
                      "errorMessage": f"Runtime exited with error: {api.exited}"}
    init_ms = (time.monotonic() - started) * 1000
    chan.send({"t": "ready", "init_error": init_error, "init_ms": init_ms, "logs": logs.cut()})
    first = True
    while True:
        msg = chan.recv()
        if msg is None:
            os._exit(0)
        if msg.get("t") != "invoke":
            continue
        request_id = msg["id"]
        logs.write_line(f"START RequestId: {request_id} Version: {spec.function_version}")
        t0 = time.monotonic()
        error_type: str | None
        if init_error is not None:
            err = dict(init_error, requestId=request_id)
            logs.write_line(f"[ERROR] {err['errorType']}: {err['errorMessage']}")
            ok, payload, error_type = False, json.dumps(err).encode(), "Unhandled"
        else:
            api.submit(Invocation(request_id, msg["payload"], int(msg["deadline_ms"]),
                                  msg.get("arn", "")))
            if inline is not None:
                try:
                    pyruntime.handle_one(*inline)
                except SystemExit as e:  # the handler ended the runtime, as sys.exit() does
                    api.runtime_exited(f"exit status {e.code if isinstance(e.code, int) else 1}")
                except BaseException as e:
                    api.runtime_exited(f"runtime failed: {e!r}")
            outcome = api.wait_outcome()
            ok, payload, error_type = outcome.ok, outcome.payload, outcome.error_type
        duration_ms = (time.monotonic() - t0) * 1000
        max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = (
            f"END RequestId: {request_id}\n"
            f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
            f"Billed Duration: {max(1, math.ceil(duration_ms))} ms\t"
            f"Memory Size: {spec.memory_mb} MB\tMax Memory Used: {max_rss_kb // 1024} MB"
        )
        if first:
            report += f"\tInit Duration: {init_ms:.2f} ms"
            first = False
        logs.write_line(report)
        logs.repair()
        chan.send({"t": "result", "id": request_id, "ok": ok, "payload": payload,
                   "error_type": error_type, "logs": logs.cut(), "duration_ms": duration_ms,
                   "max_rss_kb": max_rss_kb, "fatal": api.exited is not None})
        if api.exited is not None:
            os._exit(1)  # the runtime is gone: this environment is done
