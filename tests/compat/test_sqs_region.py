"""SQS through a real region's router: the JSON protocol (boto3, the AWS CLI) and the query
protocol (signed Action= forms), both reaching the tenant's cell."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.integration.conftest import Region
from tests.queues.query_client import QueryClient, QueryError, all_of, text

from .conftest import new_name

pytestmark = pytest.mark.integration


def _sqs(region: Region) -> Any:
    return boto3.client(
        "sqs", endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
        aws_access_key_id=str(region.doc["access_key_id"]),
        aws_secret_access_key=str(region.doc["secret_access_key"]),
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=60))


def test_both_protocols_through_the_router(region: Region) -> None:
    sqs = _sqs(region)
    name = new_name("q")
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    r = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"e{i}", "MessageBody": f"m{i}"} for i in range(3)])
    assert len(r["Successful"]) == 3
    q = QueryClient(region.endpoint, str(region.doc["region"]),
                    str(region.doc["access_key_id"]), str(region.doc["secret_access_key"]))
    got = all_of(q.call("ReceiveMessage", QueueUrl=url, MaxNumberOfMessages=10), "Message")
    assert sorted(text(m, "Body") for m in got) == ["m0", "m1", "m2"]
    r2 = q.call("DeleteMessageBatch", QueueUrl=url, **{
        f"DeleteMessageBatchRequestEntry.{i + 1}.{k}": v for i, m in enumerate(got)
        for k, v in (("Id", f"d{i}"), ("ReceiptHandle", text(m, "ReceiptHandle")))})
    assert len(all_of(r2, "DeleteMessageBatchResultEntry")) == 3
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert a["ApproximateNumberOfMessages"] == a["ApproximateNumberOfMessagesNotVisible"] == "0"
    bad = QueryClient(region.endpoint, str(region.doc["region"]),
                      str(region.doc["access_key_id"]), "not-the-secret")
    with pytest.raises(QueryError) as e:
        bad.call("ListQueues")
    assert (e.value.status, e.value.code) == (403, "SignatureDoesNotMatch")


def test_aws_cli_sqs(region: Region, tmp_path: pathlib.Path) -> None:
    exports = subprocess.run([sys.executable, "-m", "cellcloud", "env", "--state-dir",
                              region.state_dir], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    name = new_name("cliq")
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    script = f"""
set -e
eval "$1"
url=$({aws} sqs create-queue --queue-name {name} --query QueueUrl --output text)
{aws} sqs send-message-batch --queue-url "$url" \
    --entries Id=a,MessageBody=one Id=b,MessageBody=two > {tmp_path}/batch.json
{aws} sqs tag-queue --queue-url "$url" --tags env=dev
{aws} sqs list-queue-tags --queue-url "$url" > {tmp_path}/tags.json
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)
    subprocess.run(["bash", "-c", script, "bash", exports], check=True, timeout=120, env=env)
    assert len(json.loads((tmp_path / "batch.json").read_text())["Successful"]) == 2
    assert json.loads((tmp_path / "tags.json").read_text())["Tags"] == {"env": "dev"}
