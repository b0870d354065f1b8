"""core/function_urls.py: URL ids, config validation, CORS, the payload 2.0 mapping both ways,
and the authorization decision over policies built by core/policies.py itself."""

from __future__ import annotations

import base64
import json
import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import function_urls as fu
from cellcloud.core import policies
from cellcloud.core.errors import LambdaError

OWNER = "123456789012"
OTHER = "210987654321"
ARN = f"arn:aws:lambda:cc-local-1:{OWNER}:function:f"


@given(st.integers(min_value=0, max_value=10**12 - 1), st.integers())
def test_url_id_carries_its_account(n: int, seed: int) -> None:
    account = f"{n:012d}"
    url_id = fu.new_url_id(account, random.Random(seed))
    assert len(url_id) == fu.URL_ID_CHARS and url_id.isalnum() and url_id.islower()
    assert fu.account_of(url_id) == account
    assert fu.host_url_id(f"{url_id}.lambda-url.r-1.localhost:8080", "r-1") == url_id
    assert fu.host_url_id(f"{url_id.upper()}.LAMBDA-URL.r-1.localhost", "r-1") == url_id
    assert fu.split_path_form(f"/lambda-url/{url_id}/a/b") == (url_id, "/a/b")
    assert fu.split_path_form(f"/lambda-url/{url_id}") == (url_id, "/")


def test_not_url_ids() -> None:
    url_id = fu.new_url_id(OWNER, random.Random(1))
    assert fu.account_of("x" * 31) is None and fu.account_of("1" * 32) is None
    assert fu.account_of("7" * 32) is None  # decodes past 12 digits
    assert fu.host_url_id(f"{url_id}.lambda-url.other-region.localhost", "r-1") is None
    assert fu.host_url_id("127.0.0.1:9000", "r-1") is None
    assert fu.split_path_form("/2015-03-31/functions") is None
    assert fu.split_path_form("/lambda-url/short/x") is None


def test_function_url_on_the_endpoint_used() -> None:
    assert fu.function_url("a" * 32, "r-1", "http://127.0.0.1:4566") == (
        f"http://{'a' * 32}.lambda-url.r-1.localhost:4566/")
    assert fu.function_url("a" * 32, "r-1", "https://region.example").startswith("https://")
    assert fu.function_url("a" * 32, "r-1", "http://[::1]:80").endswith(".localhost:80/")


def test_config_create_and_update() -> None:
    cfg = fu.check_config({"AuthType": "NONE"}, None)
    assert cfg == {"AuthType": "NONE", "InvokeMode": "BUFFERED"}
    up = fu.check_config({"InvokeMode": "RESPONSE_STREAM", "Cors": {"MaxAge": 5}}, cfg)
    assert up == {"AuthType": "NONE", "InvokeMode": "RESPONSE_STREAM", "Cors": {"MaxAge": 5}}
    for bad in ({}, {"AuthType": "OPEN"}, {"AuthType": "NONE", "InvokeMode": "STREAM"},
                {"AuthType": "NONE", "Extra": 1}):
        with pytest.raises(LambdaError) as e:
            fu.check_config(bad, None)
        assert e.value.type == "InvalidParameterValueException"


@pytest.mark.parametrize("cors", [
    {"AllowOrigins": ["example.com"]}, {"AllowOrigins": ["ftp://a.example"]},
    {"AllowOrigins": ["https://a.example/path"]}, {"AllowOrigins": [""]},
    {"AllowOrigins": ["https://a.example"] * 101}, {"AllowMethods": ["FETCH"]},
    {"AllowMethods": ["GET"] * 7}, {"AllowHeaders": ["a b"]}, {"ExposeHeaders": ["x\n"]},
    {"MaxAge": -1}, {"MaxAge": 86401}, {"MaxAge": True}, {"AllowCredentials": "yes"},
    {"AllowOrigins": "https://a.example"}, {"Unknown": 1}, "not a structure",
])
def test_bad_cors(cors: object) -> None:
    with pytest.raises(LambdaError) as e:
        fu.check_cors(cors)
    assert e.value.status == 400


def test_good_cors() -> None:
    cors = fu.check_cors({"AllowOrigins": ["*", "https://a.example:8443", "https://*.b.example"],
                          "AllowMethods": ["GET", "*"], "AllowHeaders": ["x-a", "*"],
                          "ExposeHeaders": ["x-b"], "MaxAge": 0, "AllowCredentials": False})
    assert cors["MaxAge"] == 0


def test_preflight() -> None:
    cors = {"AllowOrigins": ["https://a.example", "https://*.b.example"],
            "AllowMethods": ["POST"], "AllowHeaders": ["x-a"], "MaxAge": 10,
            "AllowCredentials": True}
    asked = {"origin": "https://a.example", "access-control-request-method": "POST",
             "access-control-request-headers": "x-a"}
    assert fu.is_preflight("OPTIONS", asked) and not fu.is_preflight("GET", asked)
    got = dict(fu.preflight(cors, asked))
    assert got["access-control-allow-origin"] == "https://a.example"
    assert got["access-control-allow-methods"] == "POST"
    assert got["access-control-allow-headers"] == "x-a"
    assert got["access-control-allow-credentials"] == "true"
    assert got["access-control-max-age"] == "10"
    assert dict(fu.preflight(cors, {**asked, "origin": "https://x.b.example"}))[
        "access-control-allow-origin"] == "https://x.b.example"
    assert "access-control-allow-origin" not in dict(
        fu.preflight(cors, {**asked, "origin": "https://evil.example"}))
    assert "access-control-allow-origin" not in dict(
        fu.preflight(cors, {**asked, "access-control-request-method": "DELETE"}))
    # '*' without credentials answers '*'
    assert dict(fu.cors_headers({"AllowOrigins": ["*"]}, "https://z.example"))[
        "access-control-allow-origin"] == "*"
    assert fu.cors_headers(None, "https://z.example") == []


def request(**kw: object) -> fu.UrlRequest:
    base: dict[str, object] = dict(
        url_id="a" * 32, region="r-1", method="GET", raw_path="/p", raw_query="",
        headers=[], body=b"", source_ip="127.0.0.1")
    base.update(kw)
    return fu.UrlRequest(**base)  # type: ignore[arg-type]


def test_event_shape() -> None:
    ev = fu.build_event(request(
        method="POST", raw_path="/a%20b/c", raw_query="x=1&x=2&y=&z=a+b&Cap=%C3%A9%26&&flag",
        headers=[("host", "h"), ("cookie", "a=1; b=2"), ("x-m", "1"), ("x-m", "2"),
                 ("content-type", "application/json; charset=utf-8"), ("user-agent", "ua"),
                 ("content-length", "7"), ("connection", "keep-alive")],
        body=b'{"k":1}'), request_id="rid", now_ms=1_700_000_000_123)
    assert ev["version"] == "2.0" and ev["routeKey"] == "$default"
    assert (ev["rawPath"], ev["rawQueryString"]) == ("/a%20b/c",
                                                     "x=1&x=2&y=&z=a+b&Cap=%C3%A9%26&&flag")
    assert ev["cookies"] == ["a=1", "b=2"]
    assert ev["headers"] == {"host": "h", "x-m": "1,2", "user-agent": "ua",
                             "content-type": "application/json; charset=utf-8"}
    assert ev["queryStringParameters"] == {"x": "1,2", "y": "", "z": "a b", "Cap": "é&",
                                           "flag": ""}
    assert (ev["body"], ev["isBase64Encoded"]) == ('{"k":1}', False)
    ctx = ev["requestContext"]
    assert ctx["http"] == {"method": "POST", "path": "/a%20b/c", "protocol": "HTTP/1.1",
                           "sourceIp": "127.0.0.1", "userAgent": "ua"}
    assert ctx["time"] == "14/Nov/2023:22:13:20 +0000" and ctx["timeEpoch"] == 1_700_000_000_123
    assert (ctx["accountId"], ctx["apiId"], ctx["domainPrefix"]) == ("anonymous", "a" * 32,
                                                                     "a" * 32)
    assert ctx["domainName"] == f"{'a' * 32}.lambda-url.r-1.localhost"
    assert ctx["requestId"] == "rid" and "authorizer" not in ctx
    json.dumps(ev)


def test_event_without_query_or_body_and_binary() -> None:
    ev = fu.build_event(request(), request_id="r", now_ms=0)
    assert "queryStringParameters" not in ev and "body" not in ev and "cookies" not in ev
    assert ev["isBase64Encoded"] is False
    for ct, body in ((None, b"\x00\xff"), ("application/octet-stream", b"abc"),
                     ("text/plain", b"\xff\xfe")):
        hs = [("content-type", ct)] if ct else []
        ev = fu.build_event(request(headers=hs, body=body), request_id="r", now_ms=0)
        assert ev["isBase64Encoded"] is True and base64.b64decode(ev["body"]) == body


def test_event_names_the_iam_caller() -> None:
    ev = fu.build_event(request(caller={"account": OTHER, "access_key_id": "AKX"}),
                        request_id="r", now_ms=0)
    ctx = ev["requestContext"]
    assert ctx["accountId"] == OTHER
    assert ctx["authorizer"]["iam"]["accountId"] == OTHER
    assert ctx["authorizer"]["iam"]["accessKey"] == "AKX"


def test_response_shorthand() -> None:
    for value in ({"a": 1}, "text", [1, 2], 3, None, {"body": "x"}):
        r = fu.map_response(json.dumps(value).encode(), None, "rid")
        assert r.status == 200 and ("content-type", "application/json") in r.headers
        assert json.loads(r.body) == value


def test_response_structured() -> None:
    raw = base64.b64encode(b"\x00\x01").decode()
    r = fu.map_response(json.dumps({
        "statusCode": 404, "headers": {"X-A": "1", "x-n": 2, "Content-Length": "99"},
        "cookies": ["a=1", "b=2; Secure"], "body": raw, "isBase64Encoded": True}).encode(),
        None, "rid")
    assert r.status == 404 and r.body == b"\x00\x01"
    assert ("x-a", "1") in r.headers and ("x-n", "2") in r.headers
    assert [v for k, v in r.headers if k == "set-cookie"] == ["a=1", "b=2; Secure"]
    assert not any(k == "content-length" for k, _ in r.headers)  # the router sets its own
    assert ("content-type", "application/json") in r.headers  # the default
    r = fu.map_response(b'{"statusCode": 204}', None, "rid")
    assert (r.status, r.body) == (204, b"")
    r = fu.map_response(b'{"statusCode": "201", "body": "hi"}', None, "rid")
    assert (r.status, r.body) == (201, b"hi")


@pytest.mark.parametrize("payload", [
    b'{"statusCode": 99}', b'{"statusCode": "abc"}', b'{"statusCode": true}',
    b'{"statusCode": 200, "headers": []}', b'{"statusCode": 200, "headers": {"a b": "1"}}',
    b'{"statusCode": 200, "headers": {"a": "1\\r\\nx: 2"}}',
    b'{"statusCode": 200, "cookies": "a=1"}',
    b'{"statusCode": 200, "body": "***", "isBase64Encoded": true}', b"not json",
])
def test_response_malformed_is_502(payload: bytes) -> None:
    assert fu.map_response(payload, None, "rid").status == 502


def test_function_error_is_502() -> None:
    r = fu.map_response(b'{"errorMessage": "boom"}', "Unhandled", "rid")
    assert r.status == 502 and ("x-amzn-requestid", "rid") in r.headers


def policy(*docs: dict[str, object]) -> str | None:
    stored = None
    for doc in docs:
        stmt = policies.function_statement(
            {"StatementId": uuid.uuid4().hex[:8], **doc}, ARN)
        stored = policies.add(stored, stmt, None, uuid.uuid4().hex)
    return stored


PUBLIC = {"Action": "lambda:InvokeFunctionUrl", "Principal": "*", "FunctionUrlAuthType": "NONE"}


def test_none_url_needs_the_public_statement() -> None:
    assert not fu.authorize_url("NONE", OWNER, None, None)
    assert fu.authorize_url("NONE", OWNER, None, policy(PUBLIC))
    assert fu.authorize_url("NONE", OWNER, OTHER, policy(PUBLIC))
    for not_enough in (
            {"Action": "lambda:InvokeFunctionUrl", "Principal": "*"},  # no auth-type condition
            {**PUBLIC, "FunctionUrlAuthType": "AWS_IAM"},
            {**PUBLIC, "Action": "lambda:InvokeFunction"},
            {**PUBLIC, "Principal": OTHER},
            {**PUBLIC, "SourceArn": "arn:aws:execute-api:x"},  # a condition no caller meets
            {**PUBLIC, "Principal": "apigateway.amazonaws.com"}):
        assert not fu.authorize_url("NONE", OWNER, None, policy(not_enough)), not_enough
    # the public statement does not open Invoke from other accounts
    assert not fu.authorize_invoke(OWNER, OTHER, policy(PUBLIC))
    # lambda:* to * with the condition is public too
    assert fu.authorize_url("NONE", OWNER, None, policy({**PUBLIC, "Action": "lambda:*"}))


def test_iam_url() -> None:
    assert not fu.authorize_url("AWS_IAM", OWNER, None, policy(PUBLIC))
    assert fu.authorize_url("AWS_IAM", OWNER, OWNER, None)
    assert not fu.authorize_url("AWS_IAM", OWNER, OTHER, None)
    assert not fu.authorize_url("AWS_IAM", OWNER, OTHER, policy(PUBLIC))  # NONE's statement
    grant = {"Action": "lambda:InvokeFunctionUrl", "Principal": OTHER}
    assert fu.authorize_url("AWS_IAM", OWNER, OTHER, policy(grant))
    assert fu.authorize_url("AWS_IAM", OWNER, OTHER,
                            policy({**grant, "FunctionUrlAuthType": "AWS_IAM"}))
    assert fu.authorize_url("AWS_IAM", OWNER, OTHER,
                            policy({**grant, "Principal": f"arn:aws:iam::{OTHER}:root"}))
    assert not fu.authorize_url("AWS_IAM", OWNER, "999999999999", policy(grant))


def test_cross_account_invoke() -> None:
    assert fu.authorize_invoke(OWNER, OWNER, None)
    assert not fu.authorize_invoke(OWNER, OTHER, None)
    grant = {"Action": "lambda:InvokeFunction", "Principal": OTHER}
    assert fu.authorize_invoke(OWNER, OTHER, policy(grant))
    assert fu.authorize_invoke(OWNER, OTHER, policy({**grant, "Principal": "*"}))
    assert not fu.authorize_invoke(OWNER, "999999999999", policy(grant))
    assert not fu.authorize_invoke(OWNER, OTHER, policy({**grant, "SourceAccount": OTHER}))
    assert not fu.authorize_invoke(OWNER, OTHER,
                                   policy({**grant, "InvokedViaFunctionUrl": True}))
    assert fu.authorize_invoke(OWNER, OTHER, policy({**grant, "InvokedViaFunctionUrl": False}))


def test_stream_response_prelude() -> None:
    prelude = json.dumps({"statusCode": 418, "headers": {"Content-Type": "text/plain", "x-a": "1"},
                          "cookies": ["c=1"]}).encode()
    r = fu.map_stream_response(prelude + fu.PRELUDE_DELIMITER + b"body\0bytes", None, "rid")
    assert (r.status, r.body) == (418, b"body\0bytes")
    assert ("content-type", "text/plain") in r.headers and ("x-a", "1") in r.headers
    assert ("set-cookie", "c=1") in r.headers
    r = fu.map_stream_response(b'{}' + fu.PRELUDE_DELIMITER + b"x", None, "rid")
    assert (r.status, r.body) == (200, b"x")
    assert ("content-type", "application/octet-stream") in r.headers
    r = fu.map_stream_response(b"raw bytes", None, "rid")
    assert (r.status, r.body) == (200, b"raw bytes")
    assert fu.map_stream_response(b'{"statusCode": 1}' + fu.PRELUDE_DELIMITER, None,
                                  "rid").status == 502
    assert fu.map_stream_response(b"x", "Unhandled", "rid").status == 502
