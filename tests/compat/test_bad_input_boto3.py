"""Every parameter outside Lambda's documented constraints gets the modelled error, through boto3
with client-side validation off (so the server is the one that judges)."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import make_zip

from .conftest import ROLE, SUM, new_name

pytestmark = pytest.mark.integration

INVALID = "InvalidParameterValueException"
VALIDATION = "ValidationException"


def create(raw_lam: Any, **overrides: Any) -> None:
    params: dict[str, Any] = {"FunctionName": new_name("bad"), "Runtime": "python3.11",
                              "Role": ROLE, "Handler": "app.handler",
                              "Code": {"ZipFile": make_zip({"app.py": SUM})}}
    params.update(overrides)
    raw_lam.create_function(**params)


@pytest.mark.parametrize("overrides,status,code", [
    ({"FunctionName": "bad name!"}, 400, VALIDATION),
    ({"FunctionName": "x" * 65}, 400, VALIDATION),
    ({"MemorySize": 127}, 400, INVALID),
    ({"MemorySize": 10_241}, 400, INVALID),
    ({"Timeout": 0}, 400, INVALID),
    ({"Timeout": 901}, 400, INVALID),
    ({"Runtime": "python2.7"}, 400, INVALID),
    ({"Runtime": "cobol85"}, 400, INVALID),
    ({"Handler": "no dot"}, 400, INVALID),
    ({"Environment": {"Variables": {"BIG": "x" * 4100}}}, 400, INVALID),
    ({"Environment": {"Variables": {"AWS_REGION": "x"}}}, 400, INVALID),
    ({"Description": "d" * 257}, 400, VALIDATION),
    ({"Layers": ["not-an-arn"]}, 400, VALIDATION),
    ({"Layers": [f"arn:aws:lambda:cc-local-1:123456789012:layer:l:{i}" for i in range(6)]},
     400, INVALID),
    ({"Tags": {"aws:reserved": "x"}}, 400, INVALID),
    ({"EphemeralStorage": {"Size": 100}}, 400, INVALID),
    ({"Architectures": ["arm64"]}, 400, INVALID),
    ({"PackageType": "Image"}, 400, INVALID),
    ({"Code": {"ZipFile": b"not a zip"}}, 400, INVALID),
    ({"Code": {"S3Bucket": "b", "S3Key": "k"}}, 400, INVALID),
])
def test_create_function_constraints(raw_lam: Any, overrides: dict[str, Any], status: int,
                                     code: str) -> None:
    with pytest.raises(ClientError) as e:
        create(raw_lam, **overrides)
    r = e.value.response
    assert (r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"]) == (status, code)
    assert r["Error"]["Message"]


def test_unzipped_over_250_mb(raw_lam: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("big.bin", "w", force_zip64=True) as f:
            for _ in range(251):
                f.write(b"\0" * (1 << 20))
    with pytest.raises(raw_lam.exceptions.InvalidParameterValueException) as e:
        create(raw_lam, Code={"ZipFile": buf.getvalue()})
    assert "Unzipped size" in str(e.value)


def test_zip_over_50_mb(raw_lam: Any) -> None:
    # Random bytes do not compress: a stored member makes a zip just over 50 MiB.
    import os

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("blob.bin", os.urandom(50 * 1024 * 1024 + 1024))
    with pytest.raises(ClientError) as e:
        create(raw_lam, Code={"ZipFile": buf.getvalue()})
    r = e.value.response
    assert (r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"]) == (
        413, "RequestEntityTooLargeException")


def test_other_operations_constraints(raw_lam: Any) -> None:
    name = new_name("bad")
    create(raw_lam, FunctionName=name)
    cases = [
        (lambda: raw_lam.update_function_configuration(FunctionName=name, MemorySize=64), INVALID),
        (lambda: raw_lam.update_function_configuration(FunctionName=name, Timeout="ten"), INVALID),
        (lambda: raw_lam.put_function_concurrency(FunctionName=name,
                                                  ReservedConcurrentExecutions=-1), INVALID),
        (lambda: raw_lam.create_alias(FunctionName=name, Name="123", FunctionVersion="$LATEST"),
         VALIDATION),
        (lambda: raw_lam.create_alias(FunctionName=name, Name="a", FunctionVersion="x"),
         VALIDATION),
        (lambda: raw_lam.list_functions(MaxItems=0), VALIDATION),
        (lambda: raw_lam.invoke(FunctionName=name, Qualifier="bad qualifier!"), VALIDATION),
        (lambda: raw_lam.invoke(FunctionName=name, LogType="Head"), INVALID),
        # an Event invoke's LogType was ignored before both Invoke paths shared one check
        (lambda: raw_lam.invoke(FunctionName=name, InvocationType="Event", LogType="Head"),
         INVALID),
        (lambda: raw_lam.invoke(FunctionName=name, InvocationType="Later"), INVALID),
        (lambda: raw_lam.publish_layer_version(LayerName="l!", Content={"ZipFile": b"x"}),
         VALIDATION),
        (lambda: raw_lam.publish_layer_version(LayerName="l", Content={}), INVALID),
    ]
    for call, code in cases:
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] == code, e.value.response
