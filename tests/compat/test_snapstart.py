"""SnapStart's API on a region (docs/microvm.md "SnapStart"): ``ApplyOn PublishedVersions``
accepted only with microVM isolation, echoed as Lambda does (``OptimizationStatus`` On on the
published version, Off on $LATEST), an update that would leave it without isolation refused;
on this region's jail agents the version's environment is refused at placement, never run
without its setting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.compat.conftest import ROLE, lambda_client, new_name
from tests.conftest import make_zip

CODE = {"ZipFile": make_zip({"app.py": "def handler(event, context):\n    return 1\n"})}
VM = {"Variables": {"CELLCLOUD_ISOLATION": "microvm"}}


def test_snapstart_needs_microvm_isolation_and_is_echoed(region: Any) -> None:
    lam = lambda_client(region)
    with pytest.raises(ClientError, match="microVM isolation") as e:
        lam.create_function(FunctionName=new_name("ss"), Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Code=CODE,
                            SnapStart={"ApplyOn": "PublishedVersions"})
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    name = new_name("ss")
    cfg = lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                              Handler="app.handler", Code=CODE, Environment=VM,
                              SnapStart={"ApplyOn": "PublishedVersions"})
    assert cfg["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "Off"}
    v = lam.publish_version(FunctionName=name)
    assert v["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "On"}
    with pytest.raises(ClientError, match="microVM isolation"):
        lam.update_function_configuration(FunctionName=name, Environment={"Variables": {}})
    # This region's agents run jails: the version's environment is refused, not run as a jail.
    with pytest.raises(ClientError) as e:
        r = lam.invoke(FunctionName=name, Qualifier=v["Version"], Payload=b"{}")
        raise AssertionError(json.loads(r["Payload"].read()))
    assert "microvm" in str(e.value)
    off = lam.update_function_configuration(FunctionName=name, SnapStart={"ApplyOn": "None"})
    assert off["SnapStart"] == {"ApplyOn": "None", "OptimizationStatus": "Off"}
    plain = lam.create_function(FunctionName=new_name("ss"), Runtime="python3.11", Role=ROLE,
                                Handler="app.handler", Code=CODE)
    assert plain["SnapStart"] == {"ApplyOn": "None", "OptimizationStatus": "Off"}
