"""EC2's query protocol (``Action=<Op>&Version=2016-11-15&...`` form bodies, XML answers), for
the volume subset of the EC2 API (control/ec2.py). Pure: no I/O.

Requests: the form's names are botocore's ``ec2`` serializer's — list members numbered from 1
under their query name (``VolumeId.1``, ``Filter.1.Name``/``Filter.1.Value.1``,
``TagSpecification.1.Tag.1.Key``, ``ResourceId.1``). Each operation has one table naming every
member of botocore's input shape (``tests/unit/test_ec2_query.py`` checks the tables against
the model, both ways): a member cellcloud serves is typed; one it does not serve is
:data:`REFUSED` and named in an ``InvalidParameterValue`` error, never stored and ignored; a
name in no table is EC2's ``UnknownParameter``.

Answers: ``<OpResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">`` with the result's
members by their ``locationName`` (lists of structures as ``<item>`` elements, as EC2 writes
them) and a ``requestId``; errors ``<Response><Errors><Error><Code>…`` with EC2's codes.
Built with :mod:`xml.etree.ElementTree`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
VERSION = "2016-11-15"
XML = "text/xml;charset=UTF-8"
_ACTION = re.compile(r"^[A-Za-z]{1,64}$")
_INDEX = re.compile(r"^[1-9][0-9]{0,5}$")
#: characters XML 1.0 cannot carry, not even as a reference
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(s: str) -> str:
    """``s`` with every character XML cannot carry replaced by U+FFFD (an answer must parse;
    input that would need one is refused where it is stored, core/ec2_volumes.py)."""
    return NOT_XML.sub("\ufffd", s)


class Ec2Error(Exception):
    """An EC2 error: its ``Code`` (``InvalidVolume.NotFound``…), message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def invalid_value(message: str) -> Ec2Error:
    return Ec2Error("InvalidParameterValue", message)


# -- request shapes ------------------------------------------------------------------------------
STR, INT, BOOL = "string", "integer", "boolean"
REFUSED = "refused"  # in botocore's model, not served by cellcloud: refused by name


@dataclass(frozen=True)
class ListOf:
    """A list member: ``<Name>.1``, ``<Name>.2``… each an item of ``item``'s shape."""
    item: Any


@dataclass(frozen=True)
class Struct:
    members: dict[str, Any]


TAG = Struct({"Key": STR, "Value": STR})
FILTER = Struct({"Name": STR, "Value": ListOf(STR)})
TAG_SPEC = Struct({"ResourceType": STR, "Tag": ListOf(TAG)})

#: operation -> {query name: shape}; every member of botocore's input shape, by the name its
#: ec2 serializer writes (tests/unit/test_ec2_query.py)
OPERATIONS: dict[str, dict[str, Any]] = {
    "CreateVolume": {
        "AvailabilityZone": STR, "AvailabilityZoneId": STR, "Size": INT, "VolumeType": STR,
        "Iops": REFUSED, "Throughput": REFUSED, "Encrypted": BOOL, "KmsKeyId": REFUSED,
        "OutpostArn": REFUSED, "SnapshotId": STR, "MultiAttachEnabled": BOOL,
        "ClientToken": STR, "VolumeInitializationRate": REFUSED, "Operator": REFUSED,
        "TagSpecification": ListOf(TAG_SPEC), "DryRun": BOOL},
    "DescribeVolumes": {
        "VolumeId": ListOf(STR), "IncludeManagedResources": BOOL, "DryRun": BOOL,
        "Filter": ListOf(FILTER), "NextToken": STR, "MaxResults": INT},
    "DeleteVolume": {"VolumeId": STR, "DryRun": BOOL},
    "CreateTags": {"ResourceId": ListOf(STR), "Tag": ListOf(TAG), "DryRun": BOOL},
    "DeleteTags": {"ResourceId": ListOf(STR), "Tag": ListOf(TAG), "DryRun": BOOL},
    "DescribeTags": {"Filter": ListOf(FILTER), "MaxResults": INT, "NextToken": STR,
                     "DryRun": BOOL},
    "CreateSnapshot": {"Description": STR, "OutpostArn": REFUSED, "VolumeId": STR,
                       "TagSpecification": ListOf(TAG_SPEC), "Location": REFUSED,
                       "DryRun": BOOL},
    "DescribeSnapshots": {"MaxResults": INT, "NextToken": STR, "Owner": ListOf(STR),
                          "RestorableBy": REFUSED, "SnapshotId": ListOf(STR), "DryRun": BOOL,
                          "Filter": ListOf(FILTER)},
    "DeleteSnapshot": {"SnapshotId": STR, "DryRun": BOOL},
    "DescribeAvailabilityZones": {
        "ZoneName": ListOf(STR), "ZoneId": ListOf(STR), "AllAvailabilityZones": BOOL,
        "Filter": ListOf(FILTER), "DryRun": BOOL},
}


@dataclass(frozen=True)
class Request:
    action: str
    params: dict[str, Any]  # query names -> values (lists as Python lists, in index order)


def parse_request(pairs: list[tuple[str, str]], *, list_items_max: int) -> Request:
    """The form's decoded (name, value) pairs (the shell decodes the body, or the query
    string of a GET) as a typed :class:`Request`."""
    flat: dict[str, str] = {}
    for k, v in pairs:
        if k in flat:
            raise invalid_value(f"The parameter {k[:100]} is given more than once")
        flat[k] = v
    action = flat.pop("Action", "")
    if not action:
        raise Ec2Error("MissingAction", "The request must contain the parameter Action")
    if not _ACTION.match(action):
        raise Ec2Error("InvalidAction", f"The action {action[:100]} is not valid for this "
                       "web service.")
    version = flat.pop("Version", "")
    if not version:
        raise Ec2Error("MissingParameter", "The request must contain the parameter Version")
    if version != VERSION:
        raise Ec2Error("InvalidParameterValue", f"Version {version[:40]} is not supported; "
                       f"cellcloud speaks EC2's {VERSION}")
    shape = OPERATIONS.get(action)
    if shape is None:
        raise Ec2Error("UnsupportedOperation",
                       f"The EC2 operation {action} is not supported by cellcloud (served: "
                       f"{', '.join(sorted(OPERATIONS))})")
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise Ec2Error("UnknownParameter", f"The parameter {key[:100]} is not "
                               "recognized")
            node = nxt
        if parts[-1] in node:
            raise Ec2Error("UnknownParameter", f"The parameter {key[:100]} is not recognized")
        node[parts[-1]] = value
    params = _struct(Struct(shape), tree, "", list_items_max)
    return Request(action, params)


def _struct(shape: Struct, node: Any, path: str, items_max: int) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise Ec2Error("UnknownParameter", f"The parameter {path[:100]} is not recognized")
    out: dict[str, Any] = {}
    for name, value in node.items():
        full = f"{path}{name}"
        member = shape.members.get(name)
        if member is None:
            raise Ec2Error("UnknownParameter", f"The parameter {full[:100]} is not recognized")
        if member == REFUSED:
            raise invalid_value(f"The parameter {full} is not supported by cellcloud "
                                "(docs/volumes.md)")
        out[name] = _value(member, value, full, items_max)
    return out


def _value(shape: Any, node: Any, path: str, items_max: int) -> Any:
    if isinstance(shape, ListOf):
        if not isinstance(node, dict):
            raise Ec2Error("UnknownParameter", f"The parameter {path[:100]} is not recognized")
        if len(node) > items_max:
            raise invalid_value(f"The parameter {path} has more than {items_max} items "
                                "(ec2_list_items_max)")
        items = []
        for idx in node:
            if not _INDEX.match(idx):
                raise Ec2Error("UnknownParameter",
                               f"The parameter {path[:80]}.{idx[:20]} is not recognized")
        for idx in sorted(node, key=int):
            items.append(_value(shape.item, node[idx], f"{path}.{idx}", items_max))
        return items
    if isinstance(shape, Struct):
        return _struct(shape, node, path + ".", items_max)
    if isinstance(node, dict):
        raise Ec2Error("UnknownParameter", f"The parameter {path[:100]}.* is not recognized")
    if shape == INT:
        if not re.fullmatch(r"-?[0-9]{1,18}", node):
            raise invalid_value(f"Invalid value '{node[:40]}' for {path}: an integer")
        return int(node)
    if shape == BOOL:
        if node.lower() not in ("true", "false"):
            raise invalid_value(f"Invalid value '{node[:40]}' for {path}: true or false")
        return node.lower() == "true"
    return node


# -- answers -------------------------------------------------------------------------------------
def _put(parent: ET.Element, name: str, value: Any) -> None:
    if value is None:
        return
    el = ET.SubElement(parent, name)
    if isinstance(value, list):
        for item in value:
            _put(el, "item", item)
    elif isinstance(value, dict):
        for k, v in value.items():
            _put(el, k, v)
    elif isinstance(value, bool):
        el.text = "true" if value else "false"
    else:
        el.text = xml_text(str(value))


def response_xml(action: str, request_id: str, result: dict[str, Any]) -> bytes:
    """``result``'s keys are the output shape's locationNames (``volumeId``, ``volumeSet``…)."""
    root = ET.Element(f"{action}Response", xmlns=NAMESPACE)
    ET.SubElement(root, "requestId").text = request_id
    for k, v in result.items():
        _put(root, k, v)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def error_xml(code: str, message: str, request_id: str) -> bytes:
    root = ET.Element("Response")
    err = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(err, "Code").text = xml_text(code)
    ET.SubElement(err, "Message").text = xml_text(message)
    ET.SubElement(root, "RequestID").text = request_id
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)
