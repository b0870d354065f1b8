"""The EC2 volume API's rules (issue #19, docs/volumes.md): what CreateVolume accepts, the
zones of a region, DescribeVolumes' filters and pages, tags, and how a volume record is shown
(its members by botocore's ``locationName``s). Pure: no I/O, time passed in.

A volume record (the configuration store's value, control/ec2.py) is a dict:
``{"id", "size_gib", "type", "zone", "state", "created_ms", "tags": [{"Key", "Value"}],
"attachment": None | {"target", "attach_epoch", "attached_ms"}, "attach_epoch"}``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .ec2_query import NOT_XML, Ec2Error, invalid_value
from .limits import Limits

#: EC2's volume types and each one's size range in GiB (EC2's own). In cellcloud every type has
#: the same data path (docs/volumes.md): the type is the volume's label, its size is honoured;
#: io1/io2 need provisioned IOPS, which cellcloud does not provision, so they are refused.
SIZE_GIB_RANGE = {"gp2": (1, 16_384), "gp3": (1, 16_384), "st1": (125, 16_384),
                  "sc1": (125, 16_384), "standard": (1, 1_024)}
PROVISIONED_IOPS_TYPES = ("io1", "io2")
VOLUME_TYPES = (*SIZE_GIB_RANGE, *PROVISIONED_IOPS_TYPES)
DEFAULT_TYPE = "gp2"  # EC2's default
VOLUME_ID = re.compile(r"^vol-[0-9a-f]{17}$")
SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]{17}$")
_ANY_VOLUME_ID = re.compile(r"^vol-[0-9a-f]{8}([0-9a-f]{9})?$")  # EC2's old 8-hex ids too
VOLUME_FILTERS = ("volume-id", "status", "size", "availability-zone", "volume-type",
                  "encrypted", "multi-attach-enabled", "attachment.status", "tag-key")
TAG_FILTERS = ("resource-id", "resource-type", "key", "value")
SNAPSHOT_FILTERS = ("snapshot-id", "volume-id", "status", "owner-id", "volume-size",
                    "description", "encrypted", "tag-key")
DESCRIBE_SNAPSHOTS_RESULTS = (5, 1000)
DESCRIPTION_CHARS_MAX = 255  # a snapshot's Description (EC2's)
DESCRIBE_VOLUMES_RESULTS = (5, 500)  # MaxResults' range (EC2's)
DESCRIBE_TAGS_RESULTS = (5, 1000)
TAG_KEY_CHARS_MAX, TAG_VALUE_CHARS_MAX = 128, 256  # EC2's
CLIENT_TOKEN_CHARS_MAX = 64  # EC2's


@dataclass(frozen=True)
class Zone:
    name: str  # "<region>a"
    zone_id: str  # "<region>-az1"


def zones(region: str) -> tuple[Zone, ...]:
    """A cellcloud region is one failure domain today: one zone, ``<region>a``."""
    return (Zone(f"{region}a", f"{region}-az1"),)


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") \
        + f"{ms % 1000:03d}Z"


@dataclass(frozen=True)
class CreateVolume:
    size_gib: int
    volume_type: str
    zone: str
    tags: list[dict[str, str]]
    client_token: str | None
    dry_run: bool
    snapshot_id: str | None = None


def check_tags(tags: list[dict[str, Any]], where: str, limits: Limits) -> list[dict[str, str]]:
    out: dict[str, str] = {}
    for t in tags:
        key, value = t.get("Key"), t.get("Value", "")
        if not key or len(key) > TAG_KEY_CHARS_MAX or key.lower().startswith("aws:"):
            raise invalid_value(f"{where}: a tag key is 1 to {TAG_KEY_CHARS_MAX} characters "
                                "and does not start with aws:")
        if NOT_XML.search(key) or NOT_XML.search(value):
            raise invalid_value(f"{where}: a tag holds a character an XML answer cannot "
                                "carry (a control character)")
        if len(value) > TAG_VALUE_CHARS_MAX:
            raise invalid_value(f"{where}: a tag value is at most {TAG_VALUE_CHARS_MAX} "
                                "characters")
        out[key] = value
    if len(out) > limits.ec2_tags_per_resource_max:
        raise Ec2Error("TagLimitExceeded", f"A resource has at most "
                       f"{limits.ec2_tags_per_resource_max} tags")
    return [{"Key": k, "Value": v} for k, v in out.items()]


def validate_create(params: dict[str, Any], region: str, limits: Limits,
                    snapshot_size_gib: int | None = None) -> CreateVolume:
    """CreateVolume's members as EC2 judges them (sizes, types, zones, tags); from a
    snapshot (``SnapshotId``, its size given as ``snapshot_size_gib`` once found) the size
    defaults to the snapshot's and may not be smaller."""
    vtype = params.get("VolumeType", DEFAULT_TYPE)
    if vtype not in VOLUME_TYPES:
        raise invalid_value(f"The parameter VolumeType '{vtype[:40]}' is not one of "
                            f"{', '.join(VOLUME_TYPES)}")
    if vtype in PROVISIONED_IOPS_TYPES:
        raise invalid_value(f"The volume type {vtype} needs provisioned IOPS (Iops), which "
                            "cellcloud does not provision; use gp2, gp3, st1, sc1 or standard")
    snapshot_id = params.get("SnapshotId")
    if snapshot_id is not None:
        check_snapshot_id(snapshot_id)
    if "Size" not in params and snapshot_id is None:
        raise Ec2Error("MissingParameter", "The request must contain the parameter size or "
                       "snapshotId")
    size = params.get("Size", snapshot_size_gib if snapshot_size_gib is not None else 1)
    if snapshot_size_gib is not None and size < snapshot_size_gib:
        raise invalid_value(f"Volume of {size}GiB is smaller than snapshot "
                            f"'{snapshot_id}', expect size >= {snapshot_size_gib}GiB")
    lo, hi = SIZE_GIB_RANGE[vtype]
    hi = min(hi, limits.volume_size_gib_max)
    if not lo <= size <= hi:
        raise invalid_value(f"Volume of {size}GiB is out of range for {vtype}: {lo} to "
                            f"{hi} GiB" + (" (volume_size_gib_max)"
                                           if hi == limits.volume_size_gib_max else ""))
    known = zones(region)
    name, zone_id = params.get("AvailabilityZone"), params.get("AvailabilityZoneId")
    if (name is None) == (zone_id is None):
        raise Ec2Error("MissingParameter", "Either AvailabilityZone or AvailabilityZoneId "
                       "must be specified, not both")
    zone = next((z for z in known if z.name == name or z.zone_id == zone_id), None)
    if zone is None:
        raise invalid_value(f"Invalid availability zone: [{(name or zone_id or '')[:60]}] "
                            f"(this region's: {', '.join(z.name for z in known)})")
    if params.get("Encrypted"):
        raise invalid_value("Encrypted volumes are not supported by cellcloud yet: a "
                            "volume's bytes are not encrypted at rest (docs/volumes.md)")
    if params.get("MultiAttachEnabled"):
        raise invalid_value("Multi-Attach is not supported: a cellcloud volume has one "
                            "writer at a time")
    token = params.get("ClientToken")
    if token is not None and not 1 <= len(token) <= CLIENT_TOKEN_CHARS_MAX:
        raise invalid_value(f"ClientToken is 1 to {CLIENT_TOKEN_CHARS_MAX} characters")
    return CreateVolume(size, vtype, zone.name,
                        tag_specifications(params, "volume", limits), token,
                        bool(params.get("DryRun")), snapshot_id)


def tag_specifications(params: dict[str, Any], resource_type: str, limits: Limits
                       ) -> list[dict[str, str]]:
    tags: list[dict[str, Any]] = []
    for spec in params.get("TagSpecification", []):
        rt = spec.get("ResourceType")
        if rt != resource_type:
            raise invalid_value(f"'{str(rt)[:40]}' is not a valid taggable resource type for "
                                f"this operation (only {resource_type})")
        tags.extend(spec.get("Tag", []))
    return check_tags(tags, "TagSpecification", limits)


def check_volume_id(ident: str) -> None:
    if not _ANY_VOLUME_ID.match(ident):
        raise Ec2Error("InvalidVolumeID.Malformed", f'Invalid id: "{ident[:80]}"')


def check_snapshot_id(ident: str) -> None:
    if not re.match(r"^snap-[0-9a-f]{8}([0-9a-f]{9})?$", ident):
        raise Ec2Error("InvalidSnapshotID.Malformed", f'Invalid id: "{ident[:80]}"')


def snapshot_not_found(ident: str) -> Ec2Error:
    return Ec2Error("InvalidSnapshot.NotFound", f"The snapshot '{ident[:80]}' does not exist.")


def volume_not_found(ident: str) -> Ec2Error:
    return Ec2Error("InvalidVolume.NotFound", f"The volume '{ident[:80]}' does not exist.")


# -- filters and pages ---------------------------------------------------------------------------
def _wildcard(pattern: str) -> re.Pattern[str]:
    """EC2's filter values: ``*`` any run, ``?`` one character, ``\\`` escapes."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


@dataclass(frozen=True)
class Filter:
    name: str
    values: tuple[re.Pattern[str], ...]

    def matches(self, candidates: list[str]) -> bool:
        return any(p.fullmatch(c) for p in self.values for c in candidates)


def parse_filters(params: dict[str, Any], allowed: tuple[str, ...], limits: Limits
                  ) -> list[Filter]:
    out = []
    for f in params.get("Filter", []):
        name = f.get("Name")
        if not name:
            raise Ec2Error("MissingParameter", "A filter needs a Name")
        if name not in allowed and not (name.startswith("tag:") and "tag-key" in allowed):
            raise invalid_value(f"The filter '{name[:80]}' is invalid (cellcloud serves: "
                                f"{', '.join(allowed)}, tag:<key>)")
        values = f.get("Value", [])
        if not values:
            raise invalid_value(f"The filter '{name[:80]}' needs at least one Value")
        if sum(len(v) for v in values) > limits.ec2_filter_value_chars_max:
            raise invalid_value(f"The filter '{name[:80]}' has more than "
                                f"{limits.ec2_filter_value_chars_max} characters of values "
                                "(ec2_filter_value_chars_max)")
        out.append(Filter(name, tuple(_wildcard(v) for v in values)))
    return out


def volume_fields(rec: dict[str, Any], name: str) -> list[str]:
    """The values a volume has for filter ``name`` (several for tags)."""
    if name.startswith("tag:"):
        return [t["Value"] for t in rec["tags"] if t["Key"] == name[4:]]
    return {
        "volume-id": [rec["id"]], "status": [rec["state"]], "size": [str(rec["size_gib"])],
        "availability-zone": [rec["zone"]], "volume-type": [rec["type"]],
        "encrypted": ["false"], "multi-attach-enabled": ["false"],
        "attachment.status": ["attached"] if rec.get("attachment") else [],
        "tag-key": [t["Key"] for t in rec["tags"]],
    }[name]


def matches(filters: list[Filter], fields: Any) -> bool:
    return all(f.matches(fields(f.name)) for f in filters)


def max_results(params: dict[str, Any], bounds: tuple[int, int]) -> int | None:
    n = params.get("MaxResults")
    if n is None:
        return None
    if not bounds[0] <= n <= bounds[1]:
        raise invalid_value(f"Value ( {n} ) for parameter maxResults is invalid. Expecting a "
                            f"value between {bounds[0]} and {bounds[1]}.")
    return int(n)


def page(keys: list[str], params: dict[str, Any], n: int | None
         ) -> tuple[list[str], str | None]:
    """One page of sorted ``keys`` after ``NextToken`` (the last key of the previous page,
    so a delete between pages skips nothing), ``n`` long (all without MaxResults)."""
    token = params.get("NextToken")
    start = 0
    if token:
        try:
            after = str(json.loads(base64.b64decode(token, validate=True))["after"])
        except (ValueError, KeyError, TypeError):
            raise Ec2Error("InvalidPaginationToken", "The specified pagination token is not "
                           "valid or is expired.") from None
        start = next((i for i, k in enumerate(keys) if k > after), len(keys))
    if n is None:
        return keys[start:], None
    chosen = keys[start:start + n]
    nxt = None
    if start + n < len(keys):
        nxt = base64.b64encode(json.dumps({"after": chosen[-1]}).encode()).decode()
    return chosen, nxt


# -- answers -------------------------------------------------------------------------------------
def volume_doc(rec: dict[str, Any], account: str, region: str) -> dict[str, Any]:
    """A volume as botocore's ``Volume`` shape reads it (locationNames)."""
    att = rec.get("attachment")
    attachments = [] if not att else [{
        "attachTime": iso_time(att["attached_ms"]), "device": att.get("device", "/dev/sdf"),
        "instanceId": att["target"], "status": "attached", "volumeId": rec["id"],
        "deleteOnTermination": False}]
    return {
        "volumeId": rec["id"], "size": rec["size_gib"], "snapshotId": rec.get("snapshot_id", ""),
        "availabilityZone": rec["zone"], "status": rec["state"],
        "createTime": iso_time(rec["created_ms"]), "attachmentSet": attachments,
        "volumeType": rec["type"], "encrypted": False, "multiAttachEnabled": False,
        "ownerId": account, "volumeArn": f"arn:aws:ec2:{region}:{account}:volume/{rec['id']}",
        "tagSet": [{"key": t["Key"], "value": t["Value"]} for t in rec["tags"]] or None,
    }


def snapshot_fields(rec: dict[str, Any], name: str, account: str) -> list[str]:
    if name.startswith("tag:"):
        return [t["Value"] for t in rec["tags"] if t["Key"] == name[4:]]
    return {
        "snapshot-id": [rec["id"]], "volume-id": [rec["volume_id"]], "status": [rec["state"]],
        "owner-id": [account], "volume-size": [str(rec["size_gib"])],
        "description": [rec.get("description", "")], "encrypted": ["false"],
        "tag-key": [t["Key"] for t in rec["tags"]],
    }[name]


def snapshot_doc(rec: dict[str, Any], account: str) -> dict[str, Any]:
    """A snapshot as botocore's ``Snapshot`` shape reads it (locationNames)."""
    done = rec["state"] == "completed"
    return {
        "snapshotId": rec["id"], "volumeId": rec["volume_id"], "status": rec["state"],
        "statusMessage": rec.get("message") or None,
        "startTime": iso_time(rec["started_ms"]), "progress": "100%" if done else "0%",
        "ownerId": account, "description": rec.get("description", ""),
        "volumeSize": rec["size_gib"], "encrypted": False, "storageTier": "standard",
        "completionTime": iso_time(rec["completed_ms"]) if rec.get("completed_ms") else None,
        "tagSet": [{"key": t["Key"], "value": t["Value"]} for t in rec["tags"]] or None,
    }
