"""GET /metrics on the region's endpoint (issue #16): a tenant's SigV4 scrape shows its own
series only, the operator's Bearer scrape all of them, an unsigned one is refused."""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellcloud.sdk import Client
from tests.conftest import make_zip

from .conftest import Region
from .test_status_scope import _tenant

pytestmark = pytest.mark.integration

ECHO = "def handler(event, context):\n    return event\n"


def _samples(text: str) -> dict[tuple[str, str, str], float]:
    """(sample name, account, function) -> value, summed over cells."""
    out: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, s.labels.get("account", ""), s.labels.get("function", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_metrics_tenant_scoped_operator_whole_unsigned_refused(region: Region) -> None:
    n = 5
    name_a = f"m-a-{uuid.uuid4().hex[:6]}"
    region.client.create_function(name_a, make_zip({"app.py": ECHO}), "app.handler")
    for i in range(n):
        region.client.invoke(name_a, {"i": i})
    account_a = str(region.doc["account_id"])
    b = _tenant(region)
    client_b = Client(region.endpoint, (b["aws_access_key_id"], b["aws_secret_access_key"]),
                      timeout_s=60)
    name_b = f"m-b-{uuid.uuid4().hex[:6]}"
    client_b.create_function(name_b, make_zip({"app.py": ECHO}), "app.handler")
    client_b.invoke(name_b, {"k": 1})

    status, headers, body = region.client.request("GET", "/metrics")
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/plain")
    seen_a = _samples(body.decode())
    assert seen_a[("cellcloud_invocations_total", account_a, name_a)] == n
    assert seen_a[("cellcloud_invocation_duration_seconds_count", account_a, name_a)] == n
    cold = seen_a[("cellcloud_cold_starts_total", account_a, name_a)]
    assert 1 <= cold <= n  # sequential invokes: at least one environment made, at most n
    assert seen_a[("cellcloud_init_duration_seconds_count", account_a, name_a)] == cold
    assert {acct for _, acct, _ in seen_a} == {account_a}, "a tenant sees only its own"

    status, _, body = client_b.request("GET", "/metrics")
    assert status == 200
    assert name_a not in body.decode() and account_a not in body.decode()
    seen_b = _samples(body.decode())
    assert seen_b[("cellcloud_invocations_total", b["account_id"], name_b)] == 1
    assert {acct for _, acct, _ in seen_b} == {b["account_id"]}

    with open(str(region.region_json()["operator_token_file"])) as f:
        token = json.load(f)["token"]
    status, _, body = region.client.request("GET", "/metrics",
                                            headers={"authorization": f"Bearer {token}"},
                                            sign=False)
    assert status == 200
    everyone = _samples(body.decode())
    assert everyone[("cellcloud_invocations_total", account_a, name_a)] == n
    assert any(k[0] == "cellcloud_invocations_total" and k[2] == name_b for k in everyone)
    assert any(k[0] == "process_resident_memory_bytes" for k in everyone)
    assert any(k[0] == "cellcloud_environments" for k in everyone)  # per agent and state
    assert not any(k[0] == "cellcloud_environments" for k in seen_a)  # not a tenant's

    cli = json.loads(region.cli("status", "--json").stdout)
    assert cli["metrics_url"] == region.endpoint.rstrip("/") + "/metrics"

    for hdrs in ({}, {"authorization": "Bearer not-the-token"}):
        status, _, _ = client_b.request("GET", "/metrics", headers=hdrs, sign=False)
        assert status == 403, hdrs



def _operator_scrape(region: Region) -> str:
    with open(str(region.region_json()["operator_token_file"])) as f:
        token = json.load(f)["token"]
    status, _, body = region.client.request("GET", "/metrics",
                                            headers={"authorization": f"Bearer {token}"},
                                            sign=False)
    assert status == 200, body
    return body.decode()


def _by_component(text: str, name: str) -> dict[str, float]:
    """component -> value of sample ``name`` (summed over its other labels)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                c = s.labels.get("component", "")
                out[c] = out.get(c, 0.0) + s.value
    return out


def _scrape_until(region: Region, what: str, ok: Any, timeout_s: float = 60.0) -> str:
    """The operator's scrape, again until ``ok(text)`` (pushed expositions arrive every 2 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _operator_scrape(region)
        if ok(text):
            return text
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{text[-3000:]}"
        time.sleep(0.2)  # the poll's pace; the wait is the condition above


def test_operator_scrape_covers_every_component(region: Region) -> None:
    """Process metrics of every process of the region (agents, frontend, dispatcher, control,
    router), the agents' own view of their environments, the control plane's store latencies
    and TLS handshakes, one component label apart."""
    name = f"m-c-{uuid.uuid4().hex[:6]}"
    region.client.create_function(name, make_zip({"app.py": ECHO}), "app.handler")
    region.client.invoke(name, {})  # a function placed on a shard
    components = set(region.region_json()["components"])  # type: ignore[arg-type]
    assert {"router", "control", "cell-1-frontend", "cell-1-dispatcher",
            "cell-1-agent-0", "cell-1-agent-1"} <= components
    text = _scrape_until(
        region, "every component's process metrics",
        lambda t: set(_by_component(t, "process_resident_memory_bytes")) >= components)
    assert set(_by_component(text, "cellcloud_agent_environments")) == {
        c for c in components if "-agent-" in c}
    assert _by_component(text, "cellcloud_store_request_duration_seconds_count")["control"] > 0
    handshakes = _by_component(text, "cellcloud_tls_handshakes_total")
    # every link is mTLS: each agent has accepted its frontend, the frontend the router's
    assert all(handshakes.get(c, 0) > 0 for c in components - {"control"}), handshakes
    # The frontend's own series keep their names; the function's are labelled as before.
    assert _by_component(text, "cellcloud_agents") == {"cell-1-frontend": 2}
    # shard membership: that function's shard is k=2 of the 2 agents
    assert _by_component(text, "cellcloud_shard_size") == {"cell-1-frontend": 2}
    assert _by_component(text, "cellcloud_shard_functions")["cell-1-frontend"] >= 2


def test_internal_port_refuses_a_scrape_without_client_certificate(region: Region) -> None:
    """An agent's internal port speaks mTLS only: a TLS client without a certificate is
    refused in the handshake (it never reaches the ``metrics`` op), and the refusal is counted
    in the agent's own TLS failure counter."""
    comp = region.region_json()["components"]["cell-1-agent-0"]  # type: ignore[index]
    failures = "cellcloud_tls_handshake_failures_total"
    before = _by_component(_operator_scrape(region), failures).get("cell-1-agent-0", 0.0)
    ctx = ssl.create_default_context(
        cafile=f"{region.state_dir}/pki/ca.pem")
    ctx.check_hostname = False
    with socket.create_connection((comp["host"], comp["port"]), timeout=30) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as tls:
                # TLS 1.3: the server's verdict on our (absent) certificate comes with its
                # first answer; a metrics call framed as the transport's would never get one.
                tls.sendall(b"\x94\x00\x01\xa7metrics\xc0")
                if tls.recv(1) == b"":
                    raise ConnectionResetError("closed without an answer")
    _scrape_until(region, "the agent's TLS failure counter to move",
                  lambda t: _by_component(t, failures).get("cell-1-agent-0", 0.0) > before)
