"""AWS Signature Version 4 verification of incoming requests, and signing of outgoing ones.

Verification is our own pure code (no I/O; ``hmac``/``hashlib`` from the standard library do
the cryptography): the canonical request is built from exactly what arrived (method, raw path,
raw query, the headers the client named in ``SignedHeaders``, the body's SHA-256), hashed into
the string to sign, and signed with a key derived once per (secret, day, region, service).
The result is compared with the client's signature in constant time. It follows the AWS
SigV4 specification as botocore signs for non-S3 services: the path is normalised (dot
segments and repeated slashes removed) and URI-encoded a second time, query parameters are
decoded, re-encoded with the unreserved set and sorted (a query botocore signed as sent, when
it was handed a URL holding one, is accepted in that form too), header values are trimmed with runs of
whitespace collapsed and repeated headers joined with commas. CI checks it against AWS's
published SigV4 test suite (tests/unit/sigv4_vectors/) and against botocore's signer on
random requests.

Errors are AWS-shaped 403s: ``MissingAuthenticationTokenException`` without an
``Authorization`` header, ``UnrecognizedClientException`` for an unknown access key id,
``InvalidSignatureException`` for a wrong signature, a malformed header, a wrong credential
scope or a clock skew over five minutes.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from ..core.errors import LambdaError

SERVICE = "lambda"
ALGORITHM = "AWS4-HMAC-SHA256"
clock_skew_s_max = 300
authorization_bytes_max = 4096
signed_headers_max = 64
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<akid>[A-Za-z0-9]{1,128})/(?P<date>\d{8})/"
    r"(?P<region>[a-z0-9-]{1,64})/(?P<service>[a-z0-9-]{1,64})/aws4_request,\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9;_.-]{1,2048}),\s*Signature=(?P<sig>[0-9a-f]{64})$")
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")


@dataclass(frozen=True)
class Verified:
    access_key_id: str


def _forbidden(type_: str, message: str) -> LambdaError:
    return LambdaError(403, type_, message)


def parse_authorization(auth: str) -> re.Match[str]:
    """The presence and shape of an ``Authorization`` header (what can be checked before the
    body arrives): ``AWS4-HMAC-SHA256 Credential=.../SignedHeaders=.../Signature=...``."""
    if not auth:
        raise _forbidden("MissingAuthenticationTokenException", "Missing Authentication Token")
    if len(auth) > authorization_bytes_max:
        raise _forbidden("InvalidSignatureException", "The Authorization header is too long.")
    m = _AUTH.match(auth.strip())
    if m is None:
        raise _forbidden(
            "InvalidSignatureException",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            "parameters of the AWS4-HMAC-SHA256 algorithm.")
    return m


def verify(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    region: str,
    secret_for: Callable[[str], str | None],
    now_s: float | None = None,
    service: str = SERVICE,
) -> Verified:
    """Verify a SigV4-signed request; return the access key id or raise a 403 LambdaError.

    ``headers`` are (lower-case name, value) pairs as they arrived; ``secret_for`` maps an
    access key id to its secret (None: unknown). ``now_s`` is the time, passed in for tests.
    """
    hdrs: dict[str, list[str]] = {}
    for k, v in headers:
        hdrs.setdefault(k.lower(), []).append(v)
    m = parse_authorization(",".join(hdrs.get("authorization", [])))
    akid = m.group("akid")
    secret = secret_for(akid)
    if secret is None:
        raise _forbidden("UnrecognizedClientException",
                         "The security token included in the request is invalid.")
    if m.group("service") != service:
        raise _forbidden("InvalidSignatureException",
                         f"Credential should be scoped to correct service: '{service}'.")
    if m.group("region") != region:
        raise _forbidden("InvalidSignatureException",
                         f"Credential should be scoped to a valid region, not "
                         f"'{m.group('region')}'. This region is '{region}'.")
    amz_date = ",".join(hdrs.get("x-amz-date", []))
    if not _AMZ_DATE.match(amz_date):
        raise _forbidden("InvalidSignatureException",
                         "The request must carry an X-Amz-Date header (yyyyMMddTHHmmssZ).")
    if amz_date[:8] != m.group("date"):
        raise _forbidden("InvalidSignatureException",
                         "Date in Credential scope does not match YYYYMMDD from X-Amz-Date.")
    try:
        d = amz_date  # yyyyMMddTHHmmssZ, shape checked above: slicing beats strptime
        signed_at = calendar.timegm((int(d[0:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]),
                                     int(d[11:13]), int(d[13:15]), 0, 0, 0))
        if not (1 <= int(d[4:6]) <= 12 and 1 <= int(d[6:8]) <= 31):
            raise ValueError(amz_date)
    except ValueError:
        raise _forbidden("InvalidSignatureException", "X-Amz-Date is not a valid date.") from None
    now = time.time() if now_s is None else now_s
    if abs(now - signed_at) > clock_skew_s_max:
        raise _forbidden(
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier or later than "
            f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))} by more than "
            f"{clock_skew_s_max // 60} minutes.")
    signed = m.group("signed").split(";")
    if len(signed) > signed_headers_max or "host" not in signed or signed != sorted(signed):
        raise _forbidden("InvalidSignatureException",
                         "SignedHeaders must be sorted, include 'host', and name at most "
                         f"{signed_headers_max} headers.")
    missing = [h for h in signed if h not in hdrs]
    if missing:
        raise _forbidden("InvalidSignatureException",
                         f"Signed headers are missing from the request: {';'.join(missing)}")
    content_sha = ",".join(hdrs.get("x-amz-content-sha256", []))
    if content_sha and content_sha != hashlib.sha256(body).hexdigest():
        # botocore signs the header's value instead of hashing the body when the header is
        # present, so a body that does not match it must be refused here.
        raise _forbidden("InvalidSignatureException",
                         "X-Amz-Content-SHA256 does not match the request body.")
    if content_sha:
        payload_hash = content_sha  # checked equal to the body's hash above
    else:
        payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    given = m.group("sig").encode()
    canonical = canonical_request(method, raw_path, raw_query, hdrs, signed, payload_hash)
    expected = signature(secret, amz_date, region, service,
                         string_to_sign(amz_date, region, service, canonical))
    ok = hmac.compare_digest(expected.encode(), given)
    if not ok and raw_query and query_as_sent(raw_query) != canonical_query(raw_query):
        # A client that signed its query as sent (botocore given a URL by requests).
        canonical = canonical_request(method, raw_path, raw_query, hdrs, signed, payload_hash,
                                      as_sent=True)
        expected = signature(secret, amz_date, region, service,
                             string_to_sign(amz_date, region, service, canonical))
        ok = hmac.compare_digest(expected.encode(), given)
    if not ok:
        raise _forbidden(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.")
    return Verified(akid)


# -- canonicalisation (pure) -----------------------------------------------------------------
_UNRESERVED_RUN = re.compile(r"[A-Za-z0-9\-_.~]*")
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-_.~/%]*")


def _bytes(s: str) -> bytes:
    # The router decodes raw bytes with surrogateescape, so any byte comes back unchanged;
    # text (the test suite's request files) is UTF-8 as the specification says.
    return s.encode("utf-8", "surrogateescape")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 plus AWS's removal of empty segments (what botocore does for SigV4)."""
    out: list[str] = []
    for seg in path.split("/"):
        if seg and seg != ".":
            if seg == "..":
                if out:
                    out.pop()
            else:
                out.append(seg)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


def canonical_path(raw_path: str, *, normalize: bool = True) -> str:
    """The CanonicalURI: normalised (``normalize``) and URI-encoded once more, '/' kept, as
    every service but S3 expects (the path on the wire is already encoded once)."""
    if not raw_path:
        return "/"
    if normalize and raw_path[0] == "/" and "//" not in raw_path and "/." not in raw_path \
            and _PLAIN_PATH.fullmatch(raw_path):
        # The common case: no dot segment or empty segment to remove, and nothing to encode
        # but the '%' of the client's own encoding.
        return raw_path.replace("%", "%25")
    path = _remove_dot_segments(raw_path) if normalize else raw_path
    return quote(_bytes(path), safe="/~") if path else "/"


def _query_part(s: str) -> str:
    if _UNRESERVED_RUN.fullmatch(s):
        return s
    return quote(unquote_to_bytes(_bytes(s)), safe="-_.~")


def canonical_query(raw_query: str) -> str:
    """The CanonicalQueryString: each name and value decoded, re-encoded with only the
    unreserved characters left bare, pairs sorted by name then value."""
    if not raw_query:
        return ""
    pairs = []
    for pair in raw_query.split("&"):
        k, _, v = pair.partition("=")
        pairs.append((_query_part(k), _query_part(v)))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def query_as_sent(raw_query: str) -> str:
    """The query's pairs sorted as they were sent, not re-encoded: what botocore signs when
    the URL it is given already holds a query (requests writes a space as '+' and leaves
    ':' or '/' bare). Equal to :func:`canonical_query` whenever the client encoded as AWS
    specifies; the verifier accepts either form of the same bytes."""
    if not raw_query:
        return ""
    return "&".join(f"{k}={v}" for k, _, v in sorted(p.partition("=")
                                                       for p in raw_query.split("&")))


def canonical_request(method: str, raw_path: str, raw_query: str,
                      headers: Mapping[str, Sequence[str]], signed: Sequence[str],
                      payload_hash: str, *, normalize: bool = True,
                      as_sent: bool = False) -> str:
    """The CanonicalRequest. ``headers`` maps lower-case names to their values in arrival
    order; ``signed`` is the sorted SignedHeaders list (each name present in ``headers``);
    ``as_sent``: the query as :func:`query_as_sent` orders it instead of re-encoded."""
    lines = [method.upper(), canonical_path(raw_path, normalize=normalize),
             query_as_sent(raw_query) if as_sent else canonical_query(raw_query)]
    for name in signed:
        values = headers[name]
        if len(values) == 1:  # the common case, without a generator
            lines.append(f"{name}:{' '.join(values[0].split())}")
        else:
            lines.append(f"{name}:" + ",".join(" ".join(v.split()) for v in values))
    lines.append("")
    lines.append(";".join(signed))
    lines.append(payload_hash)
    return "\n".join(lines)


def string_to_sign(amz_date: str, region: str, service: str, canonical: str) -> str:
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    digest = hashlib.sha256(_bytes(canonical)).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def signature(secret: str, amz_date: str, region: str, service: str, to_sign: str) -> str:
    key = _signing_key(secret, amz_date[:8], region, service)
    return hmac.digest(key, _bytes(to_sign), "sha256").hex()


def _expected_signature(method: str, raw_path: str, raw_query: str, signed: dict[str, str],
                        body: bytes, akid: str, secret: str, region: str, amz_date: str,
                        service: str = SERVICE) -> str:
    """The signature a client should send for these signed headers (kept for tests that sign
    by hand, e.g. a request made in the past; ``akid`` is not part of the signature)."""
    payload_hash = signed.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
    names = sorted(signed)
    canonical = canonical_request(method, raw_path, raw_query,
                                  {h: [signed[h]] for h in names}, names, payload_hash)
    return signature(secret, amz_date, region, service,
                     string_to_sign(amz_date, region, service, canonical))


@functools.lru_cache(maxsize=1024)
def _signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    k = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def sign(method: str, url: str, headers: dict[str, str], body: bytes, *, access_key_id: str,
         secret_access_key: str, region: str, service: str = SERVICE) -> dict[str, str]:
    """Headers to send for a request signed with SigV4 (what boto3 does, for our own SDK)."""
    from botocore.auth import SigV4Auth  # the SDK's outgoing requests only: not the hot path
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    SigV4Auth(Credentials(access_key_id, secret_access_key), service, region).add_auth(req)
    return {k: v for k, v in req.headers.items()}
