"""Lambda extensions (the Extensions API) and the Telemetry API, through a real region and boto3:
external extensions shipped in a layer's ``extensions/`` folder, one in Python (the host's
``python3`` inside the environment) and one in shell with curl, as AWS's samples write them.

The oracles are what the extensions themselves wrote: during an invocation they append every
event they receive to files on the environment's /tmp, which the handler returns on the next
invocation; at SHUTDOWN they print it, and that output reaches the function's logs."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import ROLE, new_name
from .test_runtimes import zip_with_modes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("curl") is None or shutil.which("python3") is None,
                       reason="the extensions use curl and the host's python3"),
]

WAIT_S = 60.0

PY_EXTENSION = r'''#!/usr/bin/env python3
"""An external extension in Python: registers for INVOKE and SHUTDOWN, subscribes to
telemetry (its listener appends what arrives to /tmp/telemetry.jsonl)."""
import http.server, json, os, sys, threading, urllib.request

API = os.environ["AWS_LAMBDA_RUNTIME_API"]
NAME = os.path.basename(__file__)


def call(method, path, body=None, headers=None):
    req = urllib.request.Request(f"http://{API}{path}", data=body, method=method,
                                 headers=headers or {})
    with urllib.request.urlopen(req) as r:
        return r.status, r.headers, r.read()


class Listener(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open("/tmp/telemetry.jsonl", "a") as f:
            for ev in batch:
                f.write(json.dumps(ev) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


_, headers, _ = call("POST", "/2020-01-01/extension/register",
                     json.dumps({"events": ["INVOKE", "SHUTDOWN"]}).encode(),
                     {"Lambda-Extension-Name": NAME})
ext_id = headers["Lambda-Extension-Identifier"]
server = http.server.ThreadingHTTPServer(("127.0.0.1", 4243), Listener)
threading.Thread(target=server.serve_forever, daemon=True).start()
call("PUT", "/2022-07-01/telemetry", json.dumps({
    "schemaVersion": "2022-12-13", "types": ["platform", "function", "extension"],
    "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 25},
    "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4243/t"},
}).encode(), {"Lambda-Extension-Identifier": ext_id, "Content-Type": "application/json"})
print("pyext registered", flush=True)
while True:
    _, _, body = call("GET", "/2020-01-01/extension/event/next", None,
                      {"Lambda-Extension-Identifier": ext_id})
    ev = json.loads(body)
    with open("/tmp/pyext-events.jsonl", "a") as f:
        f.write(json.dumps(ev) + "\n")
    print(f"pyext got {ev['eventType']} {ev.get('requestId') or ev.get('shutdownReason')}",
          flush=True)
    if ev["eventType"] == "SHUTDOWN":
        sys.exit(0)
'''

SH_EXTENSION = r'''#!/bin/sh
# An external extension in shell with curl.
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension"
HEADERS="$(mktemp)"
curl -sS -D "$HEADERS" -o /dev/null -X POST "$API/register" \
     -H "Lambda-Extension-Name: $(basename "$0")" -d '{"events": ["INVOKE", "SHUTDOWN"]}'
ID=$(grep -Fi Lambda-Extension-Identifier "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
while true; do
  EVENT=$(curl -sS -H "Lambda-Extension-Identifier: $ID" "$API/event/next")
  echo "$EVENT" >> /tmp/shext-events.jsonl
  echo "shext got $EVENT"
  case "$EVENT" in *SHUTDOWN*) exit 0;; esac
done
'''

HANDLER = r'''import json
import uuid

ENV = uuid.uuid4().hex  # one per environment (its init)


def _read(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def handler(event, context):
    print("handler line for", context.aws_request_id)
    return {"rid": context.aws_request_id, "env": ENV, "py": _read("/tmp/pyext-events.jsonl"),
            "sh": _read("/tmp/shext-events.jsonl"), "telemetry": _read("/tmp/telemetry.jsonl"),
            "extra": _read("/tmp/extra.jsonl")}
'''


def _layer(lam: Any, files: dict[str, tuple[str, int]]) -> str:
    v = lam.publish_layer_version(LayerName=new_name("ext"),
                                  Content={"ZipFile": zip_with_modes(files)})
    return str(v["LayerVersionArn"])


def _function(lam: Any, layer_arn: str, *, timeout: int = 30, handler: str = HANDLER,
              memory: int = 128) -> str:
    # (memory buys CPU: where a test's budget is a SHUTDOWN phase or a timeout, more of it
    # keeps a busy host from eating the budget)
    name = new_name("fx")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                        Timeout=timeout, Layers=[layer_arn], MemorySize=memory,
                        Code={"ZipFile": zip_with_modes({"app.py": (handler, 0o644)})})
    return name


def _invoke(lam: Any, name: str) -> tuple[Any, dict[str, Any]]:
    res = lam.invoke(FunctionName=name, Payload=b"{}")
    return json.loads(res["Payload"].read()), res


def _until(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S:.0f} s"
        time.sleep(0.2)  # polling an outside observer; the bound above is what matters


def test_python_and_shell_extensions_get_invoke_and_shutdown(lam: Any, region: Any) -> None:
    layer = _layer(lam, {"extensions/pyext": (PY_EXTENSION, 0o755),
                         "extensions/shext": (SH_EXTENSION, 0o755),
                         "extensions/README.txt": ("not executable: not started", 0o644)})
    name = _function(lam, layer, memory=1024)
    first, res = _invoke(lam, name)
    assert "FunctionError" not in res, first
    second, _ = _invoke(lam, name)
    # The first invocation's Invoke phase ended only after both extensions had its INVOKE
    # event (they write it down before asking for the next one), and the second one ran after
    # that phase (in the same environment).
    assert second["env"] == first["env"]
    for key in ("py", "sh"):
        invokes = [e for e in second[key] if e["eventType"] == "INVOKE"]
        assert invokes and invokes[0]["requestId"] == first["rid"], second[key]
        assert invokes[0]["invokedFunctionArn"].endswith(f":function:{name}")
        assert invokes[0]["deadlineMs"] > 0
        assert invokes[0]["tracing"]["type"] == "X-Amzn-Trace-Id"
    # Telemetry: the platform's events and the function's own lines, batched to the listener.
    rid = first["rid"]

    def telemetry_of_first() -> list[dict[str, Any]] | None:
        out, _ = _invoke(lam, name)
        evs = out["telemetry"]
        got = {e["type"] for e in evs if isinstance(e["record"], dict)
               and e["record"].get("requestId") == rid}
        shext_line = any(e["type"] == "extension" and "shext got" in e["record"]
                         and rid in e["record"] for e in evs)
        return evs if shext_line and {"platform.start", "platform.runtimeDone",
                                      "platform.report"} <= got else None

    evs = _until("platform.report of the first invocation", telemetry_of_first)
    types = [e["type"] for e in evs]
    assert "platform.initStart" in types and "platform.initReport" in types
    assert any(e["type"] == "function" and f"handler line for {rid}" in e["record"] for e in evs)
    report = next(e for e in evs if e["type"] == "platform.report"
                  and e["record"]["requestId"] == rid)
    metrics = report["record"]["metrics"]
    assert metrics["memorySizeMB"] == 1024 and metrics["billedDurationMs"] >= 1
    assert metrics["durationMs"] > 0 and metrics["maxMemoryUsedMB"] > 0
    # the shell extension's lines are "extension" records, never "function" ones
    assert not any(e["type"] == "function" and "shext got" in e["record"] for e in evs)
    # SHUTDOWN: a configuration change retires the environment; both extensions get the
    # event and what they print then lands in the function's logs.
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"MODE": "two"}})

    def shutdown_lines() -> str | None:
        text = "".join(e["message"] for e in region.client.logs(name, limit=200))
        ok = "pyext got SHUTDOWN spindown" in text and '"eventType":"SHUTDOWN"' in text.replace(
            " ", "")
        return text if ok else None

    text = _until("SHUTDOWN in the extensions' logs", shutdown_lines)
    assert '"shutdownReason":"spindown"' in text.replace(" ", "")


def test_extension_crash_at_init_fails_the_invoke(lam: Any) -> None:
    layer = _layer(lam, {"extensions/crasher": ("#!/bin/sh\necho crashing\nexit 3\n", 0o755)})
    name = _function(lam, layer)
    out, res = _invoke(lam, name)
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Extension.Crash", out
    assert "exit code 3" in out["errorMessage"]


INIT_ERROR_EXTENSION = r'''#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension"
HEADERS="$(mktemp)"
curl -sS -D "$HEADERS" -o /dev/null -X POST "$API/register" \
     -H "Lambda-Extension-Name: $(basename "$0")" -d '{"events": ["INVOKE"]}'
ID=$(grep -Fi Lambda-Extension-Identifier "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
curl -sS -X POST "$API/init/error" -H "Lambda-Extension-Identifier: $ID" \
     -H "Lambda-Extension-Function-Error-Type: Extension.InitError" \
     -d '{"errorMessage": "no configuration found", "errorType": "Extension.InitError"}'
exit 1
'''


def test_extension_init_error_fails_the_invoke(lam: Any) -> None:
    name = _function(lam, _layer(lam, {"extensions/initerr": (INIT_ERROR_EXTENSION, 0o755)}))
    out, res = _invoke(lam, name)
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Extension.InitError", out
    assert out["errorMessage"] == "no configuration found"


STUCK_EXTENSION = r'''#!/bin/sh
# Takes its first INVOKE event, then never asks for the next one.
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension"
HEADERS="$(mktemp)"
curl -sS -D "$HEADERS" -o /dev/null -X POST "$API/register" \
     -H "Lambda-Extension-Name: $(basename "$0")" -d '{"events": ["INVOKE"]}'
ID=$(grep -Fi Lambda-Extension-Identifier "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
curl -sS -H "Lambda-Extension-Identifier: $ID" "$API/event/next" > /tmp/stuck-got.json
exec sleep 100000
'''


def test_extension_that_never_calls_next_gets_the_environment_reset(lam: Any,
                                                                    region: Any) -> None:
    """As on Lambda: the response goes back as soon as the runtime posted it; the Invoke phase
    (bounded by the function's timeout) waits for the extensions; one that overruns it gets
    the environment reset (SHUTDOWN, reason "timeout"), and the next invocation a fresh one."""
    layer = _layer(lam, {"extensions/pyext": (PY_EXTENSION, 0o755),
                         "extensions/stuck": (STUCK_EXTENSION, 0o755)})
    name = _function(lam, layer, timeout=2, memory=1024)
    first, res = _invoke(lam, name)
    assert "FunctionError" not in res, first
    second, res = _invoke(lam, name)
    assert "FunctionError" not in res, second
    assert second["env"] != first["env"]  # the first environment was reset
    # a fresh /tmp: nothing the first environment's extension wrote
    assert first["rid"] not in [e.get("requestId") for e in second["py"]]

    def reset_logged() -> bool:
        text = "".join(e["message"] for e in region.client.logs(name, limit=200))
        return "pyext got SHUTDOWN timeout" in text

    _until("the SHUTDOWN (timeout) of the reset environment in the logs", reset_logged)


BAD_REQUESTS_EXTENSION = r'''#!/usr/bin/env python3
"""Tries a register with an unknown event type and a telemetry subscription with buffering out
of AWS's bounds, writes down the answers, then registers properly."""
import json, os, urllib.error, urllib.request

API = os.environ["AWS_LAMBDA_RUNTIME_API"]
NAME = os.path.basename(__file__)


def call(method, path, body, headers):
    req = urllib.request.Request(f"http://{API}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def note(what, status, doc):
    with open("/tmp/extra.jsonl", "a") as f:
        f.write(json.dumps({"what": what, "status": status, "doc": doc}) + "\n")


status, _, doc = call("POST", "/2020-01-01/extension/register",
                      json.dumps({"events": ["INVOKE", "BOGUS"]}).encode(),
                      {"Lambda-Extension-Name": NAME})
note("bad-register", status, doc)
status, headers, doc = call("POST", "/2020-01-01/extension/register",
                            json.dumps({"events": ["INVOKE"]}).encode(),
                            {"Lambda-Extension-Name": NAME})
note("register", status, doc)
ext_id = headers["Lambda-Extension-Identifier"]
status, _, doc = call("PUT", "/2022-07-01/telemetry", json.dumps({
    "schemaVersion": "2022-12-13", "types": ["platform"], "buffering": {"maxItems": 5},
    "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4244"}}).encode(),
    {"Lambda-Extension-Identifier": ext_id})
note("bad-telemetry", status, doc)
status, _, doc = call("GET", "/2020-01-01/extension/event/next", None,
                      {"Lambda-Extension-Identifier": "not-a-uuid"})
note("bad-next", status, doc)
while True:
    call("GET", "/2020-01-01/extension/event/next", None, {"Lambda-Extension-Identifier": ext_id})
'''


def test_bad_requests_are_refused_as_aws_does(lam: Any) -> None:
    name = _function(lam, _layer(lam, {"extensions/badreq": (BAD_REQUESTS_EXTENSION, 0o755)}))
    out, res = _invoke(lam, name)
    assert "FunctionError" not in res, out
    notes = {n["what"]: n for n in out["extra"]}
    # AWS's runtime interface emulator answers 403 with this error type.
    assert notes["bad-register"]["status"] == 403
    assert notes["bad-register"]["doc"]["errorType"] == "Extension.InvalidEventType"
    assert "BOGUS" in notes["bad-register"]["doc"]["errorMessage"]
    assert notes["register"]["status"] == 200
    assert notes["register"]["doc"] == {"functionName": name, "functionVersion": "$LATEST",
                                        "handler": "app.handler"}
    assert notes["bad-telemetry"]["status"] == 400
    assert "maxItems" in notes["bad-telemetry"]["doc"]["errorMessage"]
    assert notes["bad-next"]["status"] == 403
    assert notes["bad-next"]["doc"]["errorType"] == "Extension.InvalidExtensionIdentifier"


MUTE_LISTENER_EXTENSION = r'''#!/usr/bin/env python3
"""Subscribes to every telemetry type with a listener that accepts connections and never
answers; asks for its account id on register."""
import json, os, socket, urllib.request

API = os.environ["AWS_LAMBDA_RUNTIME_API"]


def call(method, path, body=None, headers=None):
    req = urllib.request.Request(f"http://{API}{path}", data=body, method=method,
                                 headers=headers or {})
    with urllib.request.urlopen(req) as r:
        return r.status, r.headers, r.read()


mute = socket.socket()
mute.bind(("127.0.0.1", 4245))
mute.listen(1024)
_, headers, body = call("POST", "/2020-01-01/extension/register",
                        json.dumps({"events": ["INVOKE"]}).encode(),
                        {"Lambda-Extension-Name": os.path.basename(__file__),
                         "Lambda-Extension-Accept-Feature": "accountId"})
with open("/tmp/extra.jsonl", "a") as f:
    f.write(json.dumps({"what": "register", "doc": json.loads(body)}) + "\n")
ext_id = headers["Lambda-Extension-Identifier"]
status, _, _ = call("PUT", "/2022-07-01/telemetry", json.dumps({
    "schemaVersion": "2022-07-01", "types": ["platform", "function", "extension"],
    "buffering": {"maxItems": 1000, "maxBytes": 262144, "timeoutMs": 25},
    "destination": {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4245/"}}).encode(),
    {"Lambda-Extension-Identifier": ext_id})
assert status == 200
while True:
    call("GET", "/2020-01-01/extension/event/next", None, {"Lambda-Extension-Identifier": ext_id})
    print("mute extension line " * 20, flush=True)
'''

CHATTY_HANDLER = HANDLER.replace(
    'print("handler line for", context.aws_request_id)',
    'print("\\n".join(f"line {i} of {context.aws_request_id}" for i in range(5000)))')


def test_a_telemetry_listener_that_never_answers_does_not_hold_invokes(lam: Any) -> None:
    layer = _layer(lam, {"extensions/mute": (MUTE_LISTENER_EXTENSION, 0o755)})
    name = _function(lam, layer, timeout=10, handler=CHATTY_HANDLER, memory=1024)
    envs = set()
    for _ in range(4):  # far more lines than one buffer: dropped, never waited for
        out, res = _invoke(lam, name)
        assert "FunctionError" not in res, out
        envs.add(out["env"])
    # Each Invoke phase ended in time (the extension asks for its next event at once), so no
    # environment was reset: a reset on every invoke would give four. A router's lease, taken
    # on the warm environment between two invokes, may send one invoke to a second one.
    assert len(envs) <= 2
    register = next(n for n in out["extra"] if n["what"] == "register")
    arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    assert register["doc"]["accountId"] == arn.split(":")[4]


TRAPPING_BOOTSTRAP = r'''#!/bin/sh
# A custom runtime that shuts down gracefully: on SIGTERM it says so and exits.
set -u
trap 'echo "runtime got SIGTERM"; exit 0' TERM
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS="$(mktemp)"
  curl -sS -D "$HEADERS" -o /dev/null "$API/invocation/next" &
  wait $!
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  curl -sS -X POST "$API/invocation/$REQUEST_ID/response" -d '{"ok": true}' >/dev/null
done
'''


def test_custom_runtime_gets_sigterm_and_extension_shutdown(lam: Any, region: Any) -> None:
    """A process runtime (provided.al2023) with an extension: on SHUTDOWN the runtime gets
    SIGTERM, as on Lambda when extensions are registered."""
    layer = _layer(lam, {"extensions/shext": (SH_EXTENSION, 0o755)})
    name = new_name("fxrt")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="function.handler", Layers=[layer], MemorySize=1024,
                        Code={"ZipFile": zip_with_modes({"bootstrap": (TRAPPING_BOOTSTRAP,
                                                                       0o755)})})
    for _ in range(2):
        out, res = _invoke(lam, name)
        assert out == {"ok": True} and "FunctionError" not in res
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"MODE": "two"}})

    def logged() -> bool:
        text = "".join(e["message"] for e in region.client.logs(name, limit=200))
        return "runtime got SIGTERM" in text and '"shutdownReason":"spindown"' in text.replace(
            " ", "")

    _until("the runtime's SIGTERM and the extension's SHUTDOWN in the logs", logged)


def test_runtime_that_exits_at_init_with_an_extension_is_reported(lam: Any) -> None:
    layer = _layer(lam, {"extensions/shext": (SH_EXTENSION, 0o755)})
    name = new_name("fxex")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="function.handler", Layers=[layer],
                        Code={"ZipFile": zip_with_modes({"bootstrap": ("#!/bin/sh\nexit 3\n",
                                                                       0o755)})})
    out, res = _invoke(lam, name)
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Runtime.ExitError", out
    assert "exit status 3" in out["errorMessage"]
