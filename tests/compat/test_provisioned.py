"""Provisioned concurrency: environments created ahead of traffic, kept warm, used first."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, new_name

pytestmark = pytest.mark.integration


def provisioned_envs(region: Region, name: str) -> list[dict[str, Any]]:
    st = region.client.status()
    return [e for c in st["cells"].values() for a in c["agents"].values() for e in a["envs"]
            if e["function"] == name]


def test_provisioned_concurrency_prewarms_and_serves(lam: Any, region: Region) -> None:
    name = new_name("pc")
    code = "import os\ndef handler(e, c):\n    return c.log_stream_name\n"
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": make_zip({"app.py": code})})
    version = lam.publish_version(FunctionName=name)["Version"]
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.put_provisioned_concurrency_config(FunctionName=name, Qualifier="$LATEST",
                                               ProvisionedConcurrentExecutions=2)
    out = lam.put_provisioned_concurrency_config(FunctionName=name, Qualifier=version,
                                                 ProvisionedConcurrentExecutions=2)
    assert out["RequestedProvisionedConcurrentExecutions"] == 2
    # Ready before any invoke: wait (bounded) for the frontend's report of it.
    deadline = time.monotonic() + 60
    while True:
        cfg = lam.get_provisioned_concurrency_config(FunctionName=name, Qualifier=version)
        if cfg["Status"] == "READY":
            break
        assert time.monotonic() < deadline, cfg
        time.sleep(0.1)
    assert cfg["AllocatedProvisionedConcurrentExecutions"] == 2
    warm = provisioned_envs(region, name)
    assert len(warm) == 2 and all(e["invocations"] == 0 for e in warm)
    # Invokes of that version run on the provisioned environments: no new one is created.
    streams = {json.loads(lam.invoke(FunctionName=name, Qualifier=version)["Payload"].read())
               for _ in range(3)}
    assert len(provisioned_envs(region, name)) == 2
    # Lambda names an environment's stream by a digest of its id (core/cwlogs.stream_name).
    assert all(any(s.endswith(hashlib.sha256(e["env_id"].encode()).hexdigest()[:32])
                   for e in warm) for s in streams)
    lam.delete_provisioned_concurrency_config(FunctionName=name, Qualifier=version)
    with pytest.raises(lam.exceptions.ProvisionedConcurrencyConfigNotFoundException):
        lam.get_provisioned_concurrency_config(FunctionName=name, Qualifier=version)
