"""boto3 against a running region, for every supported Lambda operation and modelled error."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cellcloud.security import sigv4
from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, lambda_client, new_name

pytestmark = pytest.mark.integration

VERSIONED = ("import os\ndef handler(event, context):\n"
             "    return {'tag': os.environ.get('TAG'), 'version': context.function_version,\n"
             "            'arn': context.invoked_function_arn}\n")


def code_of(err: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    r = err.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"]


def test_create_get_update_delete_with_waiters(lam: Any) -> None:
    name = new_name()
    zipped = make_zip({"app.py": SUM})
    cfg = lam.create_function(
        FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="app.handler",
        Code={"ZipFile": zipped}, MemorySize=256, Timeout=10, Description="d",
        Environment={"Variables": {"KEY1": "v"}}, Tags={"team": "a"})
    assert cfg["State"] == "Active" and cfg["Version"] == "$LATEST"
    assert cfg["CodeSha256"] == base64.b64encode(hashlib.sha256(zipped).digest()).decode()
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    lam.get_waiter("function_exists").wait(FunctionName=name)
    got = lam.get_function(FunctionName=name)
    assert got["Configuration"]["MemorySize"] == 256 and got["Tags"] == {"team": "a"}
    assert lam.get_function_configuration(FunctionName=name)["Environment"] == {
        "Variables": {"KEY1": "v"}}
    lam.update_function_code(FunctionName=name, ZipFile=make_zip(
        {"app.py": "def handler(e, c):\n    return {'product': e['a'] * e['b']}\n"}))
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)
    out = lam.invoke(FunctionName=name, Payload=json.dumps({"a": 3, "b": 4}))
    assert json.loads(out["Payload"].read()) == {"product": 12}
    upd = lam.update_function_configuration(FunctionName=name, Timeout=20)
    assert upd["Timeout"] == 20 and upd["LastUpdateStatus"] == "Successful"
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.update_function_configuration(FunctionName=name, Timeout=5, RevisionId="stale")
    lam.delete_function(FunctionName=name)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName=name)


def test_list_functions_paging(lam: Any, make_function: Callable[..., str]) -> None:
    names = {make_function() for _ in range(5)}
    seen: list[str] = []
    pages = 0
    for page in lam.get_paginator("list_functions").paginate(
            PaginationConfig={"PageSize": 2}):
        assert len(page["Functions"]) <= 2
        seen += [f["FunctionName"] for f in page["Functions"]]
        pages += 1
    assert names <= set(seen) and len(seen) == len(set(seen)) and pages >= 3
    first = lam.list_functions(MaxItems=1)
    assert len(first["Functions"]) == 1 and first["NextMarker"]


def test_invoke_kinds(lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function("def handler(e, c):\n    print('hello log')\n"
                         "    if e.get('fail'):\n        raise KeyError('k')\n    return e\n")
    out = lam.invoke(FunctionName=name, Payload=b'{"x": 1}', LogType="Tail")
    assert out["StatusCode"] == 200 and out["ExecutedVersion"] == "$LATEST"
    assert json.loads(out["Payload"].read()) == {"x": 1}
    assert "hello log" in base64.b64decode(out["LogResult"]).decode()
    out = lam.invoke(FunctionName=name, Payload=b'{"fail": true}')
    assert out["FunctionError"] == "Unhandled"
    assert json.loads(out["Payload"].read())["errorType"] == "KeyError"
    assert lam.invoke(FunctionName=name, InvocationType="DryRun")["StatusCode"] == 204
    accepted = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b"{}")
    assert accepted["StatusCode"] == 202 and accepted["ResponseMetadata"]["RequestId"]
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName=name, Payload=b"{not json")
    with pytest.raises(ClientError) as big:
        lam.invoke(FunctionName=name, Payload=b'"' + b"x" * (6 * 1024 * 1024) + b'"')
    assert code_of(big) == (413, "RequestEntityTooLargeException")


def test_versions_are_immutable_snapshots_with_their_own_environments(
        lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function(VERSIONED, Environment={"Variables": {"TAG": "one"}})
    v1 = lam.publish_version(FunctionName=name, Description="first")
    assert v1["Version"] == "1" and v1["FunctionArn"].endswith(f":{name}:1")
    # Nothing changed: the same version comes back.
    assert lam.publish_version(FunctionName=name)["Version"] == "1"
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"TAG": "two"}})
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.publish_version(FunctionName=name, CodeSha256="bm9wZQ==")
    assert lam.publish_version(FunctionName=name)["Version"] == "2"
    seen = {}
    for q in ("1", "2", "$LATEST"):
        out = lam.invoke(FunctionName=name, Qualifier=q, Payload=b"{}")
        doc = json.loads(out["Payload"].read())
        assert out["ExecutedVersion"] == doc["version"] == q
        seen[q] = doc["tag"]
    assert seen == {"1": "one", "2": "two", "$LATEST": "two"}
    out = lam.invoke(FunctionName=f"{name}:1", Payload=b"{}")
    assert out["ExecutedVersion"] == "1"
    assert lam.get_function(FunctionName=name, Qualifier="1")["Configuration"]["Environment"] == {
        "Variables": {"TAG": "one"}}
    versions = [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]]
    assert versions == ["$LATEST", "1", "2"]
    page = lam.list_versions_by_function(FunctionName=name, MaxItems=2)
    rest = lam.list_versions_by_function(FunctionName=name, Marker=page["NextMarker"])
    assert [v["Version"] for v in page["Versions"] + rest["Versions"]] == versions
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=name, Qualifier="9", Payload=b"{}")
    lam.delete_function(FunctionName=name, Qualifier="1")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_configuration(FunctionName=name, Qualifier="1")
    assert lam.invoke(FunctionName=name, Qualifier="2", Payload=b"{}")["ExecutedVersion"] == "2"


def test_aliases_and_weighted_routing(lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function(VERSIONED, Environment={"Variables": {"TAG": "one"}})
    lam.publish_version(FunctionName=name)
    lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"TAG": "two"}})
    lam.publish_version(FunctionName=name)
    alias = lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1",
                             Description="prod")
    assert alias["AliasArn"].endswith(f":{name}:live")
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1")
    out = lam.invoke(FunctionName=name, Qualifier="live", Payload=b"{}")
    assert out["ExecutedVersion"] == "1"
    assert json.loads(out["Payload"].read())["arn"].endswith(f":{name}:live")
    upd = lam.update_alias(FunctionName=name, Name="live",
                           RoutingConfig={"AdditionalVersionWeights": {"2": 0.3}})
    assert upd["RoutingConfig"] == {"AdditionalVersionWeights": {"2": 0.3}}
    n = 200
    counts = Counter(lam.invoke(FunctionName=name, Qualifier="live", Payload=b"{}")
                     ["ExecutedVersion"] for _ in range(n))
    sd = (n * 0.3 * 0.7) ** 0.5
    assert set(counts) <= {"1", "2"} and abs(counts["2"] - n * 0.3) < 5 * sd, counts
    assert lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"] == "1"
    assert [a["Name"] for a in lam.list_aliases(FunctionName=name)["Aliases"]] == ["live"]
    assert lam.list_aliases(FunctionName=name, FunctionVersion="2")["Aliases"][0]["Name"] == "live"
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.delete_function(FunctionName=name, Qualifier="2")  # the alias routes to it
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.update_alias(FunctionName=name, Name="live", FunctionVersion="2", RevisionId="x")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.create_alias(FunctionName=name, Name="bad", FunctionVersion="7")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_alias(FunctionName=name, Name="bad", FunctionVersion="1",
                         RoutingConfig={"AdditionalVersionWeights": {"2": 0.5, "3": 0.1}})
    lam.delete_alias(FunctionName=name, Name="live")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_alias(FunctionName=name, Name="live")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=name, Qualifier="live", Payload=b"{}")


def test_reserved_concurrency_throttles_by_count(region: Region, lam: Any,
                                                 make_function: Callable[..., str]) -> None:
    name = make_function("import time\ndef handler(event, context):\n"
                         "    time.sleep(max(0.0, event['until'] - time.time()))\n"
                         "    return 'done'\n", Timeout=60)
    assert lam.get_function_concurrency(FunctionName=name).get(
        "ReservedConcurrentExecutions") is None
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=1)
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 1
    assert lam.get_function(FunctionName=name)["Concurrency"] == {
        "ReservedConcurrentExecutions": 1}
    results: list[str] = []
    holder = lambda_client(region)
    t = threading.Thread(target=lambda: results.append(
        holder.invoke(FunctionName=name, Payload=json.dumps({"until": time.time() + 8}))
        ["Payload"].read().decode()))
    t.start()
    # Wait (bounded) until the first invoke is running in its environment: a real condition.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        envs = [e for c in region.client.status()["cells"].values()
                for a in c["agents"].values() for e in a["envs"]
                if e["function"] == name and e["busy"]]
        if envs:
            break
    assert envs, "the first invoke never started"
    with pytest.raises(lam.exceptions.TooManyRequestsException) as e:
        lam.invoke(FunctionName=name, Payload=json.dumps({"until": 0}))
    assert e.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    t.join(60)
    assert results == ['"done"']
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=0)
    with pytest.raises(lam.exceptions.TooManyRequestsException):
        lam.invoke(FunctionName=name, Payload=json.dumps({"until": 0}))
    lam.delete_function_concurrency(FunctionName=name)
    assert lam.invoke(FunctionName=name, Payload=json.dumps({"until": 0}))["StatusCode"] == 200
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=100_000)


def test_layers(lam: Any, make_function: Callable[..., str]) -> None:
    layer = new_name("layer")
    zipped = make_zip({"python/greeting.py": "WORD = 'hi from a layer'\n"})
    v1 = lam.publish_layer_version(LayerName=layer, Content={"ZipFile": zipped},
                                   CompatibleRuntimes=["python3.11"], Description="d1")
    assert v1["Version"] == 1 and v1["LayerVersionArn"].endswith(f":layer:{layer}:1")
    assert v1["Content"]["CodeSize"] == len(zipped)
    v2 = lam.publish_layer_version(LayerName=layer, Content={"ZipFile": zipped})
    assert v2["Version"] == 2
    got = lam.get_layer_version(LayerName=layer, VersionNumber=1)
    assert got["Description"] == "d1" and got["LayerArn"] == v1["LayerArn"]
    assert lam.get_layer_version_by_arn(Arn=v1["LayerVersionArn"])["Version"] == 1
    assert [v["Version"] for v in lam.list_layer_versions(LayerName=layer)["LayerVersions"]] == [
        2, 1]
    assert [v["Version"] for v in lam.list_layer_versions(
        LayerName=layer, CompatibleRuntime="python3.11")["LayerVersions"]] == [1]
    layers = {x["LayerName"]: x for x in lam.list_layers()["Layers"]}
    assert layers[layer]["LatestMatchingVersion"]["Version"] == 2
    name = make_function("import os, sys\ndef handler(e, c):\n"
                         "    sys.path.append('/opt/python')\n    import greeting\n"
                         "    return greeting.WORD\n", Layers=[v1["LayerVersionArn"]])
    cfg = lam.get_function_configuration(FunctionName=name)
    assert cfg["Layers"] == [{"Arn": v1["LayerVersionArn"], "CodeSize": len(zipped)}]
    assert json.loads(lam.invoke(FunctionName=name, Payload=b"{}")["Payload"].read()) == \
        "hi from a layer"
    lam.delete_layer_version(LayerName=layer, VersionNumber=1)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_layer_version(LayerName=layer, VersionNumber=1)
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.update_function_configuration(FunctionName=name, Layers=[v1["LayerVersionArn"]])
    # A function keeps the layer it was configured with.
    assert json.loads(lam.invoke(FunctionName=name, Payload=b"{}")["Payload"].read()) == \
        "hi from a layer"
    lam.delete_layer_version(LayerName=layer, VersionNumber=1)  # idempotent
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.update_function_configuration(
            FunctionName=name, Layers=[v2["LayerVersionArn"].replace(":layer:", ":layer:x")])


def test_modelled_errors(lam: Any, make_function: Callable[..., str]) -> None:
    missing = new_name("missing")
    for call in (lambda: lam.get_function(FunctionName=missing),
                 lambda: lam.invoke(FunctionName=missing),
                 lambda: lam.delete_function(FunctionName=missing),
                 lambda: lam.publish_version(FunctionName=missing),
                 lambda: lam.list_aliases(FunctionName=missing),
                 lambda: lam.get_function_concurrency(FunctionName=missing),
                 lambda: lam.get_layer_version(LayerName=missing, VersionNumber=1)):
        with pytest.raises(lam.exceptions.ResourceNotFoundException):
            call()
    name = make_function()
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Code={"ZipFile": make_zip({"app.py": SUM})})
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.update_function_configuration(FunctionName=name, Runtime="java21")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.delete_function(FunctionName=name, Qualifier="$LATEST")


def test_signature_errors_and_tenant_isolation(region: Region, lam: Any,
                                               make_function: Callable[..., str]) -> None:
    bad = lambda_client(region, secret="not-the-secret")
    with pytest.raises(ClientError) as e:
        bad.list_functions()
    assert code_of(e) == (403, "InvalidSignatureException")
    with pytest.raises(ClientError) as e:
        lambda_client(region, access_key_id="AKIAUNKNOWNKEY000000").list_functions()
    assert code_of(e) == (403, "UnrecognizedClientException")
    # A correct signature made six minutes ago is refused (clock skew).
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(region.endpoint)
    host = f"{u.hostname}:{u.port}"
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 360))
    sig = sigv4._expected_signature(
        "GET", "/2015-03-31/functions/", "", {"host": host, "x-amz-date": amz_date}, b"",
        str(region.doc["access_key_id"]), str(region.doc["secret_access_key"]), "cc-local-1",
        amz_date)
    auth = (f"AWS4-HMAC-SHA256 Credential={region.doc['access_key_id']}/{amz_date[:8]}/"
            f"cc-local-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/2015-03-31/functions/", headers={"x-amz-date": amz_date,
                                                           "Authorization": auth})
    resp = conn.getresponse()
    assert resp.status == 403 and resp.getheader("x-amzn-errortype") == "InvalidSignatureException"
    assert b"Signature expired" in resp.read()
    # A second tenant, created with the CLI, sees none of the first one's functions.
    name = make_function()
    out = subprocess.run([sys.executable, "-m", "cellcloud", "tenant", "create", new_name("t"),
                          "--state-dir", region.state_dir], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    fields = dict(line.split(None, 1) for line in out.strip().splitlines())
    other = lambda_client(region, access_key_id=fields["aws_access_key_id"].strip(),
                          secret=fields["aws_secret_access_key"].strip())
    assert other.list_functions()["Functions"] == []
    arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    # Another account's keys naming the ARN: Lambda's 403, since no resource-based policy
    # grants that account (cross-account invokes are allowed only by AddPermission).
    with pytest.raises(ClientError) as denied:
        other.invoke(FunctionName=arn, Payload=b'{"a": 1, "b": 2}')
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(other.exceptions.ResourceNotFoundException):
        other.get_function(FunctionName=name)
    other.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                          Handler="app.handler", Code={"ZipFile": make_zip({"app.py": SUM})})
    other_arn = other.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    assert other_arn != arn and fields["account_id"].strip() in other_arn
    listed = subprocess.run([sys.executable, "-m", "cellcloud", "tenant", "ls", "--state-dir",
                             region.state_dir], capture_output=True, text=True, check=True,
                            timeout=60).stdout
    assert fields["aws_access_key_id"].strip() in listed
    assert fields["aws_secret_access_key"].strip() not in listed
