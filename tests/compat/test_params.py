"""Issue #23: the region never accepts a parameter and ignores it.

For every input member of every covered operation, as botocore's model lists it, a valid value
is sent through boto3 (client-side validation on: the value is valid for the model) and the
answer must be what the table below says is intended today:

- ``echo``: accepted, and the answer's member of the same name holds the value (AWS's echo);
- ``accept``: accepted (the output has no member of that name to echo it in);
- ``refuse``: the operation's validation error, its message naming the member.

A member the table does not list fails the test (a newer botocore brought a parameter nobody
has decided about). Honouring a refused parameter later is a one-row change here.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.session
import pytest
from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, lambda_client, new_name

pytestmark = pytest.mark.integration

ZIP = make_zip({"app.py": SUM})
ECHO, ACCEPT, REFUSE = "echo", "accept", "refuse"


@dataclass(frozen=True)
class Row:
    expect: str
    #: the value, or a function of the world and the operation's target that makes it
    value: Any = None
    #: how the echo looks, where it is not the value itself: value, response -> bool
    echoed: Callable[[Any, dict[str, Any]], bool] | None = None


@dataclass
class World:
    lam: Any
    sqs: Any
    account: str
    region: str
    layer_arn: str
    queue_url: str
    queue_arn: str

    def function(self, versions: int = 0) -> str:
        name = new_name("p")
        self.lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                                 Handler="app.handler", Code={"ZipFile": ZIP})
        for i in range(versions):
            self.lam.update_function_configuration(FunctionName=name, Description=f"v{i + 1}")
            self.lam.publish_version(FunctionName=name)
        return name

    def queue(self) -> str:
        url: str = self.sqs.create_queue(QueueName=new_name("q"))["QueueUrl"]
        return url

    def receipt(self, url: str) -> str:
        self.sqs.send_message(QueueUrl=url, MessageBody="m")
        [m] = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)["Messages"]
        handle: str = m["ReceiptHandle"]
        return handle


def _revision(w: World, t: dict[str, Any]) -> str:
    rid: str = w.lam.get_function_configuration(FunctionName=t["FunctionName"])["RevisionId"]
    return rid


def _layers_echoed(value: Any, resp: dict[str, Any]) -> bool:
    return [layer["Arn"] for layer in resp.get("Layers", [])] == value


_ARN_KMS = "arn:aws:kms:cc-local-1:123456789012:key/0123abcd-0000-0000-0000-000000000000"
_CONFIG: dict[str, Row] = {
    "Runtime": Row(ECHO, "python3.12"),
    "Role": Row(ECHO, "arn:aws:iam::123456789012:role/other"),
    "Handler": Row(ECHO, "app.other"),
    "Description": Row(ECHO, "described"),
    "Timeout": Row(ECHO, 7),
    "MemorySize": Row(ECHO, 256),
    "Environment": Row(ECHO, {"Variables": {"GREETING": "hi"}}),
    "Layers": Row(ECHO, lambda w, t: [w.layer_arn], _layers_echoed),
    "EphemeralStorage": Row(ECHO, {"Size": 1024}),
    # the function's network setting (core/vpc.py); echoed with VpcId
    "VpcConfig": Row(ECHO, {"SubnetIds": ["cellcloud-egress"],
                            "SecurityGroupIds": ["allow:198.51.99.0/24:443"],
                            "Ipv6AllowedForDualStack": False}),
    "DeadLetterConfig": Row(ECHO, lambda w, t: {"TargetArn": w.queue_arn}),
    "KMSKeyArn": Row(REFUSE, _ARN_KMS),
    "TracingConfig": Row(REFUSE, {"Mode": "Active"}),
    "FileSystemConfigs": Row(REFUSE, [{
        "Arn": "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/"
               "fsap-0123456789abcdef0", "LocalMountPath": "/mnt/efs"}]),
    "ImageConfig": Row(REFUSE, {"Command": ["app.handler"]}),
    # refused without microVM isolation (CELLCLOUD_ISOLATION=microvm; docs/microvm.md)
    "SnapStart": Row(REFUSE, {"ApplyOn": "PublishedVersions"}),
    # honoured (core/cwlogs.py; tests/integration/test_logs.py applies it)
    "LoggingConfig": Row(ECHO, {"LogFormat": "JSON", "ApplicationLogLevel": "WARN",
                                "SystemLogLevel": "INFO", "LogGroup": "/custom/params"}),
    "CapacityProviderConfig": Row(REFUSE, {"LambdaManagedInstancesCapacityProviderConfig": {
        "CapacityProviderArn": "arn:aws:lambda:us-east-1:123456789012:capacity-provider:cp"}}),
    "DurableConfig": Row(REFUSE, {"RetentionPeriodInDays": 1}),
    "RuntimeConfig": Row(REFUSE, {
        "RuntimeArn": "arn:aws:lambda:us-east-1:123456789012:runtime/0123456789abcdef0123456789",
        "RuntimeAlias": "r"}),
    "AcceleratorConfig": Row(REFUSE, {"AcceleratorMemorySize": 1}),
}
_CODE_ELSEWHERE: dict[str, Row] = {
    "S3Bucket": Row(REFUSE, "bucket"), "S3Key": Row(REFUSE, "key.zip"),
    "S3ObjectVersion": Row(REFUSE, "1"), "S3ObjectStorageMode": Row(REFUSE, "COPY"),
    "ImageUri": Row(REFUSE, "123456789012.dkr.ecr.us-east-1.amazonaws.com/r:latest"),
    "SourceKMSKeyArn": Row(REFUSE, _ARN_KMS),
}

LAMBDA: dict[str, dict[str, Row]] = {
    "CreateFunction": {
        "FunctionName": Row(ECHO, lambda w, t: new_name("p")), **_CONFIG,
        "Code": Row(ACCEPT, {"ZipFile": ZIP}),
        "Publish": Row(ACCEPT, True),
        "PublishTo": Row(REFUSE, "LATEST_PUBLISHED"),
        "PackageType": Row(ECHO, "Zip"),
        "Tags": Row(ACCEPT, {"team": "a"}),
        "Architectures": Row(ECHO, ["x86_64"]),
        "CodeSigningConfigArn": Row(
            REFUSE, "arn:aws:lambda:us-east-1:123456789012:code-signing-config:"
                    "csc-0123456789abcdef0"),
        "TenancyConfig": Row(REFUSE, {"TenantIsolationMode": "PER_TENANT"}),
    },
    "UpdateFunctionConfiguration": {
        "FunctionName": Row(ECHO, lambda w, t: t["FunctionName"]), **_CONFIG,
        "RevisionId": Row(ACCEPT, _revision),
    },
    "UpdateFunctionCode": {
        "FunctionName": Row(ECHO, lambda w, t: t["FunctionName"]),
        "ZipFile": Row(ACCEPT, make_zip({"app.py": SUM + "# v2\n"})),
        **_CODE_ELSEWHERE,
        "Architectures": Row(ECHO, ["x86_64"]),
        "Publish": Row(ACCEPT, True), "DryRun": Row(ACCEPT, True),
        "RevisionId": Row(ACCEPT, _revision),
        "PublishTo": Row(REFUSE, "LATEST_PUBLISHED"),
    },
    "PublishVersion": {
        "FunctionName": Row(ECHO, lambda w, t: t["FunctionName"]),
        "CodeSha256": Row(ECHO, base64.b64encode(hashlib.sha256(ZIP).digest()).decode()),
        "Description": Row(ECHO, "first"),
        "RevisionId": Row(ACCEPT, _revision),
        "PublishTo": Row(REFUSE, "LATEST_PUBLISHED"),
    },
    "CreateAlias": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "Name": Row(ECHO, "fresh"), "FunctionVersion": Row(ECHO, "1"),
        "Description": Row(ECHO, "an alias"),
        "RoutingConfig": Row(ECHO, {"AdditionalVersionWeights": {"2": 0.25}}),
    },
    "UpdateAlias": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "Name": Row(ECHO, "live"), "FunctionVersion": Row(ECHO, "2"),
        "Description": Row(ECHO, "moved"),
        "RoutingConfig": Row(ECHO, {"AdditionalVersionWeights": {"2": 0.5}}),
        "RevisionId": Row(ACCEPT, lambda w, t: w.lam.get_alias(
            FunctionName=t["FunctionName"], Name="live")["RevisionId"]),
    },
    "PutFunctionConcurrency": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "ReservedConcurrentExecutions": Row(ECHO, 5),
    },
    "PutProvisionedConcurrencyConfig": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "Qualifier": Row(ACCEPT, "1"),
        "ProvisionedConcurrentExecutions": Row(ACCEPT, 1),  # echoed as Requested...
    },
    "PublishLayerVersion": {
        "LayerName": Row(ACCEPT, lambda w, t: t["LayerName"]),
        "Description": Row(ECHO, "a layer"),
        "Content": Row(ACCEPT, {"ZipFile": make_zip({"python/lib.py": "X = 1\n"})}),
        "CompatibleArchitectures": Row(ECHO, ["x86_64"]),
        "CompatibleRuntimes": Row(ECHO, ["python3.11"]),
        "LicenseInfo": Row(ECHO, "MIT"),
    },
    "PutFunctionEventInvokeConfig": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "Qualifier": Row(ACCEPT, "$LATEST"),
        "MaximumRetryAttempts": Row(ECHO, 1),
        "MaximumEventAgeInSeconds": Row(ECHO, 120),
        "DestinationConfig": Row(ECHO, lambda w, t: {
            "OnFailure": {"Destination": w.queue_arn}}),
    },
    "Invoke": {
        "FunctionName": Row(ACCEPT, lambda w, t: t["FunctionName"]),
        "InvocationType": Row(ACCEPT, "DryRun"),
        "LogType": Row(ACCEPT, "Tail"),
        "ClientContext": Row(REFUSE, base64.b64encode(b'{"custom": {"k": "v"}}').decode()),
        "DurableExecutionName": Row(REFUSE, "run-1"),
        "Payload": Row(ACCEPT, b'{"a": 2, "b": 3}'),
        "Qualifier": Row(ACCEPT, "$LATEST"),
        "TenantId": Row(REFUSE, "tenant-1"),
    },
}
LAMBDA["UpdateFunctionEventInvokeConfig"] = LAMBDA["PutFunctionEventInvokeConfig"]

SQS: dict[str, dict[str, Row]] = {
    "CreateQueue": {"QueueName": Row(ACCEPT, lambda w, t: new_name("q")),
                    "Attributes": Row(ACCEPT, {"VisibilityTimeout": "45"}),
                    "tags": Row(ACCEPT, {"team": "a"})},
    "GetQueueUrl": {"QueueName": Row(ACCEPT, lambda w, t: w.queue_url.rsplit("/", 1)[1]),
                    "QueueOwnerAWSAccountId": Row(REFUSE, "210987654321")},
    "ListQueues": {"QueueNamePrefix": Row(ACCEPT, "q-"), "NextToken": Row(REFUSE, "t"),
                   "MaxResults": Row(REFUSE, 5)},
    "DeleteQueue": {"QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"])},
    "PurgeQueue": {"QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"])},
    "SendMessage": {
        "QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"]),
        "MessageBody": Row(ACCEPT, "hello"), "DelaySeconds": Row(ACCEPT, 0),
        "MessageAttributes": Row(ACCEPT, {"k": {"DataType": "String", "StringValue": "v"}}),
        "MessageSystemAttributes": Row(ACCEPT, {"AWSTraceHeader": {
            "DataType": "String", "StringValue": "Root=1-5759e988-bd862e3fe1be46a994272793"}}),
        "MessageDeduplicationId": Row(REFUSE, "d1"),
        "MessageGroupId": Row(REFUSE, "g1"),
    },
    "ReceiveMessage": {
        "QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"]),
        "AttributeNames": Row(ACCEPT, ["All"]),
        "MessageSystemAttributeNames": Row(ACCEPT, ["SentTimestamp"]),
        "MessageAttributeNames": Row(ACCEPT, ["All"]),
        "MaxNumberOfMessages": Row(ACCEPT, 2), "VisibilityTimeout": Row(ACCEPT, 5),
        "WaitTimeSeconds": Row(ACCEPT, 0),
        "ReceiveRequestAttemptId": Row(ACCEPT, "attempt-1"),
    },
    "DeleteMessage": {"QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"]),
                      "ReceiptHandle": Row(ACCEPT, lambda w, t: t["ReceiptHandle"])},
    "DeleteMessageBatch": {"QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"]),
                           "Entries": Row(ACCEPT, lambda w, t: t["Entries"])},
    "GetQueueAttributes": {"QueueUrl": Row(ACCEPT, lambda w, t: t["QueueUrl"]),
                           "AttributeNames": Row(ACCEPT, ["QueueArn"])},
}


def _base(w: World, op: str) -> dict[str, Any]:
    """A valid request of ``op`` (its target made fresh where the member could disturb it)."""
    if op == "CreateFunction":
        return {"FunctionName": new_name("p"), "Runtime": "python3.11", "Role": ROLE,
                "Handler": "app.handler", "Code": {"ZipFile": ZIP}}
    if op == "PutFunctionConcurrency":
        return {"FunctionName": w.function(), "ReservedConcurrentExecutions": 5}
    if op in ("UpdateFunctionConfiguration", "PublishVersion", "PutFunctionEventInvokeConfig",
              "Invoke"):
        return {"FunctionName": w.function()}
    if op == "UpdateFunctionEventInvokeConfig":
        name = w.function()
        w.lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=2)
        return {"FunctionName": name}
    if op == "UpdateFunctionCode":
        return {"FunctionName": w.function(), "ZipFile": ZIP}
    if op == "CreateAlias":
        return {"FunctionName": w.function(versions=2), "Name": "fresh", "FunctionVersion": "1"}
    if op == "UpdateAlias":
        name = w.function(versions=2)
        w.lam.create_alias(FunctionName=name, Name="live", FunctionVersion="1")
        return {"FunctionName": name, "Name": "live"}
    if op == "PutProvisionedConcurrencyConfig":
        return {"FunctionName": w.function(versions=1), "Qualifier": "1",
                "ProvisionedConcurrentExecutions": 1}
    if op == "PublishLayerVersion":
        return {"LayerName": new_name("l"), "Content": {"ZipFile": ZIP}}
    if op == "CreateQueue":
        return {"QueueName": new_name("q")}
    if op in ("GetQueueUrl",):
        return {"QueueName": w.queue_url.rsplit("/", 1)[1]}
    if op == "ListQueues":
        return {}
    url = w.queue()
    if op == "SendMessage":
        return {"QueueUrl": url, "MessageBody": "m"}
    if op == "DeleteMessage":
        return {"QueueUrl": url, "ReceiptHandle": w.receipt(url)}
    if op == "DeleteMessageBatch":
        return {"QueueUrl": url, "Entries": [{"Id": "1", "ReceiptHandle": w.receipt(url)}]}
    return {"QueueUrl": url}


def _cleanup(w: World, op: str, params: dict[str, Any]) -> None:
    if op == "PutProvisionedConcurrencyConfig":  # give its environment back
        w.lam.delete_provisioned_concurrency_config(FunctionName=params["FunctionName"],
                                                    Qualifier=params["Qualifier"])


def _members(service: str, ops: dict[str, dict[str, Row]]) -> list[tuple[str, str]]:
    model = botocore.session.get_session().get_service_model(service)
    return [(op, m) for op in ops for m in model.operation_model(op).input_shape.members]


def _output_members(service: str, op: str) -> set[str]:
    model = botocore.session.get_session().get_service_model(service)
    shape = model.operation_model(op).output_shape
    return set(shape.members) if shape is not None else set()


def _contains(echo: Any, sent: Any) -> bool:
    """The echo holds what was sent (AWS may add members, such as LoggingConfig's LogGroup)."""
    if isinstance(sent, dict):
        return isinstance(echo, dict) and all(k in echo and _contains(echo[k], v)
                                              for k, v in sent.items())
    return bool(echo == sent)


@pytest.fixture(scope="module")
def world(region: Region) -> World:
    kw: dict[str, Any] = dict(
        endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
        aws_access_key_id=str(region.doc["access_key_id"]),
        aws_secret_access_key=str(region.doc["secret_access_key"]),
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=120))
    lam = lambda_client(region)
    sqs = boto3.client("sqs", **kw)
    layer = lam.publish_layer_version(LayerName=new_name("l"),
                                      Content={"ZipFile": make_zip({"python/x.py": "X = 1\n"})})
    url = sqs.create_queue(QueueName=new_name("q"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    return World(lam, sqs, str(region.doc["account_id"]), str(region.doc["region"]),
                 layer["LayerVersionArn"], url, arn)


def _check(w: World, service: str, client: Any, table: dict[str, dict[str, Row]], op: str,
           member: str, error_code: str) -> None:
    row = table[op].get(member)
    assert row is not None, f"{op}.{member} is in botocore's model but not in this table: " \
                            "decide whether the region honours or refuses it"
    params = _base(w, op)
    value = row.value(w, params) if callable(row.value) else row.value
    params[member] = value
    call = getattr(client, xform_name(op))
    if row.expect == REFUSE:
        with pytest.raises(ClientError) as e:
            call(**params)
        err = e.value.response["Error"]
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, err
        assert err["Code"] == error_code, err
        assert member in err["Message"], err
        return
    try:
        resp = call(**params)
    finally:
        _cleanup(w, op, params)
    if row.expect == ECHO:
        assert member in _output_members(service, op), f"{op} has no {member} to echo"
        if row.echoed is not None:
            assert row.echoed(value, resp), (value, resp.get(member))
        else:
            assert _contains(resp.get(member), value), (value, resp.get(member))


@pytest.mark.parametrize("op,member", _members("lambda", LAMBDA),
                         ids=[f"{o}.{m}" for o, m in _members("lambda", LAMBDA)])
def test_lambda_parameter_is_honoured_or_refused(world: World, op: str, member: str) -> None:
    _check(world, "lambda", world.lam, LAMBDA, op, member, "InvalidParameterValueException")


@pytest.mark.parametrize("op,member", _members("sqs", SQS),
                         ids=[f"{o}.{m}" for o, m in _members("sqs", SQS)])
def test_sqs_parameter_is_honoured_or_refused(world: World, op: str, member: str) -> None:
    _check(world, "sqs", world.sqs, SQS, op, member, "InvalidParameterValue")


@pytest.mark.parametrize("member,value,echo", [
    ("TracingConfig", {"Mode": "PassThrough"}, True),
    ("LoggingConfig", {"LogFormat": "Text"}, True),
    ("LoggingConfig", {"LogFormat": "Text", "LogGroup": "/aws/lambda/{name}"}, True),
    ("VpcConfig", {"SubnetIds": [], "SecurityGroupIds": []}, True),
    ("FileSystemConfigs", [], False),
    ("SnapStart", {"ApplyOn": "None"}, False),
    ("KMSKeyArn", "", False),
    ("DeadLetterConfig", {}, False),
    ("ImageConfig", {}, False),
])
def test_the_default_value_of_an_unsupported_parameter_is_accepted(
        world: World, member: str, value: Any, echo: bool) -> None:
    name = new_name("p")
    if isinstance(value, dict):
        value = {k: v.format(name=name) if isinstance(v, str) else v for k, v in value.items()}
    resp = world.lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                                     Handler="app.handler", Code={"ZipFile": ZIP},
                                     **{member: value})
    if echo:
        assert _contains(resp[member], value)


@pytest.mark.parametrize("member,value", [
    ("LoggingConfig", {"LogGroup": "not a log group name!"}),
    ("LoggingConfig", {"LogFormat": "Text", "ApplicationLogLevel": "INFO"}),
    ("DeadLetterConfig", {"TargetArn": "arn:aws:sns:cc-local-1:123456789012:t"}),
    ("VpcConfig", {"SubnetIds": [], "SecurityGroupIds": ["sg-1"]}),
    ("SnapStart", {"ApplyOn": "PublishedVersions"}),
])
def test_update_refuses_what_create_refuses(world: World, member: str, value: Any) -> None:
    name = world.function()
    with pytest.raises(world.lam.exceptions.InvalidParameterValueException) as e:
        world.lam.update_function_configuration(FunctionName=name, **{member: value})
    assert member in str(e.value)
    cfg = world.lam.get_function_configuration(FunctionName=name)
    assert cfg["TracingConfig"] == {"Mode": "PassThrough"}
    assert cfg["LoggingConfig"] == {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{name}"}


def test_unknown_body_member_is_refused_not_ignored(region: Region) -> None:
    status, headers, body = region.client.request(
        "PUT", "/2015-03-31/functions/nope/configuration", b'{"Timeout": 5, "Colour": "red"}',
        {"content-type": "application/json"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    assert b"Colour" in body


def test_queue_attributes_are_honoured(world: World) -> None:
    sqs = world.sqs
    url = sqs.create_queue(QueueName=new_name("q"), Attributes={
        "DelaySeconds": "900", "MaximumMessageSize": "1024",
        "ReceiveMessageWaitTimeSeconds": "0"})["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (attrs["DelaySeconds"], attrs["MaximumMessageSize"]) == ("900", "1024")
    sqs.send_message(QueueUrl=url, MessageBody="later")  # the queue's delay: not visible yet
    assert sqs.receive_message(QueueUrl=url).get("Messages") is None
    with pytest.raises(ClientError) as e:
        sqs.send_message(QueueUrl=url, MessageBody="x" * 1025, DelaySeconds=0)
    assert e.value.response["Error"]["Code"] == "InvalidParameterValue"
    sqs.send_message(QueueUrl=url, MessageBody="now", DelaySeconds=0)
    [m] = sqs.receive_message(QueueUrl=url)["Messages"]
    assert m["Body"] == "now" and "Attributes" not in m  # none were asked for
    sqs.send_message(QueueUrl=url, MessageBody="again", DelaySeconds=0)
    [m] = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])[
        "Messages"]
    assert m["Attributes"] == {"ApproximateReceiveCount": "1"}
    with pytest.raises(ClientError) as e:
        sqs.create_queue(QueueName=new_name("q"), Attributes={"RedrivePolicy": "{}"})
    assert e.value.response["Error"]["Code"] == "InvalidAttributeValue"
    assert "RedrivePolicy" in e.value.response["Error"]["Message"]


def test_every_refused_parameter_is_listed_in_the_docs() -> None:
    import pathlib

    from cellcloud.core import params

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "lambda-api.md").read_text()
    for table in (params.LAMBDA, params.SQS):
        for op, rows in table.items():
            for name, p in rows.items():
                if p.rule != params.HONOURED:
                    short = name.split(".", 1)[-1] if name.startswith(
                        ("Code.", "Content.", "Attributes.")) else name
                    assert f"`{short}`" in doc, f"{op}.{name} is refused but not in the docs"


