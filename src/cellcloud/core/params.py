"""Which request parameters the region honours, one table for every operation it serves.

The rule (issue #23): a parameter is either *honoured* — it takes effect and is echoed exactly
as AWS echoes it — or *refused* with the operation's validation error, naming the parameter.
Never stored and ignored, never silently rewritten. A third kind of row, *default-only*, is a
parameter the region does not support but whose AWS default it does implement (``TracingConfig
{Mode: PassThrough}``, ``VpcConfig.Ipv6AllowedForDualStack: false``): that one value is
accepted, any other refused.

Rows are keyed by the botocore member name; a dotted key (``VpcConfig.SubnetIds``) is a member
of a structure (or a key of a map such as SQS's ``Attributes``). A structure with dotted rows
has each of its keys checked: keys without a row are refused too. A body key the operation's
model does not have at all is refused (botocore never sends one; a hand-made request that
does would otherwise be ignored).

Pure: :func:`refusal` takes the request's parts and returns the first refused parameter with
the reason, or None; the shells (frontend/api.py, queues/api.py) raise their own error type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

HONOURED = "honoured"
REFUSED = "refused"
DEFAULT_ONLY = "refused-unless-default-value"

#: what a default-only row needs to know about the request (the function's name, the caller's
#: account) to tell the default value from another
Context = Mapping[str, str]


@dataclass(frozen=True)
class Param:
    rule: str
    #: body | uri | query:<wire name> | header:<wire name, lower case>
    where: str = "body"
    #: why it is refused (completes "<name> is not supported: ...")
    why: str = ""
    #: for DEFAULT_ONLY: whether a value is the default one
    is_default: Callable[[Any, Context], bool] | None = None

    def __post_init__(self) -> None:
        assert self.rule in (HONOURED, REFUSED, DEFAULT_ONLY)
        assert (self.rule == DEFAULT_ONLY) == (self.is_default is not None)
        assert self.rule == HONOURED or self.why
        assert self.rule != DEFAULT_ONLY or self.where == "body"


@dataclass(frozen=True)
class Refusal:
    name: str  # the parameter, dotted for a member of a structure
    message: str


H = Param(HONOURED)
URI = Param(HONOURED, "uri")


def refused(why: str, where: str = "body") -> Param:
    return Param(REFUSED, where, why)


def default_only(why: str, is_default: Callable[[Any, Context], bool]) -> Param:
    return Param(DEFAULT_ONLY, "body", why, is_default)


def _equals(value: object) -> Callable[[Any, Context], bool]:
    return lambda v, _ctx: bool(v == value)


_NO_VPC = "environments get no IPv6 (only false is accepted)"
_ZIP_ONLY = "only .zip code uploaded in the request (ZipFile) is supported"
_NO_CAPACITY = "Lambda Managed Instances (capacity providers) are not supported"

#: CreateFunction / UpdateFunctionConfiguration's configuration members
_CONFIG: dict[str, Param] = {
    "Runtime": H, "Role": H, "Handler": H, "Description": H, "Timeout": H, "MemorySize": H,
    "Environment": H, "Environment.Variables": H,
    "Layers": H,
    "EphemeralStorage": H, "EphemeralStorage.Size": H,
    "VpcConfig": H,
    # the function's network setting (core/vpc.py validates the entries; frontend/cell.py
    # refuses any other, naming it): SubnetIds [] | ["cellcloud-egress"] | ["cellcloud-none"],
    # SecurityGroupIds ["allow:<IPv4 CIDR>:<port>", ...]
    "VpcConfig.SubnetIds": H,
    "VpcConfig.SecurityGroupIds": H,
    "VpcConfig.Ipv6AllowedForDualStack": default_only(_NO_VPC, _equals(False)),
    "DeadLetterConfig": H,
    # an SQS queue of the function's account (frontend/deadletter.py checks it)
    "DeadLetterConfig.TargetArn": H,
    "KMSKeyArn": default_only("environment variables are not encrypted with a customer "
                              "managed key (only an empty KMSKeyArn is accepted)", _equals("")),
    "TracingConfig": H,
    "TracingConfig.Mode": default_only("X-Ray tracing is not supported (only Mode PassThrough "
                                       "is accepted)", _equals("PassThrough")),
    "FileSystemConfigs": default_only("file systems (EFS) cannot be mounted (only an empty "
                                      "list is accepted)", _equals([])),
    # PackageType Image only (frontend/image_functions.py; a .zip function refuses them)
    "ImageConfig": H,
    "ImageConfig.EntryPoint": H,
    "ImageConfig.Command": H,
    "ImageConfig.WorkingDirectory": H,
    "SnapStart": H,
    # PublishedVersions only with microvm isolation (frontend/functions.py, docs/microvm.md)
    "SnapStart.ApplyOn": H,
    "LoggingConfig": H,
    # core/cwlogs.py checks them (levels only with JSON) and frontend/cell.py applies them
    "LoggingConfig.LogFormat": H,
    "LoggingConfig.LogGroup": H,
    "LoggingConfig.ApplicationLogLevel": H,
    "LoggingConfig.SystemLogLevel": H,
    "CapacityProviderConfig": refused(_NO_CAPACITY),
    "DurableConfig": refused("durable functions are not supported"),
    "RuntimeConfig": refused("custom runtime ARNs are not supported; use a runtime this region "
                             "lists or provided.al2023 with a bootstrap"),
    "AcceleratorConfig": refused("accelerators are not supported"),
}

_CODE_SOURCES: dict[str, Param] = {
    "S3Bucket": refused(_ZIP_ONLY),
    "S3Key": refused(_ZIP_ONLY),
    "S3ObjectVersion": refused(_ZIP_ONLY),
    "S3ObjectStorageMode": refused(_ZIP_ONLY),
    # an image of this region's registry, by tag or digest (resolved to the digest)
    "ImageUri": H,
    "SourceKMSKeyArn": refused("code is not encrypted with a customer managed key"),
}

LAMBDA: dict[str, dict[str, Param]] = {
    "CreateFunction": {
        "FunctionName": H, **_CONFIG,
        "Code": H, "Code.ZipFile": H, **{f"Code.{k}": p for k, p in _CODE_SOURCES.items()},
        "Publish": H,
        "PublishTo": refused(_NO_CAPACITY),
        "PackageType": H, "Tags": H, "Architectures": H,
        "CodeSigningConfigArn": refused("code signing is not supported"),
        "TenancyConfig": refused("tenant isolation mode is not supported"),
    },
    "UpdateFunctionConfiguration": {"FunctionName": URI, **_CONFIG, "RevisionId": H},
    "UpdateFunctionCode": {
        "FunctionName": URI, "ZipFile": H, **_CODE_SOURCES,
        "Architectures": H, "Publish": H, "DryRun": H, "RevisionId": H,
        "PublishTo": refused(_NO_CAPACITY),
    },
    "PublishVersion": {"FunctionName": URI, "CodeSha256": H, "Description": H,
                       "RevisionId": H, "PublishTo": refused(_NO_CAPACITY)},
    "CreateAlias": {"FunctionName": URI, "Name": H, "FunctionVersion": H, "Description": H,
                    "RoutingConfig": H},
    "UpdateAlias": {"FunctionName": URI, "Name": URI, "FunctionVersion": H, "Description": H,
                    "RoutingConfig": H, "RevisionId": H},
    "PutFunctionConcurrency": {"FunctionName": URI, "ReservedConcurrentExecutions": H},
    "PutProvisionedConcurrencyConfig": {"FunctionName": URI,
                                        "Qualifier": Param(HONOURED, "query:Qualifier"),
                                        "ProvisionedConcurrentExecutions": H},
    "PublishLayerVersion": {
        "LayerName": URI, "Description": H, "LicenseInfo": H,
        "Content": H, "Content.ZipFile": H,
        **{f"Content.{k}": _CODE_SOURCES[k] for k in ("S3Bucket", "S3Key", "S3ObjectVersion")},
        "CompatibleArchitectures": H, "CompatibleRuntimes": H,
    },
    "PutFunctionEventInvokeConfig": {"FunctionName": URI,
                                     "Qualifier": Param(HONOURED, "query:Qualifier"),
                                     "MaximumRetryAttempts": H, "MaximumEventAgeInSeconds": H,
                                     "DestinationConfig": H},
    "Invoke": {
        "FunctionName": URI,
        "InvocationType": Param(HONOURED, "header:x-amz-invocation-type"),
        "LogType": Param(HONOURED, "header:x-amz-log-type"),
        "ClientContext": refused("client context is not passed to functions",
                                 "header:x-amz-client-context"),
        "DurableExecutionName": refused("durable functions are not supported",
                                        "header:x-amz-durable-execution-name"),
        "TenantId": refused("tenant isolation mode is not supported", "header:x-amz-tenant-id"),
        "Payload": Param(HONOURED, "payload"),
        "Qualifier": Param(HONOURED, "query:Qualifier"),
    },
    "ListFunctions": {
        "MasterRegion": refused("there are no Lambda@Edge replicas", "query:MasterRegion"),
        "FunctionVersion": Param(HONOURED, "query:FunctionVersion"),
        "Marker": Param(HONOURED, "query:Marker"), "MaxItems": Param(HONOURED, "query:MaxItems"),
    },
    "ListLayers": {
        "CompatibleArchitecture": refused("layers are not filtered by architecture",
                                          "query:CompatibleArchitecture"),
        "CompatibleRuntime": Param(HONOURED, "query:CompatibleRuntime"),
        "Marker": Param(HONOURED, "query:Marker"), "MaxItems": Param(HONOURED, "query:MaxItems"),
    },
    "ListLayerVersions": {
        "LayerName": URI,
        "CompatibleArchitecture": refused("layers are not filtered by architecture",
                                          "query:CompatibleArchitecture"),
        "CompatibleRuntime": Param(HONOURED, "query:CompatibleRuntime"),
        "Marker": Param(HONOURED, "query:Marker"), "MaxItems": Param(HONOURED, "query:MaxItems"),
    },
}
LAMBDA["UpdateFunctionEventInvokeConfig"] = LAMBDA["PutFunctionEventInvokeConfig"]
_NOT_SQS = "this region maps only SQS queues, and SQS mappings have no such setting"
#: an SQS event source mapping's members (frontend/mappings.py, core/esm.py)
_ESM: dict[str, Param] = {
    "FunctionName": H, "Enabled": H, "BatchSize": H, "MaximumBatchingWindowInSeconds": H,
    "FunctionResponseTypes": H, "ScalingConfig": H, "ScalingConfig.MaximumConcurrency": H,
    "FilterCriteria": H, "FilterCriteria.Filters": H,
    "KMSKeyArn": default_only("filter criteria are not encrypted with a customer managed key "
                              "(only an empty KMSKeyArn is accepted)", _equals("")),
    "MetricsConfig": refused("event source mapping metrics are not published"),
    "LoggingConfig": refused("event source mappings write no logs of their own"),
    "ProvisionedPollerConfig": refused("provisioned pollers are not supported (pollers scale "
                                       "by themselves up to ScalingConfig)"),
    "Tags": refused("event source mappings cannot be tagged"),
    **{k: refused(_NOT_SQS) for k in (
        "ParallelizationFactor", "DestinationConfig", "MaximumRecordAgeInSeconds",
        "BisectBatchOnFunctionError", "MaximumRetryAttempts", "TumblingWindowInSeconds",
        "SourceAccessConfigurations", "AmazonManagedKafkaEventSourceConfig",
        "SelfManagedKafkaEventSourceConfig", "DocumentDBEventSourceConfig")},
}
LAMBDA["CreateEventSourceMapping"] = {
    **_ESM, "EventSourceArn": H,
    **{k: refused(_NOT_SQS) for k in ("StartingPosition", "StartingPositionTimestamp",
                                      "Topics", "Queues", "SelfManagedEventSource")},
}
LAMBDA["UpdateEventSourceMapping"] = {**{k: p for k, p in _ESM.items() if k != "Tags"},
                                      "UUID": URI}

_QUEUE_ATTRS: dict[str, Param] = {
    "VisibilityTimeout": H, "MessageRetentionPeriod": H, "DelaySeconds": H,
    "ReceiveMessageWaitTimeSeconds": H, "MaximumMessageSize": H,
    "Policy": refused("queue policies are not supported (a queue is its account's alone)"),
    "RedrivePolicy": H, "RedriveAllowPolicy": H,
    # FIFO queues (names ending .fifo); queues/api.py refuses them on a standard queue
    "FifoQueue": H, "ContentBasedDeduplication": H, "DeduplicationScope": H,
    "FifoThroughputLimit": H,
    "KmsMasterKeyId": refused("messages are not encrypted with a KMS key"),
    "KmsDataKeyReusePeriodSeconds": refused("messages are not encrypted with a KMS key"),
    "SqsManagedSseEnabled": refused("messages are not encrypted at rest"),
}

#: SendMessage's members; a SendMessageBatch entry has the same ones (and Id)
_SEND: dict[str, Param] = {"QueueUrl": H, "MessageBody": H, "DelaySeconds": H,
                           "MessageAttributes": H, "MessageSystemAttributes": H,
                           # FIFO queues only: queues/api.py refuses them on a standard queue
                           "MessageDeduplicationId": H, "MessageGroupId": H}

SQS: dict[str, dict[str, Param]] = {
    "CreateQueue": {"QueueName": H, "Attributes": H,
                    **{f"Attributes.{k}": p for k, p in _QUEUE_ATTRS.items()},
                    "tags": H},
    "GetQueueUrl": {"QueueName": H, "QueueOwnerAWSAccountId": default_only(
        "a queue is its account's alone (only the caller's own account is accepted)",
        lambda v, ctx: bool(v == ctx.get("account")))},
    "ListQueues": {"QueueNamePrefix": H,
                   "NextToken": refused("queue lists are not paginated"),
                   "MaxResults": refused("queue lists are not paginated")},
    "DeleteQueue": {"QueueUrl": H},
    "PurgeQueue": {"QueueUrl": H},
    "SendMessage": _SEND,
    "SendMessageBatch": {"QueueUrl": H, "Entries": H},
    "ReceiveMessage": {"QueueUrl": H, "AttributeNames": H, "MessageSystemAttributeNames": H,
                       "MessageAttributeNames": H,
                       "MaxNumberOfMessages": H, "VisibilityTimeout": H, "WaitTimeSeconds": H,
                       "ReceiveRequestAttemptId": H},
    "DeleteMessage": {"QueueUrl": H, "ReceiptHandle": H},
    "DeleteMessageBatch": {"QueueUrl": H, "Entries": H},
    "ChangeMessageVisibility": {"QueueUrl": H, "ReceiptHandle": H, "VisibilityTimeout": H},
    "ChangeMessageVisibilityBatch": {"QueueUrl": H, "Entries": H},
    "GetQueueAttributes": {"QueueUrl": H, "AttributeNames": H},
    "SetQueueAttributes": {"QueueUrl": H, "Attributes": H,
                           **{f"Attributes.{k}": p for k, p in _QUEUE_ATTRS.items()}},
    "TagQueue": {"QueueUrl": H, "Tags": H},
    "UntagQueue": {"QueueUrl": H, "TagKeys": H},
    "ListQueueTags": {"QueueUrl": H},
    "ListDeadLetterSourceQueues": {"QueueUrl": H, "NextToken": H, "MaxResults": H},
    "StartMessageMoveTask": {"SourceArn": H, "DestinationArn": H,
                             "MaxNumberOfMessagesPerSecond": refused(
                                 "a move task moves every message at once (no pacing)")},
    "ListMessageMoveTasks": {"SourceArn": H, "MaxResults": H},
    "CancelMessageMoveTask": {"TaskHandle": H},
}


def _not_supported(name: str, why: str) -> Refusal:
    return Refusal(name, f"The parameter {name} is not supported by this region: {why}.")


def _check(rows: Mapping[str, Param], prefix: str, doc: Mapping[str, Any], op: str,
           ctx: Context, *, strict: bool) -> Refusal | None:
    for key, value in doc.items():
        name = f"{prefix}{key}"
        p = rows.get(name)
        if p is None:
            if not strict:
                continue
            return Refusal(name, f"The parameter {name} is not supported by this region: "
                                 f"{op} has no such parameter.")
        if value is None:  # a JSON null is an absent member
            continue
        if p.rule == REFUSED:
            return _not_supported(name, p.why)
        if p.rule == DEFAULT_ONLY:
            assert p.is_default is not None
            if not p.is_default(value, ctx):
                return _not_supported(name, p.why)
            continue
        if isinstance(value, Mapping) and any(k.startswith(f"{name}.") for k in rows):
            found = _check(rows, f"{name}.", value, op, ctx, strict=True)
            if found is not None:
                return found
    return None


def refusal(table: Mapping[str, Mapping[str, Param]], op: str, body: Mapping[str, Any], *,
            query: Mapping[str, list[str]] | None = None,
            headers: Mapping[str, str] | None = None,
            ctx: Context | None = None, strict_body: bool = True) -> Refusal | None:
    """The first parameter of ``op``'s request that the region refuses, or None.

    ``body`` is the decoded JSON body (the members of location body); ``query`` and
    ``headers`` the request's, of which only the rows' wire names are looked at. An
    operation without a row set is not judged here.
    """
    rows = table.get(op)
    if rows is None:
        return None
    ctx = ctx or {}
    body_rows = {k: p for k, p in rows.items() if p.where == "body"}
    found = _check(body_rows, "", body, op, ctx, strict=strict_body)
    if found is not None:
        return found
    for name, p in rows.items():
        if p.rule == HONOURED or ":" not in p.where:
            continue
        kind, _, wire = p.where.partition(":")
        present = (kind == "query" and query is not None and wire in query) or (
            kind == "header" and headers is not None and wire in headers)
        if present:
            return _not_supported(name, p.why)
    return None
