"""Every bad input gets a clear, Lambda-shaped error, and nothing already stored is lost."""

from __future__ import annotations

import base64
import io
import json
import uuid
import zipfile

import pytest

from cellcloud.sdk import CellcloudError, Client
from tests.conftest import make_zip

from .conftest import Region

pytestmark = pytest.mark.integration

SUM = 'def handler(event, context):\n    return {"sum": event["a"] + event["b"]}\n'


def create_raw(region: Region, doc: dict[str, object]) -> tuple[int, dict[str, str], dict[str, object]]:
    status, headers, body = region.client.request(
        "POST", "/2015-03-31/functions", json.dumps(doc).encode(),
        {"content-type": "application/json"})
    return status, headers, json.loads(body) if body else {}


def doc_for(zip_bytes: bytes, name: str | None = None, **kw: object) -> dict[str, object]:
    return {"FunctionName": name or f"bad-{uuid.uuid4().hex[:8]}", "Runtime": "python3.11",
            "Handler": "app.handler", "Code": {"ZipFile": base64.b64encode(zip_bytes).decode()},
            **kw}


def expect(region: Region, doc: dict[str, object], status: int, type_: str) -> str:
    got_status, headers, body = create_raw(region, doc)
    assert (got_status, headers.get("x-amzn-errortype")) == (status, type_), body
    assert body.get("message")
    return str(body["message"])


def test_not_a_zip(region: Region) -> None:
    assert "unzip" in expect(region, doc_for(b"hello, not a zip"), 400,
                             "InvalidParameterValueException")


def test_zip_slip_and_absolute_paths(region: Region) -> None:
    expect(region, doc_for(make_zip({"../../etc/cron.d/evil": "x"})), 400,
           "InvalidParameterValueException")
    expect(region, doc_for(make_zip({"/etc/evil": "x"})), 400, "InvalidParameterValueException")


def test_zip_bomb(region: Region) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("bomb.bin", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(251):
                f.write(chunk)
    assert "Unzipped size" in expect(region, doc_for(buf.getvalue()), 400,
                                     "InvalidParameterValueException")


def test_bad_names_and_parameters(region: Region) -> None:
    z = make_zip({"app.py": SUM})
    expect(region, doc_for(z, name="bad name!"), 400, "ValidationException")
    expect(region, doc_for(z, name="x" * 65), 400, "ValidationException")
    expect(region, doc_for(z, MemorySize=64), 400, "InvalidParameterValueException")
    expect(region, doc_for(z, Timeout=901), 400, "InvalidParameterValueException")
    expect(region, doc_for(z, Runtime="cobol85"), 400, "InvalidParameterValueException")
    expect(region, doc_for(z, Handler="has space.handler"), 400, "InvalidParameterValueException")
    expect(region, doc_for(z, Handler="x" * 129), 400, "InvalidParameterValueException")
    expect(region, doc_for(z, Environment={"Variables": {"AWS_REGION": "x"}}), 400,
           "InvalidParameterValueException")


def test_duplicate_create_and_missing_update(region: Region) -> None:
    z = make_zip({"app.py": SUM})
    d = doc_for(z)
    assert create_raw(region, d)[0] == 201
    expect(region, d, 409, "ResourceConflictException")
    # The original is intact.
    assert region.client.invoke(str(d["FunctionName"]), {"a": 1, "b": 2}).json() == {"sum": 3}
    with pytest.raises(CellcloudError) as e:
        region.client.update_function_code("does-not-exist", z)
    assert (e.value.status, e.value.type) == (404, "ResourceNotFoundException")
    with pytest.raises(CellcloudError) as e:
        region.client.update_function_configuration("does-not-exist", Timeout=5)
    assert e.value.status == 404


def test_unknown_function(region: Region) -> None:
    with pytest.raises(CellcloudError) as e:
        region.client.invoke("nope-" + uuid.uuid4().hex[:6], {})
    assert (e.value.status, e.value.type) == (404, "ResourceNotFoundException")


def test_payloads(region: Region) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    region.client.create_function(name, make_zip({"app.py": SUM}), "app.handler")
    with pytest.raises(CellcloudError) as e:
        region.client.invoke(name, raw=b"{not json")
    assert (e.value.status, e.value.type) == (400, "InvalidRequestContentException")
    big = json.dumps({"a": "x" * (6 * 1024 * 1024)}).encode()
    with pytest.raises(CellcloudError) as e:
        region.client.invoke(name, raw=big)
    assert (e.value.status, e.value.type) == (413, "RequestEntityTooLargeException")
    # Nothing was lost: the function still answers.
    assert region.client.invoke(name, {"a": 2, "b": 3}).json() == {"sum": 5}


def test_authentication(region: Region) -> None:
    akid = region.client.access_key_id
    for creds, type_ in [(f"{akid}:wrong-secret", "InvalidSignatureException"),
                         ("AKIAUNKNOWNUNKNOWN00:x", "UnrecognizedClientException")]:
        with pytest.raises(CellcloudError) as e:
            Client(region.endpoint, creds).list_functions()
        assert (e.value.status, e.value.type) == (403, type_)
    status, headers, _ = region.client.request("GET", "/2015-03-31/functions/", sign=False)
    assert (status, headers["x-amzn-errortype"]) == (403, "MissingAuthenticationTokenException")
    # The old x-api-key header is no longer a way in.
    status, _, _ = region.client.request("GET", "/2015-03-31/functions/", sign=False,
                                         headers={"x-api-key": str(region.doc["api_key"])})
    assert status == 403


def test_unknown_route(region: Region) -> None:
    status, headers, _ = region.client.request("GET", "/2015-03-31/nothing-here")
    assert status == 404 and headers["x-amzn-errortype"] == "UnknownOperationException"
    status, _, _ = region.client.request("PATCH", "/2015-03-31/functions/")
    assert status == 405


def test_other_accounts_arn_is_not_found(region: Region) -> None:
    name = f"acct-{uuid.uuid4().hex[:8]}"
    region.client.create_function(name, make_zip({"app.py": SUM}), "app.handler")
    own = f"arn:aws:lambda:cc-local-1:{region.doc['account_id']}:function:{name}"
    assert region.client.invoke(own, {"a": 1, "b": 1}).json() == {"sum": 2}
    with pytest.raises(CellcloudError) as e:
        region.client.invoke(f"arn:aws:lambda:cc-local-1:999999999999:function:{name}", {})
    assert e.value.status == 404
