"""The pure parts of the Lambda API: weighted alias routing and SigV4 verification."""

from __future__ import annotations

import random
import time

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.aliases import check_routing, pick_version
from cellcloud.core.errors import LambdaError
from cellcloud.security import sigv4

REGION = "cc-local-1"


def test_weighted_split_over_1000_picks_is_within_bounds_and_replays() -> None:
    for weight in (0.1, 0.3, 0.5, 0.9):
        picks = [pick_version("1", {"2": weight}, random.Random(seed)) for seed in range(1000)]
        n2 = picks.count("2")
        sd = (1000 * weight * (1 - weight)) ** 0.5
        assert abs(n2 - 1000 * weight) < 5 * sd, (weight, n2)
        # Same seeds, same choices.
        assert picks == [pick_version("1", {"2": weight}, random.Random(s)) for s in range(1000)]
    rng = random.Random(7)
    assert {pick_version("1", {"2": 0.0}, rng) for _ in range(1000)} == {"1"}
    assert {pick_version("1", {"2": 1.0}, rng) for _ in range(1000)} == {"2"}


@given(st.floats(min_value=0.0, max_value=1.0), st.integers(0, 2**32))
def test_pick_is_one_of_the_two_versions(weight: float, seed: int) -> None:
    assert pick_version("3", {"4": weight}, random.Random(seed)) in {"3", "4"}


@pytest.mark.parametrize("primary,routing,ok", [
    ("1", {"AdditionalVersionWeights": {"2": 0.5}}, True),
    ("1", {"AdditionalVersionWeights": {}}, True),
    ("1", None, True),
    ("$LATEST", {"AdditionalVersionWeights": {"2": 0.5}}, False),
    ("1", {"AdditionalVersionWeights": {"1": 0.5}}, False),
    ("1", {"AdditionalVersionWeights": {"2": 1.5}}, False),
    ("1", {"AdditionalVersionWeights": {"2": -0.1}}, False),
    ("1", {"AdditionalVersionWeights": {"2": 0.1, "3": 0.1}}, False),
    ("1", {"AdditionalVersionWeights": {"$LATEST": 0.1}}, False),
    ("1", {"AdditionalVersionWeights": {"2": "x"}}, False),
    ("1", "nonsense", False),
])
def test_routing_rules(primary: str, routing: object, ok: bool) -> None:
    if ok:
        check_routing(primary, routing)
    else:
        with pytest.raises(LambdaError) as e:
            check_routing(primary, routing)
        assert e.value.status == 400


def _signed(secret: str = "s3cret", akid: str = "AKIATEST", region: str = REGION,
            body: bytes = b'{"a": 1}') -> tuple[dict[str, str], bytes]:
    req = AWSRequest(method="POST", url="http://127.0.0.1:9009/2015-03-31/functions/arn%3Ax/"
                     "invocations?Qualifier=live", data=body,
                     headers={"content-type": "application/json"})
    SigV4Auth(Credentials(akid, secret), "lambda", region).add_auth(req)
    headers = {k.lower(): v for k, v in req.headers.items()}
    headers["host"] = "127.0.0.1:9009"
    return headers, body


def _verify(headers: dict[str, str], body: bytes, now_s: float | None = None) -> sigv4.Verified:
    return sigv4.verify(method="POST", raw_path="/2015-03-31/functions/arn%3Ax/invocations",
                        raw_query="Qualifier=live", headers=list(headers.items()), body=body,
                        region=REGION, secret_for={"AKIATEST": "s3cret"}.get, now_s=now_s)


def test_sigv4_accepts_botocore_signature() -> None:
    headers, body = _signed()
    assert _verify(headers, body).access_key_id == "AKIATEST"


@pytest.mark.parametrize("case,type_", [
    ("wrong secret", "InvalidSignatureException"),
    ("unknown key", "UnrecognizedClientException"),
    ("other region", "InvalidSignatureException"),
    ("tampered body", "InvalidSignatureException"),
    ("no auth", "MissingAuthenticationTokenException"),
    ("skew", "InvalidSignatureException"),
    ("garbage", "InvalidSignatureException"),
])
def test_sigv4_refusals(case: str, type_: str) -> None:
    headers, body = _signed(
        secret="other" if case == "wrong secret" else "s3cret",
        akid="AKIANOPE" if case == "unknown key" else "AKIATEST",
        region="us-east-1" if case == "other region" else REGION)
    now = None
    if case == "tampered body":
        body = b'{"a": 2}'
    elif case == "no auth":
        del headers["authorization"]
    elif case == "skew":
        now = time.time() + 301
    elif case == "garbage":
        headers["authorization"] = "AWS4-HMAC-SHA256 nonsense"
    with pytest.raises(LambdaError) as e:
        _verify(headers, body, now)
    assert (e.value.status, e.value.type) == (403, type_)


def test_sigv4_skew_within_five_minutes_is_fine() -> None:
    headers, body = _signed()
    assert _verify(headers, body, time.time() + 290).access_key_id == "AKIATEST"
