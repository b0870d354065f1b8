"""EC2's query protocol for the volume API (core/ec2_query.py): the operation tables name
exactly the members of botocore's ``ec2`` input shapes (by the names its serializer writes),
requests botocore serializes parse back, and answers parse with botocore's own parser, every
element a ``locationName`` of the output shape."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import botocore.session
import pytest
from botocore import parsers, serialize

from cellcloud.control.ec2 import form_pairs
from cellcloud.core import ec2_query as q
from cellcloud.core import ec2_volumes as vols

EC2 = botocore.session.get_session().get_service_model("ec2")


def _query_name(member: str, shape: Any) -> str:
    """The name botocore's ec2 serializer writes a member under."""
    s = shape.serialization
    if "queryName" in s:
        return str(s["queryName"])
    if "name" in s:
        return str(s["name"][0].upper() + s["name"][1:])
    return member


def _table(shape: Any) -> Any:
    if shape.type_name == "list":
        return q.ListOf(_table(shape.member))
    if shape.type_name == "structure":
        return q.Struct({_query_name(n, s): _table(s) for n, s in shape.members.items()})
    return {"integer": q.INT, "long": q.INT, "boolean": q.BOOL}.get(shape.type_name, q.STR)


def _agree(ours: Any, model: Any, path: str) -> None:
    """Our table against the model's: same names everywhere, same types where served."""
    if ours == q.REFUSED:
        return
    if isinstance(model, q.Struct):
        assert isinstance(ours, q.Struct), path
        assert set(ours.members) == set(model.members), path
        for k in ours.members:
            _agree(ours.members[k], model.members[k], f"{path}.{k}")
    elif isinstance(model, q.ListOf):
        assert isinstance(ours, q.ListOf), path
        _agree(ours.item, model.item, path + ".N")
    else:
        assert ours == model, path


@pytest.mark.parametrize("op", sorted(q.OPERATIONS))
def test_tables_name_every_member_of_the_model(op: str) -> None:
    model = _table(EC2.operation_model(op).input_shape)
    _agree(q.Struct(q.OPERATIONS[op]), model, op)


def _form(op: str, params: dict[str, Any]) -> bytes:
    r = serialize.create_serializer("ec2").serialize_to_request(params, EC2.operation_model(op))
    return urlencode(r["body"]).encode()


def _parse_form(form: bytes, list_items_max: int = 10) -> q.Request:
    return q.parse_request(form_pairs(form, "", 100), list_items_max=list_items_max)


def test_a_botocore_request_parses_back() -> None:
    req = _parse_form(_form("CreateVolume", {
        "AvailabilityZone": "cc-local-1a", "Size": 8, "VolumeType": "gp3", "DryRun": True,
        "TagSpecifications": [{"ResourceType": "volume", "Tags": [
            {"Key": "a", "Value": "1"}, {"Key": "b", "Value": ""}]}]}))
    assert req.action == "CreateVolume"
    assert req.params == {"AvailabilityZone": "cc-local-1a", "Size": 8, "VolumeType": "gp3",
                          "DryRun": True, "TagSpecification": [{"ResourceType": "volume", "Tag": [
                              {"Key": "a", "Value": "1"}, {"Key": "b", "Value": ""}]}]}
    # eleven items: numbered 1..11 come back in numeric order, not string order
    ids = [f"vol-{i:017x}" for i in range(11)]
    req = _parse_form(_form("DescribeVolumes", {"VolumeIds": ids}), list_items_max=20)
    assert req.params == {"VolumeId": ids}


@pytest.mark.parametrize("form,code", [
    (b"Version=2016-11-15", "MissingAction"),
    (b"Action=DescribeVolumes", "MissingParameter"),
    (b"Action=DescribeVolumes&Version=2014-01-01", "InvalidParameterValue"),
    (b"Action=RunInstances&Version=2016-11-15", "UnsupportedOperation"),
    (b"Action=DescribeVolumes&Version=2016-11-15&Bogus=1", "UnknownParameter"),
    (b"Action=DescribeVolumes&Version=2016-11-15&VolumeId.x=1", "UnknownParameter"),
    (b"Action=DescribeVolumes&Version=2016-11-15&VolumeId.0=1", "UnknownParameter"),
    (b"Action=DescribeVolumes&Version=2016-11-15&Filter.1.Nam=x", "UnknownParameter"),
    (b"Action=DescribeVolumes&Version=2016-11-15&MaxResults=ten", "InvalidParameterValue"),
    (b"Action=DescribeVolumes&Version=2016-11-15&DryRun=yes", "InvalidParameterValue"),
    (b"Action=DescribeVolumes&Version=2016-11-15&MaxResults=5&MaxResults=6",
     "InvalidParameterValue"),
    (b"Action=DescribeVolumes&Version=2016-11-15&MaxResults=5&MaxResults.1=6",
     "UnknownParameter"),
    (b"Action=CreateVolume&Version=2016-11-15&Iops=3000", "InvalidParameterValue"),
    (b"Action=CreateVolume&Version=2016-11-15&Throughput=125", "InvalidParameterValue"),
    (b"Action=DescribeVolumes&Version=2016-11-15&" + b"&".join(
        b"VolumeId.%d=x" % i for i in range(1, 12)), "InvalidParameterValue"),
    (b"\xff\xfe", "InvalidParameterValue"),
])
def test_bad_forms(form: bytes, code: str) -> None:
    with pytest.raises(q.Ec2Error) as e:
        _parse_form(form)
    assert e.value.code == code, e.value.message


def _locations(shape: Any) -> dict[str, Any]:
    return {s.serialization.get("name", n): s for n, s in shape.members.items()}


def _check_names(el: ET.Element, shape: Any, path: str) -> None:
    """Every element of an answer is a locationName of its shape (recursively)."""
    if shape.type_name == "list":
        for item in el:
            assert item.tag.endswith("item"), path
            _check_names(item, shape.member, path + ".item")
        return
    if shape.type_name != "structure":
        return
    names = _locations(shape)
    for child in el:
        tag = child.tag.split("}")[-1]
        if not path and tag == "requestId":  # EC2's response metadata, on every answer
            continue
        assert tag in names, f"{path}.{tag} is not in botocore's {shape.name}"
        _check_names(child, names[tag], f"{path}.{tag}")


def _parse(op: str, body: bytes, status: int = 200) -> dict[str, Any]:
    out: dict[str, Any] = parsers.create_parser("ec2").parse(
        {"status_code": status, "headers": {}, "body": body},
        EC2.operation_model(op).output_shape)
    return out


def test_a_volume_answer_reads_as_botocore_reads_it() -> None:
    rec = {"id": "vol-0123456789abcdef0", "size_gib": 8, "type": "gp3", "zone": "r-1a",
           "state": "in-use", "created_ms": 1_800_000_000_123, "tags": [{"Key": "k", "Value": "v"}],
           "attach_epoch": 3, "attachment": {"target": "task/abc", "attach_epoch": 3,
                                             "attached_ms": 1_800_000_000_500}}
    doc = vols.volume_doc(rec, "111122223333", "r-1")
    body = q.response_xml("DescribeVolumes", "rid-1", {"volumeSet": [doc]})
    root = ET.fromstring(body)
    assert root.tag == f"{{{q.NAMESPACE}}}DescribeVolumesResponse"
    _check_names(root, EC2.operation_model("DescribeVolumes").output_shape, "")
    v = _parse("DescribeVolumes", body)["Volumes"][0]
    assert (v["VolumeId"], v["Size"], v["VolumeType"], v["State"], v["Encrypted"]) \
        == ("vol-0123456789abcdef0", 8, "gp3", "in-use", False)
    assert v["CreateTime"].isoformat() == "2027-01-15T08:00:00.123000+00:00"
    assert v["Tags"] == [{"Key": "k", "Value": "v"}]
    assert v["Attachments"][0]["InstanceId"] == "task/abc"
    assert v["Attachments"][0]["State"] == "attached"
    single = q.response_xml("CreateVolume", "rid-2", doc)
    _check_names(ET.fromstring(single), EC2.operation_model("CreateVolume").output_shape, "")
    assert _parse("CreateVolume", single)["VolumeId"] == "vol-0123456789abcdef0"


def test_an_error_reads_as_botocore_reads_it() -> None:
    body = q.error_xml("InvalidVolume.NotFound", "The volume 'vol-1' does not exist.", "r-9")
    err = _parse("DescribeVolumes", body, 400)["Error"]
    assert err == {"Code": "InvalidVolume.NotFound",
                   "Message": "The volume 'vol-1' does not exist."}


def test_filter_wildcards() -> None:
    from cellcloud.core.limits import DEFAULT_LIMITS
    fs = vols.parse_filters({"Filter": [{"Name": "tag:team", "Value": ["we?-*", "a\\*b"]}]},
                            vols.VOLUME_FILTERS, DEFAULT_LIMITS)
    assert fs[0].matches(["web-1"]) and fs[0].matches(["a*b"])
    assert not fs[0].matches(["a-b"]) and not fs[0].matches(["xweb-1"])
    with pytest.raises(q.Ec2Error, match="filter 'owner-id' is invalid"):
        vols.parse_filters({"Filter": [{"Name": "owner-id", "Value": ["x"]}]},
                           vols.VOLUME_FILTERS, DEFAULT_LIMITS)
