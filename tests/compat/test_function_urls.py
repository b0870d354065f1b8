"""Function URLs (issue #15) on a real region: the config operations through boto3, requests
through curl (which resolves ``*.localhost`` itself, so the printed FunctionUrl is used as is)
and raw HTTP, the payload format 2.0 event as the handler saw it, the response mapping, CORS,
and the resource-policy decisions (AuthType NONE, AWS_IAM, another tenant's keys)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from tests.compat.conftest import lambda_client
from tests.integration.conftest import Region

pytestmark = pytest.mark.integration

# The handler answers with the event it got (in the structured form), or as the event asks.
ECHO = '''
import base64, json
def handler(event, context):
    mode = (event.get("queryStringParameters") or {}).get("mode")
    if mode == "shorthand":
        return {"hello": "world"}
    if mode == "string":
        return "plain"
    if mode == "fail":
        raise RuntimeError("boom")
    if mode == "binary":
        return {"statusCode": 201, "headers": {"content-type": "application/octet-stream",
                "x-one": "1"}, "cookies": ["a=1; Path=/", "b=2"],
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps(event)}
'''


@pytest.fixture(scope="module")
def echo(make_function_module: Callable[..., str]) -> str:
    return make_function_module(ECHO)


@pytest.fixture(scope="module")
def make_function_module(lam: Any) -> Callable[..., str]:
    import uuid

    from tests.compat.conftest import ROLE
    from tests.conftest import make_zip

    def make(code: str, **kw: Any) -> str:
        name = f"url-{uuid.uuid4().hex[:10]}"
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Code={"ZipFile": make_zip({"app.py": code})},
                            **kw)
        return name
    return make


@pytest.fixture(scope="module")
def other_tenant(region: Region) -> Iterator[dict[str, str]]:
    out = region.cli("tenant", "create", "urls-b").stdout
    fields = {k: v.strip() for k, v in (line.split(None, 1) for line in out.splitlines()
                                        if line.strip())}
    yield fields


def public(lam: Any, name: str, **kw: Any) -> str:
    """A NONE URL with the statement Lambda documents for a public URL."""
    url = str(lam.create_function_url_config(FunctionName=name, AuthType="NONE", **kw)
              ["FunctionUrl"])
    lam.add_permission(FunctionName=name, StatementId="public", Action="lambda:InvokeFunctionUrl",
                       Principal="*", FunctionUrlAuthType="NONE",
                       **({"Qualifier": kw["Qualifier"]} if "Qualifier" in kw else {}))
    return url


def curl(url: str, *args: str) -> tuple[int, dict[str, list[str]], bytes]:
    """curl, as a user would run it (it resolves *.localhost to loopback itself)."""
    out = subprocess.run(["curl", "-sS", "-i", "--max-time", "60", *args, url],
                         capture_output=True, timeout=90, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return int(lines[0].split()[1]), headers, body


def raw(region: Region, method: str, url: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to the endpoint's address with the URL's Host (what --resolve does)."""
    parts = urllib.parse.urlsplit(url)
    ep = urllib.parse.urlsplit(region.endpoint)
    conn = http.client.HTTPConnection(ep.hostname, ep.port, timeout=60)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers={"Host": parts.netloc, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.msg, resp.read()
    finally:
        conn.close()


def test_config_operations_as_boto3_expects(lam: Any, echo: str) -> None:
    assert lam.list_function_url_configs(FunctionName=echo)["FunctionUrlConfigs"] == []
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_url_config(FunctionName=echo)
    made = lam.create_function_url_config(
        FunctionName=echo, AuthType="AWS_IAM",
        Cors={"AllowOrigins": ["https://app.example.com"], "AllowMethods": ["GET", "POST"],
              "MaxAge": 60})
    assert made["ResponseMetadata"]["HTTPStatusCode"] == 201
    url = made["FunctionUrl"]
    assert url.startswith("http://") and ".lambda-url.cc-local-1.localhost:" in url, url
    assert made["InvokeMode"] == "BUFFERED" and made["AuthType"] == "AWS_IAM"
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_function_url_config(FunctionName=echo, AuthType="NONE")
    got = lam.get_function_url_config(FunctionName=echo)
    assert got["FunctionUrl"] == url and got["Cors"]["MaxAge"] == 60
    up = lam.update_function_url_config(FunctionName=echo, AuthType="NONE",
                                        InvokeMode="RESPONSE_STREAM")
    assert (up["AuthType"], up["InvokeMode"], up["FunctionUrl"]) == (
        "NONE", "RESPONSE_STREAM", url)
    assert up["Cors"]["AllowOrigins"] == ["https://app.example.com"]  # kept
    listed = lam.list_function_url_configs(FunctionName=echo)["FunctionUrlConfigs"]
    assert [c["FunctionUrl"] for c in listed] == [url]
    lam.delete_function_url_config(FunctionName=echo)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.delete_function_url_config(FunctionName=echo)
    # the deleted URL answers 404 (its id is gone), not the function
    assert raw_status(url) == 404


def raw_status(url: str) -> int:
    status, _, _ = curl(url)
    return status


def test_bad_config_input(lam: Any, raw_lam: Any, echo: str) -> None:
    for cors in ({"AllowOrigins": ["not an origin"]}, {"AllowOrigins": ["ftp://x.example"]},
                 {"AllowMethods": ["FETCH"]}, {"MaxAge": 86401},
                 {"AllowHeaders": ["bad header"]}):
        with pytest.raises(raw_lam.exceptions.InvalidParameterValueException):
            raw_lam.create_function_url_config(FunctionName=echo, AuthType="NONE", Cors=cors)
    with pytest.raises(raw_lam.exceptions.InvalidParameterValueException):
        raw_lam.create_function_url_config(FunctionName=echo, AuthType="OPEN")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.create_function_url_config(FunctionName="url-missing-fn", AuthType="NONE")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.create_function_url_config(FunctionName=echo, AuthType="NONE", Qualifier="noalias")
    assert lam.list_function_url_configs(FunctionName=echo)["FunctionUrlConfigs"] == []


def test_event_and_response_mapping(lam: Any, echo: str) -> None:
    url = public(lam, echo)
    try:
        status, headers, body = curl(
            url + "some/path?a=1&a=2&b=x%20y", "-X", "POST", "-H", "Content-Type: text/plain",
            "-H", "X-Multi: one", "-H", "X-Multi: two", "-H", "Cookie: c1=v1; c2=v2",
            "-A", "url-test/1", "--data-binary", "hello body")
        assert status == 200, body
        event = json.loads(body)
        assert event["version"] == "2.0" and event["routeKey"] == "$default"
        assert event["rawPath"] == "/some/path"
        assert event["rawQueryString"] == "a=1&a=2&b=x%20y"
        assert event["queryStringParameters"] == {"a": "1,2", "b": "x y"}
        assert event["cookies"] == ["c1=v1", "c2=v2"]
        assert event["headers"]["x-multi"] == "one,two"
        assert "cookie" not in event["headers"]
        assert event["body"] == "hello body" and event["isBase64Encoded"] is False
        ctx = event["requestContext"]
        url_id = urllib.parse.urlsplit(url).hostname.split(".")[0]  # type: ignore[union-attr]
        assert ctx["apiId"] == url_id and ctx["domainPrefix"] == url_id
        assert ctx["domainName"] == f"{url_id}.lambda-url.cc-local-1.localhost"
        assert ctx["http"] == {"method": "POST", "path": "/some/path", "protocol": "HTTP/1.1",
                               "sourceIp": "127.0.0.1", "userAgent": "url-test/1"}
        assert ctx["accountId"] == "anonymous" and "authorizer" not in ctx
        assert isinstance(ctx["timeEpoch"], int) and ctx["requestId"]
        # a binary body arrives base64-encoded
        status, _, body = curl(url, "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                               "--data-binary", "\x01\x02")
        event = json.loads(body)
        assert event["isBase64Encoded"] is True and event["body"] == "AQI="
        # the structured response: status, headers, cookies, a base64 body decoded
        status, headers, body = curl(url + "?mode=binary")
        assert status == 201 and body == bytes(range(256))
        assert headers["x-one"] == ["1"] and headers["set-cookie"] == ["a=1; Path=/", "b=2"]
        # the shorthand: 200, application/json, the value as JSON
        status, headers, body = curl(url + "?mode=shorthand")
        assert (status, headers["content-type"], json.loads(body)) == (
            200, ["application/json"], {"hello": "world"})
        status, _, body = curl(url + "?mode=string")
        assert (status, json.loads(body)) == (200, "plain")
        # a function error is a 502
        status, _, _ = curl(url + "?mode=fail")
        assert status == 502
        # the path form reaches the same function
        ep = urllib.parse.urlsplit(lam.meta.endpoint_url)
        status, _, body = curl(f"{ep.scheme}://{ep.netloc}/lambda-url/{url_id}/p2?x=1")
        assert status == 200 and json.loads(body)["rawPath"] == "/p2"
    finally:
        lam.delete_function_url_config(FunctionName=echo)
        lam.remove_permission(FunctionName=echo, StatementId="public")


def test_none_url_needs_the_public_statement(lam: Any, echo: str) -> None:
    url = str(lam.create_function_url_config(FunctionName=echo, AuthType="NONE")["FunctionUrl"])
    try:
        status, headers, body = curl(url)
        assert status == 403, body
        assert headers["x-amzn-errortype"] == ["AccessDeniedException"]
        # a statement for another action, or without the auth-type condition, is not enough
        lam.add_permission(FunctionName=echo, StatementId="inv", Action="lambda:InvokeFunction",
                           Principal="*")
        lam.add_permission(FunctionName=echo, StatementId="nocond",
                           Action="lambda:InvokeFunctionUrl", Principal="*")
        assert curl(url)[0] == 403
        lam.add_permission(FunctionName=echo, StatementId="public",
                           Action="lambda:InvokeFunctionUrl", Principal="*",
                           FunctionUrlAuthType="NONE")
        assert curl(url)[0] == 200
        lam.remove_permission(FunctionName=echo, StatementId="public")
        assert curl(url)[0] == 403
    finally:
        lam.delete_function_url_config(FunctionName=echo)
        for sid in ("inv", "nocond"):
            lam.remove_permission(FunctionName=echo, StatementId=sid)


def signed(region: Region, url: str, akid: str, secret: str) -> tuple[int, bytes]:
    """A GET to the URL signed with SigV4 (service lambda) by botocore's own signer."""
    req = botocore.awsrequest.AWSRequest(method="GET", url=url)
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(akid, secret), "lambda",
                            str(region.doc["region"])).add_auth(req)
    status, _, body = raw(region, "GET", url, headers=dict(req.headers.items()))
    return status, body


def test_aws_iam_url_and_other_tenants(region: Region, lam: Any, echo: str,
                                       other_tenant: dict[str, str]) -> None:
    url = str(lam.create_function_url_config(FunctionName=echo, AuthType="AWS_IAM")
              ["FunctionUrl"])
    b_key, b_secret = other_tenant["aws_access_key_id"], other_tenant["aws_secret_access_key"]
    try:
        assert curl(url)[0] == 403  # unsigned
        status, body = signed(region, url, str(region.doc["access_key_id"]),
                              str(region.doc["secret_access_key"]))
        assert status == 200, body
        ctx = json.loads(body)["requestContext"]
        assert ctx["authorizer"]["iam"]["accountId"] == str(region.doc["account_id"])
        assert signed(region, url, str(region.doc["access_key_id"]), "wrong-secret")[0] == 403
        # another tenant: refused until the owner grants it
        assert signed(region, url, b_key, b_secret)[0] == 403
        lam.add_permission(FunctionName=echo, StatementId="b-url",
                           Action="lambda:InvokeFunctionUrl",
                           Principal=other_tenant["account_id"], FunctionUrlAuthType="AWS_IAM")
        status, body = signed(region, url, b_key, b_secret)
        assert status == 200, body
        assert json.loads(body)["requestContext"]["accountId"] == other_tenant["account_id"]
    finally:
        lam.delete_function_url_config(FunctionName=echo)
        lam.remove_permission(FunctionName=echo, StatementId="b-url")


def test_cross_tenant_invoke_needs_a_grant(region: Region, lam: Any, echo: str,
                                           other_tenant: dict[str, str]) -> None:
    arn = lam.get_function(FunctionName=echo)["Configuration"]["FunctionArn"]
    b = lambda_client(region, access_key_id=other_tenant["aws_access_key_id"],
                      secret=other_tenant["aws_secret_access_key"])
    with pytest.raises(b.exceptions.ClientError) as e:
        b.invoke(FunctionName=arn, Payload=b"{}")
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"
    lam.add_permission(FunctionName=echo, StatementId="b-invoke", Action="lambda:InvokeFunction",
                       Principal=other_tenant["account_id"])
    try:
        out = b.invoke(FunctionName=arn, Payload=b"{}")
        assert out["StatusCode"] == 200 and json.loads(out["Payload"].read())["statusCode"] == 200
        # the grant opens Invoke only: the function's configuration stays the owner's
        with pytest.raises(b.exceptions.ResourceNotFoundException):
            b.get_function(FunctionName=arn)
    finally:
        lam.remove_permission(FunctionName=echo, StatementId="b-invoke")
    with pytest.raises(b.exceptions.ClientError):
        b.invoke(FunctionName=arn, Payload=b"{}")


def test_cors_preflight_and_headers(lam: Any, echo: str) -> None:
    url = public(lam, echo, Cors={"AllowOrigins": ["https://app.example.com"],
                                  "AllowMethods": ["POST"], "AllowHeaders": ["x-custom"],
                                  "ExposeHeaders": ["x-one"], "MaxAge": 300})
    try:
        status, headers, body = curl(url, "-X", "OPTIONS", "-H",
                                     "Origin: https://app.example.com", "-H",
                                     "Access-Control-Request-Method: POST")
        assert status == 200 and body == b""
        assert headers["access-control-allow-origin"] == ["https://app.example.com"]
        assert headers["access-control-allow-methods"] == ["POST"]
        assert headers["access-control-max-age"] == ["300"]
        status, headers, _ = curl(url, "-X", "OPTIONS", "-H", "Origin: https://evil.example",
                                  "-H", "Access-Control-Request-Method: POST")
        assert status == 200 and "access-control-allow-origin" not in headers
        status, headers, _ = curl(url + "?mode=shorthand", "-H",
                                  "Origin: https://app.example.com")
        assert status == 200
        assert headers["access-control-allow-origin"] == ["https://app.example.com"]
        assert headers["access-control-expose-headers"] == ["x-one"]
    finally:
        lam.delete_function_url_config(FunctionName=echo)
        lam.remove_permission(FunctionName=echo, StatementId="public")


def test_alias_qualifier(lam: Any, echo: str) -> None:
    v = lam.publish_version(FunctionName=echo)["Version"]
    lam.create_alias(FunctionName=echo, Name="live", FunctionVersion=v)
    url = public(lam, echo, Qualifier="live")
    try:
        assert lam.get_function_url_config(FunctionName=echo, Qualifier="live")[
            "FunctionArn"].endswith(":live")
        with pytest.raises(lam.exceptions.ResourceNotFoundException):
            lam.get_function_url_config(FunctionName=echo)  # the unqualified one is absent
        status, _, body = curl(url + "?mode=shorthand")
        assert status == 200, body
        assert len(lam.list_function_url_configs(FunctionName=echo)["FunctionUrlConfigs"]) == 1
    finally:
        lam.delete_alias(FunctionName=echo, Name="live")  # takes its URL with it
    assert curl(url)[0] == 404


def test_bad_requests(region: Region, lam: Any, echo: str) -> None:
    url = public(lam, echo)
    try:
        # 10 MB: refused on its declared length, before the body crosses a hop
        parts = urllib.parse.urlsplit(url)
        ep = urllib.parse.urlsplit(region.endpoint)
        with socket.create_connection((ep.hostname, ep.port), timeout=60) as s:
            s.sendall(f"POST / HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: text/plain"
                      f"\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n".encode())
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413") and b"RequestEntityTooLarge" in answer
        # ... and sent chunked (no declared length): cut off once it passes 6 MB
        with socket.create_connection((ep.hostname, ep.port), timeout=60) as s:
            s.sendall(f"POST / HTTP/1.1\r\nHost: {parts.netloc}\r\nTransfer-Encoding: "
                      "chunked\r\n\r\n".encode())
            chunk = b"x" * (1024 * 1024)
            for _ in range(6):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"10\r\n" + b"y" * 16 + b"\r\n")  # one byte over: the last we send
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # an unknown URL id of a real account, and garbage in place of an id
        url_id = str(parts.hostname).split(".")[0]
        other = url_id[:-4] + ("aaaa" if url_id[-4:] != "aaaa" else "bbbb")
        assert curl(url.replace(url_id, other))[0] == 404
        # a header line that is not HTTP: the connection layer answers 400
        with socket.create_connection((ep.hostname, ep.port), timeout=60) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {parts.netloc}\r\nBad Header\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 400")
    finally:
        lam.delete_function_url_config(FunctionName=echo)
        lam.remove_permission(FunctionName=echo, StatementId="public")


# -- response streaming (Node's awslambda.streamifyResponse) -------------------------------------
STREAM_JS = r"""
exports.handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
  const mode = event.mode || (event.queryStringParameters || {}).mode;
  if (mode === "http") {
    const s = awslambda.HttpResponseStream.from(responseStream, {
      statusCode: 201, headers: { "content-type": "text/plain", "x-streamed": "yes" },
      cookies: ["s=1"] });
    s.write("hello ");
    await new Promise((r) => setTimeout(r, 10));
    s.write("streamed ");
    s.end("world");
    return;
  }
  if (mode === "fail") {
    responseStream.write("partial");
    throw new Error("failed midway");
  }
  if (mode === "wait") {  // the first chunk, then wait for the file the test creates
    responseStream.write("first;");
    const fs = require("fs");
    while (!fs.existsSync(`/tmp/go-${event.token || (event.queryStringParameters || {}).token}`)) {
      await new Promise((r) => setTimeout(r, 20));
    }
    responseStream.end("second");
    return;
  }
  if (mode === "forever") {
    responseStream.write("first");
    return;  // never ends: the function's timeout ends it
  }
  for (let i = 0; i < 3; i++) responseStream.write(`chunk${i};`);
  responseStream.end();
});
"""


@pytest.fixture(scope="module")
def streamer(lam: Any) -> str:
    import uuid

    from cellcloud.sandbox import runtimes
    from tests.conftest import make_zip
    installed = runtimes.find_node()
    if not installed:
        pytest.skip("no Node installed")
    name = f"url-s-{uuid.uuid4().hex[:8]}"
    lam.create_function(FunctionName=name, Runtime=f"nodejs{min(installed)}.x",
                        Role="arn:aws:iam::123456789012:role/x", Handler="index.handler",
                        Timeout=3, Code={"ZipFile": make_zip({"index.js": STREAM_JS})})
    return name


def events(out: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    chunks, complete = [], {}
    for e in out["EventStream"]:
        if "PayloadChunk" in e:
            chunks.append(e["PayloadChunk"]["Payload"])
        else:
            complete = e["InvokeComplete"]
    return b"".join(chunks), complete


def test_invoke_with_response_stream(lam: Any, streamer: str) -> None:
    out = lam.invoke_with_response_stream(FunctionName=streamer, Payload=b"{}", LogType="Tail")
    assert out["StatusCode"] == 200 and out["ExecutedVersion"] == "$LATEST"
    assert out["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
    body, complete = events(out)
    assert body == b"chunk0;chunk1;chunk2;"
    assert "ErrorCode" not in complete and complete["LogResult"]
    # a failure after the first write: InvokeComplete says so
    body, complete = events(lam.invoke_with_response_stream(
        FunctionName=streamer, Payload=json.dumps({"mode": "fail"}).encode()))
    assert complete["ErrorCode"] and "failed midway" in complete["ErrorDetails"]
    # a stream that never ends is cut at the function's timeout (3 s)
    body, complete = events(lam.invoke_with_response_stream(
        FunctionName=streamer, Payload=json.dumps({"mode": "forever"}).encode()))
    assert complete["ErrorCode"] and "timed out" in complete["ErrorDetails"].lower()


def test_response_stream_url(lam: Any, streamer: str) -> None:
    url = public(lam, streamer, InvokeMode="RESPONSE_STREAM")
    try:
        status, headers, body = curl(url + "?mode=http")
        assert (status, body) == (201, b"hello streamed world")
        assert headers["content-type"] == ["text/plain"] and headers["x-streamed"] == ["yes"]
        assert headers["set-cookie"] == ["s=1"]
        status, headers, body = curl(url)
        assert (status, body) == (200, b"chunk0;chunk1;chunk2;")
        assert headers["content-type"] == ["application/octet-stream"]
        # a failure after the head left: the stream just ends (the status went out already)
        status, _, body = curl(url + "?mode=fail")
        assert (status, body) == (200, b"partial")
    finally:
        lam.delete_function_url_config(FunctionName=streamer)
        lam.remove_permission(FunctionName=streamer, StatementId="public")


def release(token: str, code_file: str = "index.js", code: str = STREAM_JS) -> None:
    """The event the waiting handler polls for: a file in its environment's own /tmp, made
    through /proc/<pid>/root (we are root on the host). The environment is found by its code:
    a process whose /var/task holds this module's handler."""
    made = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/root/var/task/{code_file}") as f:
                if code not in f.read():
                    continue
            with open(f"/proc/{pid}/root/tmp/go-{token}", "w") as f:
                f.write("go")
            made += 1
        except OSError:
            continue  # gone, or not an environment
    assert made, "no environment of the streaming function found"


def test_first_chunk_arrives_before_the_handler_finishes(region: Region, lam: Any,
                                                         streamer: str) -> None:
    """The handler writes its first chunk, then waits for a file that this test creates only
    after it has read that chunk: the whole response can only arrive if the first chunk
    crossed guest -> agent -> frontend -> router -> client while the handler still ran."""
    import uuid
    url = public(lam, streamer, InvokeMode="RESPONSE_STREAM")
    try:
        token = uuid.uuid4().hex
        parts = urllib.parse.urlsplit(url)
        ep = urllib.parse.urlsplit(region.endpoint)
        conn = http.client.HTTPConnection(ep.hostname, ep.port, timeout=60)
        conn.request("GET", f"/?mode=wait&token={token}", headers={"Host": parts.netloc})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
        first = resp.read1(65536)
        assert first == b"first;"
        release(token)
        assert resp.read() == b"second"
        conn.close()
        # the same through InvokeWithResponseStream, read by boto3's EventStream
        token = uuid.uuid4().hex
        out = lam.invoke_with_response_stream(
            FunctionName=streamer, Payload=json.dumps({"mode": "wait", "token": token}).encode())
        stream = iter(out["EventStream"])
        assert next(stream) == {"PayloadChunk": {"Payload": b"first;"}}
        release(token)
        rest = list(stream)
        assert rest[0] == {"PayloadChunk": {"Payload": b"second"}}
        assert "InvokeComplete" in rest[-1] and "ErrorCode" not in rest[-1]["InvokeComplete"]
    finally:
        lam.delete_function_url_config(FunctionName=streamer)
        lam.remove_permission(FunctionName=streamer, StatementId="public")


# A custom runtime (provided.al2023) in Python that streams by speaking to the Runtime API
# itself: chunked POST with Lambda-Runtime-Function-Response-Mode: streaming.
PY_BOOTSTRAP = r"""#!/usr/bin/env python3
import http.client, json, os, time
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
api = "/2018-06-01/runtime"
while True:
    c = http.client.HTTPConnection(host, int(port))
    c.request("GET", api + "/invocation/next")
    r = c.getresponse()
    rid = r.getheader("Lambda-Runtime-Aws-Request-Id")
    event = json.loads(r.read() or b"null")
    c.putrequest("POST", api + f"/invocation/{rid}/response")
    c.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    def chunk(b):
        c.send(b"%x\r\n%s\r\n" % (len(b), b))
    chunk(b"py-first;")
    while not os.path.exists("/tmp/go-" + event["token"]):
        time.sleep(0.02)
    chunk(b"py-second")
    c.send(b"0\r\n\r\n")
    c.getresponse().read()
    c.close()
"""


def test_a_custom_python_runtime_streams(lam: Any) -> None:
    import uuid

    from tests.compat.test_runtimes import zip_with_modes
    name = f"url-py-{uuid.uuid4().hex[:8]}"
    lam.create_function(FunctionName=name, Runtime="provided.al2023",
                        Role="arn:aws:iam::123456789012:role/x", Handler="unused", Timeout=30,
                        Code={"ZipFile": zip_with_modes({"bootstrap": (PY_BOOTSTRAP, 0o755)})})
    token = uuid.uuid4().hex
    out = lam.invoke_with_response_stream(FunctionName=name,
                                          Payload=json.dumps({"token": token}).encode())
    stream = iter(out["EventStream"])
    assert next(stream) == {"PayloadChunk": {"Payload": b"py-first;"}}
    release(token, "bootstrap", PY_BOOTSTRAP)  # only after the first chunk arrived
    rest = list(stream)
    assert rest[0] == {"PayloadChunk": {"Payload": b"py-second"}}
    assert "ErrorCode" not in rest[-1]["InvokeComplete"]
