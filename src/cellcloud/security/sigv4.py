"""AWS Signature Version 4 verification of incoming requests, and signing of outgoing ones.

We do not re-implement the canonicalisation: the request is rebuilt as a botocore
``AWSRequest`` from exactly what arrived (method, raw path, raw query, the headers the client
named in ``SignedHeaders``, the body) and botocore's own ``SigV4Auth`` computes the signature
the client should have sent, with the tenant's secret and the request's own ``X-Amz-Date``.
The two are compared in constant time.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..core.errors import LambdaError

SERVICE = "lambda"
ALGORITHM = "AWS4-HMAC-SHA256"
clock_skew_s_max = 300
authorization_bytes_max = 4096
signed_headers_max = 64

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
    expected = _expected_signature(method, raw_path, raw_query,
                                   {h: ",".join(hdrs[h]) for h in signed}, body, akid, secret,
                                   region, amz_date, service)
    if not hmac.compare_digest(expected.encode(), m.group("sig").encode()):
        raise _forbidden(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.")
    return Verified(akid)


def _expected_signature(method: str, raw_path: str, raw_query: str, signed: dict[str, str],
                        body: bytes, akid: str, secret: str, region: str, amz_date: str,
                        service: str = SERVICE) -> str:
    host = signed["host"]
    url = f"http://{host}{raw_path}" + (f"?{raw_query}" if raw_query else "")
    req = AWSRequest(method=method, url=url, headers=signed, data=body)
    req.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(akid, secret), service, region)
    canonical = signer.canonical_request(req)
    string_to_sign = signer.string_to_sign(req, canonical)
    # botocore derives the signing key with four HMACs on every call; it only changes with
    # the secret, the day and the region, so derive it once per day instead.
    key = _signing_key(secret, amz_date[:8], region, service)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=1024)
def _signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    k = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def sign(method: str, url: str, headers: dict[str, str], body: bytes, *, access_key_id: str,
         secret_access_key: str, region: str, service: str = SERVICE) -> dict[str, str]:
    """Headers to send for a request signed with SigV4 (what boto3 does, for our own SDK)."""
    req = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    SigV4Auth(Credentials(access_key_id, secret_access_key), service, region).add_auth(req)
    return {k: v for k, v in req.headers.items()}
