"""The web console without a browser or a region: who may look (login, cookie, bearer), what an
answer carries (CSP, no-store), the pure shaping of the region's reads (console/views.py),
and that the pages ship in the package (no CDN)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from cellcloud.console import views
from cellcloud.console.app import COOKIE, STATIC_DIR, Console, session_value
from cellcloud.core.limits import Limits

TOKEN = "operator-secret-token"
ACCOUNT = "123456789012"


class FakeRegion:
    """The reads the console makes, answered from fixed documents."""

    def __init__(self) -> None:
        self.token = TOKEN
        self.calls: list[tuple[str, str, Any]] = []

    def operator_matches(self, token: str) -> bool:
        return bool(self.token) and token == self.token

    def operator_session(self, label: bytes) -> str | None:
        return session_value(self.token.encode(), label) if self.token else None

    def cell_ids(self) -> list[str]:
        return ["cell-1"]

    def accounts(self) -> list[str]:
        return [ACCOUNT]

    async def status(self, account: str | None = None) -> dict[str, Any]:
        return STATUS

    async def metrics(self, account: str | None) -> tuple[int, dict[str, str], bytes]:
        return 200, {}, METRICS.encode()

    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any:
        self.calls.append((account, op, body))
        if op == "http" and body["path"].endswith("/logs"):
            return {"s": 200, "h": {}, "b": json.dumps({"events": [
                {"timestamp": 1, "requestId": "r1", "message": "START\nhello 1\n"},
                {"timestamp": 2, "requestId": "r2", "message": "hello 2\n"}]}).encode()}
        if op == "http":
            return {"s": 200, "h": {}, "b": json.dumps({"Configuration": {
                "FunctionName": "f"}, "Versions": [], "Aliases": []}).encode()}
        return {"s": 200, "h": {}, "b": b"{}"}

    async def call_cell_id(self, cell_id: str, op: str, body: Any, timeout_s: float) -> Any:
        return {"accepted": 0, "shed": 0, "backlog": []}


STATUS: dict[str, Any] = {"router": {"pid": 1, "cell_map_version": 3}, "cells": {"cell-1": {
    "placement": {"agents": {"a0": {"up": True}, "a1": {"up": True}, "a2": {"up": False}}},
    "shards": {"sharding": "signature", "k": 2,
               "functions": {f"{ACCOUNT}/f": ["a0", "a1"]}, "failed_agents": {}},
    "agents": {
        "a0": {"backend": "jail", "pid": 10, "envs": [
            {"env_id": "e1", "function": "f", "function_key": f"{ACCOUNT}/f/$LATEST/1",
             "pid": 99, "busy": True, "invocations": 4, "memory_bytes": 1}]},
        "a1": {"agent_id": "a1", "error": "status timed out after 5s"},
        "a2": {"backend": "jail", "pid": 12, "envs": []}}}}}

METRICS = f"""# TYPE cellcloud_invocations_total counter
cellcloud_invocations_total{{account="{ACCOUNT}",function="f",cell="cell-1"}} 7.0
# TYPE cellcloud_function_errors_total counter
cellcloud_function_errors_total{{account="{ACCOUNT}",function="f",cell="cell-1"}} 2.0
# TYPE cellcloud_invocation_duration_seconds histogram
cellcloud_invocation_duration_seconds_bucket{{account="{ACCOUNT}",function="f",le="+Inf",cell="cell-1"}} 7.0
cellcloud_invocation_duration_seconds_count{{account="{ACCOUNT}",function="f",cell="cell-1"}} 7.0
cellcloud_invocation_duration_seconds_sum{{account="{ACCOUNT}",function="f",cell="cell-1"}} 1.4
# TYPE cellcloud_environments gauge
cellcloud_environments{{agent="a0",state="busy",cell="cell-1"}} 1.0
# TYPE cellcloud_agents_failed gauge
cellcloud_agents_failed{{cell="cell-1"}} 1.0
"""


def call(console: Console, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"", query: str = "") -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "scheme": "http",
             "query_string": query.encode(),
             "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(console.serve(scope, receive, send))
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], head, sent[1]["body"]


def login(console: Console, token: str = TOKEN) -> tuple[int, dict[str, str], bytes]:
    return call(console, "POST", "/console/login",
                {"content-type": "application/x-www-form-urlencoded"},
                f"token={token}".encode())


def test_nothing_but_the_login_page_without_the_operator_credential() -> None:
    c = Console(FakeRegion())
    for path in ("/console/api/region", "/console/api/metrics", "/console/api/functions",
                 "/console/api/queues", "/console/api/store"):
        status, headers, body = call(c, "GET", path)
        assert status == 403, path
        assert headers["x-amzn-errortype"] == "AccessDeniedException"
        assert json.loads(body)["Type"] == "User"
        assert call(c, "GET", path, {"authorization": "Bearer wrong"})[0] == 403
        assert call(c, "GET", path, {"cookie": f"{COOKIE}={TOKEN}"})[0] == 403  # not a session
    for page in ("/console", "/console/", "/console/index.html", "/console/console.js"):
        status, headers, _ = call(c, "GET", page)
        assert (status, headers["location"]) == (303, "/console/login"), page
    assert call(c, "GET", "/console/login")[0] == 200
    assert call(c, "GET", "/console/console.css")[0] == 200
    assert call(c, "POST", "/console/logout")[0] == 403


def test_login_sets_an_httponly_strict_cookie_derived_from_the_token() -> None:
    region = FakeRegion()
    c = Console(region)
    status, headers, body = login(c, "wrong")
    assert status == 403 and b"not the operator token" in body and "set-cookie" not in headers
    status, headers, _ = login(c)
    assert status == 303 and headers["location"] == "/console/"
    cookie = headers["set-cookie"]
    value = re.match(rf"{COOKIE}=([0-9a-f]+);", cookie)
    assert value and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    session = {"cookie": f"other=1; {COOKIE}={value.group(1)}"}
    status, _, body = call(c, "GET", "/console/api/region", session)
    assert status == 200 and json.loads(body)["cells"][0]["cell_id"] == "cell-1"
    assert call(c, "GET", "/console/", session)[0] == 200
    # A new operator token ends every session; the bearer header works on its own.
    region.token = "rotated"
    assert call(c, "GET", "/console/api/region", session)[0] == 403
    assert call(c, "GET", "/console/api/region", {"authorization": "Bearer rotated"})[0] == 200
    # Logging out clears the cookie.
    status, headers, _ = call(c, "POST", "/console/logout", {"authorization": "Bearer rotated"})
    assert status == 303 and "Max-Age=0" in headers["set-cookie"]


def test_no_token_file_no_session() -> None:
    region = FakeRegion()
    region.token = ""
    c = Console(region)
    assert login(c, "")[0] == 403
    assert call(c, "GET", "/console/api/region", {"cookie": f"{COOKIE}="})[0] == 403


def test_login_form_is_bounded() -> None:
    c = Console(FakeRegion(), Limits(console_login_body_bytes_max=64))
    status, headers, _ = call(c, "POST", "/console/login", {}, b"token=" + b"x" * 100)
    assert status == 413 and headers["x-amzn-errortype"] == "RequestEntityTooLargeException"


def test_every_answer_carries_a_strict_content_security_policy() -> None:
    c = Console(FakeRegion())
    for path in ("/console/login", "/console/api/region"):
        _, headers, _ = call(c, "GET", path, {"authorization": f"Bearer {TOKEN}"})
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
    _, headers, _ = call(c, "GET", "/console/api/region", {"authorization": f"Bearer {TOKEN}"})
    assert headers["cache-control"] == "no-store"


def test_parameters_are_checked_before_any_read() -> None:
    region = FakeRegion()
    c = Console(region)
    auth = {"authorization": f"Bearer {TOKEN}"}
    for query in ("account=12&name=f", f"account={ACCOUNT}&name=../../x",
                  f"account={ACCOUNT}&name=" + "a" * 65, f"account={ACCOUNT}"):
        status, headers, _ = call(c, "GET", "/console/api/function", auth, query=query)
        assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    assert region.calls == []
    assert call(c, "GET", "/console/api/nothing", auth)[0] == 404
    assert call(c, "GET", "/console/../etc/passwd", auth)[0] == 404
    assert call(c, "DELETE", "/console/api/region", auth)[0] == 405


def test_function_read_groups_logs_by_invocation_through_the_adapter() -> None:
    region = FakeRegion()
    c = Console(region, Limits(console_log_events_max=7))
    status, _, body = call(c, "GET", "/console/api/function",
                           {"authorization": f"Bearer {TOKEN}"},
                           query=f"account={ACCOUNT}&name=f")
    assert status == 200
    doc = json.loads(body)
    assert doc["metrics"]["invocations"] == 7 and doc["metrics"]["errors"] == 2
    assert [i["request_id"] for i in doc["invocations"]] == ["r2", "r1"]  # newest first
    assert doc["invocations"][1]["lines"] == ["START", "hello 1"]
    assert doc["shard"] == {"cell_id": "cell-1", "agents": ["a0", "a1"], "key": f"{ACCOUNT}/f"}
    logs_call = next(b for _, op, b in region.calls if op == "http" and b["path"].endswith("/logs"))
    assert logs_call["query"] == "limit=7" and logs_call["account"] == ACCOUNT


def test_region_map_marks_failed_agents() -> None:
    m = views.region_map(STATUS)
    agents = {a["agent_id"]: a for a in m["cells"][0]["agents"]}
    assert agents["a0"]["state"] == "up"
    # a1's full status timed out, but the cell's liveness poll holds it up: up, with the error
    assert agents["a1"]["state"] == "up"
    assert agents["a1"]["status_error"] == "status timed out after 5s"
    assert agents["a2"]["state"] == "failed"  # the cell holds it down
    assert agents["a0"]["envs"][0] == {"env_id": "e1", "function": "f", "account": ACCOUNT,
                                      "version": "$LATEST", "pid": 99, "busy": True,
                                      "invocations": 4, "memory_bytes": 1}
    lost = json.loads(json.dumps(STATUS))
    lost["cells"]["cell-1"]["shards"]["failed_agents"] = {"a0": 1}
    assert views.region_map(lost)["cells"][0]["agents"][0]["state"] == "failed"
    # an agent the cell does not place and that did not answer: failed
    unplaced = json.loads(json.dumps(STATUS))
    unplaced["cells"]["cell-1"]["placement"]["agents"].pop("a1")
    assert views.region_map(unplaced)["cells"][0]["agents"][1]["state"] == "failed"
    assert views.shard_of(m, ACCOUNT, "f") == {"cell_id": "cell-1", "agents": ["a0", "a1"],
                                               "key": f"{ACCOUNT}/f"}
    assert views.shard_of(m, ACCOUNT, "g") is None
    gone = views.region_map({"cells": {"cell-2": {"error": "timed out"}}})
    assert gone["cells"] == [{"cell_id": "cell-2", "error": "timed out", "agents": [],
                              "shards": {}}]


def test_metrics_summary_sums_cells_and_keeps_totals() -> None:
    s = views.metrics_summary(METRICS + METRICS.replace("cell-1", "cell-2").replace(
        "# TYPE", "# HELP"))
    f = s["functions"][0]
    assert (f["account"], f["function"], f["invocations"], f["errors"]) == (ACCOUNT, "f", 14, 4)
    assert f["duration_count"] == 14 and f["duration_sum_s"] == pytest.approx(2.8)
    assert s["totals"]["invocations"] == 14
    assert s["environments"] == {"busy": 2.0} and s["agents_failed"] == 2.0


def test_dead_letter_queues_are_marked() -> None:
    arn = "arn:aws:sqs:cc-local-1:123456789012:dlq"
    src = views.queue_row("http://h/123456789012/src", {
        "QueueArn": "arn:aws:sqs:cc-local-1:123456789012:src", "ApproximateNumberOfMessages": "3",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 2})})
    dlq = views.queue_row("http://h/123456789012/dlq", {"QueueArn": arn})
    bad = views.queue_row("http://h/123456789012/bad", {"RedrivePolicy": "{not json"})
    queues = [src, dlq, bad]
    views.mark_dead_letter_queues(queues, [{"name": "fn", "dead_letter_target": arn}])
    assert src["visible"] == 3 and src["dead_letter_target"] == arn
    assert dlq["dead_letter_for"] == ["function fn", "src"]
    assert src["dead_letter_for"] == [] and bad["dead_letter_target"] is None


def test_pages_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    names = {p.name for p in STATIC_DIR.iterdir()}
    assert {"index.html", "login.html", "console.js", "console.css"} <= names
    for p in STATIC_DIR.iterdir():
        text = p.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), p.name
        assert "<script>" not in text and " style=" not in text, p.name  # CSP: no inline
