"""The control plane's EC2 volume API (control/ec2.py) in-process, over a real SQLite
configuration store, spoken to as boto3 speaks: botocore's ``ec2`` serializer writes each
request and its parser reads each answer. Volumes, filters and pages, tags, sizes and types out
of range, attachment (exclusive, epochs), tenant isolation, unknown members."""

from __future__ import annotations

import asyncio
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import botocore.session
import pytest
from botocore import parsers, serialize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellcloud.control.configstore import SqliteConfigStore
from cellcloud.control.ec2 import VOLUMES, Ec2
from cellcloud.volumes.blockdev import FileBlockStore, snapshot_file, volume_file

A, B = "111122223333", "444455556666"
REGION = "cc-local-1"
ZONE = f"{REGION}a"
EC2 = botocore.session.get_session().get_service_model("ec2")


class Api:
    """One event loop for the test (snapshot and restore copies run on it between calls)."""

    def __init__(self, store: SqliteConfigStore, data_dir: str | None = None) -> None:
        self.store = store
        self.now = 1_800_000_000_000
        self.ec2 = Ec2(store, REGION, clock=lambda: self.now, data_dir=data_dir)
        self.loop = asyncio.new_event_loop()

    def raw(self, body: bytes, account: str = A) -> dict[str, Any]:
        out: dict[str, Any] = self.loop.run_until_complete(
            self.ec2.op({"b": body, "q": "", "a": account}))
        return out

    def wait_copies(self) -> None:
        self.loop.run_until_complete(self.ec2.wait_copies())

    def close(self) -> None:
        self.wait_copies()
        self.loop.close()

    def __call__(self, op: str, params: dict[str, Any] | None = None, account: str = A
                 ) -> tuple[int, dict[str, Any]]:
        model = EC2.operation_model(op)
        req = serialize.create_serializer("ec2").serialize_to_request(params or {}, model)
        r = self.raw(urlencode(req["body"]).encode(), account)
        assert r["h"]["content-type"].startswith("text/xml")
        out = parsers.create_parser("ec2").parse(
            {"status_code": r["s"], "headers": r["h"], "body": r["b"]}, model.output_shape)
        return r["s"], out

    def ok(self, op: str, params: dict[str, Any] | None = None, account: str = A
           ) -> dict[str, Any]:
        status, out = self(op, params, account)
        assert status == 200, out
        return out

    def err(self, op: str, params: dict[str, Any] | None = None, account: str = A
            ) -> tuple[str, str]:
        status, out = self(op, params, account)
        assert status >= 400, out
        return out["Error"]["Code"], out["Error"]["Message"]

    def create(self, size: int = 8, account: str = A, **extra: Any) -> dict[str, Any]:
        return self.ok("CreateVolume", {"AvailabilityZone": ZONE, "Size": size, **extra},
                       account)

    def attach(self, volume_id: str, target: str = "task/t1", account: str = A
               ) -> dict[str, Any]:
        out: dict[str, Any] = asyncio.run(self.ec2.attach(account, volume_id, target))
        return out


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(SqliteConfigStore(str(tmp_path / "config.db")), str(tmp_path / "volumes"))
    yield a
    a.close()


def test_create_describe_delete(api: Api) -> None:
    v = api.create(8, VolumeType="gp3", TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "team", "Value": "web"}]}])
    assert re.fullmatch(r"vol-[0-9a-f]{17}", v["VolumeId"])
    assert (v["Size"], v["VolumeType"], v["AvailabilityZone"], v["State"], v["Encrypted"]) \
        == (8, "gp3", ZONE, "available", False)
    assert v["Tags"] == [{"Key": "team", "Value": "web"}]
    assert "Iops" not in v and "Throughput" not in v  # nothing is provisioned, nothing echoed
    d = api.ok("DescribeVolumes", {"VolumeIds": [v["VolumeId"]]})["Volumes"]
    assert [x["VolumeId"] for x in d] == [v["VolumeId"]] and d[0]["Size"] == 8
    assert api.create(1)["VolumeType"] == "gp2"  # EC2's default type
    assert len(api.ok("DescribeVolumes")["Volumes"]) == 2
    api.ok("DeleteVolume", {"VolumeId": v["VolumeId"]})
    assert api.err("DescribeVolumes", {"VolumeIds": [v["VolumeId"]]})[0] \
        == "InvalidVolume.NotFound"
    assert api.err("DeleteVolume", {"VolumeId": v["VolumeId"]})[0] == "InvalidVolume.NotFound"
    assert api.err("DeleteVolume", {"VolumeId": "vol-nope"})[0] == "InvalidVolumeID.Malformed"
    assert len(api.ok("DescribeVolumes")["Volumes"]) == 1


@pytest.mark.parametrize("params,code", [
    ({"Size": 0}, "InvalidParameterValue"),
    ({"Size": -1}, "InvalidParameterValue"),
    ({"Size": 16_385}, "InvalidParameterValue"),
    ({"Size": 1_025, "VolumeType": "standard"}, "InvalidParameterValue"),
    ({"Size": 100, "VolumeType": "st1"}, "InvalidParameterValue"),
    ({"Size": 10, "VolumeType": "io2"}, "InvalidParameterValue"),
    ({"Size": 10, "VolumeType": "gp3", "Iops": 3000}, "InvalidParameterValue"),
    ({"Size": 10, "VolumeType": "gp3", "Throughput": 125}, "InvalidParameterValue"),
    ({"Size": 10, "Encrypted": True}, "InvalidParameterValue"),
    ({"Size": 10, "MultiAttachEnabled": True}, "InvalidParameterValue"),
    ({"Size": 10, "SnapshotId": "snap-0123456789abcdef0"}, "InvalidSnapshot.NotFound"),
    ({"Size": 10, "SnapshotId": "snap-x"}, "InvalidSnapshotID.Malformed"),
    ({"Size": 10, "AvailabilityZone": "us-east-1a"}, "InvalidParameterValue"),
    ({"Size": 10, "AvailabilityZone": None}, "MissingParameter"),
    ({}, "MissingParameter"),
    ({"Size": 10, "TagSpecifications": [{"ResourceType": "instance", "Tags": [
        {"Key": "a", "Value": "b"}]}]}, "InvalidParameterValue"),
    ({"Size": 10, "TagSpecifications": [{"ResourceType": "volume", "Tags": [
        {"Key": f"k{i}", "Value": "v"} for i in range(51)]}]}, "TagLimitExceeded"),
    ({"Size": 10, "TagSpecifications": [{"ResourceType": "volume", "Tags": [
        {"Key": "aws:x", "Value": "v"}]}]}, "InvalidParameterValue"),
    ({"Size": 10, "DryRun": True}, "DryRunOperation"),
])
def test_create_refusals(api: Api, params: dict[str, Any], code: str) -> None:
    p = {"AvailabilityZone": ZONE, **params}
    p = {k: v for k, v in p.items() if v is not None}
    assert api.err("CreateVolume", p)[0] == code
    assert api.ok("DescribeVolumes")["Volumes"] == []  # nothing was made


def test_sizes_at_the_edges_and_zone_id(api: Api) -> None:
    assert api.create(16_384)["Size"] == 16_384
    assert api.create(125, VolumeType="sc1")["VolumeType"] == "sc1"
    v = api.ok("CreateVolume", {"AvailabilityZoneId": f"{REGION}-az1", "Size": 1})
    assert v["AvailabilityZone"] == ZONE
    zones = api.ok("DescribeAvailabilityZones")["AvailabilityZones"]
    assert [(z["ZoneName"], z["ZoneId"], z["State"]) for z in zones] \
        == [(ZONE, f"{REGION}-az1", "available")]


def test_unknown_members_and_operations(api: Api) -> None:
    r = api.raw(b"Action=DescribeVolumes&Version=2016-11-15&Colour=blue")
    assert r["s"] == 400 and b"<Code>UnknownParameter</Code>" in r["b"]
    assert b"Colour" in r["b"] and b"<RequestID>" in r["b"]
    r = api.raw(b"Action=RunInstances&Version=2016-11-15&ImageId=ami-1")
    assert r["s"] == 400 and b"<Code>UnsupportedOperation</Code>" in r["b"]


def test_filters_and_pages(api: Api) -> None:
    made = [api.create(size, TagSpecifications=[{"ResourceType": "volume", "Tags": [
        {"Key": "team", "Value": "web" if size % 2 else "db"}]}])["VolumeId"]
        for size in range(1, 13)]
    def ids(**p: Any) -> list[str]:
        return sorted(v["VolumeId"] for v in api.ok("DescribeVolumes", p)["Volumes"])
    assert ids(Filters=[{"Name": "tag:team", "Values": ["web"]}]) \
        == sorted(made[0::2])
    assert ids(Filters=[{"Name": "tag:team", "Values": ["w*"]},
                        {"Name": "size", "Values": ["1", "3", "4"]}]) == sorted(made[0:3:2])
    assert ids(Filters=[{"Name": "volume-id", "Values": [made[5]]}]) == [made[5]]
    assert ids(Filters=[{"Name": "status", "Values": ["in-use"]}]) == []
    assert ids(Filters=[{"Name": "availability-zone", "Values": [ZONE]}]) == sorted(made)
    assert ids(Filters=[{"Name": "tag-key", "Values": ["nope"]}]) == []
    assert api.err("DescribeVolumes", {"Filters": [{"Name": "colour", "Values": ["x"]}]})[0] \
        == "InvalidParameterValue"
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        p: dict[str, Any] = {"MaxResults": 5, **({"NextToken": token} if token else {})}
        out = api.ok("DescribeVolumes", p)
        seen += [v["VolumeId"] for v in out["Volumes"]]
        pages += 1
        token = out.get("NextToken")
        if not token:
            break
    assert pages == 3 and sorted(seen) == sorted(made) and len(seen) == len(set(seen))
    assert api.err("DescribeVolumes", {"MaxResults": 4})[0] == "InvalidParameterValue"
    assert api.err("DescribeVolumes", {"MaxResults": 5, "VolumeIds": [made[0]]})[0] \
        == "InvalidParameterCombination"
    assert api.err("DescribeVolumes", {"NextToken": "garbage"})[0] == "InvalidPaginationToken"


def test_tenants_are_isolated(api: Api) -> None:
    mine = api.create(4)["VolumeId"]
    theirs = api.create(5, account=B)["VolumeId"]
    assert [v["VolumeId"] for v in api.ok("DescribeVolumes")["Volumes"]] == [mine]
    for op, p in [("DescribeVolumes", {"VolumeIds": [theirs]}),
                  ("DeleteVolume", {"VolumeId": theirs}),
                  ("CreateTags", {"Resources": [theirs], "Tags": [{"Key": "a", "Value": "b"}]})]:
        assert api.err(op, p)[0] == "InvalidVolume.NotFound", op
    assert api.ok("DescribeTags", {})["Tags"] == []
    assert api.ok("DescribeVolumes", account=B)["Volumes"][0]["VolumeId"] == theirs


def test_an_attached_volume_is_not_deleted_and_attachment_is_exclusive(api: Api) -> None:
    vid = api.create(2)["VolumeId"]
    rec = api.attach(vid, "task/one")
    assert rec["attach_epoch"] == 1 and rec["state"] == "in-use"
    v = api.ok("DescribeVolumes", {"VolumeIds": [vid]})["Volumes"][0]
    assert v["State"] == "in-use" and v["Attachments"][0]["InstanceId"] == "task/one"
    assert api.err("DeleteVolume", {"VolumeId": vid}) == (
        "VolumeInUse", f"Volume {vid} is currently attached to task/one")
    with pytest.raises(Exception, match="already attached"):
        api.attach(vid, "task/two")
    with pytest.raises(Exception, match="epoch 1, not 7"):  # a stale detach changes nothing
        asyncio.run(api.ec2.detach(A, vid, 7))
    asyncio.run(api.ec2.detach(A, vid, 1))
    assert api.attach(vid, "task/two")["attach_epoch"] == 2  # epochs only grow
    asyncio.run(api.ec2.detach(A, vid, 2))
    api.ok("DeleteVolume", {"VolumeId": vid})
    with pytest.raises(Exception, match="does not exist"):
        api.attach(vid, "task/three", account=A)


def test_a_delete_in_progress_refuses_an_attach(api: Api) -> None:
    """The delete's first step (the record says "deleting") makes an attach lose, so a
    volume is never deleted under a writer."""
    vid = api.create(2)["VolumeId"]
    key = f"{VOLUMES}{A}/{vid}"
    e = asyncio.run(api.store.get(key))
    assert e is not None
    asyncio.run(api.store.put(key, e.value.replace(b'"available"', b'"deleting"')))
    with pytest.raises(Exception, match="is deleting, not available"):
        api.attach(vid)


def test_tags(api: Api) -> None:
    a, b = api.create(1)["VolumeId"], api.create(2)["VolumeId"]
    api.ok("CreateTags", {"Resources": [a, b], "Tags": [{"Key": "env", "Value": "prod"},
                                                        {"Key": "team", "Value": "web"}]})
    api.ok("CreateTags", {"Resources": [b], "Tags": [{"Key": "env", "Value": "dev"}]})
    tags = api.ok("DescribeTags", {"Filters": [{"Name": "key", "Values": ["env"]}]})["Tags"]
    assert sorted((t["ResourceId"], t["Value"]) for t in tags) == sorted([(a, "prod"),
                                                                         (b, "dev")])
    assert all(t["ResourceType"] == "volume" for t in tags)
    api.ok("DeleteTags", {"Resources": [a, b], "Tags": [{"Key": "env", "Value": "dev"}]})
    left = {(t["ResourceId"], t["Key"]) for t in api.ok("DescribeTags")["Tags"]}
    assert left == {(a, "env"), (a, "team"), (b, "team")}  # only b's env=dev went
    api.ok("DeleteTags", {"Resources": [a]})  # no Tag member: all of a's
    assert {t["ResourceId"] for t in api.ok("DescribeTags")["Tags"]} == {b}
    assert api.err("CreateTags", {"Resources": ["i-0123456789abcdef0"],
                                  "Tags": [{"Key": "a", "Value": "b"}]})[0] == "InvalidID"
    missing = "vol-0000000000000000f"
    assert api.err("CreateTags", {"Resources": [a, missing],
                                  "Tags": [{"Key": "x", "Value": "y"}]})[0] \
        == "InvalidVolume.NotFound"
    assert api.ok("DescribeVolumes", {"VolumeIds": [a]})["Volumes"][0].get("Tags") is None


def test_client_token_makes_create_idempotent(api: Api) -> None:
    one = api.create(3, ClientToken="tok-1")
    again = api.create(3, ClientToken="tok-1")
    assert again["VolumeId"] == one["VolumeId"]
    assert len(api.ok("DescribeVolumes")["Volumes"]) == 1
    assert api.err("CreateVolume", {"AvailabilityZone": ZONE, "Size": 4,
                                    "ClientToken": "tok-1"})[0] == "IdempotentParameterMismatch"
    # deleted, the token goes with it: the same request makes a new volume, never the old id
    api.ok("DeleteVolume", {"VolumeId": one["VolumeId"]})
    later = api.create(3, ClientToken="tok-1")
    assert later["VolumeId"] != one["VolumeId"]
    assert [v["VolumeId"] for v in api.ok("DescribeVolumes")["Volumes"]] == [later["VolumeId"]]
    assert [e.key for e in asyncio.run(api.store.list(f"cellcloud/ec2/client-tokens/{A}/"))] \
        == [f"cellcloud/ec2/client-tokens/{A}/tok-1"]


def test_volume_limit(tmp_path: Path) -> None:
    from dataclasses import replace

    from cellcloud.core.limits import DEFAULT_LIMITS
    api = Api(SqliteConfigStore(str(tmp_path / "c.db")))
    api.ec2.limits = replace(DEFAULT_LIMITS, ec2_volumes_per_tenant_max=2)
    api.create(1)
    api.create(1)
    assert api.err("CreateVolume", {"AvailabilityZone": ZONE, "Size": 1})[0] \
        == "VolumeLimitExceeded"
    api.create(1, account=B)  # per account


def test_every_answer_is_xml_botocore_can_read(api: Api) -> None:
    """A character XML cannot carry (a control character) in a tag is refused where it
    would be stored, and one echoed in an error message is replaced: before, one such tag made
    every later DescribeVolumes of the account unparseable."""
    code, message = api.err("CreateVolume", {
        "AvailabilityZone": ZONE, "Size": 1, "TagSpecifications": [
            {"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "a\x01b"}]}]})
    assert code == "InvalidParameterValue" and "control character" in message
    vid = api.create(1)["VolumeId"]
    assert api.err("CreateTags", {"Resources": [vid], "Tags": [{"Key": "\x1b[31m",
                                                                "Value": "v"}]})[0] \
        == "InvalidParameterValue"
    assert api.ok("DescribeVolumes")["Volumes"][0]["VolumeId"] == vid
    r = api.raw(b"Action=DescribeVolumes&Version=2016-11-15&Bad%00%01=1")
    assert r["s"] == 400
    root = ET.fromstring(r["b"])
    assert root.findtext("Errors/Error/Code") == "UnknownParameter"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(
    st.sampled_from(["Action", "Version", "Size", "AvailabilityZone", "VolumeId.1",
                     "Filter.1.Name", "Filter.1.Value.1", "TagSpecification.1.ResourceType",
                     "TagSpecification.1.Tag.1.Key", "TagSpecification.1.Tag.1.Value",
                     "MaxResults", "NextToken", "ResourceId.1", "Tag.1.Key", "Tag.1.Value"])
    | st.text(max_size=12), st.text(max_size=24)), max_size=8),
    action=st.sampled_from(["CreateVolume", "DescribeVolumes", "DeleteVolume", "CreateTags",
                            "DeleteTags", "DescribeTags", "DescribeAvailabilityZones"]))
def test_any_form_gets_a_parseable_answer(api: Api, pairs: list[tuple[str, str]],
                                          action: str) -> None:
    body = urlencode([("Action", action), ("Version", "2016-11-15"), *pairs]).encode()
    r = api.raw(body)
    assert r["s"] in (200, 400, 412), r
    root = ET.fromstring(r["b"])  # always XML, whatever came in
    if r["s"] != 200:
        assert root.tag == "Response" and root.findtext("Errors/Error/Code")
    assert api.ok("DescribeVolumes") is not None  # and the account stays readable


def _write_volume(api: Api, volume_id: str, writes: dict[int, bytes], account: str = A) -> None:
    """Bytes into the volume's FileBlockStore, as an attachment would have written them."""
    assert api.ec2.data_dir is not None
    path = volume_file(api.ec2.data_dir, account, volume_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    size = api.ok("DescribeVolumes", {"VolumeIds": [volume_id]}, account)["Volumes"][0]["Size"]

    async def run() -> None:
        s = FileBlockStore(path, size * 1024 ** 3)
        for off, data in writes.items():
            await s.write(off, data)
        s.close()

    asyncio.run(run())


def _read_volume(api: Api, volume_id: str, off: int, n: int) -> bytes:
    assert api.ec2.data_dir is not None
    with open(volume_file(api.ec2.data_dir, A, volume_id), "rb") as f:
        f.seek(off)
        return f.read(n)


def test_snapshot_and_a_volume_from_it(api: Api) -> None:
    vid = api.create(1)["VolumeId"]
    writes = {0: b"boot", 512 * 1024 * 1024: b"middle", 1024 ** 3 - 4: b"tail"}
    _write_volume(api, vid, writes)
    snap = api.ok("CreateSnapshot", {"VolumeId": vid, "Description": "nightly",
                                     "TagSpecifications": [{"ResourceType": "snapshot",
                                                            "Tags": [{"Key": "k",
                                                                      "Value": "v"}]}]})
    assert re.fullmatch(r"snap-[0-9a-f]{17}", snap["SnapshotId"])
    assert (snap["State"], snap["VolumeId"], snap["VolumeSize"], snap["Description"]) \
        == ("pending", vid, 1, "nightly")
    api.wait_copies()
    _write_volume(api, vid, {0: b"LATE"})  # after the point: not in the snapshot
    d = api.ok("DescribeSnapshots", {"OwnerIds": ["self"]})["Snapshots"]
    assert [(s["SnapshotId"], s["State"], s["Progress"]) for s in d] \
        == [(snap["SnapshotId"], "completed", "100%")]
    assert d[0]["Tags"] == [{"Key": "k", "Value": "v"}]
    assert api.ok("DescribeSnapshots", {"Filters": [{"Name": "volume-id", "Values": [vid]}]}
                  )["Snapshots"][0]["SnapshotId"] == snap["SnapshotId"]
    assert api.ok("DescribeSnapshots", {"OwnerIds": [B]})["Snapshots"] == []
    # tags on snapshots, as on volumes
    api.ok("CreateTags", {"Resources": [snap["SnapshotId"]], "Tags": [{"Key": "k2",
                                                                      "Value": "v2"}]})
    api.ok("DeleteTags", {"Resources": [snap["SnapshotId"]], "Tags": [{"Key": "k"}]})
    assert api.ok("DescribeTags", {"Filters": [{"Name": "resource-type",
                                                "Values": ["snapshot"]}]})["Tags"] \
        == [{"ResourceId": snap["SnapshotId"], "ResourceType": "snapshot", "Key": "k2",
             "Value": "v2"}]
    assert api.err("CreateTags", {"Resources": [snap["SnapshotId"]], "Tags": [
        {"Key": "x", "Value": "y"}]}, account=B)[0] == "InvalidSnapshot.NotFound"
    # a volume from it: the snapshot's size unless told, never smaller
    assert api.err("CreateVolume", {"AvailabilityZone": ZONE, "SnapshotId": snap["SnapshotId"],
                                    "Size": 0})[0] == "InvalidParameterValue"
    new = api.ok("CreateVolume", {"AvailabilityZone": ZONE, "SnapshotId": snap["SnapshotId"]})
    assert (new["Size"], new["SnapshotId"], new["State"]) == (1, snap["SnapshotId"], "creating")
    bigger = api.ok("CreateVolume", {"AvailabilityZone": ZONE,
                                     "SnapshotId": snap["SnapshotId"], "Size": 2})
    api.wait_copies()
    for v in (new, bigger):
        got = api.ok("DescribeVolumes", {"VolumeIds": [v["VolumeId"]]})["Volumes"][0]
        assert got["State"] == "available"
        for off, data in writes.items():
            assert _read_volume(api, v["VolumeId"], off, len(data)) == data
    assert os.path.getsize(volume_file(str(api.ec2.data_dir), A, bigger["VolumeId"])) \
        == 2 * 1024 ** 3
    assert _read_volume(api, vid, 0, 4) == b"LATE"
    # deleting the snapshot leaves the volumes made from it
    api.ok("DeleteSnapshot", {"SnapshotId": snap["SnapshotId"]})
    assert api.err("DescribeSnapshots", {"SnapshotIds": [snap["SnapshotId"]]})[0] \
        == "InvalidSnapshot.NotFound"
    assert not os.path.exists(snapshot_file(str(api.ec2.data_dir), A, snap["SnapshotId"]))
    assert _read_volume(api, new["VolumeId"], 0, 4) == b"boot"
    # deleting a volume removes its bytes
    api.ok("DeleteVolume", {"VolumeId": new["VolumeId"]})
    assert not os.path.exists(volume_file(str(api.ec2.data_dir), A, new["VolumeId"]))


def test_snapshot_refusals(api: Api, tmp_path: Path) -> None:
    vid = api.create(1)["VolumeId"]
    assert api.err("CreateSnapshot", {"VolumeId": "vol-0000000000000000f"})[0] \
        == "InvalidVolume.NotFound"
    assert api.err("CreateSnapshot", {"VolumeId": vid}, account=B)[0] \
        == "InvalidVolume.NotFound"
    assert api.err("CreateSnapshot", {"VolumeId": vid, "TagSpecifications": [
        {"ResourceType": "volume", "Tags": [{"Key": "a", "Value": "b"}]}]})[0] \
        == "InvalidParameterValue"
    assert api.err("CreateSnapshot", {"VolumeId": vid, "Location": "local"})[0] \
        == "InvalidParameterValue"
    assert api.err("CreateSnapshot", {"VolumeId": vid, "DryRun": True})[0] == "DryRunOperation"
    rec = api.attach(vid)
    code, message = api.err("CreateSnapshot", {"VolumeId": vid})
    assert code == "IncorrectState" and "detached volumes only" in message
    asyncio.run(api.ec2.detach(A, vid, rec["attach_epoch"]))
    # the volume's store held by a writer the record does not know: refused at the call
    _write_volume(api, vid, {0: b"x"})
    assert api.ec2.data_dir is not None
    holder = FileBlockStore(volume_file(api.ec2.data_dir, A, vid), 1024 ** 3)
    try:
        code, message = api.err("CreateSnapshot", {"VolumeId": vid})
        assert code == "IncorrectState" and "held by a writer" in message
    finally:
        holder.close()
    assert api.ok("DescribeSnapshots")["Snapshots"] == []
    # the point of a snapshot is its call: the volume deleted right after changes nothing,
    # and two snapshots of one volume may be taken at once
    sid = api.ok("CreateSnapshot", {"VolumeId": vid})["SnapshotId"]
    sid2 = api.ok("CreateSnapshot", {"VolumeId": vid})["SnapshotId"]
    api.ok("DeleteVolume", {"VolumeId": vid})
    api.wait_copies()
    for s in (sid, sid2):
        assert api.ok("DescribeSnapshots", {"SnapshotIds": [s]})["Snapshots"][0]["State"] \
            == "completed"
        with open(snapshot_file(api.ec2.data_dir, A, s), "rb") as f:
            assert f.read(1) == b"x"
    # a snapshot being made cannot be restored from yet (made pending by hand: deterministic)
    key = f"cellcloud/ec2/snapshots/{A}/{sid}"
    e = asyncio.run(api.store.get(key))
    assert e is not None
    asyncio.run(api.store.put(key, e.value.replace(b'"completed"', b'"pending"')))
    assert api.err("CreateVolume", {"AvailabilityZone": ZONE, "SnapshotId": sid})[0] \
        == "IncorrectState"
    assert api.err("DeleteSnapshot", {"SnapshotId": sid})[0] == "IncorrectState"
    other = Api(SqliteConfigStore(str(tmp_path / "no-data.db")))  # no data directory
    v2 = other.create(1)["VolumeId"]
    assert other.err("CreateSnapshot", {"VolumeId": v2})[0] == "UnsupportedOperation"
    other.close()


def test_concurrent_changes_lose_no_update(api: Api) -> None:
    """Every change is a compare-and-set on the volume's record: tags added at once by many
    requests all land (a request that keeps losing is Unavailable, 503, and nothing of it
    is half-written), and of two attaches at once exactly one wins."""
    vid = api.create(1)["VolumeId"]
    model = EC2.operation_model("CreateTags")

    def body(i: int) -> bytes:
        req = serialize.create_serializer("ec2").serialize_to_request(
            {"Resources": [vid], "Tags": [{"Key": f"k{i}", "Value": str(i)}]}, model)
        return urlencode(req["body"]).encode()

    async def all_at_once() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(api.ec2.op({"b": body(i), "q": "", "a": A})
                                           for i in range(12))))

    answers = api.loop.run_until_complete(all_at_once())
    landed = {f"k{i}" for i, r in enumerate(answers) if r["s"] == 200}
    assert all(r["s"] in (200, 503) for r in answers) and landed
    tags = api.ok("DescribeVolumes", {"VolumeIds": [vid]})["Volumes"][0]["Tags"]
    assert {t["Key"] for t in tags} == landed

    async def two_attaches() -> list[Any]:
        return list(await asyncio.gather(api.ec2.attach(A, vid, "task/a"),
                                         api.ec2.attach(A, vid, "task/b"),
                                         return_exceptions=True))

    won = [r for r in api.loop.run_until_complete(two_attaches()) if isinstance(r, dict)]
    assert len(won) == 1 and won[0]["attach_epoch"] == 1
