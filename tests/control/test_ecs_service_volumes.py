"""ECS services with managed volumes (issues #17, #19; docs/fargate.md#volumes), in one
process: the control plane's ECS and EC2 shells and the tenant's cell with its service loop
driving FAKE agents (test_ecs_services.py's world). CreateService/UpdateService take
``volumeConfigurations`` as botocore's model has them (``ServiceVolumeConfiguration``); each
task the service starts gets a volume of its own, made by the control plane ahead (the cell's
pool) and attached to the task before it is placed; the volume ends with the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cellcloud.control.ec2 import Ec2

from .test_ecs_services import REGION, SvcWorld, run, web_def
from .test_ecs_tasks import MODEL, A

ROLE = f"arn:aws:iam::{A}:role/ecsInfrastructureRole"


def vol_def() -> dict[str, Any]:
    doc = web_def(mountPoints=[{"sourceVolume": "data", "containerPath": "/data"}])
    doc["volumes"] = [{"name": "data", "configuredAtLaunch": True}]
    return doc


def conf(**extra: Any) -> list[dict[str, Any]]:
    return [{"name": "data", "managedEBSVolume": {"sizeInGiB": 2, "roleArn": ROLE, **extra}}]


async def setup(w: SvcWorld) -> None:
    w.ecs.ec2 = Ec2(w.config, REGION, clock=lambda: w.now, data_dir=str(w.tmp / "volumes"))
    await w.ok("CreateCluster", {})
    await w.ok("RegisterTaskDefinition", vol_def())


async def volumes(w: SvcWorld) -> list[dict[str, Any]]:
    assert w.ecs.ec2 is not None
    out: list[dict[str, Any]] = (await w.ecs.ec2.describe_volumes(A, {}))["volumeSet"]
    return out


def task_arn(task_id: str) -> str:
    return f"arn:aws:ecs:{REGION}:{A}:task/default/{task_id}"


async def attached(w: SvcWorld) -> dict[str, str]:
    """Each task the agents run -> the volume attached to it (as DescribeVolumes has it)."""
    by_task = {v["attachmentSet"][0]["instanceId"]: v["volumeId"]
               for v in await volumes(w) if v["attachmentSet"]}
    return {i: by_task[task_arn(i)] for i in w.task_ids() if task_arn(i) in by_task}


async def swept_to(w: SvcWorld, what: str, cond: Any) -> None:
    """Until ``cond()`` holds, with the control plane's sweep and volume round run each time."""
    async def check() -> bool:
        await w.ecs.sweep_task_volumes()
        got = cond()
        return bool(await got if hasattr(got, "__await__") else got)
    await w.until(what, check)


def test_a_service_of_two_tasks_gets_two_volumes(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await setup(w)
        out = await w.ok("CreateService", {
            "serviceName": "web", "taskDefinition": "web", "desiredCount": 2,
            "volumeConfigurations": conf(volumeType="gp3", tagSpecifications=[
                {"resourceType": "volume", "tags": [{"key": "team", "value": "data"}]}])})
        (d,) = out["service"]["deployments"]
        (vc,) = d["volumeConfigurations"]
        assert set(vc) <= set(MODEL.shape_for("ServiceVolumeConfiguration").members)
        assert set(vc["managedEBSVolume"]) <= set(
            MODEL.shape_for("ServiceManagedEBSVolumeConfiguration").members)
        assert vc["name"] == "data" and vc["managedEBSVolume"]["sizeInGiB"] == 2
        assert vc["managedEBSVolume"]["roleArn"] == ROLE
        await w.steady()
        got = await attached(w)
        assert len(got) == 2 and len(set(got.values())) == 2  # one volume each
        for v in await volumes(w):
            assert v["status"] == "in-use" and v["size"] == 2
            assert v["tagSet"] == [{"key": "team", "value": "data"}]
        for task_id, volume_id in got.items():
            agent = next(a for a in w.agents.values() if task_id in a.tasks)
            create = next(b for op, b in agent.calls
                          if op == "task_create" and b["task_id"] == task_id)
            assert [v["volume_id"] for v in create["volumes"]] == [volume_id]
        s = await w.service()
        assert s["deployments"][0]["volumeConfigurations"] == d["volumeConfigurations"]
        # scale out: the new task's volume is made by UpdateService, ahead of its start
        await w.ok("UpdateService", {"service": "web", "desiredCount": 3})
        await w.steady()
        got = await attached(w)
        assert len(got) == 3 and len(set(got.values())) == 3
        assert w.cell.tasks is not None
        assert w.cell.tasks.services.counters["volume_waits"] == 0  # none waited for one
        # scale in: the stopped task's volume is deleted
        await w.ok("UpdateService", {"service": "web", "desiredCount": 1})
        await swept_to(w, "scaled in, its volume ended",
                       lambda: len(w.task_ids()) == 1)

        async def one_left() -> bool:
            return len(await volumes(w)) == 1 and len(await attached(w)) == 1
        await swept_to(w, "one volume left", one_left)
        # the service deleted: its tasks stop, their volumes go
        await w.ok("UpdateService", {"service": "web", "desiredCount": 0})
        await w.ok("DeleteService", {"service": "web"})

        async def none_left() -> bool:
            return await volumes(w) == []
        await swept_to(w, "no volume left", none_left)
    run(body, tmp_path)


def test_a_replaced_task_gets_a_new_volume_and_the_old_one_is_deleted(tmp_path: Path
                                                                      ) -> None:
    async def body(w: SvcWorld) -> None:
        await setup(w)
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 2, "volumeConfigurations": conf()})
        await w.steady()
        before = await attached(w)
        victim = sorted(before)[0]
        agent = next(a for a in w.agents.values() if victim in a.tasks)
        agent.exit(victim, "web", 137, "killed")
        await w.wait_status(task_arn(victim), "STOPPED")

        async def replaced() -> bool:
            s = await w.service()
            now = await attached(w)
            return (s["runningCount"] == 2 and victim not in w.task_ids() and len(now) == 2
                    and before[victim] not in {v["volumeId"] for v in await volumes(w)})
        await swept_to(w, "replaced with a new volume", replaced)
        s = await w.service()  # it waited for its volume, not as a placement failure
        assert not any("unable to place" in e["message"] for e in s["events"])
        after = await attached(w)
        new = set(after) - set(before)
        assert len(new) == 1 and after[new.pop()] not in before.values()
        assert len(await volumes(w)) == 2  # the pool holds none beyond what runs
        # a task the user stops is replaced at once (no backoff): the new task waits
        # PROVISIONING for the volume round's volume
        other = sorted(after)[0]
        await w.ok("StopTask", {"task": task_arn(other)})

        async def again() -> bool:
            s = await w.service()
            now = await attached(w)
            return (s["runningCount"] == 2 and other not in w.task_ids() and len(now) == 2
                    and after[other] not in {v["volumeId"] for v in await volumes(w)})
        await swept_to(w, "replaced again", again)
        assert w.cell.tasks is not None
        assert w.cell.tasks.services.counters["volume_waits"] == 1
        assert len(set((await attached(w)).values()) - set(after.values())) == 1
    run(body, tmp_path)


def test_an_update_with_new_volume_configurations_deploys_anew(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await setup(w)
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 1, "volumeConfigurations": conf()})
        await w.steady()
        first = await attached(w)
        out = await w.ok("UpdateService", {"service": "web",
                                           "volumeConfigurations": conf(sizeInGiB=3)})
        deps = out["service"]["deployments"]
        assert len(deps) == 2
        assert deps[0]["volumeConfigurations"][0]["managedEBSVolume"]["sizeInGiB"] == 3

        async def moved() -> bool:
            s = await w.service()
            vols = await volumes(w)
            return (len(s["deployments"]) == 1 and s["runningCount"] == 1
                    and not set(first) & w.task_ids()
                    and [v["size"] for v in vols] == [3])
        await swept_to(w, "the new deployment's task on a 3 GiB volume", moved)
        # no volumeConfigurations: kept, no new deployment
        out = await w.ok("UpdateService", {"service": "web", "desiredCount": 1})
        assert len(out["service"]["deployments"]) == 1
        # a new revision without volumeConfigurations: the service's are kept
        rev2 = vol_def()
        rev2["containerDefinitions"][0]["environment"] = [{"name": "REV", "value": "2"}]
        await w.ok("RegisterTaskDefinition", rev2)
        out = await w.ok("UpdateService", {"service": "web", "taskDefinition": "web:2"})
        assert out["service"]["deployments"][0]["volumeConfigurations"][0][
            "managedEBSVolume"]["sizeInGiB"] == 3
        await w.steady(revision=2)

        async def on_rev2() -> bool:
            vols = await volumes(w)
            return len(vols) == 1 and vols[0]["size"] == 3 and len(await attached(w)) == 1
        await swept_to(w, "revision 2's task on a volume of its own", on_rev2)
        # bad ones named, nothing made, nothing deployed
        before = [v["volumeId"] for v in await volumes(w)]
        for vc, needle in ((conf(terminationPolicy={"deleteOnTermination": True}),
                            "terminationPolicy"), (conf(iops=3000), "iops"),
                           ([{"name": "logs", "managedEBSVolume": {"sizeInGiB": 1,
                                                                   "roleArn": ROLE}}], "logs")):
            err, msg = await w.err("UpdateService", {"service": "web",
                                                     "volumeConfigurations": vc})
            assert err == "InvalidParameterException" and needle in msg, msg
        await w.ok("RegisterTaskDefinition", web_def(family="plain"))
        err, msg = await w.err("UpdateService", {"service": "web", "taskDefinition": "plain",
                                                 "volumeConfigurations": conf()})
        assert err == "InvalidParameterException" and "data" in msg, msg
        assert [v["volumeId"] for v in await volumes(w)] == before
        assert len((await w.service())["deployments"]) == 1
        # a task definition without the volume: the kept configuration is dropped
        out = await w.ok("UpdateService", {"service": "web", "taskDefinition": "plain"})
        assert "volumeConfigurations" not in out["service"]["deployments"][0]

        async def plain() -> bool:
            s = await w.service()
            return (len(s["deployments"]) == 1 and s["runningCount"] == 1
                    and await volumes(w) == [])
        await swept_to(w, "the plain task running, no volume left", plain)
    run(body, tmp_path)


@pytest.mark.parametrize("vc,needle", [
    (None, "volumeConfigurations"),  # configured at launch: the service must give it
    (conf(terminationPolicy={"deleteOnTermination": False}), "terminationPolicy"),
    (conf(sizeInGiB=0), "sizeInGiB"),
    (conf(encrypted=True), "encrypted"),
    (conf(roleArn="arn:aws:iam::444455556666:role/x"), "roleArn"),
    ([{"name": "other", "managedEBSVolume": {"sizeInGiB": 1, "roleArn": ROLE}}], "other"),
])
def test_bad_service_volume_configurations(tmp_path: Path, vc: Any, needle: str) -> None:
    async def body(w: SvcWorld) -> None:
        await setup(w)
        doc: dict[str, Any] = {"serviceName": "web", "taskDefinition": "web",
                               "desiredCount": 1}
        if vc is not None:
            doc["volumeConfigurations"] = vc
        err, msg = await w.err("CreateService", doc)
        assert err == "InvalidParameterException" and needle in msg, msg
        assert await volumes(w) == []
        assert (await w.ok("ListServices", {}))["serviceArns"] == []
    run(body, tmp_path)


def test_a_pooled_volume_outlives_the_orphan_timeout_and_goes_when_unwanted(tmp_path: Path
                                                                          ) -> None:
    """A task with no room yet keeps its volume in the cell's pool (not an orphan of the
    sweep however long it waits, kept across a restart of the cell); scaled in, the pooled
    volume is ended."""
    async def body(w: SvcWorld) -> None:
        await setup(w)
        # 2 agents of 1024 MiB: four tasks of 512 MiB fit, the fifth waits for room
        await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                     "desiredCount": 5, "volumeConfigurations": conf()})

        async def four() -> bool:
            s = await w.service()
            return s["runningCount"] == 4 and any(
                "was unable to place a task" in e["message"] for e in s["events"])
        await w.until("four running, one waiting for room", four)
        assert len(await volumes(w)) == 5 and len(await attached(w)) == 4
        all_ids = {v["volumeId"] for v in await volumes(w)}
        assert len(all_ids - set((await attached(w)).values())) == 1  # pooled
        # the cell's process restarts: its pools are kept with its services
        assert w.cell.tasks is not None
        await w.cell.tasks.close()
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        s = await w.service()
        assert s["deployments"][0]["volumeConfigurations"] == conf(
            volumeType="gp3", filesystemType="ext4")
        w.now += w.limits.ecs_task_volume_orphan_ms + 1
        await w.ecs.sweep_task_volumes()
        # the pooled one is held, not an orphan; none made anew
        assert {v["volumeId"] for v in await volumes(w)} == all_ids
        await w.ok("UpdateService", {"service": "web", "desiredCount": 4})

        async def four_left() -> bool:
            return len(await volumes(w)) == 4 and len(await attached(w)) == 4
        await swept_to(w, "the pooled volume ended", four_left)
    run(body, tmp_path, memory_mb_max=1024)
