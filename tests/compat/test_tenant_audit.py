"""Tenant isolation audit (issue #8): tenant B tries every supported operation on tenant A's
resources — by ARN, the way a client would name another account's function — and is refused
every time; afterwards A's resources are exactly as they were. Cross-environment paths (files,
/tmp, processes, network) are the escape suite's (tests/escape)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, lambda_client, new_name

pytestmark = pytest.mark.integration

DENIED = {"ResourceNotFoundException", "AccessDeniedException", "AccessDenied",
          "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


def _other_tenant(region: Region) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "cellcloud", "tenant", "create", new_name("b"),
                          "--state-dir", region.state_dir], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {k: v.strip() for k, v in (line.split(None, 1) for line in out.strip().splitlines())}


def test_tenant_b_cannot_touch_tenant_a(region: Region, lam: Any) -> None:
    # Tenant A: a function with a version, an alias, reserved concurrency, an async config,
    # a layer, and a queue.
    name = new_name("a")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": make_zip({"app.py": SUM})})
    lam.invoke(FunctionName=name, Payload=b'{"a": 1, "b": 2}')
    version = lam.publish_version(FunctionName=name)["Version"]
    lam.create_alias(FunctionName=name, Name="live", FunctionVersion=version)
    lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=5)
    lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=1)
    layer = lam.publish_layer_version(LayerName=new_name("l"),
                                      Content={"ZipFile": make_zip({"python/x.py": "X = 1"})})
    fn_arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    kw = dict(endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
              config=Config(retries={"total_max_attempts": 1}))
    sqs_a = boto3.client("sqs", aws_access_key_id=str(region.doc["access_key_id"]),
                         aws_secret_access_key=str(region.doc["secret_access_key"]), **kw)
    queue_url = sqs_a.create_queue(QueueName=new_name("q"))["QueueUrl"]
    sqs_a.send_message(QueueUrl=queue_url, MessageBody="for A only")
    before = lam.get_function(FunctionName=name)["Configuration"]

    b = _other_tenant(region)
    other = lambda_client(region, access_key_id=b["aws_access_key_id"],
                          secret=b["aws_secret_access_key"])
    sqs_b = boto3.client("sqs", aws_access_key_id=b["aws_access_key_id"],
                         aws_secret_access_key=b["aws_secret_access_key"], **kw)
    zip_b = make_zip({"app.py": "def handler(e, c):\n    return 'B was here'\n"})
    attempts: dict[str, Callable[[], Any]] = {
        "GetFunction": lambda: other.get_function(FunctionName=fn_arn),
        "GetFunctionConfiguration": lambda: other.get_function_configuration(FunctionName=fn_arn),
        "UpdateFunctionCode": lambda: other.update_function_code(FunctionName=fn_arn,
                                                                 ZipFile=zip_b),
        "UpdateFunctionConfiguration": lambda: other.update_function_configuration(
            FunctionName=fn_arn, Timeout=30),
        "Invoke": lambda: other.invoke(FunctionName=fn_arn, Payload=b'{"a": 1, "b": 2}'),
        "Invoke(Event)": lambda: other.invoke(FunctionName=fn_arn, InvocationType="Event",
                                              Payload=b"{}"),
        "Invoke(DryRun)": lambda: other.invoke(FunctionName=fn_arn, InvocationType="DryRun"),
        "Invoke(alias)": lambda: other.invoke(FunctionName=f"{fn_arn}:live", Payload=b"{}"),
        "PublishVersion": lambda: other.publish_version(FunctionName=fn_arn),
        "ListVersionsByFunction": lambda: other.list_versions_by_function(FunctionName=fn_arn),
        "CreateAlias": lambda: other.create_alias(FunctionName=fn_arn, Name="evil",
                                                  FunctionVersion=version),
        "GetAlias": lambda: other.get_alias(FunctionName=fn_arn, Name="live"),
        "UpdateAlias": lambda: other.update_alias(FunctionName=fn_arn, Name="live",
                                                  FunctionVersion="$LATEST"),
        "DeleteAlias": lambda: other.delete_alias(FunctionName=fn_arn, Name="live"),
        "ListAliases": lambda: other.list_aliases(FunctionName=fn_arn),
        "PutFunctionConcurrency": lambda: other.put_function_concurrency(
            FunctionName=fn_arn, ReservedConcurrentExecutions=0),
        "GetFunctionConcurrency": lambda: other.get_function_concurrency(FunctionName=fn_arn),
        "DeleteFunctionConcurrency": lambda: other.delete_function_concurrency(
            FunctionName=fn_arn),
        "PutProvisionedConcurrencyConfig": lambda: other.put_provisioned_concurrency_config(
            FunctionName=fn_arn, Qualifier=version, ProvisionedConcurrentExecutions=1),
        "GetProvisionedConcurrencyConfig": lambda: other.get_provisioned_concurrency_config(
            FunctionName=fn_arn, Qualifier=version),
        "PutFunctionEventInvokeConfig": lambda: other.put_function_event_invoke_config(
            FunctionName=fn_arn, MaximumRetryAttempts=0),
        "GetFunctionEventInvokeConfig": lambda: other.get_function_event_invoke_config(
            FunctionName=fn_arn),
        "DeleteFunctionEventInvokeConfig": lambda: other.delete_function_event_invoke_config(
            FunctionName=fn_arn),
        "GetLayerVersion": lambda: other.get_layer_version_by_arn(
            Arn=layer["LayerVersionArn"]),
        "DeleteLayerVersion(by A's ARN)": lambda: other.delete_layer_version(
            LayerName=layer["LayerArn"], VersionNumber=layer["Version"]),
        "ListLayerVersions": lambda: other.list_layer_versions(LayerName=layer["LayerArn"]),
        "CreateFunction(with A's layer)": lambda: other.create_function(
            FunctionName=new_name("b"), Runtime="python3.11", Role=ROLE, Handler="app.handler",
            Code={"ZipFile": zip_b}, Layers=[layer["LayerVersionArn"]]),
        "DeleteFunction": lambda: other.delete_function(FunctionName=fn_arn),
        "SQS ReceiveMessage": lambda: sqs_b.receive_message(QueueUrl=queue_url),
        "SQS SendMessage": lambda: sqs_b.send_message(QueueUrl=queue_url, MessageBody="x"),
        "SQS PurgeQueue": lambda: sqs_b.purge_queue(QueueUrl=queue_url),
        "SQS GetQueueAttributes": lambda: sqs_b.get_queue_attributes(QueueUrl=queue_url),
    }
    allowed_through: list[str] = []
    refusals: dict[str, str] = {}
    for op, call in attempts.items():
        try:
            res = call()
        except ClientError as e:
            code = e.response["Error"]["Code"]
            refusals[op] = code
            # Naming another tenant's layer in a create is a bad parameter, as on Lambda.
            layer_param = op.startswith("CreateFunction") and code == "InvalidParameterValueException"
            assert code in DENIED or layer_param, (op, code)
            continue
        # DeleteLayerVersion is idempotent on AWS (204 for a version that is not yours or not
        # there); anything else succeeding is a breach.
        if op.startswith("DeleteLayerVersion"):
            continue
        allowed_through.append(f"{op}: {str(res)[:120]}")
    assert allowed_through == []
    print(json.dumps(refusals, indent=1))  # the audit's record, shown with -s
    # A's resources are untouched.
    after = lam.get_function(FunctionName=name)["Configuration"]
    for field in ("CodeSha256", "Timeout", "RevisionId"):
        assert after[field] == before[field]
    assert lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"] == version
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 5
    assert lam.get_layer_version_by_arn(Arn=layer["LayerVersionArn"])["Version"] == layer["Version"]
    assert json.loads(lam.invoke(FunctionName=name, Payload=b'{"a": 2, "b": 2}')["Payload"]
                      .read()) == {"sum": 4}
    msgs = sqs_a.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in msgs] == ["for A only"]
