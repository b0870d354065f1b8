"""Randomised boto3 calls (Hypothesis, bounded): never a 500, never a crashed process."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, lambda_client

pytestmark = pytest.mark.integration

names = st.one_of(st.sampled_from(["fz-a", "fz-b", "fz-c"]),
                  st.text(max_size=70), st.integers(), st.none())
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
              st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=8)
ZIP = make_zip({"app.py": SUM})


def _maybe(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=keys)


CALLS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "create_function": st.fixed_dictionaries({"FunctionName": names}, optional={
        "Runtime": st.one_of(st.sampled_from(["python3.11", "provided.al2023"]), junk),
        "Role": st.just(ROLE), "Handler": st.one_of(st.just("app.handler"), junk),
        "Code": st.one_of(st.just({"ZipFile": ZIP}), junk), "MemorySize": junk,
        "Timeout": junk, "Environment": junk, "Layers": junk, "Tags": junk,
        "Description": junk, "Publish": junk, "EphemeralStorage": junk}),
    "get_function": st.fixed_dictionaries({"FunctionName": names},
                                          optional={"Qualifier": junk}),
    "update_function_configuration": st.fixed_dictionaries({"FunctionName": names}, optional={
        "MemorySize": junk, "Timeout": junk, "Environment": junk, "Handler": junk,
        "Runtime": junk, "RevisionId": junk, "Layers": junk}),
    "update_function_code": st.fixed_dictionaries({"FunctionName": names}, optional={
        "ZipFile": st.one_of(st.just(ZIP), st.binary(max_size=64)), "Publish": junk}),
    "list_functions": _maybe({"MaxItems": junk, "Marker": junk, "FunctionVersion": junk}),
    "invoke": st.fixed_dictionaries({"FunctionName": names}, optional={
        "Payload": st.one_of(st.binary(max_size=64),
                             st.builds(lambda d: json.dumps(d).encode(), junk)),
        "Qualifier": junk, "InvocationType": st.sampled_from(
            ["RequestResponse", "DryRun", "Event", "x"]), "LogType": junk}),
    "publish_version": st.fixed_dictionaries({"FunctionName": names}, optional={
        "CodeSha256": junk, "Description": junk, "RevisionId": junk}),
    "list_versions_by_function": st.fixed_dictionaries({"FunctionName": names}, optional={
        "MaxItems": junk, "Marker": junk}),
    "create_alias": st.fixed_dictionaries({"FunctionName": names, "Name": names,
                                           "FunctionVersion": junk},
                                          optional={"RoutingConfig": junk}),
    "update_alias": st.fixed_dictionaries({"FunctionName": names, "Name": names}, optional={
        "FunctionVersion": junk, "RoutingConfig": junk}),
    "list_aliases": st.fixed_dictionaries({"FunctionName": names}, optional={
        "Marker": junk, "MaxItems": junk}),
    "put_function_concurrency": st.fixed_dictionaries({
        "FunctionName": names, "ReservedConcurrentExecutions": junk}),
    "publish_layer_version": st.fixed_dictionaries({"LayerName": names, "Content": st.one_of(
        st.just({"ZipFile": ZIP}), junk)}, optional={"CompatibleRuntimes": junk,
                                                     "LicenseInfo": junk}),
    "get_layer_version": st.fixed_dictionaries({"LayerName": names, "VersionNumber": junk}),
    "list_layer_versions": st.fixed_dictionaries({"LayerName": names}, optional={
        "Marker": junk, "MaxItems": junk}),
    "list_layers": _maybe({"Marker": junk, "MaxItems": junk, "CompatibleRuntime": junk}),
    "delete_function": st.fixed_dictionaries({"FunctionName": names},
                                             optional={"Qualifier": junk}),
}


@pytest.fixture(scope="module")
def fuzz_client(region: Region) -> Any:
    client = lambda_client(region, validate=False)
    client.create_function(FunctionName="fz-a", Runtime="python3.11", Role=ROLE,
                           Handler="app.handler", Code={"ZipFile": ZIP})
    return client


@settings(max_examples=int(os.environ.get("CELLCLOUD_FUZZ_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(call=st.sampled_from(sorted(CALLS)).flatmap(
    lambda op: st.tuples(st.just(op), CALLS[op])))
def test_random_calls_never_500(fuzz_client: Any, call: tuple[str, dict[str, Any]]) -> None:
    op, params = call
    try:
        getattr(fuzz_client, op)(**params)
    except ClientError as e:
        status = e.response["ResponseMetadata"]["HTTPStatusCode"]
        assert status < 500, (op, params, e.response)
    except (BotoCoreError, TypeError, ValueError, AttributeError, KeyError):
        pass  # botocore could not even serialise it: nothing reached the server


def test_no_process_crashed_during_fuzz(region: Region,
                                        fuzz_client: Any) -> None:
    comps = region.region_json()["components"]
    assert isinstance(comps, dict)
    assert all(c["restarts"] == 0 for c in comps.values()), comps
    assert fuzz_client.list_functions()["ResponseMetadata"]["HTTPStatusCode"] == 200
