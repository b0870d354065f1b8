"""Issue #15: the operations IaC tools call beyond the function core, through boto3 against a
real region — tags, resource policies, layer version policies, account settings, settings
with one answer, and provisioned concurrency listed without a qualifier."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import make_zip
from tests.integration.conftest import Region

pytestmark = pytest.mark.integration


def test_tags_round_trip(lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function(Tags={"team": "a"})
    arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "a"}
    lam.tag_resource(Resource=arn, Tags={"env": "dev", "team": "b"})
    assert lam.list_tags(Resource=arn)["Tags"] == {"team": "b", "env": "dev"}
    assert lam.get_function(FunctionName=name)["Tags"] == {"team": "b", "env": "dev"}
    lam.untag_resource(Resource=arn, TagKeys=["team"])
    assert lam.list_tags(Resource=arn)["Tags"] == {"env": "dev"}
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.tag_resource(Resource=arn, Tags={"aws:reserved": "x"})
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.list_tags(Resource=f"{arn}:1")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.list_tags(Resource=arn.replace(name, name + "-gone"))


def test_add_permission_every_member_then_remove(lam: Any,
                                                 make_function: Callable[..., str]) -> None:
    name = make_function()
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName=name)
    out = lam.add_permission(
        FunctionName=name, StatementId="url", Action="lambda:InvokeFunctionUrl",
        Principal="123456789012", FunctionUrlAuthType="AWS_IAM")
    stmt = json.loads(out["Statement"])
    assert stmt["Condition"] == {"StringEquals": {"lambda:FunctionUrlAuthType": "AWS_IAM"}}
    assert stmt["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}
    lam.add_permission(
        FunctionName=name, StatementId="s3", Action="lambda:InvokeFunction",
        Principal="s3.amazonaws.com", SourceArn="arn:aws:s3:::bucket",
        SourceAccount="123456789012", EventSourceToken="tok", PrincipalOrgID="o-abcdefghij",
        InvokedViaFunctionUrl=True)
    got = lam.get_policy(FunctionName=name)
    policy = json.loads(got["Policy"])
    assert [s["Sid"] for s in policy["Statement"]] == ["url", "s3"]
    s3 = policy["Statement"][1]
    assert s3["Principal"] == {"Service": "s3.amazonaws.com"}
    assert s3["Condition"] == {
        "ArnLike": {"AWS:SourceArn": "arn:aws:s3:::bucket"},
        "StringEquals": {"AWS:SourceAccount": "123456789012",
                         "aws:PrincipalOrgID": "o-abcdefghij",
                         "lambda:EventSourceToken": "tok"},
        "Bool": {"lambda:InvokedViaFunctionUrl": "true"}}
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.add_permission(FunctionName=name, StatementId="s3", Action="lambda:InvokeFunction",
                           Principal="s3.amazonaws.com")
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.remove_permission(FunctionName=name, StatementId="s3", RevisionId="stale")
    lam.remove_permission(FunctionName=name, StatementId="s3", RevisionId=got["RevisionId"])
    assert [s["Sid"] for s in json.loads(lam.get_policy(FunctionName=name)["Policy"])
            ["Statement"]] == ["url"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.remove_permission(FunctionName=name, StatementId="s3")
    lam.remove_permission(FunctionName=name, StatementId="url")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName=name)


def test_a_policy_is_per_qualifier_and_goes_with_the_function(
        lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function()
    version = lam.publish_version(FunctionName=name)["Version"]
    lam.add_permission(FunctionName=name, Qualifier=version, StatementId="v",
                       Action="lambda:InvokeFunction", Principal="events.amazonaws.com")
    stmt = json.loads(lam.get_policy(FunctionName=name, Qualifier=version)["Policy"])
    assert stmt["Statement"][0]["Resource"].endswith(f":{name}:{version}")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName=name)  # the unqualified function has none
    lam.add_permission(FunctionName=name, StatementId="f", Action="lambda:InvokeFunction",
                       Principal="events.amazonaws.com")
    lam.delete_function(FunctionName=name)
    lam.create_function(FunctionName=name, Runtime="python3.11", Role="arn:aws:iam::1:role/r",
                        Handler="app.handler", Code={"ZipFile": make_zip({"app.py": "x=1"})})
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName=name)


def test_layer_version_permissions(lam: Any, region: Region) -> None:
    layer = "iac-layer"
    v = lam.publish_layer_version(LayerName=layer,
                                  Content={"ZipFile": make_zip({"x.txt": "x"})})["Version"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_layer_version_policy(LayerName=layer, VersionNumber=v)
    out = lam.add_layer_version_permission(
        LayerName=layer, VersionNumber=v, StatementId="all", Action="lambda:GetLayerVersion",
        Principal="*", OrganizationId="o-abcdefghij")
    got = lam.get_layer_version_policy(LayerName=layer, VersionNumber=v)
    assert got["RevisionId"] == out["RevisionId"]
    [stmt] = json.loads(got["Policy"])["Statement"]
    assert stmt == json.loads(out["Statement"])
    assert stmt["Condition"] == {"StringEquals": {"aws:PrincipalOrgID": "o-abcdefghij"}}
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.add_layer_version_permission(LayerName=layer, VersionNumber=v, StatementId="x",
                                         Action="lambda:InvokeFunction", Principal="*")
    lam.remove_layer_version_permission(LayerName=layer, VersionNumber=v, StatementId="all")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_layer_version_policy(LayerName=layer, VersionNumber=v)


def test_settings_with_one_answer(lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function()
    settings = lam.get_account_settings()
    assert settings["AccountLimit"]["ConcurrentExecutions"] == 1000
    assert settings["AccountUsage"]["FunctionCount"] >= 1
    assert lam.get_function_code_signing_config(FunctionName=name)["CodeSigningConfigArn"] == ""
    assert lam.get_runtime_management_config(FunctionName=name)["UpdateRuntimeOn"] == "Auto"
    with pytest.raises(lam.exceptions.InvalidParameterValueException, match="UpdateRuntimeOn"):
        lam.put_runtime_management_config(FunctionName=name, UpdateRuntimeOn="FunctionUpdate")
    assert lam.get_function_recursion_config(FunctionName=name)["RecursiveLoop"] == "Allow"
    with pytest.raises(lam.exceptions.InvalidParameterValueException, match="RecursiveLoop"):
        lam.put_function_recursion_config(FunctionName=name, RecursiveLoop="Terminate")
    assert lam.list_provisioned_concurrency_configs(
        FunctionName=name)["ProvisionedConcurrencyConfigs"] == []
    assert lam.list_function_url_configs(FunctionName=name)["FunctionUrlConfigs"] == []
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function_url_config(FunctionName=name)
    assert lam.list_event_source_mappings()["EventSourceMappings"] == []


def test_provisioned_configs_listed_without_a_qualifier(
        lam: Any, make_function: Callable[..., str]) -> None:
    name = make_function()
    version = lam.publish_version(FunctionName=name)["Version"]
    lam.put_provisioned_concurrency_config(FunctionName=name, Qualifier=version,
                                           ProvisionedConcurrentExecutions=1)
    [cfg] = lam.list_provisioned_concurrency_configs(
        FunctionName=name)["ProvisionedConcurrencyConfigs"]
    assert cfg["FunctionArn"].endswith(f":{name}:{version}")
    assert cfg["RequestedProvisionedConcurrentExecutions"] == 1
    lam.delete_provisioned_concurrency_config(FunctionName=name, Qualifier=version)
    assert lam.list_provisioned_concurrency_configs(
        FunctionName=name)["ProvisionedConcurrencyConfigs"] == []
