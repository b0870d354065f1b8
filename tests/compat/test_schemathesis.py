"""Schemathesis against the native API's OpenAPI document, on a running region: every response
matches the document, no 5xx, no crashed process."""

from __future__ import annotations

import os
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import settings  # noqa: E402

from cellcloud.security import sigv4  # noqa: E402
from tests.conftest import make_zip  # noqa: E402
from tests.integration.conftest import Region  # noqa: E402

pytestmark = pytest.mark.integration

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "openapi-native.yaml")
schema = schemathesis.openapi.from_path(SPEC)


class SigV4(requests.auth.AuthBase):  # type: ignore[misc]
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def __call__(self, r: Any) -> Any:
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode()
        signed = sigv4.sign(r.method, r.url, {k: v for k, v in r.headers.items()
                                              if k.lower() in ("content-type",)}, body,
                            access_key_id=self.doc["access_key_id"],
                            secret_access_key=self.doc["secret_access_key"],
                            region=self.doc["region"])
        r.headers.update(signed)
        return r


@pytest.fixture(scope="module")
def seeded(region: Region) -> Region:
    # A function with that name exists, so generated names hit both paths (found, not found).
    try:
        region.client.create_function("fuzz", make_zip({"app.py": "def handler(e, c):\n"
                                                                  "    return e\n"}), "app.handler")
    except Exception:  # already there from an earlier run of the session
        pass
    region.client.invoke("fuzz", {})
    return region


@schema.parametrize()
@settings(max_examples=40, deadline=None)
def test_native_api(case: Any, seeded: Region) -> None:
    before = {k: v["pid"] for k, v in seeded.region_json()["components"].items()}  # type: ignore[union-attr]
    response = case.call_and_validate(base_url=seeded.endpoint, auth=SigV4(seeded.doc),
                                      timeout=30)
    assert response.status_code < 500
    after = {k: v["pid"] for k, v in seeded.region_json()["components"].items()}  # type: ignore[union-attr]
    assert after == before  # no process crashed and was restarted
