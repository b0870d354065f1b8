"""A real region, driven by real AWS clients (boto3 and the AWS CLI), no mocks of them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

ROLE = "arn:aws:iam::123456789012:role/cellcloud-test"
SUM = 'def handler(event, context):\n    return {"sum": event["a"] + event["b"]}\n'


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "compat-region", "--agents-per-cell", "2") as r:
        yield r


def lambda_client(region: Region, *, access_key_id: str | None = None,
                  secret: str | None = None, validate: bool = True) -> Any:
    # One attempt: a retry must never hide what the server answered.
    return boto3.client(
        "lambda", endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
        aws_access_key_id=access_key_id or str(region.doc["access_key_id"]),
        aws_secret_access_key=secret or str(region.doc["secret_access_key"]),
        config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                      parameter_validation=validate, read_timeout=120, connect_timeout=10))


@pytest.fixture(scope="session")
def lam(region: Region) -> Any:
    return lambda_client(region)


@pytest.fixture(scope="session")
def raw_lam(region: Region) -> Any:
    """A client that sends what it is given (no client-side validation): the server must judge."""
    return lambda_client(region, validate=False)


def new_name(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_function(lam: Any) -> Callable[..., str]:
    def make(code: str = SUM, **kw: Any) -> str:
        name = new_name()
        lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Code={"ZipFile": make_zip({"app.py": code})},
                            **kw)
        return name

    return make
