"""Function URLs (issue #15), pure: the URL id, the config's validation, CORS, the payload
format 2.0 event and response mapping, and the authorization decision. No I/O, no clock (the
time comes in), no randomness of its own (a seeded ``random.Random`` comes in).

A URL id is 32 characters of lowercase base32 — AWS's length and alphabet class — over 20
bytes: the owner's 12-digit account id in the first 5 (big-endian), 15 random bytes after. A
router finds the owner's cell from the id alone, without a table (it stays stateless). The
account id is thereby readable from the URL; it is in the function's ARN too and is not a
secret.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import errors, policies
from .errors import LambdaError
from .limits import DEFAULT_LIMITS

URL_ID_CHARS = 32
_URL_ID = re.compile(r"^[a-z2-7]{32}$")
#: the path form on the region's endpoint: ``/lambda-url/<url-id>/<rawPath>``
PATH_PREFIX = "/lambda-url/"
AUTH_TYPES = ("NONE", "AWS_IAM")
INVOKE_MODES = ("BUFFERED", "RESPONSE_STREAM")
_METHODS = ("GET", "PUT", "HEAD", "POST", "PATCH", "DELETE", "*")
_ORIGIN = re.compile(r"^https?://(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Cors list members (botocore's model: at most 100 origins/headers, 6 methods)
_ITEMS = DEFAULT_LIMITS.function_url_cors_items_max
CORS_LIST_MAX = {"AllowOrigins": _ITEMS, "AllowHeaders": _ITEMS, "ExposeHeaders": _ITEMS,
                 "AllowMethods": 6}  # botocore's model: one each of six methods
_CORS_ITEM_MAX = {"AllowOrigins": 253, "AllowHeaders": 1024, "ExposeHeaders": 1024,
                  "AllowMethods": 6}
CORS_MAX_AGE_S_MAX = DEFAULT_LIMITS.function_url_cors_max_age_s_max
# Request headers a function never sees (the connection's own); response headers it may not set.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                  "proxy-connection", "content-length"})
_TEXT_TYPES = ("application/json", "application/javascript", "application/xml",
               "application/ecmascript")


# -- ids and addresses -------------------------------------------------------------------------
def new_url_id(account: str, rng: random.Random) -> str:
    """A fresh URL id for ``account`` (12 digits)."""
    assert re.fullmatch(r"\d{12}", account), account
    raw = int(account).to_bytes(5, "big") + rng.randbytes(15)
    return base64.b32encode(raw).decode().lower()


def account_of(url_id: str) -> str | None:
    """The owner's account id a URL id names, or None for a string that is no URL id."""
    if not _URL_ID.fullmatch(url_id):
        return None
    raw = base64.b32decode(url_id.upper())
    n = int.from_bytes(raw[:5], "big")
    return f"{n:012d}" if n < 10**12 else None


def host_url_id(host: str, region: str) -> str | None:
    """The URL id a ``Host`` header names (``<id>.lambda-url.<region>.localhost[:port]``)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    suffix = f".lambda-url.{region}.localhost"
    if not name.lower().endswith(suffix):
        return None
    url_id = name[: -len(suffix)].lower()
    return url_id if _URL_ID.fullmatch(url_id) else None


def split_path_form(raw_path: str) -> tuple[str, str] | None:
    """``/lambda-url/<id>[/rest]`` -> (id, ``/rest``); None for any other path."""
    if not raw_path.startswith(PATH_PREFIX):
        return None
    url_id, _, rest = raw_path[len(PATH_PREFIX):].partition("/")
    if not _URL_ID.fullmatch(url_id):
        return None
    return url_id, "/" + rest


def domain_name(url_id: str, region: str) -> str:
    return f"{url_id}.lambda-url.{region}.localhost"


def function_url(url_id: str, region: str, endpoint: str) -> str:
    """The canonical URL (host form) on the endpoint the client used (``scheme://host[:port]``):
    ``http://<id>.lambda-url.<region>.localhost:<port>/``."""
    scheme, _, hostport = endpoint.partition("://")
    if not hostport:
        scheme, hostport = "http", endpoint
    port = ""
    if hostport.startswith("["):  # an IPv6 literal
        close = hostport.find("]")
        if close >= 0 and hostport[close + 1:close + 2] == ":":
            port = hostport[close + 1:]
    elif ":" in hostport:
        port = ":" + hostport.rsplit(":", 1)[1]
    return f"{scheme or 'http'}://{domain_name(url_id, region)}{port}/"


# -- the config ----------------------------------------------------------------------------------
def _strings(name: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.invalid(f"Cors.{name} must be a list of strings")
    if len(value) > CORS_LIST_MAX[name]:
        raise errors.invalid(f"Cors.{name} has {len(value)} members; at most "
                             f"{CORS_LIST_MAX[name]} are allowed")
    for v in value:
        if len(v) > _CORS_ITEM_MAX[name] or (name == "AllowOrigins" and not v):
            raise errors.invalid(f"Cors.{name} member {v[:64]!r} must be 1 to "
                                 f"{_CORS_ITEM_MAX[name]} characters")
    return list(value)


def check_cors(doc: object) -> dict[str, Any]:
    """A ``Cors`` structure, validated as Lambda does (400 InvalidParameterValueException)."""
    if not isinstance(doc, dict):
        raise errors.invalid("Cors must be a structure")
    unknown = set(doc) - {"AllowCredentials", "AllowHeaders", "AllowMethods", "AllowOrigins",
                          "ExposeHeaders", "MaxAge"}
    if unknown:
        raise errors.invalid(f"Cors has no member {sorted(unknown)[0]}")
    out: dict[str, Any] = {}
    if "AllowCredentials" in doc:
        if not isinstance(doc["AllowCredentials"], bool):
            raise errors.invalid("Cors.AllowCredentials must be a boolean")
        out["AllowCredentials"] = doc["AllowCredentials"]
    for name in ("AllowHeaders", "AllowMethods", "AllowOrigins", "ExposeHeaders"):
        if name in doc:
            out[name] = _strings(name, doc[name])
    for origin in out.get("AllowOrigins", ()):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise errors.invalid(f"Cors.AllowOrigins member {origin[:64]!r} is not an origin: "
                                 "use * or scheme://host[:port] (http or https)")
    for method in out.get("AllowMethods", ()):
        if method.upper() not in _METHODS:
            raise errors.invalid(f"Cors.AllowMethods member {method!r} must be one of "
                                 f"{', '.join(_METHODS)}")
    for name in ("AllowHeaders", "ExposeHeaders"):
        for h in out.get(name, ()):
            if h != "*" and not _TOKEN.fullmatch(h):
                raise errors.invalid(f"Cors.{name} member {h[:64]!r} is not a header name")
    if "MaxAge" in doc:
        age = doc["MaxAge"]
        if not isinstance(age, int) or isinstance(age, bool) or not (
                0 <= age <= CORS_MAX_AGE_S_MAX):
            raise errors.invalid(f"Cors.MaxAge must be an integer from 0 to {CORS_MAX_AGE_S_MAX}")
        out["MaxAge"] = age
    return out


def check_config(doc: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """Create (``old`` None: AuthType required) or update (members given replace ``old``'s):
    the stored ``{"AuthType", "Cors"?, "InvokeMode"}``."""
    unknown = set(doc) - {"AuthType", "Cors", "InvokeMode"}
    if unknown:
        raise errors.invalid(f"The parameter {sorted(unknown)[0]} is not a member of the "
                             "function URL config")
    out: dict[str, Any] = dict(old) if old is not None else {"InvokeMode": "BUFFERED"}
    if "AuthType" in doc or old is None:
        auth = doc.get("AuthType")
        if auth not in AUTH_TYPES:
            raise errors.invalid(f"AuthType must be one of {', '.join(AUTH_TYPES)}")
        out["AuthType"] = auth
    if doc.get("Cors") is not None:
        out["Cors"] = check_cors(doc["Cors"])
    if "InvokeMode" in doc:
        if doc["InvokeMode"] not in INVOKE_MODES:
            raise errors.invalid(f"InvokeMode must be one of {', '.join(INVOKE_MODES)}")
        out["InvokeMode"] = doc["InvokeMode"]
    return out


_URL_QUALIFIER = re.compile(r"^[0-9a-zA-Z_-]{1,128}$")


def check_qualifier(qualifier: str | None) -> None:
    """A URL's qualifier is an alias name (Lambda: not a version number, not $LATEST)."""
    if qualifier is None:
        return
    if not _URL_QUALIFIER.fullmatch(qualifier) or qualifier.isdigit():
        raise LambdaError(400, "ValidationException",
                          f"1 validation error detected: Value '{qualifier}' at 'qualifier' "
                          "failed to satisfy constraint: Member must satisfy regular expression "
                          "pattern: ((?!^\\d+$)^[0-9a-zA-Z-_]+$)")


# -- CORS on the wire ---------------------------------------------------------------------------
def _origin_allowed(cors: dict[str, Any], origin: str) -> str | None:
    """The Access-Control-Allow-Origin value for ``origin``, or None when it is not allowed."""
    allowed = cors.get("AllowOrigins") or []
    if "*" in allowed:
        return "*" if not cors.get("AllowCredentials") else origin
    for a in allowed:
        if a.lower() == origin.lower():
            return origin
        if "://*." in a:  # https://*.example.com
            scheme, _, rest = a.partition("://*.")
            if origin.lower().startswith(scheme.lower() + "://") and origin.lower().endswith(
                    "." + rest.lower()):
                return origin
    return None


def is_preflight(method: str, headers: dict[str, str]) -> bool:
    return (method == "OPTIONS" and "origin" in headers
            and "access-control-request-method" in headers)


def preflight(cors: dict[str, Any], headers: dict[str, str]) -> list[tuple[str, str]]:
    """The headers of the region's answer (200, no body) to a CORS preflight."""
    out: list[tuple[str, str]] = [("vary", "Origin")]
    allow = _origin_allowed(cors, headers["origin"])
    if allow is None:
        return out
    method = headers["access-control-request-method"].strip().upper()
    methods = [m.upper() for m in cors.get("AllowMethods") or []]
    if "*" not in methods and method not in methods:
        return out
    out.append(("access-control-allow-origin", allow))
    out.append(("access-control-allow-methods", ",".join(methods) if methods else method))
    wanted = headers.get("access-control-request-headers")
    allowed_h = cors.get("AllowHeaders") or []
    if wanted and allowed_h:
        if "*" in allowed_h:
            out.append(("access-control-allow-headers", wanted))
        else:
            out.append(("access-control-allow-headers", ",".join(allowed_h)))
    if cors.get("AllowCredentials"):
        out.append(("access-control-allow-credentials", "true"))
    if "MaxAge" in cors:
        out.append(("access-control-max-age", str(cors["MaxAge"])))
    return out


def cors_headers(cors: dict[str, Any] | None, origin: str | None) -> list[tuple[str, str]]:
    """CORS headers on a (non-preflight) answer; they replace any the function set."""
    if cors is None or origin is None:
        return []
    allow = _origin_allowed(cors, origin)
    if allow is None:
        return [("vary", "Origin")]
    out = [("access-control-allow-origin", allow), ("vary", "Origin")]
    if cors.get("ExposeHeaders"):
        out.append(("access-control-expose-headers", ",".join(cors["ExposeHeaders"])))
    if cors.get("AllowCredentials"):
        out.append(("access-control-allow-credentials", "true"))
    return out


# -- the event (payload format 2.0) ----------------------------------------------------------------
@dataclass(frozen=True)
class UrlRequest:
    """One HTTP request to a function URL, as the router read it."""

    url_id: str
    region: str
    method: str
    raw_path: str  # as sent, without the path form's prefix
    raw_query: str
    headers: list[tuple[str, str]]  # names lower-cased, in order, duplicates kept
    body: bytes
    source_ip: str
    protocol: str = "HTTP/1.1"
    #: the verified SigV4 caller (AWS_IAM): {"account", "access_key_id"}; None: anonymous
    caller: dict[str, str] | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


def joined_headers(pairs: Iterable[tuple[str, str]], lower: bool = True) -> dict[str, str]:
    """Repeated names joined with commas (names lower-cased, as headers are)."""
    out: dict[str, str] = {}
    for k, v in pairs:
        k = k.lower() if lower else k
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


def _is_text(content_type: str | None) -> bool:
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return (mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+json")
            or mime.endswith("+xml"))


def _clf_time(now_ms: int) -> str:
    t = datetime.datetime.fromtimestamp(now_ms // 1000, datetime.UTC)
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return f"{t.day:02d}/{months[t.month - 1]}/{t.year}:{t:%H:%M:%S} +0000"


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _unquote_plus(s: str) -> str:
    raw = s.replace("+", " ").encode("utf-8", "surrogateescape")
    return _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8", "replace")


def parse_query(raw: str) -> list[tuple[str, str]]:
    """A query string's (name, value) pairs, decoded (``+`` is a space), blanks kept."""
    out = []
    for part in raw.split("&"):
        if part:
            k, _, v = part.partition("=")
            out.append((_unquote_plus(k), _unquote_plus(v)))
    return out


def build_event(req: UrlRequest, *, request_id: str, now_ms: int) -> dict[str, Any]:
    """The event a function URL invocation hands the function, as Lambda documents it."""
    cookies: list[str] = []
    pairs: list[tuple[str, str]] = []
    for k, v in [*req.headers, *req.extra_headers]:
        if k in _HOP:
            continue
        if k == "cookie":
            cookies.extend(c.strip() for c in v.split(";") if c.strip())
            continue
        pairs.append((k, v))
    headers = joined_headers(pairs)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": req.raw_path,
        "rawQueryString": req.raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if req.raw_query:
        event["queryStringParameters"] = joined_headers(parse_query(req.raw_query), lower=False)
    domain = domain_name(req.url_id, req.region)
    ctx: dict[str, Any] = {
        "accountId": req.caller["account"] if req.caller else "anonymous",
        "apiId": req.url_id,
        "domainName": domain,
        "domainPrefix": req.url_id,
        "http": {"method": req.method, "path": req.raw_path, "protocol": req.protocol,
                 "sourceIp": req.source_ip, "userAgent": headers.get("user-agent", "")},
        "requestId": request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": _clf_time(now_ms),
        "timeEpoch": now_ms,
    }
    if req.caller is not None:
        account = req.caller["account"]
        ctx["authorizer"] = {"iam": {
            "accessKey": req.caller["access_key_id"], "accountId": account,
            "callerId": req.caller["access_key_id"], "cognitoIdentity": None,
            "principalOrgId": None, "userArn": f"arn:aws:iam::{account}:root",
            "userId": account}}
    event["requestContext"] = ctx
    if req.body:
        if _is_text(headers.get("content-type")):
            try:
                event["body"] = req.body.decode("utf-8")
                event["isBase64Encoded"] = False
            except UnicodeDecodeError:
                event["body"] = base64.b64encode(req.body).decode()
                event["isBase64Encoded"] = True
        else:
            event["body"] = base64.b64encode(req.body).decode()
            event["isBase64Encoded"] = True
    else:
        event["isBase64Encoded"] = False
    return event


# -- the response ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def bad_gateway(request_id: str) -> UrlResponse:
    """A function error or an answer that cannot be mapped: Lambda's 502."""
    return UrlResponse(502, [("content-type", "application/json"),
                             ("x-amzn-errortype", "InternalServerErrorException"),
                             ("x-amzn-requestid", request_id)],
                       b'{"Message":"Internal Server Error"}')


def _header_value(v: object) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return None


def map_response(payload: bytes, function_error: str | None,
                 request_id: str) -> UrlResponse:
    """The HTTP answer for a function's result: the structured form (``statusCode``,
    ``headers``, ``cookies``, ``body``, ``isBase64Encoded``) or the shorthand (anything else:
    200, ``application/json``, the JSON as it came); a function error or a malformed structured
    answer is 502."""
    if function_error is not None:
        return bad_gateway(request_id)
    try:
        doc = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return bad_gateway(request_id)
    rid = ("x-amzn-requestid", request_id)
    if not isinstance(doc, dict) or "statusCode" not in doc:
        return UrlResponse(200, [("content-type", "application/json"), rid],
                           payload if payload else b"null")
    status = doc["statusCode"]
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        return bad_gateway(request_id)
    headers: list[tuple[str, str]] = []
    raw_headers = doc.get("headers")
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(raw_headers, dict):
        return bad_gateway(request_id)
    for k, v in raw_headers.items():
        value = _header_value(v)
        if value is None or not _TOKEN.fullmatch(str(k)) or "\n" in value or "\r" in value:
            return bad_gateway(request_id)
        if k.lower() not in _HOP and k.lower() != "x-amzn-requestid":
            headers.append((k.lower(), value))
    cookies = doc.get("cookies") or []
    if not isinstance(cookies, list) or not all(
            isinstance(c, str) and "\n" not in c and "\r" not in c for c in cookies):
        return bad_gateway(request_id)
    headers.extend(("set-cookie", c) for c in cookies)
    if not any(k == "content-type" for k, _ in headers):
        headers.append(("content-type", "application/json"))
    headers.append(rid)
    body = doc.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        if doc.get("isBase64Encoded") is True:
            try:
                data = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                return bad_gateway(request_id)
        else:
            data = body.encode()
    else:
        data = json.dumps(body).encode()
    return UrlResponse(status, headers, data)


PRELUDE_DELIMITER = b"\0" * 8
#: the content type a runtime streams a response with a prelude under
HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
#: the most bytes of a streamed response's prelude (its JSON before the 8 NUL bytes)
prelude_bytes_max = DEFAULT_LIMITS.function_url_prelude_bytes_max


def map_stream_response(payload: bytes, function_error: str | None,
                        request_id: str) -> UrlResponse:
    """A RESPONSE_STREAM URL's answer: the prelude ``awslambda.HttpResponseStream.from`` writes
    (JSON ``{statusCode, headers, cookies}``, then 8 NUL bytes) gives status and headers and the
    rest is the body; without one, 200 ``application/octet-stream`` and the bytes as they came."""
    if function_error is not None:
        return bad_gateway(request_id)
    rid = ("x-amzn-requestid", request_id)
    cut = payload.find(PRELUDE_DELIMITER, 0, prelude_bytes_max) if payload[:1] == b"{" else -1
    if cut < 0:
        return UrlResponse(200, [("content-type", "application/octet-stream"), rid], payload)
    try:
        prelude = json.loads(payload[:cut])
    except (ValueError, UnicodeDecodeError):
        return bad_gateway(request_id)
    if not isinstance(prelude, dict):
        return bad_gateway(request_id)
    head = map_response(json.dumps({**prelude, "statusCode": prelude.get("statusCode", 200),
                                    "body": None}).encode(), None, request_id)
    if head.status == 502:
        return head
    headers = [(k, v) for k, v in head.headers if k != "content-type"]
    ctype = next((v for k, v in head.headers if k == "content-type" and
                  "content-type" in {str(h).lower() for h in prelude.get("headers") or {}}),
                 "application/octet-stream")
    return UrlResponse(head.status, [("content-type", ctype), *headers],
                       payload[cut + len(PRELUDE_DELIMITER):])


# -- who may invoke -------------------------------------------------------------------------------
def authorize_url(auth_type: str, owner: str, caller: str | None,
                  policy: str | None) -> bool:
    """May this request invoke the function through its URL?

    - ``AWS_IAM``: a SigV4-signed caller only; the owner's own keys, or another account that
      the function's resource policy grants ``lambda:InvokeFunctionUrl`` (a statement with no
      ``FunctionUrlAuthType`` condition, or one saying AWS_IAM).
    - ``NONE``: anyone, but only when the resource policy has the statement Lambda documents
      for a public URL: ``lambda:InvokeFunctionUrl`` to Principal ``*`` with
      ``FunctionUrlAuthType`` NONE (``AddPermission ... --function-url-auth-type NONE``).
    """
    if auth_type == "AWS_IAM":
        if caller is None:
            return False
        if caller == owner:
            return True
        return policies.allows(policy, "lambda:InvokeFunctionUrl", caller,
                               {"lambda:FunctionUrlAuthType": "AWS_IAM",
                                "lambda:InvokedViaFunctionUrl": "true"})
    assert auth_type == "NONE", auth_type
    return policies.allows(policy, "lambda:InvokeFunctionUrl", None,
                           {"lambda:FunctionUrlAuthType": "NONE",
                            "lambda:InvokedViaFunctionUrl": "true"},
                           require=("lambda:FunctionUrlAuthType",))


def authorize_invoke(owner: str, caller: str, policy: str | None) -> bool:
    """May ``caller`` Invoke the owner's function (its keys naming the function's ARN)? Its own
    account always; another only by a statement granting it ``lambda:InvokeFunction``."""
    if caller == owner:
        return True
    return policies.allows(policy, "lambda:InvokeFunction", caller,
                           {"lambda:InvokedViaFunctionUrl": "false"})
