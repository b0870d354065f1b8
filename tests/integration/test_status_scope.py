"""Region status is the operator's; a tenant sees only its own (issue #11, item 6); and no
JSON nesting produces a 5xx (item 5)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid

import pytest

from cellcloud.sdk import Client
from tests.conftest import make_zip

from .conftest import Region

pytestmark = pytest.mark.integration

ECHO = "def handler(event, context):\n    return event\n"


def _tenant(region: Region) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "cellcloud", "tenant", "create",
                          f"t{uuid.uuid4().hex[:8]}", "--state-dir", region.state_dir],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return {k: v.strip() for k, v in (line.split(None, 1) for line in out.strip().splitlines())}


def _envs(st: dict[str, object]) -> list[dict[str, object]]:
    return [e for c in st["cells"].values() for a in c["agents"].values()  # type: ignore[attr-defined]
            for e in a["envs"]]


def test_tenant_status_shows_only_its_own(region: Region) -> None:
    name_a = f"st-a-{uuid.uuid4().hex[:6]}"
    region.client.create_function(name_a, make_zip({"app.py": ECHO}), "app.handler")
    region.client.invoke(name_a, {"k": 1})
    b = _tenant(region)
    client_b = Client(region.endpoint, (b["aws_access_key_id"], b["aws_secret_access_key"]),
                      timeout_s=60)
    name_b = f"st-b-{uuid.uuid4().hex[:6]}"
    client_b.create_function(name_b, make_zip({"app.py": ECHO}), "app.handler")
    client_b.invoke(name_b, {"k": 2})
    account_a = str(region.doc["account_id"])

    seen_by_b = client_b.status()
    raw_b = json.dumps(seen_by_b)
    assert account_a not in raw_b and name_a not in raw_b
    envs_b = _envs(seen_by_b)
    assert envs_b and {e["function"] for e in envs_b} == {name_b}
    status, _, body = client_b.request("GET", "/cellcloud/v1/cell/status")
    assert status == 200 and account_a not in body.decode() and name_a not in body.decode()
    assert name_b in body.decode()

    # The operator (`cellcloud status`, the token in the state dir) sees everyone.
    token_file = str(region.region_json()["operator_token_file"])
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    with open(token_file) as f:
        token = json.load(f)["token"]
    operator = Client(region.endpoint, ("unused", "unused"), operator_token=token, timeout_s=60)
    functions = {e["function"] for e in _envs(operator.status())}
    assert {name_a, name_b} <= functions
    cli = json.loads(region.cli("status", "--json").stdout)
    assert {name_a, name_b} <= {e["function"] for e in _envs(cli["status"])}
    # The host's microVM acceleration, as last probed (None: never probed in this state dir).
    assert "microvm" in cli and cli["microvm"] is None
    assert "microVM acceleration: not probed" in region.cli("status").stdout

    for headers in ({}, {"authorization": "Bearer not-the-token"},
                    {"authorization": f"Bearer {token}x"}):
        status, _, _ = client_b.request("GET", "/cellcloud/v1/status", headers=headers,
                                        sign=False)
        assert status == 403, headers


@pytest.mark.parametrize("depth", [990, 100_000])
def test_deep_json_is_a_400_never_a_5xx(region: Region, depth: int) -> None:
    name = f"deep-{uuid.uuid4().hex[:6]}"
    region.client.create_function(name, make_zip({"app.py": ECHO}), "app.handler")
    deep = b"[" * depth + b"]" * depth
    obj = b'{"a":' * depth + b"1" + b"}" * depth
    for method, path, body, headers in [
        ("POST", f"/2015-03-31/functions/{name}/invocations", deep, {}),
        ("POST", f"/2015-03-31/functions/{name}/invocations", obj,
         {"x-amz-invocation-type": "Event"}),
        ("POST", f"/cellcloud/v1/functions/{name}/events", deep, {}),
        ("POST", "/2015-03-31/functions", obj, {"content-type": "application/json"}),
        ("PUT", f"/2015-03-31/functions/{name}/configuration", obj,
         {"content-type": "application/json"}),
    ]:
        status, h, data = region.client.request(method, path, body, headers)
        assert (status, h.get("x-amzn-errortype")) == (400, "InvalidRequestContentException"), (
            path, status, data[:200])
    # Within the limit still works.
    ok = b"[" * 100 + b"]" * 100
    assert region.client.invoke(name, raw=ok).json() == json.loads(ok)
