"""ECS managed volumes on tasks (issue #19, docs/fargate.md#volumes), in one process: the
control plane's ECS and EC2 shells over SQLite and the tenant's cell driving FAKE agents
(tests/control/test_ecs_tasks.py's world). The shapes are botocore's ecs model's; the volume
is made through EC2's CreateVolume path (DescribeVolumes shows it attached to the task), given
to the agent with the containers' mount points, and ended once the task stopped and its host
let go of it (deleted by default; kept with deleteOnTermination false)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cellcloud.control.ec2 import Ec2
from cellcloud.control.ecs import EBS_ATTACHMENT

from .test_ecs_tasks import MODEL, REGION, TASK_MEMBERS, A, World, two_containers

ROLE = f"arn:aws:iam::{A}:role/ecsInfrastructureRole"


def with_volume(**mount: Any) -> dict[str, Any]:
    doc = two_containers(mountPoints=[{"sourceVolume": "data", "containerPath": "/data",
                                       **mount}])
    doc["volumes"] = [{"name": "data", "configuredAtLaunch": True}]
    return doc


def ebs(**extra: Any) -> list[dict[str, Any]]:
    return [{"name": "data", "managedEBSVolume": {"sizeInGiB": 2, "roleArn": ROLE,
                                                  "filesystemType": "ext4", **extra}}]


def run(body: Any, tmp: Path) -> None:
    async def main() -> None:
        w = World(tmp)
        w.ecs.ec2 = Ec2(w.config, REGION, clock=lambda: w.now, data_dir=str(tmp / "volumes"))
        try:
            await w.ok("CreateCluster", {})
            await body(w)
        finally:
            assert w.cell.tasks is not None
            await w.cell.tasks.close()
    asyncio.run(main())


async def volumes(w: World) -> list[dict[str, Any]]:
    assert w.ecs.ec2 is not None
    out: list[dict[str, Any]] = (await w.ecs.ec2.describe_volumes(A, {}))["volumeSet"]
    return out


def test_task_definition_volumes_and_mount_points(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        out = (await w.ok("RegisterTaskDefinition", with_volume(readOnly=True)))
        d = out["taskDefinition"]
        assert d["volumes"] == [{"name": "data", "configuredAtLaunch": True}]
        assert d["containerDefinitions"][0]["mountPoints"] == [
            {"sourceVolume": "data", "containerPath": "/data", "readOnly": True}]
        assert d["containerDefinitions"][1]["mountPoints"] == []
        for member in d["volumes"][0]:
            assert member in MODEL.shape_for("Volume").members
        again = (await w.ok("DescribeTaskDefinition", {"taskDefinition": "web"}))
        assert again["taskDefinition"]["volumes"] == d["volumes"]
        # other volume kinds are refused by name
        for kind, conf in (("host", {"sourcePath": "/srv"}),
                           ("efsVolumeConfiguration", {"fileSystemId": "fs-1"}),
                           ("dockerVolumeConfiguration", {"scope": "task"})):
            doc = with_volume()
            doc["volumes"] = [{"name": "data", kind: conf}]
            err, msg = await w.err("RegisterTaskDefinition", doc)
            assert err == "ClientException" and kind in msg
        doc = with_volume()
        doc["volumes"] = [{"name": "data"}]  # not configuredAtLaunch: no such volume here
        err, msg = await w.err("RegisterTaskDefinition", doc)
        assert err == "ClientException" and "configuredAtLaunch" in msg
        doc = with_volume()
        doc["containerDefinitions"][0]["mountPoints"][0]["sourceVolume"] = "nope"
        err, msg = await w.err("RegisterTaskDefinition", doc)
        assert err == "ClientException" and "nope" in msg
        for path in ("relative", "/proc/x", "/a/../etc", "/"):
            doc = with_volume(containerPath=path)
            assert (await w.err("RegisterTaskDefinition", doc))[0] == "ClientException"
        # a service must give its volume at launch (test_ecs_service_volumes.py)
        err, msg = await w.err("CreateService", {"serviceName": "s", "taskDefinition": "web",
                                                 "desiredCount": 1})
        assert err == "InvalidParameterException" and "configured at launch" in msg
    run(body, tmp_path)


@pytest.mark.parametrize("conf,needle", [
    (None, "volumeConfigurations"),  # configured at launch: RunTask must give it
    (ebs(sizeInGiB=0), "sizeInGiB"),
    (ebs(sizeInGiB=20_000), "sizeInGiB"),
    (ebs(filesystemType="xfs"), "xfs"),
    (ebs(filesystemType="ntfs"), "ntfs"),
    (ebs(filesystemType="zfs"), "filesystemType"),
    (ebs(encrypted=True), "encrypted"),
    (ebs(iops=3000), "iops"),
    (ebs(snapshotId="snap-0123456789abcdef0"), "snapshotId"),
    (ebs(volumeType="io2"), "io2"),
    (ebs(roleArn=""), "roleArn"),
    (ebs(roleArn="arn:aws:iam::444455556666:role/x"), "roleArn"),
    (ebs(terminationPolicy={"deleteOnTermination": "yes"}), "terminationPolicy"),
    ([{"name": "other", "managedEBSVolume": {"sizeInGiB": 1, "roleArn": ROLE}}], "other"),
])
def test_bad_volume_configurations(tmp_path: Path, conf: Any, needle: str) -> None:
    async def body(w: World) -> None:
        await w.ok("RegisterTaskDefinition", with_volume())
        doc: dict[str, Any] = {"taskDefinition": "web"}
        if conf is not None:
            doc["volumeConfigurations"] = conf
        err, msg = await w.err("RunTask", doc)
        assert err == "InvalidParameterException" and needle in msg, msg
        assert await volumes(w) == []  # nothing made
        assert all(not a.tasks for a in w.agents.values())
    run(body, tmp_path)


@pytest.mark.parametrize("delete", [True, False])
def test_a_task_gets_its_volume_and_it_ends_with_the_task(tmp_path: Path, delete: bool
                                                          ) -> None:
    async def body(w: World) -> None:
        await w.ok("RegisterTaskDefinition", with_volume())
        out = await w.ok("RunTask", {"taskDefinition": "web", "volumeConfigurations": ebs(
            volumeType="gp3", terminationPolicy={"deleteOnTermination": delete},
            tagSpecifications=[{"resourceType": "volume",
                                "tags": [{"key": "team", "value": "data"}]}])})
        (t,) = out["tasks"]
        arn, task_id = t["taskArn"], t["taskArn"].rsplit("/", 1)[1]
        (vol,) = await volumes(w)
        assert vol["size"] == 2 and vol["volumeType"] == "gp3" and vol["status"] == "in-use"
        assert vol["attachmentSet"][0]["instanceId"] == arn
        assert vol["tagSet"] == [{"key": "team", "value": "data"}]
        t = await w.wait_status(arn, "RUNNING")
        assert set(t) <= TASK_MEMBERS
        (att,) = [a for a in t["attachments"] if a["type"] == EBS_ATTACHMENT]
        assert att["status"] == "ATTACHED" and set(att) <= set(
            MODEL.shape_for("Attachment").members)
        details = {d["name"]: d["value"] for d in att["details"]}
        assert details["volumeId"] == vol["volumeId"] and details["roleArn"] == ROLE
        assert details["volumeName"] == "data" and details["volumeSizeInGiB"] == "2"
        assert details["deleteOnTermination"] == str(delete)
        agent = w.agent_of(t)
        create = next(b for op, b in agent.calls if op == "task_create")
        assert create["volumes"] == [{"name": "data", "volume_id": vol["volumeId"],
                                      "size_gib": 2, "attach_epoch": 1, "replicated": False}]
        assert create["containers"][0]["mounts"] == [
            {"volume": "data", "path": "/data", "read_only": False}]
        assert "mounts" not in create["containers"][1]
        assert await w.ecs.sweep_task_volumes() == 0  # running: kept
        await w.ok("StopTask", {"task": arn})
        t = await w.wait_status(arn, "STOPPED")

        async def detached() -> bool:
            t = await w.task(arn)
            return any(a["type"] == EBS_ATTACHMENT and a["status"] == "DETACHED"
                       for a in t["attachments"])
        await w.wait_for("the host let go", detached)
        assert task_id not in agent.tasks
        assert await w.ecs.sweep_task_volumes() == 1
        left = await volumes(w)
        if delete:
            assert left == []
        else:
            assert [(v["volumeId"], v["status"], v["attachmentSet"]) for v in left] == [
                (vol["volumeId"], "available", [])]
        assert await w.ecs.sweep_task_volumes() == 0  # ended once
    run(body, tmp_path)


def test_tasks_not_placed_leave_no_volume(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.ok("RegisterTaskDefinition", with_volume())
        for a in w.agents.values():
            a.full = True
        # placement does not know they are full: the tasks are placed, fail to be made,
        # stop; their volumes end with them
        out = await w.ok("RunTask", {"taskDefinition": "web", "count": 2,
                                     "volumeConfigurations": ebs()})
        assert len(await volumes(w)) == len(out["tasks"])
        for t in out["tasks"]:
            await w.wait_status(t["taskArn"], "STOPPED")

        async def all_ended() -> bool:
            await w.ecs.sweep_task_volumes()
            return await volumes(w) == []
        await w.wait_for("volumes ended", all_ended)
    run(body, tmp_path)


def test_a_retried_run_task_makes_no_second_volume(tmp_path: Path) -> None:
    """A clientToken retry answers the first tasks; the volumes made for the retry's own
    (never placed) task ids are ended at once, so one volume per task remains."""
    async def body(w: World) -> None:
        await w.ok("RegisterTaskDefinition", with_volume())
        doc = {"taskDefinition": "web", "count": 2, "clientToken": "tok-1",
               "volumeConfigurations": ebs()}
        first = await w.ok("RunTask", doc)
        again = await w.ok("RunTask", doc)
        assert [t["taskArn"] for t in again["tasks"]] == [t["taskArn"] for t in first["tasks"]]
        left = await volumes(w)
        assert sorted(v["attachmentSet"][0]["instanceId"] for v in left) == sorted(
            t["taskArn"] for t in first["tasks"])
        for t in first["tasks"]:
            await w.ok("StopTask", {"task": t["taskArn"]})
            await w.wait_status(t["taskArn"], "STOPPED")

        async def ended() -> bool:
            await w.ecs.sweep_task_volumes()
            return await volumes(w) == []
        await w.wait_for("both volumes ended", ended)
    run(body, tmp_path)
