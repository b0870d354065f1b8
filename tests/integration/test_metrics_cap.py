"""Label cardinality is capped (issue #16, bad input): functions of one account beyond
``metrics_functions_per_account_max`` count under ``function="__other__"`` of that account,
and the series count stays bounded however many functions a tenant creates."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sdk import Client
from tests.conftest import make_zip

from .conftest import Region, running_region
from .test_status_scope import _tenant

pytestmark = pytest.mark.integration

ECHO = make_zip({"app.py": "def handler(event, context):\n    return event\n"})
CAP = 3


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "capped", "--agents-per-cell", "1",
                        "--metrics-functions-per-account-max", str(CAP)) as r:
        yield r


def _throttled_function(client: Client, name: str) -> None:
    """A function with series of its own at the cost of three API calls and no environment:
    reserved concurrency 0, so its invoke is throttled (and counted) at once."""
    client.create_function(name, ECHO, "app.handler")
    status, _, body = client.request(
        "PUT", f"/2017-10-31/functions/{name}/concurrency",
        json.dumps({"ReservedConcurrentExecutions": 0}).encode(),
        {"content-type": "application/json"})
    assert status == 200, body
    status, _, body = client.request("POST", f"/2015-03-31/functions/{name}/invocations", b"{}",
                                     {"content-type": "application/json"})
    assert status == 429, body


def _throttles(client: Client) -> dict[tuple[str, str], float]:
    status, _, body = client.request("GET", "/metrics")
    assert status == 200, body
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "cellcloud_throttles_total":
                key = (s.labels["account"], s.labels["function"])
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_functions_beyond_the_accounts_cap_fold_into_other(capped: Region) -> None:
    n = CAP + 5
    prefix = f"cap-{uuid.uuid4().hex[:4]}"
    for i in range(n):
        _throttled_function(capped.client, f"{prefix}-{i}")
    account = str(capped.doc["account_id"])
    seen = _throttles(capped.client)
    named = {f for (a, f) in seen if a == account and f != "__other__"}
    assert len(named) == CAP, seen
    assert seen[(account, "__other__")] == n - CAP
    assert sum(seen.values()) == n  # every throttle counted, none lost to the cap
    # The cap is per account: another tenant's function still has its own series.
    b = _tenant(capped)
    client_b = Client(capped.endpoint, (b["aws_access_key_id"], b["aws_secret_access_key"]),
                      timeout_s=60)
    _throttled_function(client_b, "quiet")
    assert _throttles(client_b) == {(b["account_id"], "quiet"): 1.0}


@pytest.mark.slow
def test_ten_thousand_functions_keep_the_series_bounded(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """10,000 functions of one tenant (its quota), each with a throttled invoke: the scrape
    keeps at most ``metrics_functions_per_account_max`` of them by name."""
    n = DEFAULT_LIMITS.functions_per_tenant_max
    cap = DEFAULT_LIMITS.metrics_functions_per_account_max
    with running_region(tmp_path_factory, "tenk", "--agents-per-cell", "1") as r:
        local = threading.local()  # one HTTP connection per worker (a Client is not shared)

        def make(i: int) -> None:
            if not hasattr(local, "client"):
                local.client = Client(r.endpoint, str(r.doc["api_key"]), timeout_s=60)
            _throttled_function(local.client, f"f{i:05d}")

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(n)))
        made_s = time.monotonic() - t0
        account = str(r.doc["account_id"])
        status, _, body = r.client.request("GET", "/metrics")
        assert status == 200
        families = list(text_string_to_metric_families(body.decode()))
        functions = {s.labels["function"] for fam in families for s in fam.samples
                     if s.labels.get("account") == account}
        series = sum(len(fam.samples) for fam in families)
        throttles = _throttles(r.client)
        print(f"{n} functions made and throttled in {made_s:.0f} s; scrape: {len(body)} bytes, "
              f"{series} series, {len(functions)} function label values")
        assert len(functions) == cap + 1  # cap named + __other__
        assert sum(throttles.values()) == n
        assert throttles[(account, "__other__")] == n - cap
