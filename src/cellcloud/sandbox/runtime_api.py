"""The Lambda Runtime API inside an environment (``$AWS_LAMBDA_RUNTIME_API/2018-06-01/...``).

:class:`RuntimeApi` is the state machine (one invocation at a time, as on Lambda); the guest's
channel loop feeds it invocations and waits for outcomes. It has two bindings over the same
state: an HTTP server on the environment's own loopback (for custom runtimes, awslambdaric,
other Python versions) and direct calls (for the built-in Python runtime thread, which runs the
very same loop in ``pyruntime.py`` without paying for HTTP inside one process).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .extensions import EXTENSION_PREFIX, TELEMETRY_PATHS, Extensions, Reply, Telemetry

API_PREFIX = "/2018-06-01/runtime"
request_body_bytes_max = 6 * 1024 * 1024 + 1024
# What a response over its limit may still send that is read and dropped before the 413.
overflow_drain_bytes_max = 1024 * 1024


@dataclass
class Invocation:
    request_id: str
    payload: bytes
    deadline_ms: int
    arn: str
    trace_id: str = ""


@dataclass
class Outcome:
    ok: bool
    payload: bytes
    error_type: str | None  # "Unhandled" when the function failed


class RuntimeApi:
    def __init__(self, response_bytes_max: int,
                 response_stream_bytes_max: int = 20 * 1024 * 1024) -> None:
        self.response_bytes_max = response_bytes_max
        self.response_stream_bytes_max = response_stream_bytes_max
        self._cond = threading.Condition()
        self._queued: Invocation | None = None  # given to the runtime by next()
        self._current: Invocation | None = None  # delivered, awaiting its outcome
        self._outcome: Outcome | None = None
        self.ready = False  # the runtime asked for its first invocation: init is done
        self.init_error: dict[str, Any] | None = None
        self.exited: str | None = None  # why the runtime is gone, if it is
        #: the guest's sink for the invocation being streamed (GuestInvoke.stream): a streamed
        #: response's bytes go there as they arrive, (request id, bytes, content type)
        self.chunk_sink: Callable[[str, bytes, str], None] | None = None

    # -- the guest's side ------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self.ready or self.init_error is not None or self.exited is not None,
                timeout_s,
            )

    def submit(self, inv: Invocation) -> None:
        with self._cond:
            assert self._queued is None and self._current is None, "one invocation at a time"
            self._outcome = None
            self._queued = inv
            self._cond.notify_all()

    def wait_outcome(self) -> Outcome:
        with self._cond:
            self._cond.wait_for(lambda: self._outcome is not None or self.exited is not None)
            if self._outcome is None:
                self._queued = self._current = None
                return Outcome(
                    False,
                    json.dumps(
                        {
                            "errorType": "Runtime.ExitError",
                            "errorMessage": f"Runtime exited with error: {self.exited}",
                        }
                    ).encode(),
                    "Unhandled",
                )
            out, self._outcome = self._outcome, None
            return out

    def mark_ready(self) -> None:
        """The built-in runtime finished its init on the guest's own thread."""
        with self._cond:
            self.ready = True
            self._cond.notify_all()

    def wait_exited(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.exited is not None, timeout_s)

    def runtime_exited(self, why: str) -> None:
        with self._cond:
            self.exited = why
            self._cond.notify_all()

    # -- the runtime's side (the Runtime API operations) -----------------------------------------
    def next(self) -> Invocation:
        with self._cond:
            if self._current is not None and self._outcome is None:
                # Asking for the next event without answering this one: Lambda treats the
                # invocation as failed.
                self._finish(
                    Outcome(
                        False,
                        json.dumps(
                            {
                                "errorType": "Runtime.NoResponse",
                                "errorMessage": "the runtime asked for the next event without a response",
                            }
                        ).encode(),
                        "Unhandled",
                    )
                )
            self.ready = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._queued is not None)
            inv, self._queued = self._queued, None
            assert inv is not None
            self._current = inv
            return inv

    def respond(self, request_id: str, body: bytes) -> tuple[int, dict[str, str]]:
        with self._cond:
            if self._current is None or self._current.request_id != request_id:
                return 400, {
                    "errorType": "InvalidRequestID",
                    "errorMessage": f"unknown or finished request {request_id}",
                }
            if len(body) > self.response_bytes_max:
                self._finish(
                    Outcome(
                        False,
                        json.dumps(
                            {
                                "errorType": "Function.ResponseSizeTooLarge",
                                "errorMessage": f"Response payload size ({len(body)} bytes) exceeded maximum "
                                f"allowed payload size ({self.response_bytes_max} bytes).",
                            }
                        ).encode(),
                        "Unhandled",
                    )
                )
                return 413, {
                    "errorType": "RequestEntityTooLarge",
                    "errorMessage": "response payload too large",
                }
            self._finish(Outcome(True, body, None))
            return 202, {"status": "OK"}

    def stream_sink(self, request_id: str) -> Callable[[str, bytes, str], None] | None:
        """Where a streamed response of ``request_id`` goes as it arrives, if its invocation is
        streamed (else it is gathered and posted whole)."""
        with self._cond:
            if self._current is None or self._current.request_id != request_id:
                return None
            return self.chunk_sink

    def error(self, request_id: str, body: bytes) -> tuple[int, dict[str, str]]:
        with self._cond:
            if self._current is None or self._current.request_id != request_id:
                return 400, {
                    "errorType": "InvalidRequestID",
                    "errorMessage": f"unknown or finished request {request_id}",
                }
            self._finish(Outcome(False, _error_doc(body), "Unhandled"))
            return 202, {"status": "OK"}

    def init_fail(self, body: bytes) -> tuple[int, dict[str, str]]:
        with self._cond:
            self.init_error = json.loads(_error_doc(body))
            self._cond.notify_all()
            return 202, {"status": "OK"}

    def _finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._current = None
        self._cond.notify_all()


def _error_doc(body: bytes) -> bytes:
    """The runtime's error JSON, normalised to Lambda's shape (bad JSON is reported as is)."""
    try:
        doc = json.loads(body) if body else {}
        if not isinstance(doc, dict):
            raise ValueError
    except ValueError:
        doc = {"errorType": "Runtime.Unknown", "errorMessage": body.decode(errors="replace")}
    doc.setdefault("errorType", "Runtime.Unknown")
    doc.setdefault("errorMessage", "")
    return json.dumps(doc).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a runtime polls next on one connection
    # A reply is two writes (headers, then body): with Nagle on, the body waits for the
    # runtime's delayed ACK of the headers, ~40 ms twice per warm invoke on a kept-alive
    # connection.
    disable_nagle_algorithm = True
    api: RuntimeApi
    extensions: Extensions | None = None
    telemetry: Telemetry | None = None
    trailers: dict[str, str]  # of the request being handled (a streamed response's error)
    too_large = False  # the request being handled passed its body limit

    def log_message(self, format: str, *args: Any) -> None:  # not into the function's logs
        return

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reply_ext(self, reply: Reply) -> None:
        status, headers, doc = reply
        self._reply(status, json.dumps(doc).encode(), headers)

    def _read_chunked(self, limit: int, sink: Callable[[bytes], None] | None = None
                      ) -> tuple[bytes, dict[str, str]] | None:
        """A chunked body (a streamed response: ``Lambda-Runtime-Function-Response-Mode:
        streaming``) and its trailers, read as it arrives; None (413 sent) past ``limit``."""
        parts: list[bytes] = []
        size = 0
        trailers: dict[str, str] = {}
        while True:
            line = self.rfile.readline(1024)
            try:
                n = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                self._reply(400, b'{"errorType":"InvalidChunkedEncoding"}')
                self.close_connection = True
                return None
            if n == 0:
                break
            size += n
            if size > limit:
                self.too_large = True
                # Read (and drop) what the runtime is still sending, bounded, before answering:
                # closing with unread bytes resets the connection, and the runtime would see a
                # broken pipe instead of the 413.
                self._drain_chunked(n, overflow_drain_bytes_max)
                self._reply(413, b'{"errorType":"RequestEntityTooLarge"}')
                self.close_connection = True
                return None
            data = self.rfile.read(n)
            if sink is not None:
                sink(data)  # on its way to the caller now; not kept here
            else:
                parts.append(data)
            self.rfile.readline(8)  # the chunk's CRLF
        for _ in range(100):  # trailers, then the empty line
            line = self.rfile.readline(65536)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            trailers[k.strip().lower()] = v.strip()
        return b"".join(parts), trailers

    def _drain_chunked(self, pending: int, budget: int) -> None:
        """Discard a chunked body's rest: ``pending`` bytes of the current chunk, then whole
        chunks, until its last chunk or ``budget`` bytes (then the connection just closes)."""
        while budget > 0:
            while pending > 0 and budget > 0:
                got = self.rfile.read(min(pending, budget, 65536))
                if not got:
                    return
                pending -= len(got)
                budget -= len(got)
            if pending > 0:
                return
            self.rfile.readline(8)  # the chunk's CRLF
            line = self.rfile.readline(1024)
            try:
                pending = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                return
            if pending == 0:
                for _ in range(100):  # trailers, then the empty line
                    if self.rfile.readline(65536) in (b"\r\n", b"\n", b""):
                        return
                return

    def _read_body(self, sink: Callable[[bytes], None] | None = None) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            got = self._read_chunked(
                self.api.response_stream_bytes_max if sink is not None
                else request_body_bytes_max, sink)
            if got is None:
                return None
            body, self.trailers = got
            return body
        length = int(self.headers.get("Content-Length") or 0)
        if length > request_body_bytes_max:
            self.too_large = True
            self._reply(413, b'{"errorType":"RequestEntityTooLarge"}')
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def do_PUT(self) -> None:
        body = self._read_body()
        if body is None:
            return
        if self.path in TELEMETRY_PATHS and self.telemetry is not None:
            assert self.extensions is not None
            name = self.extensions.name_of(self.headers.get("Lambda-Extension-Identifier"))
            self._reply_ext(self.telemetry.subscribe(name, body))
            return
        self._reply(404, b'{"errorType":"NotFound"}')

    def do_GET(self) -> None:
        if self.path == f"{EXTENSION_PREFIX}/event/next" and self.extensions is not None:
            self._reply_ext(self.extensions.next(self.headers.get("Lambda-Extension-Identifier")))
            return
        if self.path != f"{API_PREFIX}/invocation/next":
            self._reply(404, b'{"errorType":"NotFound"}')
            return
        inv = self.api.next()
        headers = {
            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": inv.arn,
        }
        if inv.trace_id:  # the guest always sets one (core/tracing.py's format)
            headers["Lambda-Runtime-Trace-Id"] = inv.trace_id
        self._reply(200, inv.payload, headers)

    def do_POST(self) -> None:
        self.trailers = {}
        self.too_large = False
        sink = None
        if (self.headers.get("Lambda-Runtime-Function-Response-Mode") or "").lower() == (
                "streaming") and self.path.startswith(API_PREFIX + "/invocation/"):
            request_id = self.path[len(API_PREFIX + "/invocation/"):].split("/", 1)[0]
            streamed = self.api.stream_sink(request_id)
            if streamed is not None:
                ctype = self.headers.get("Content-Type") or "application/octet-stream"
                def sink(data: bytes, _s: Any = streamed, _r: str = request_id,
                         _c: str = ctype) -> None:
                    _s(_r, data, _c)
        body = self._read_body(sink)
        if body is None:
            parts = self.path[len(API_PREFIX):].strip("/").split("/")
            if (self.too_large and len(parts) == 3 and parts[0] == "invocation"
                    and parts[2] == "response"):
                # the response passed its limit (while it streamed): the invocation fails
                self.api.error(parts[1], json.dumps({
                    "errorType": "Function.ResponseSizeTooLarge",
                    "errorMessage": "Response payload size exceeded maximum allowed payload "
                                    "size"}).encode())
            return
        if self.path.startswith(EXTENSION_PREFIX + "/") and self.extensions is not None:
            ext, h = self.extensions, self.headers
            op = self.path[len(EXTENSION_PREFIX):]
            ext_id, err_type = h.get("Lambda-Extension-Identifier"), h.get(
                "Lambda-Extension-Function-Error-Type")
            if op == "/register":
                self._reply_ext(ext.register(h.get("Lambda-Extension-Name") or "", body,
                                             h.get("Lambda-Extension-Accept-Feature") or ""))
            elif op == "/init/error":
                self._reply_ext(ext.init_error(ext_id, err_type, body))
            elif op == "/exit/error":
                self._reply_ext(ext.exit_error(ext_id, err_type, body))
            else:
                self._reply(404, b'{"errorType":"NotFound"}')
            return
        parts = (
            self.path[len(API_PREFIX) :].strip("/").split("/")
            if self.path.startswith(API_PREFIX)
            else []
        )
        if parts == ["init", "error"]:
            status, doc = self.api.init_fail(body)
        elif len(parts) == 3 and parts[0] == "invocation" and parts[2] == "response":
            error_type = self.trailers.get("lambda-runtime-function-error-type")
            if error_type:  # a streamed response that failed midway (its trailers say so)
                detail = self.trailers.get("lambda-runtime-function-error-body")
                try:
                    error_body = base64.b64decode(detail or "", validate=True)
                except ValueError:
                    error_body = b""
                status, doc = self.api.error(parts[1], error_body or json.dumps(
                    {"errorType": error_type, "errorMessage": ""}).encode())
            else:
                status, doc = self.api.respond(parts[1], body)
        elif len(parts) == 3 and parts[0] == "invocation" and parts[2] == "error":
            status, doc = self.api.error(parts[1], body)
        else:
            status, doc = 404, {"errorType": "NotFound"}
        self._reply(status, json.dumps(doc).encode())


def serve_http(api: RuntimeApi, host: str = "127.0.0.1", port: int = 9001,
               extensions: Extensions | None = None,
               telemetry: Telemetry | None = None) -> ThreadingHTTPServer:
    """The Runtime API (and, given them, the Extensions and Telemetry APIs) over HTTP."""
    handler = type("RuntimeApiHandler", (_Handler,),
                   {"api": api, "extensions": extensions, "telemetry": telemetry})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="runtime-api", daemon=True).start()
    return server
