from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cellcloud import sdk


@dataclass
class Region:
    state_dir: str
    doc: dict[str, object]
    client: sdk.Client

    @property
    def endpoint(self) -> str:
        return str(self.doc["endpoint"])

    def region_json(self) -> dict[str, object]:
        with open(os.path.join(self.state_dir, "region.json")) as f:
            doc: dict[str, object] = json.load(f)
            return doc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cellcloud", *args, "--state-dir",
                               self.state_dir], capture_output=True, text=True, check=check,
                              timeout=120)


def start_region(state_dir: str, *extra: str) -> Region:
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state_dir, *extra], check=True, timeout=120)
    with open(os.path.join(state_dir, "region.json")) as f:
        doc = json.load(f)
    # The test is the region's operator (as `cellcloud status` is): status shows everything.
    token = None
    if doc.get("operator_token_file"):
        with open(doc["operator_token_file"]) as f:
            token = json.load(f).get("token")
    return Region(state_dir, doc, sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60,
                                             operator_token=token))


def stop_region(region: Region) -> None:
    region.client.close()
    subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", region.state_dir],
                   check=True, timeout=60)


@contextlib.contextmanager
def running_region(tmp_path_factory: pytest.TempPathFactory, name: str,
                   *extra: str) -> Iterator[Region]:
    """A region for the duration of a fixture: started, yielded, always stopped."""
    r = start_region(str(tmp_path_factory.mktemp(name)), *extra)
    try:
        yield r
    finally:
        stop_region(r)


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "region", "--agents-per-cell", "2") as r:
        yield r


def create_tenant(region: Region, name: str) -> dict[str, str]:
    """A new tenant of the region (``cellcloud tenant create``): its fields as the CLI prints
    them (``account_id``, ``aws_access_key_id``, ``aws_secret_access_key``, ...)."""
    out = region.cli("tenant", "create", name).stdout
    return {k: v.strip() for k, v in (line.split(None, 1) for line in out.splitlines()
                                       if line.strip())}


def boto_client(region: Region, service: str, keys: dict[str, str] | None = None,
                **config: Any) -> Any:
    """An unmodified boto3 client of the region: the default tenant's, or ``keys``' (from
    :func:`create_tenant`); no retries, so every error reaches the test."""
    import boto3
    from botocore.config import Config

    akid = keys["aws_access_key_id"] if keys else str(region.doc["access_key_id"])
    secret = keys["aws_secret_access_key"] if keys else str(region.doc["secret_access_key"])
    return boto3.client(service, endpoint_url=region.endpoint,
                        region_name=str(region.doc["region"]), aws_access_key_id=akid,
                        aws_secret_access_key=secret,
                        config=Config(**{"retries": {"mode": "standard",
                                                     "total_max_attempts": 1},
                                         "read_timeout": 60, **config}))
