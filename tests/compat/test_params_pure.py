"""core/params.py on its own: the table's rules without a region."""

from __future__ import annotations

from cellcloud.core import params
from cellcloud.core.params import LAMBDA, SQS, refusal


def test_default_only_accepts_exactly_the_default() -> None:
    ctx = {"function_name": "f"}
    ok = {"LoggingConfig": {"LogFormat": "Text", "LogGroup": "/aws/lambda/f"},
          "TracingConfig": {"Mode": "PassThrough"}, "VpcConfig": {"SubnetIds": []},
          "KMSKeyArn": "", "FileSystemConfigs": [], "ImageConfig": {}}
    assert refusal(LAMBDA, "UpdateFunctionConfiguration", ok, ctx=ctx) is None
    for body, name in [
        ({"LoggingConfig": {"LogGroup": "/aws/lambda/g", "Colour": 1}}, "LoggingConfig.Colour"),
        ({"TracingConfig": {"Mode": "Active"}}, "TracingConfig.Mode"),
        ({"VpcConfig": {"Ipv6AllowedForDualStack": True}}, "VpcConfig.Ipv6AllowedForDualStack"),
        ({"DeadLetterConfig": {"TargetArn": "arn:aws:sqs:r:1:q", "X": 1}}, "DeadLetterConfig.X"),
        ({"TracingConfig": {"Mode": "PassThrough", "Extra": 1}}, "TracingConfig.Extra"),
        ({"Colour": "red"}, "Colour"),
    ]:
        found = refusal(LAMBDA, "UpdateFunctionConfiguration", body, ctx=ctx)
        assert found is not None and found.name == name and name in found.message


def test_null_is_an_absent_member_and_headers_and_queries_are_judged() -> None:
    assert refusal(LAMBDA, "CreateFunction", {"KMSKeyArn": None}) is None
    found = refusal(LAMBDA, "Invoke", {}, headers={"x-amz-tenant-id": "t"})
    assert found is not None and found.name == "TenantId"
    assert refusal(LAMBDA, "Invoke", {}, headers={"x-amz-log-type": "Tail"}) is None
    found = refusal(LAMBDA, "ListFunctions", {}, query={"MasterRegion": ["us-east-1"]})
    assert found is not None and found.name == "MasterRegion"
    assert refusal(LAMBDA, "GetAccountSettings", {"Anything": 1}) is None  # not judged here


def test_sqs_rows() -> None:
    ctx = {"account": "111111111111"}
    assert refusal(SQS, "GetQueueUrl", {"QueueName": "q",
                                        "QueueOwnerAWSAccountId": "111111111111"}, ctx=ctx) is None
    found = refusal(SQS, "GetQueueUrl", {"QueueOwnerAWSAccountId": "222222222222"}, ctx=ctx)
    assert found is not None and found.name == "QueueOwnerAWSAccountId"
    found = refusal(SQS, "CreateQueue", {"Attributes": {"KmsMasterKeyId": "alias/k"}})
    assert found is not None and found.name == "Attributes.KmsMasterKeyId"
    assert refusal(SQS, "CreateQueue", {"Attributes": {"FifoQueue": "true"}}) is None


def test_every_row_is_well_formed() -> None:
    for table in (LAMBDA, SQS):
        for rows in table.values():
            for p in rows.values():
                assert p.rule in (params.HONOURED, params.REFUSED, params.DEFAULT_ONLY)
