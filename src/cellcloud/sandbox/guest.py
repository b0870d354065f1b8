"""The guest agent: the first code in every environment. It loads the function's handler and
runs it for each invocation the host agent sends over the environment's channel, exactly as AWS
Lambda's Python runtime calls it: ``handler(event, context)``.

Channel frames (msgpack, one socket the host agent created; the guest never opens one):
    guest -> agent  {"t": "ready", "init_error": None | {...}, "init_ms": float}
    agent -> guest  {"t": "invoke", "id", "payload": bytes, "deadline_ms", "arn"}
    guest -> agent  {"t": "result", "id", "ok", "payload": bytes, "logs": bytes,
                     "duration_ms", "max_rss_kb", "error_type"}
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import resource
import socket
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

import msgpack

from .spec import EnvSpec

response_bytes_max = 6 * 1024 * 1024
log_bytes_max = 256 * 1024
log_drain_timeout_s = 1.0


class LambdaContext:
    """The context object of AWS Lambda's Python runtime (same attribute names and types)."""

    def __init__(self, spec: EnvSpec, request_id: str, deadline_ms: int, arn: str) -> None:
        self.aws_request_id = request_id
        self.function_name = spec.function_name
        self.function_version = spec.function_version
        self.invoked_function_arn = arn
        self.memory_limit_in_mb = str(spec.memory_mb)
        self.log_group_name = spec.log_group
        self.log_stream_name = spec.log_stream
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))

    def __repr__(self) -> str:
        return (f"LambdaContext([aws_request_id={self.aws_request_id},"
                f"function_name={self.function_name},"
                f"function_version={self.function_version}])")


class _LogCapture:
    """fd 1 and 2 go into a pipe that a thread drains into a bounded buffer; at the end of an
    invocation a sentinel written through a private fd marks where that invocation's logs end,
    so output from C extensions and subprocesses is captured too."""

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
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                          closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                          closefd=False)
        threading.Thread(target=self._drain, name="log-drain", daemon=True).start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._r, 65536)
            except OSError:
                return
            if not data:
                return
            with self._cond:
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
        try:
            os.write(self._marker_fd, text.encode() + b"\n")
        except OSError:
            pass

    def cut(self) -> bytes:
        """Everything written since the previous cut (the tail, if it was too long)."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
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
                    return out[-log_bytes_max:]
                self._cond.wait(left)
            out = bytes(self._buf[:idx])
            del self._buf[: idx + len(sentinel)]
        return out[-log_bytes_max:]


class _RequestIdFilter(logging.Filter):
    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.request_id
        return True


def _error(type_: str, message: str, stack: list[str] | None = None) -> dict[str, Any]:
    return {"errorMessage": message, "errorType": type_, "requestId": "", "stackTrace": stack or []}


def load_handler(handler: str) -> tuple[Any, dict[str, Any] | None]:
    try:
        modname, fname = handler.rsplit(".", 1)
    except ValueError as e:
        return None, _error("Runtime.MalformedHandlerName", f"Bad handler '{handler}': {e}")
    if "/" in modname:
        modname = modname.replace("/", ".")
    try:
        module = importlib.import_module(modname)
    except ImportError as e:
        return None, _error("Runtime.ImportModuleError", f"Unable to import module '{modname}': {e}")
    except SyntaxError as e:
        return None, _error("Runtime.UserCodeSyntaxError", f"Syntax error in module '{modname}': {e}")
    except Exception as e:
        return None, _error(type(e).__name__, str(e), traceback.format_list(
            traceback.extract_tb(e.__traceback__)[1:]))
    fn = getattr(module, fname, None)
    if fn is None or not callable(fn):
        return None, _error("Runtime.HandlerNotFound", f"Handler '{fname}' missing on module '{modname}'")
    return fn, None


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


def run(spec: EnvSpec, chan_fd: int) -> NoReturn:
    """Serve invocations forever; exits when the host agent closes the channel."""
    started = time.monotonic()
    sock = socket.socket(fileno=chan_fd)
    sock.setblocking(True)
    chan = _Channel(sock)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logs = _LogCapture()
    req_filter = _RequestIdFilter()
    log_handler = logging.StreamHandler(sys.stdout)
    log_handler.setFormatter(logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S"))
    log_handler.addFilter(req_filter)
    logging.Formatter.converter = time.gmtime
    logging.getLogger().addHandler(log_handler)
    sys.path[:0] = [os.environ.get("LAMBDA_TASK_ROOT", "/var/task"), "/opt/python"]
    fn, init_error = load_handler(spec.handler)
    init_ms = (time.monotonic() - started) * 1000
    chan.send({"t": "ready", "init_error": init_error, "init_ms": init_ms,
               "logs": logs.cut()})
    first = True
    while True:
        msg = chan.recv()
        if msg is None:
            os._exit(0)
        if msg.get("t") != "invoke":
            continue
        request_id = msg["id"]
        req_filter.request_id = request_id
        logs.write_line(f"START RequestId: {request_id} Version: {spec.function_version}")
        t0 = time.monotonic()
        ok, payload, error_type = _invoke(fn, init_error, spec, msg, logs)
        duration_ms = (time.monotonic() - t0) * 1000
        max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logs.write_line(f"END RequestId: {request_id}")
        report = (
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
                   "max_rss_kb": max_rss_kb})


def _invoke(fn: Any, init_error: dict[str, Any] | None, spec: EnvSpec,
            msg: dict[str, Any], logs: _LogCapture) -> tuple[bool, bytes, str | None]:
    request_id = msg["id"]
    if init_error is not None:
        err = dict(init_error, requestId=request_id)
        logs.write_line(f"[ERROR] {err['errorType']}: {err['errorMessage']}")
        return False, json.dumps(err).encode(), "Unhandled"
    try:
        event = json.loads(msg["payload"]) if msg["payload"] else {}
        context = LambdaContext(spec, request_id, msg["deadline_ms"], msg["arn"])
        result = fn(event, context)
    except Exception as e:
        stack = traceback.format_list(traceback.extract_tb(e.__traceback__)[1:])
        err = {"errorMessage": str(e), "errorType": type(e).__name__,
               "requestId": request_id, "stackTrace": stack}
        # Through our own fd: the handler may have closed or replaced stderr.
        logs.write_line(f"[ERROR] {type(e).__name__}: {e}\nTraceback (most recent call last):\n"
                        + "".join(stack).rstrip("\n"))
        return False, json.dumps(err).encode(), "Unhandled"
    try:
        body = json.dumps(result).encode()
    except (TypeError, ValueError) as e:
        err = {"errorMessage": f"Unable to marshal response: {e}",
               "errorType": "Runtime.MarshalError", "requestId": request_id, "stackTrace": []}
        return False, json.dumps(err).encode(), "Unhandled"
    if len(body) > response_bytes_max:
        err = {"errorMessage": f"Response payload size ({len(body)} bytes) exceeded maximum "
                               f"allowed payload size ({response_bytes_max} bytes).",
               "errorType": "Function.ResponseSizeTooLarge"}
        return False, json.dumps(err).encode(), "Unhandled"
    return True, body, None
