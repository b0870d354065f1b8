"""The EC2 API's volume subset (issue #19, control/ec2.py) against a real region (one for the
module), through boto3's ``ec2`` client and the AWS CLI, unmodified: create, describe with
filters and pages, tags, delete; sizes out of range, unknown members, another tenant's volume,
a refused signature — each a modelled EC2 error code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.conftest import Region, boto_client, create_tenant, running_region

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "ec2-api") as r:
        yield r




@pytest.fixture(scope="module")
def ec2(region: Region) -> Any:
    return boto_client(region, "ec2")


@pytest.fixture(scope="module")
def other(region: Region) -> Any:
    return boto_client(region, "ec2", create_tenant(region, "ec2-other"))


def _code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def test_volumes_through_boto3(ec2: Any, region: Region) -> None:
    zone = f"{region.doc['region']}a"
    zones = ec2.describe_availability_zones()["AvailabilityZones"]
    assert [z["ZoneName"] for z in zones] == [zone]
    v = ec2.create_volume(AvailabilityZone=zone, Size=10, VolumeType="gp3", TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "app", "Value": "db"}]}])
    assert v["State"] == "available" and v["Size"] == 10 and v["VolumeType"] == "gp3"
    vid = v["VolumeId"]
    ec2.get_waiter("volume_available").wait(VolumeIds=[vid])  # boto3's own waiter
    others = [ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"] for _ in range(6)]
    found = ec2.describe_volumes(Filters=[{"Name": "tag:app", "Values": ["d*"]}])["Volumes"]
    assert [x["VolumeId"] for x in found] == [vid]
    pages = ec2.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": 5})
    listed = [x["VolumeId"] for p in pages for x in p["Volumes"]]
    assert sorted(listed) == sorted([vid, *others])
    ec2.create_tags(Resources=[vid], Tags=[{"Key": "tier", "Value": "gold"}])
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [vid]}])["Tags"]
    assert sorted((t["Key"], t["Value"]) for t in tags) == [("app", "db"), ("tier", "gold")]
    ec2.delete_tags(Resources=[vid], Tags=[{"Key": "tier"}])
    for x in [vid, *others]:
        ec2.delete_volume(VolumeId=x)
    ec2.get_waiter("volume_deleted").wait(VolumeIds=[vid])
    with pytest.raises(ClientError) as e:
        ec2.describe_volumes(VolumeIds=[vid])
    assert _code(e) == "InvalidVolume.NotFound"


@pytest.mark.parametrize("kwargs,code", [
    ({"Size": 0}, "InvalidParameterValue"),
    ({"Size": 20_000}, "InvalidParameterValue"),
    ({"Size": 10, "VolumeType": "gp3", "Iops": 4000}, "InvalidParameterValue"),
    ({"Size": 10, "AvailabilityZone": "us-east-1a"}, "InvalidParameterValue"),
    ({"Size": 10, "DryRun": True}, "DryRunOperation"),
])
def test_bad_creates_are_modelled_errors(ec2: Any, region: Region, kwargs: dict[str, Any],
                                         code: str) -> None:
    with pytest.raises(ClientError) as e:
        ec2.create_volume(**{"AvailabilityZone": f"{region.doc['region']}a", **kwargs})
    assert _code(e) == code


def test_another_tenants_volume_is_not_found(ec2: Any, other: Any, region: Region) -> None:
    vid = ec2.create_volume(AvailabilityZone=f"{region.doc['region']}a", Size=1)["VolumeId"]
    for call in (lambda: other.describe_volumes(VolumeIds=[vid]),
                 lambda: other.delete_volume(VolumeId=vid)):
        with pytest.raises(ClientError) as e:
            call()
        assert _code(e) == "InvalidVolume.NotFound"
    assert other.describe_volumes()["Volumes"] == []
    ec2.delete_volume(VolumeId=vid)


def test_unsupported_operation_and_bad_signature(ec2: Any, region: Region) -> None:
    with pytest.raises(ClientError) as e:
        ec2.describe_instances()
    assert _code(e) == "UnsupportedOperation" and "DescribeInstances" in str(e.value)
    bad = boto_client(region, "ec2", {"aws_access_key_id": str(region.doc["access_key_id"]),
                                       "aws_secret_access_key": "not-the-secret"})
    with pytest.raises(ClientError) as e:
        bad.describe_volumes()
    assert _code(e) == "AuthFailure"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_aws_cli(region: Region, tmp_path: Any) -> None:
    exports = subprocess.run([sys.executable, "-m", "cellcloud", "env", "--state-dir",
                              region.state_dir], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    zone = f"{region.doc['region']}a"
    script = f"""set -e
eval "$1"
{aws} ec2 create-volume --availability-zone {zone} --size 3 > {tmp_path}/c.json
vid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["VolumeId"])' \
  {tmp_path}/c.json)
{aws} ec2 describe-volumes --volume-ids "$vid" > {tmp_path}/d.json
{aws} ec2 create-volume --availability-zone {zone} --size 0 2> {tmp_path}/err.txt && exit 9 \
  || true
{aws} ec2 delete-volume --volume-id "$vid"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)
    subprocess.run(["bash", "-c", script, "bash", exports], check=True, timeout=120, env=env)
    made = json.loads((tmp_path / "c.json").read_text())
    assert made["Size"] == 3 and made["AvailabilityZone"] == zone
    assert json.loads((tmp_path / "d.json").read_text())["Volumes"][0]["VolumeId"] \
        == made["VolumeId"]
    assert "InvalidParameterValue" in (tmp_path / "err.txt").read_text()


def test_an_oversized_request_is_refused_in_ec2s_xml(ec2: Any, region: Region) -> None:
    """Refused by the router from its declared length, before the body is read, and written
    as EC2 writes errors (botocore reads the code from the XML)."""
    def refused() -> int:
        return int(region.client.status()["router"]["counters"]["refused_before_body"])

    before = refused()
    with pytest.raises(ClientError) as e:
        ec2.describe_volumes(Filters=[{"Name": "tag:k", "Values": ["x" * 300_000]}])
    assert _code(e) == "RequestEntityTooLargeException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert refused() == before + 1


def test_snapshots_through_boto3(ec2: Any, region: Region) -> None:
    zone = f"{region.doc['region']}a"
    vid = ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]
    snap = ec2.create_snapshot(VolumeId=vid, Description="first")
    assert snap["State"] == "pending" and snap["VolumeSize"] == 1
    ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snap["SnapshotId"]],
                                              WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    restored = ec2.create_volume(AvailabilityZone=zone, SnapshotId=snap["SnapshotId"])
    assert restored["SnapshotId"] == snap["SnapshotId"] and restored["Size"] == 1
    ec2.get_waiter("volume_available").wait(VolumeIds=[restored["VolumeId"]],
                                            WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    listed = ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert [s["SnapshotId"] for s in listed] == [snap["SnapshotId"]]
    ec2.delete_snapshot(SnapshotId=snap["SnapshotId"])
    with pytest.raises(ClientError) as e:
        ec2.describe_snapshots(SnapshotIds=[snap["SnapshotId"]])
    assert _code(e) == "InvalidSnapshot.NotFound"
    for v in (vid, restored["VolumeId"]):
        ec2.delete_volume(VolumeId=v)
