"""GET /metrics on the region's endpoint (issue #16): a tenant's SigV4 scrape shows its own
series only, the operator's Bearer scrape all of them, an unsigned one is refused."""

from __future__ import annotations

import json
import uuid

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

