"""Tracing end to end (issue #16): X-Ray trace ids through router -> frontend -> agent ->
environment, ``_X_AMZN_TRACE_ID`` in the handler (the built-in runtime and the unmodified
awslambdaric), and the four spans exported over OTLP/HTTP to a receiver this test runs
(decoded with opentelemetry-proto). One region for the module; ``cellcloud top --once`` is
checked against the same region."""

from __future__ import annotations

import gzip
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from cellcloud.core import tracing
from tests.conftest import make_zip

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

TRACE_ECHO = ("import os\n"
              "def handler(event, context):\n"
              "    return {'trace': os.environ.get('_X_AMZN_TRACE_ID')}\n")
CLIENT_TRACE = "Root=1-{t:08x}-{r};Parent=53995c3f42cd8ad8;Sampled=1"


class Receiver:
    """An OTLP/HTTP trace receiver: every exported span, decoded, with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                got = []
                for rs in req.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            got.append({"service": service, "name": sp.name,
                                        "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                                        "parent": sp.parent_span_id.hex(),
                                        "start": sp.start_time_unix_nano,
                                        "end": sp.end_time_unix_nano,
                                        "attrs": {a.key: a.value.string_value
                                                  for a in sp.attributes}})
                with receiver.cond:
                    receiver.spans.extend(got)
                    receiver.cond.notify_all()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_trace(self, trace_id: str, count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(
                lambda: len([s for s in self.spans if s["trace_id"] == trace_id]) >= count,
                timeout_s)
            return [s for s in self.spans if s["trace_id"] == trace_id]


    def wait_chain(self, trace_id: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """A trace's spans once its router and environment spans are in and every span's
        parent is too (the router's excepted)."""
        def complete() -> bool:
            got = [s for s in self.spans if s["trace_id"] == trace_id]
            ids = {s["span_id"] for s in got}
            names = {s["name"] for s in got}
            return {"router", "environment"} <= names and all(
                s["parent"] in ids for s in got if s["name"] != "router")

        with self.cond:
            self.cond.wait_for(complete, timeout_s)
            return [s for s in self.spans if s["trace_id"] == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Region]:
    with running_region(tmp_path_factory, "tracing", "--agents-per-cell", "2",
                        "--otlp-endpoint", receiver.url) as r:
        yield r


def _invoke(region: Region, name: str, trace: str | None) -> tuple[dict[str, str], Any]:
    headers = {"content-type": "application/json"}
    if trace is not None:
        headers["x-amzn-trace-id"] = trace
    status, h, body = region.client.request(
        "POST", f"/2015-03-31/functions/{quote(name)}/invocations", b"{}", headers)
    assert status == 200, body
    return h, json.loads(body)


def test_four_spans_one_trace_parented_across_processes(traced: Region,
                                                         receiver: Receiver) -> None:
    name = f"tr-{uuid.uuid4().hex[:6]}"
    traced.client.create_function(name, make_zip({"app.py": TRACE_ECHO}), "app.handler")
    sent = CLIENT_TRACE.format(t=int(time.time()), r=uuid.uuid4().hex[:24])
    h, out = _invoke(traced, name, sent)
    want = tracing.parse(sent)
    seen = tracing.parse(out["trace"])
    assert want is not None and seen is not None, out
    # The handler sees the client's trace: same root, same decision, Parent = its own span.
    assert (seen.root, seen.sampled) == (want.root, True)
    assert seen.parent not in (None, want.parent)
    # ... and the answer carries it back.
    back = tracing.parse(h.get("x-amzn-trace-id"))
    assert back is not None and back.root == want.root

    trace_hex = f"{want.otel_trace_id:032x}"
    assert trace_hex == want.root[2:10] + want.root[11:]  # AWS's X-Ray/OTel mapping
    spans = receiver.wait_trace(trace_hex, 4)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"router", "frontend", "agent", "environment"}, spans
    assert len(spans) == 4
    router, frontend = by_name["router"], by_name["frontend"]
    agent, env = by_name["agent"], by_name["environment"]
    assert router["parent"] == want.parent  # the client's segment
    assert frontend["parent"] == router["span_id"]
    assert agent["parent"] == frontend["span_id"]
    assert env["parent"] == agent["span_id"]
    assert env["span_id"] == seen.parent  # the function's Parent is the environment's span
    assert [s["service"] for s in (router, frontend, agent, env)] == [
        "cellcloud-router", "cellcloud-frontend", "cellcloud-agent", "cellcloud-environment"]
    # each span lies within its parent's
    for child, parent in ((frontend, router), (agent, frontend), (env, agent)):
        assert parent["start"] <= child["start"] <= child["end"] <= parent["end"], (child, parent)


def test_every_invocation_gets_its_own_valid_id(traced: Region, receiver: Receiver) -> None:
    name = f"tr-{uuid.uuid4().hex[:6]}"
    traced.client.create_function(name, make_zip({"app.py": TRACE_ECHO}), "app.handler")
    roots = set()
    for bad in (None, "Root=not-a-trace-id", None):
        h, out = _invoke(traced, name, bad)
        seen = tracing.parse(out["trace"])
        assert seen is not None and seen.parent is not None, out
        assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=1",
                            out["trace"])
        assert abs(int(seen.root[2:10], 16) - time.time()) < 600
        assert tracing.parse(h["x-amzn-trace-id"]).root == seen.root  # type: ignore[union-attr]
        roots.add(seen.root)
        # Whichever way it went (the frontend's, or router -> agent under a lease once the
        # function is warm), the spans chain from the router to the environment.
        spans = {sp["name"]: sp for sp in receiver.wait_chain(f"{seen.otel_trace_id:032x}")}
        chain = [spans[n] for n in ("router", "frontend", "agent", "environment") if n in spans]
        assert [c["name"] for c in chain][0::len(chain) - 1] == ["router", "environment"]
        assert chain[0]["parent"] == ""  # no incoming Parent: the router's span is the root
        for parent, child in zip(chain, chain[1:], strict=False):
            assert child["parent"] == parent["span_id"], chain
    assert len(roots) == 3
    # An async invoke's delivery gets an id of its own (there is no router hop in it).
    status, h, body = traced.client.request(
        "POST", f"/2015-03-31/functions/{quote(name)}/invocations", b"{}",
        {"x-amz-invocation-type": "Event"})
    assert status == 202, body
    event_id = h["x-amzn-requestid"]
    deadline = time.monotonic() + 60
    with receiver.cond:
        receiver.cond.wait_for(lambda: any(
            sp["attrs"].get("aws.request_id") == event_id and sp["name"] == "frontend"
            for sp in receiver.spans), max(0.0, deadline - time.monotonic()))
        delivery = [sp for sp in receiver.spans if sp["attrs"].get("aws.request_id") == event_id]
    front = next(sp for sp in delivery if sp["name"] == "frontend")
    assert front["parent"] == ""
    assert front["trace_id"] not in {r[2:10] + r[11:] for r in roots}


def test_awslambdaric_sets_x_amzn_trace_id_from_the_runtime_api(traced: Region) -> None:
    """The unmodified awslambdaric reads Lambda-Runtime-Trace-Id and sets _X_AMZN_TRACE_ID."""
    pytest.importorskip("awslambdaric")
    import io
    import stat
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for fname, content, mode in (
                ("bootstrap", f"#!/bin/sh\nexec {sys.executable} -m awslambdaric \"$_HANDLER\"\n",
                 0o755), ("app.py", TRACE_ECHO, 0o644)):
            info = zipfile.ZipInfo(fname)
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, content)
    name = f"tr-ric-{uuid.uuid4().hex[:6]}"
    traced.client.create_function(name, buf.getvalue(), "app.handler",
                                  runtime="provided.al2023", timeout_s=10)
    sent = CLIENT_TRACE.format(t=int(time.time()), r=uuid.uuid4().hex[:24])
    _, out = _invoke(traced, name, sent)
    seen, want = tracing.parse(out["trace"]), tracing.parse(sent)
    assert seen is not None and want is not None, out
    assert (seen.root, seen.sampled) == (want.root, want.sampled)


def _row(out: str, name: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if f" {name} " in ln)
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_top_once_shows_functions_and_agents(traced: Region) -> None:
    ok = f"top-{uuid.uuid4().hex[:6]}"
    bad = f"top-{uuid.uuid4().hex[:6]}"
    traced.client.create_function(ok, make_zip({"app.py": TRACE_ECHO}), "app.handler")
    traced.client.create_function(bad, make_zip({"app.py": "def handler(e, c):\n"
                                                           "    raise ValueError('no')\n"}),
                                  "app.handler")
    for _ in range(3):
        traced.client.invoke(ok, {})
    traced.client.invoke(bad, {})
    res = traced.cli("top", "--once", "--interval", "0.2")
    assert res.returncode == 0, res.stderr
    # columns: account, function, rate/s, invocations, errors, throttles, p50, p99, concurrency
    row = _row(res.stdout, ok)
    assert row[1] == ok and row[3] == "3" and row[4] == "0" and row[5] == "0", res.stdout
    assert row[6].endswith(" ms") and row[7].endswith(" ms")
    assert float(row[6][:-3]) <= float(row[7][:-3])
    assert float(row[2]) >= 0 and row[8] == "0"
    row = _row(res.stdout, bad)
    assert row[3] == "1" and row[4] == "1", res.stdout
    # agents: cell, agent, state, envs, busy, detail. A busy machine can make a cell's status
    # answer late (top then shows the cell as failed): wait, bounded, for a frame with all.
    deadline = time.monotonic() + 60
    agents: dict[str, str] = {}
    while not agents and time.monotonic() < deadline:
        status = traced.client.status()  # what `cellcloud status --json` shows as "status"
        agents = {a: c for c, cell in status["cells"].items() for a in cell.get("agents", {})}
    assert agents, status
    while True:
        out = traced.cli("top", "--once", "--interval", "0.2").stdout
        rows = {a: _row(out, a) for a in agents if f" {a} " in out}
        if len(rows) == len(agents) or time.monotonic() > deadline:
            break
    for agent_id, cell_id in agents.items():
        arow = rows[agent_id]
        assert arow[0] == cell_id and arow[2] == "ok", out
    assert sum(int(r[3]) for r in rows.values()) >= 2  # an environment for each function


def _cli_with_tty_stderr(region: Region, *args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe): (rc, stdout, stderr)."""
    import os
    import pty
    import subprocess

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cellcloud", *args, "--state-dir",
                             region.state_dir], stdout=subprocess.PIPE, stderr=slave,
                            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode() if proc.stdout else ""
    rc = proc.wait(timeout=120)
    os.close(master)
    return rc, out, b"".join(chunks).decode(errors="replace")


def test_deploy_shows_a_bar_on_a_terminal_and_stays_plain_otherwise(traced: Region,
                                                                     tmp_path: Any) -> None:
    import os

    src = tmp_path / "fn"
    src.mkdir()
    (src / "app.py").write_text(TRACE_ECHO)
    (src / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # a bundle worth a bar
    name = f"bar-{uuid.uuid4().hex[:6]}"
    rc, out, tty = _cli_with_tty_stderr(traced, "deploy", name, str(src))
    assert rc == 0, (out, tty)
    assert out.startswith(f"created {name} ("), out  # stdout: the same one line
    assert f"uploading {name}" in tty and "MB" in tty, tty
    plain = traced.cli("deploy", name, str(src))  # no terminal at all: no bar, same line
    assert plain.stderr == "" and plain.stdout.startswith(f"updated {name} ("), plain
