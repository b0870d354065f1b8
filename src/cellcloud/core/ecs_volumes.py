"""ECS managed volumes (issue #19, docs/fargate.md#volumes): a task definition's ``volumes``
(``configuredAtLaunch: true`` only) and containers' ``mountPoints``, and RunTask's
``volumeConfigurations`` with ``managedEBSVolume``, as ECS judges them (botocore's ecs model
names the members). Sans-IO: documents in, frozen values or ``EcsError`` out."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .ec2_volumes import SIZE_GIB_RANGE
from .ecs_taskdef import EcsError
from .limits import DEFAULT_LIMITS, Limits

VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
# Volume kinds of a task definition that cellcloud does not provide (the host's directories,
# EFS, FSx, Docker volume drivers), refused by name.
_OTHER_KINDS = ("host", "dockerVolumeConfiguration", "efsVolumeConfiguration",
                "s3filesVolumeConfiguration",
                "fsxWindowsFileServerVolumeConfiguration")
_VOLUME_FIELDS = frozenset({"name", "configuredAtLaunch", *_OTHER_KINDS})
_MOUNT_FIELDS = frozenset({"sourceVolume", "containerPath", "readOnly"})
_EBS_FIELDS = frozenset({"sizeInGiB", "volumeType", "filesystemType", "tagSpecifications",
                         "roleArn", "terminationPolicy", "encrypted", "kmsKeyId", "iops",
                         "throughput", "snapshotId", "volumeInitializationRate"})
# gp2/gp3/st1/sc1/standard as EC2's CreateVolume takes them; io1/io2 need provisioned IOPS,
# which cellcloud does not provision (as CreateVolume refuses them).
VOLUME_TYPES = tuple(SIZE_GIB_RANGE)
DEFAULT_VOLUME_TYPE = "gp3"  # ECS's default for a managed volume
FILESYSTEM_TYPES = ("ext3", "ext4", "xfs", "ntfs")  # ECS's enum; cellcloud makes ext4
# Paths a volume may not be mounted over: the environment's own mounts (jail.py).
_RESERVED = ("/proc", "/dev", "/sys", "/etc", "/var/runtime", "/tmp", "/.old_root")
ROLE_ARN = re.compile(r"^arn:aws:iam::\d{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")


def invalid(message: str) -> EcsError:
    return EcsError("InvalidParameterException", message)


def client(message: str) -> EcsError:
    return EcsError("ClientException", message)


@dataclass(frozen=True)
class MountPoint:
    source_volume: str
    container_path: str
    read_only: bool

    def to_wire(self) -> dict[str, Any]:
        return {"sourceVolume": self.source_volume, "containerPath": self.container_path,
                "readOnly": self.read_only}


@dataclass(frozen=True)
class ManagedVolume:
    """One ``volumeConfigurations`` entry: the EBS-style volume a task gets at launch."""

    name: str
    size_gib: int
    volume_type: str
    filesystem_type: str
    role_arn: str
    delete_on_termination: bool
    tags: tuple[tuple[str, str], ...]
    propagate_tags: str  # NONE (TASK_DEFINITION/SERVICE: refused)

    def service_wire(self) -> dict[str, Any]:
        """As DescribeServices shows it (``ServiceVolumeConfiguration``)."""
        ebs: dict[str, Any] = {"sizeInGiB": self.size_gib, "volumeType": self.volume_type,
                               "filesystemType": self.filesystem_type, "roleArn": self.role_arn}
        if self.tags:
            ebs["tagSpecifications"] = [{"resourceType": "volume", "propagateTags": "NONE",
                                         "tags": [{"key": k, "value": v} for k, v in self.tags]}]
        return {"name": self.name, "managedEBSVolume": ebs}

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "sizeInGiB": self.size_gib, "volumeType": self.volume_type,
                "filesystemType": self.filesystem_type, "roleArn": self.role_arn,
                "deleteOnTermination": self.delete_on_termination,
                "tags": [{"key": k, "value": v} for k, v in self.tags]}


def _refuse(doc: dict[str, Any], honoured: frozenset[str], where: str) -> None:
    for key, value in doc.items():
        if key not in honoured and value not in (None, [], {}, ""):
            raise client(f"{where}.{key} is not supported by cellcloud")


def task_volumes(doc: dict[str, Any]) -> tuple[str, ...]:
    """RegisterTaskDefinition's ``volumes``: the names of its configured-at-launch volumes."""
    vols = doc.get("volumes")
    if vols is None:
        return ()
    if not isinstance(vols, list) or not all(isinstance(v, dict) for v in vols):
        raise client("volumes must be a list of objects")
    names: list[str] = []
    for i, v in enumerate(vols):
        where = f"volumes[{i}]"
        for kind in _OTHER_KINDS:
            if v.get(kind) not in (None, {}):
                raise client(f"{where}.{kind} is not supported by cellcloud: a task's volume "
                             "is a managed volume (configuredAtLaunch: true, given by RunTask's "
                             "volumeConfigurations)")
        _refuse(v, _VOLUME_FIELDS, where)
        name = v.get("name")
        if not isinstance(name, str) or not VOLUME_NAME.match(name):
            raise client(f"{where}.name must be 1 to 255 letters, numbers, hyphens and "
                         "underscores")
        if name in names:
            raise client(f"Volume names must be unique within a task definition: {name}")
        if v.get("configuredAtLaunch") is not True:
            raise client(f"{where}: cellcloud's task volumes are managed volumes; set "
                         "configuredAtLaunch: true and give the volume in RunTask's "
                         "volumeConfigurations (a task's scratch space is its containers' "
                         "/tmp)")
        names.append(name)
    if len(names) > 1:
        raise client("A task definition has at most one volume configured at launch "
                     "(ECS's limit for managed EBS volumes)")
    return tuple(names)


def mount_points(c: dict[str, Any], volumes: tuple[str, ...], where: str
                 ) -> tuple[MountPoint, ...]:
    """A container definition's ``mountPoints``, each naming a volume of the task."""
    mps = c.get("mountPoints")
    if mps is None:
        return ()
    if not isinstance(mps, list) or not all(isinstance(p, dict) for p in mps):
        raise client(f"{where}.mountPoints must be a list of objects")
    out: list[MountPoint] = []
    for i, p in enumerate(mps):
        at = f"{where}.mountPoints[{i}]"
        _refuse(p, _MOUNT_FIELDS, at)
        source, path, ro = p.get("sourceVolume"), p.get("containerPath"), p.get("readOnly", False)
        if not isinstance(source, str) or source not in volumes:
            raise client(f"Invalid 'containerDefinitions' parameter: {at}.sourceVolume "
                         f"{str(source)[:255]!r} names no volume of the task definition")
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096 \
                or "\0" in path or any(part in (".", "..") for part in path.split("/")):
            raise client(f"{at}.containerPath must be an absolute path without '.' or '..'")
        norm = "/" + "/".join(s for s in path.split("/") if s)
        if norm == "/" or any(norm == r or norm.startswith(r + "/") for r in _RESERVED):
            raise client(f"{at}.containerPath {norm} is one of the environment's own mounts")
        if not isinstance(ro, bool):
            raise client(f"{at}.readOnly must be a boolean")
        if any(m.container_path == norm for m in out):
            raise client(f"{at}.containerPath {norm} is mounted twice")
        out.append(MountPoint(source, norm, ro))
    return tuple(out)


def _bounded_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{where} must be an integer")
    return v


def volume_configurations(value: Any, volumes: tuple[str, ...], account: str,
                          limits: Limits = DEFAULT_LIMITS, *, op: str = "RunTask"
                          ) -> tuple[ManagedVolume, ...]:
    """RunTask's ``volumeConfigurations`` against the task definition's volumes: each
    configured-at-launch volume needs exactly one, with a ``managedEBSVolume``. With
    ``op`` CreateService/UpdateService, a service's (botocore's
    ``ServiceManagedEBSVolumeConfiguration``: no ``terminationPolicy``; a service task's
    volume is always deleted when the task ends)."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise invalid("volumeConfigurations must be a list of objects")
    out: list[ManagedVolume] = []
    for i, v in enumerate(value):
        where = f"volumeConfigurations[{i}]"
        _refuse(v, frozenset({"name", "managedEBSVolume"}), where)
        name = v.get("name")
        if not isinstance(name, str) or name not in volumes:
            raise invalid(f"{where}.name {str(name)[:255]!r} is not a volume of the task "
                          "definition configured at launch")
        if any(o.name == name for o in out):
            raise invalid(f"{where}: volume {name} is configured twice")
        ebs = v.get("managedEBSVolume")
        if not isinstance(ebs, dict):
            raise invalid(f"{where}.managedEBSVolume is required")
        if op != "RunTask" and ebs.get("terminationPolicy") is not None:
            raise invalid(f"{where}.managedEBSVolume.terminationPolicy is not a member of a "
                          "service's volume configuration: a service task's volume is always "
                          "deleted when the task ends")
        out.append(_managed(ebs, name, f"{where}.managedEBSVolume", account, limits))
    for name in volumes:
        if not any(o.name == name for o in out):
            raise invalid(f"The task definition's volume {name} is configured at launch; "
                          f"{op} must give it in volumeConfigurations")
    return tuple(out)


def _managed(ebs: dict[str, Any], name: str, where: str, account: str, limits: Limits
             ) -> ManagedVolume:
    for key in ("encrypted", "kmsKeyId", "iops", "throughput", "snapshotId",
                "volumeInitializationRate"):
        if ebs.get(key) not in (None, False, ""):
            raise invalid(f"{where}.{key} is not supported by cellcloud (volumes are not "
                          "encrypted at rest, IOPS and throughput are not provisioned, and a "
                          "managed volume starts empty): docs/fargate.md#volumes")
    _refuse(ebs, _EBS_FIELDS, where)
    role = ebs.get("roleArn")
    # Required by ECS (the infrastructure role ECS acts as); cellcloud has no IAM: the ARN is
    # checked for its form and this account, kept, and shown in DescribeTasks.
    if not isinstance(role, str) or not ROLE_ARN.match(role):
        raise invalid(f"{where}.roleArn is required: an IAM role ARN "
                      "(arn:aws:iam::<account>:role/<name>)")
    if role.split(":")[4] != account:
        raise invalid(f"{where}.roleArn must be a role of this account ({account})")
    vtype = ebs.get("volumeType", DEFAULT_VOLUME_TYPE)
    if vtype in ("io1", "io2"):
        raise invalid(f"{where}.volumeType {vtype} needs provisioned IOPS, which cellcloud "
                      "does not provision; use gp2, gp3, st1, sc1 or standard")
    if vtype not in VOLUME_TYPES:
        raise invalid(f"{where}.volumeType must be one of {', '.join(VOLUME_TYPES)}")
    if ebs.get("sizeInGiB") is None:
        raise invalid(f"{where}.sizeInGiB is required (a managed volume made without a "
                      "snapshot)")
    size = _bounded_int(ebs.get("sizeInGiB"), f"{where}.sizeInGiB")
    lo, hi = SIZE_GIB_RANGE[vtype]
    hi = min(hi, limits.volume_size_gib_max)
    if not lo <= size <= hi:
        raise invalid(f"{where}.sizeInGiB {size} is out of range for {vtype}: {lo} to {hi}")
    fs = ebs.get("filesystemType", "ext4")
    if fs not in FILESYSTEM_TYPES:
        raise invalid(f"{where}.filesystemType must be one of {', '.join(FILESYSTEM_TYPES)}")
    if fs != "ext4":
        raise invalid(f"{where}.filesystemType {fs} is not supported by cellcloud: a managed "
                      "volume is made as ext4")
    term = ebs.get("terminationPolicy")
    delete = True
    if term is not None:
        if not isinstance(term, dict) or not isinstance(term.get("deleteOnTermination"), bool) \
                or set(term) - {"deleteOnTermination"}:
            raise invalid(f"{where}.terminationPolicy is {{deleteOnTermination: boolean}}")
        delete = term["deleteOnTermination"]
    tags: list[tuple[str, str]] = []
    propagate = "NONE"
    specs = ebs.get("tagSpecifications") or []
    if not isinstance(specs, list):
        raise invalid(f"{where}.tagSpecifications must be a list")
    for j, spec in enumerate(specs):
        at = f"{where}.tagSpecifications[{j}]"
        if not isinstance(spec, dict) or spec.get("resourceType") != "volume":
            raise invalid(f"{at}.resourceType must be volume")
        _refuse(spec, frozenset({"resourceType", "tags", "propagateTags"}), at)
        p = spec.get("propagateTags", "NONE")
        if p not in ("NONE", None):
            raise invalid(f"{at}.propagateTags {str(p)[:40]} is not supported by cellcloud "
                          "(NONE only: give the tags here)")
        for t in spec.get("tags") or []:
            if not isinstance(t, dict) or not isinstance(t.get("key"), str) \
                    or not isinstance(t.get("value", ""), str) or not 1 <= len(t["key"]) <= 128 \
                    or len(t.get("value", "")) > 256 or t["key"].lower().startswith("aws:"):
                raise invalid(f"{at}.tags: each is {{key: 1-128 characters (not aws:...), "
                              "value: up to 256}")
            tags.append((t["key"], t.get("value", "")))
    if len(tags) > limits.ec2_tags_per_resource_max:
        raise invalid(f"{where}: at most {limits.ec2_tags_per_resource_max} tags")
    return ManagedVolume(name, size, str(vtype), "ext4", role, delete, tuple(tags), propagate)


def task_mounts(def_doc: dict[str, Any]) -> dict[str, tuple[MountPoint, ...]]:
    """Each container's mount points, from a task definition as DescribeTaskDefinition shows
    it (already validated when it was registered)."""
    names = tuple(str(v["name"]) for v in def_doc.get("volumes") or [])
    return {str(c["name"]): mount_points(c, names, str(c["name"]))
            for c in def_doc.get("containerDefinitions") or []}
