"""The Extensions API lifecycle and the Telemetry API's subscriptions and delivery, without an
environment: the state machines of sandbox/extensions.py driven from threads, as the Runtime
API's HTTP threads and the guest drive them."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sandbox.extensions import Extensions, Telemetry

WAIT_S = 60.0


def _register(ext: Extensions, name: str, events: list[str]) -> str:
    status, headers, doc = ext.register(name, json.dumps({"events": events}).encode())
    assert status == 200, doc
    assert doc == {"functionName": "fn", "functionVersion": "$LATEST", "handler": "app.handler"}
    return headers["Lambda-Extension-Identifier"]


def _next_in_thread(ext: Extensions, ext_id: str, out: list[Any]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(ext.next(ext_id)), daemon=True)
    t.start()
    return t


def test_lifecycle_init_invoke_shutdown() -> None:
    ext = Extensions("fn", "$LATEST", "app.handler", ["a", "b"])
    a = _register(ext, "a", ["INVOKE", "SHUTDOWN"])
    assert not ext.wait_registered(0.01)  # b has not registered yet
    b = _register(ext, "b", ["SHUTDOWN"])
    assert ext.wait_registered(WAIT_S)
    got_a: list[Any] = []
    got_b: list[Any] = []
    ta = _next_in_thread(ext, a, got_a)
    assert not ext.wait_init_done(0.01)  # b has not called next: its init is not over
    tb = _next_in_thread(ext, b, got_b)
    assert ext.wait_init_done(WAIT_S)
    ext.end_init()
    status, _, doc = ext.register("late", b'{"events": ["INVOKE"]}')
    assert (status, doc["errorType"]) == (403, "Extension.RegistrationClosed")
    ids = ext.begin_invoke({"eventType": "INVOKE", "requestId": "r1", "deadlineMs": 1})
    assert ids == [a]  # only a registered for INVOKE
    ta.join(WAIT_S)
    assert got_a[0][0] == 200 and got_a[0][2]["requestId"] == "r1"
    assert got_a[0][1]["Lambda-Extension-Event-Identifier"]
    assert not ext.wait_done(ids, 0.01)  # a has not asked for its next event yet
    ta = _next_in_thread(ext, a, got_a)
    assert ext.wait_done(ids, WAIT_S)
    done: list[bool] = []
    shut = threading.Thread(target=lambda: done.append(ext.shutdown("spindown", 123, WAIT_S)),
                            daemon=True)
    shut.start()
    ta.join(WAIT_S)
    tb.join(WAIT_S)
    for got in (got_a[1], got_b[0]):
        assert got[2] == {"eventType": "SHUTDOWN", "shutdownReason": "spindown",
                          "deadlineMs": 123}
    assert not done  # the phase lasts until both asked for their next event
    _next_in_thread(ext, a, [])
    _next_in_thread(ext, b, [])
    shut.join(WAIT_S)
    assert done == [True]


def test_shutdown_waits_for_next_within_its_budget() -> None:
    ext = Extensions("fn", "$LATEST", "app.handler", ["a"])
    a = _register(ext, "a", ["SHUTDOWN"])
    got: list[Any] = []
    _next_in_thread(ext, a, got)
    assert ext.wait_init_done(WAIT_S)
    # a takes the SHUTDOWN event but never calls next again: the budget ends the wait.
    assert ext.shutdown("timeout", 1, 0.2) is False
    assert got[0][2]["shutdownReason"] == "timeout"


def test_crash_is_the_init_error_and_exit_code() -> None:
    ext = Extensions("fn", "$LATEST", "app.handler", ["a", "b"])
    _register(ext, "a", ["INVOKE"])
    ext.extension_exited("b", "exit code 3")
    assert ext.wait_registered(WAIT_S)
    assert ext.error == {"errorType": "Extension.Crash", "errorMessage": "exit code 3"}


def test_init_error_takes_the_extensions_error_type() -> None:
    ext = Extensions("fn", "$LATEST", "app.handler", ["a"])
    a = _register(ext, "a", ["INVOKE"])
    status, _, doc = ext.init_error(a, None, b"{}")
    assert (status, doc["errorType"]) == (403, "Extension.MissingHeader")
    status, _, _ = ext.init_error(a, "Extension.ConfigMissing",
                                  b'{"errorMessage": "no key", "errorType": "X"}')
    assert status == 202
    assert ext.error == {"errorType": "Extension.ConfigMissing", "errorMessage": "no key"}
    ext.extension_exited("a", "exit code 1")  # its exit afterwards does not replace the cause
    assert ext.error["errorType"] == "Extension.ConfigMissing"


@pytest.mark.parametrize(("name", "body", "error_type"), [
    ("", b'{"events": []}', "Extension.InvalidExtensionName"),
    ("a", b'{"events": ["INVOKE", "BOGUS"]}', "Extension.InvalidEventType"),
    ("a", b'{"events": "INVOKE"}', "InvalidRequestFormat"),
    ("a", b"not json", "InvalidRequestFormat"),
    ("a", b'{"events": [], "configurationKeys": ["k"]}', "InvalidRequestFormat"),
    # an internal extension (not an executable in /opt/extensions) cannot take SHUTDOWN
    ("inside-runtime", b'{"events": ["SHUTDOWN"]}', "Extension.InvalidEventType"),
])
def test_bad_registers(name: str, body: bytes, error_type: str) -> None:
    ext = Extensions("fn", "$LATEST", "app.handler", ["a"])
    status, headers, doc = ext.register(name, body)
    assert (status, doc["errorType"]) == (403, error_type)
    assert "Lambda-Extension-Identifier" not in headers
    assert ext.registered == 0


def test_duplicate_and_too_many_extensions() -> None:
    names = [f"e{i}" for i in range(DEFAULT_LIMITS.extensions_per_function_max + 1)]
    ext = Extensions("fn", "$LATEST", "app.handler", names)
    for n in names[:-1]:
        _register(ext, n, [])
    status, _, doc = ext.register(names[0], b"{}")
    assert (status, doc["errorType"]) == (403, "Extension.InvalidExtensionState")
    status, _, doc = ext.register(names[-1], b"{}")
    assert (status, doc["errorType"]) == (403, "Extension.TooManyExtensions")


@pytest.mark.parametrize(("ext_id", "error_type"), [
    (None, "Extension.MissingExtensionIdentifier"),
    ("nope", "Extension.InvalidExtensionIdentifier"),
    ("00000000-0000-0000-0000-000000000000", "Extension.UnknownExtensionIdentifier"),
])
def test_next_with_a_bad_identifier(ext_id: str | None, error_type: str) -> None:
    status, _, doc = Extensions("fn", "$LATEST", "h", []).next(ext_id)
    assert (status, doc["errorType"]) == (403, error_type)


def _subscription(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": "2022-12-13", "types": ["platform", "function"],
        "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 25},
        "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4243/x"}}
    for k, v in over.items():
        if k in ("maxItems", "maxBytes", "timeoutMs"):
            doc["buffering"][k] = v
        else:
            doc[k] = v
    return json.dumps(doc).encode()


@pytest.mark.parametrize("over", [
    {"maxItems": 999}, {"maxItems": 10_001}, {"maxBytes": 262_143}, {"maxBytes": 1_048_577},
    {"timeoutMs": 24}, {"timeoutMs": 30_001}, {"maxItems": "1000"},
    {"types": ["platform", "bogus"]}, {"types": []}, {"schemaVersion": "2020-01-01"},
    {"destination": {"protocol": "TCP", "URI": "http://sandbox.localdomain:4243"}},
    {"destination": {"protocol": "HTTP", "URI": "http://example.com:4243/"}},
    {"destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain/"}},
])
def test_subscribe_validation(over: dict[str, Any]) -> None:
    status, _, doc = Telemetry().subscribe("a", _subscription(**over))
    assert (status, doc["errorType"]) == (400, "ValidationError"), doc


def test_subscribe_without_a_known_extension_is_refused() -> None:
    status, _, doc = Telemetry().subscribe(None, _subscription())
    assert status == 403 and doc["errorType"] == "Extension.UnknownExtensionIdentifier"


class _Listener:
    """A subscriber's HTTP listener on the loopback, recording every batch; while ``gate`` is
    clear it holds each request unanswered."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.cond:
                    outer.batches.append(batch)
                    outer.cond.notify_all()
                outer.gate.wait(WAIT_S)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [e for b in self.batches for e in b]

    def wait_for(self, pred: Any) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred([e for b in self.batches for e in b]), WAIT_S)


def _local(port: int, **over: Any) -> bytes:
    return _subscription(destination={"protocol": "HTTP",
                                      "URI": f"http://sandbox.localdomain:{port}/t"}, **over)


def test_delivery_replays_init_and_batches_by_type() -> None:
    listener = _Listener()
    tel = Telemetry()
    tel.emit("platform.initStart", {"phase": "init"})
    tel.emit("extension", "an extension line")
    assert tel.subscribe("a", _local(listener.port))[0] == 200
    tel.end_init()
    tel.emit("platform.start", {"requestId": "r1"})
    tel.emit("function", "hello")
    tel.emit("extension", "not subscribed")
    assert listener.wait_for(lambda evs: any(e["type"] == "function" for e in evs))
    types = [e["type"] for e in listener.events()]
    assert types[0] == "platform.initStart"  # from before the subscription (init phase)
    assert "platform.start" in types and "platform.telemetrySubscription" in types
    assert "extension" not in types
    assert all(e["time"].endswith("Z") for e in listener.events())
    listener.server.shutdown()


def test_a_listener_that_never_answers_costs_nothing_but_its_events() -> None:
    # Accepts connections (the kernel's backlog) and never reads or answers.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)
    tel = Telemetry()
    assert tel.subscribe("a", _local(mute.getsockname()[1], maxItems=1000))[0] == 200
    tel.end_init()
    for i in range(20_000):  # far over one batch: emit never blocks, the excess is dropped
        tel.emit("function", f"line {i}")
    sub = tel._subs[0]
    assert len(sub.queue) <= sub.max_items
    assert sub.dropped_records > 0
    mute.close()


def test_drops_are_reported_once_the_listener_answers_again() -> None:
    listener = _Listener()
    listener.gate.clear()  # the listener takes the first batch and sits on it
    tel = Telemetry()
    assert tel.subscribe("a", _local(listener.port, maxItems=1000, timeoutMs=25))[0] == 200
    tel.end_init()
    tel.emit("function", "first")
    assert listener.wait_for(lambda evs: any(e["record"] == "first" for e in evs))
    for i in range(1500):  # one full buffer queues, the other 500 are dropped
        tel.emit("function", f"line {i}")
    listener.gate.set()
    assert listener.wait_for(lambda evs: any(e["type"] == "platform.logsDropped" for e in evs))
    dropped = next(e for e in listener.events() if e["type"] == "platform.logsDropped")
    assert dropped["record"]["droppedRecords"] == 500
    lines = [e["record"] for e in listener.events() if e["type"] == "function"]
    assert lines[:2] == ["first", "line 0"] and "line 999" in lines and "line 1000" not in lines
    listener.server.shutdown()
