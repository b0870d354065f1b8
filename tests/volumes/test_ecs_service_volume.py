"""ECS services with managed volumes through boto3 against a real region (docs/fargate.md#volumes):
a service of 2 tasks, each on a volume of its own that its container sees at ``/data`` (ext4
on a loop device); a stopped task is replaced on a new volume and the old one deleted; the
deleted service leaves no volume. Real control plane, cell, agent, volume helper and jail;
volumes on the control plane's local files (no storage servers)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import boto_client, running_region
from tests.oci_images import host_python_layers, image_layout, layer_tar

pytestmark = pytest.mark.integration

APP = r"""
import os, time
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4] == "/data":
        rest = f[f.index("-") + 1:]
        print("mount", rest[0], rest[1], flush=True)
print("before", sorted(os.listdir("/data")), flush=True)
open("/data/mine", "w").write("x")
while True:
    time.sleep(60)
"""


def _until(what: str, cond: Callable[[], Any], timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_service_s_tasks_each_get_a_volume(tmp_path: Path,
                                              tmp_path_factory: pytest.TempPathFactory
                                              ) -> None:
    with running_region(tmp_path_factory, "ecs-service-volume-region",
                        "--agents-per-cell", "1") as region:
        layout = str(tmp_path / "img")
        image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                     blobs=[host_python_layers()[0], layer_tar({"app/app.py": APP.encode()})])
        archive = str(tmp_path / "img.tar")
        subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
        region.cli("image", "push", archive, "ecs/svc:v1")
        image = f"{region.endpoint.split('//', 1)[1]}/ecs/svc:v1"
        name, account = str(region.doc["region"]), str(region.doc["account_id"])
        ecs, ec2, logs = (boto_client(region, s) for s in ("ecs", "ec2", "logs"))
        ecs.create_cluster(clusterName="vols")
        ecs.register_task_definition(
            family="svc", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="256", memory="512",
            volumes=[{"name": "data", "configuredAtLaunch": True}],
            containerDefinitions=[{
                "name": "app", "image": image,
                "command": [sys.executable, "-u", "/app/app.py"],
                "mountPoints": [{"sourceVolume": "data", "containerPath": "/data"}],
                "logConfiguration": {"logDriver": "awslogs", "options": {
                    "awslogs-group": "/ecs/svc", "awslogs-region": name,
                    "awslogs-stream-prefix": "s"}}}])
        out = ecs.create_service(cluster="vols", serviceName="web", taskDefinition="svc",
                                 desiredCount=2, volumeConfigurations=[{
                                     "name": "data", "managedEBSVolume": {
                                         "sizeInGiB": 1, "filesystemType": "ext4",
                                         "roleArn": f"arn:aws:iam::{account}:role/ecsInfra"}}])
        dep = out["service"]["deployments"][0]
        assert dep["volumeConfigurations"][0]["managedEBSVolume"]["sizeInGiB"] == 1

        def running() -> list[str]:
            arns: list[str] = ecs.list_tasks(cluster="vols", serviceName="web")["taskArns"]
            tasks = ecs.describe_tasks(cluster="vols", tasks=arns)["tasks"] if arns else []
            ok = [t["taskArn"] for t in tasks if t["lastStatus"] == "RUNNING"]
            return ok if len(ok) == 2 else []

        def by_task() -> dict[str, str]:
            return {v["Attachments"][0]["InstanceId"]: v["VolumeId"]
                    for v in ec2.describe_volumes()["Volumes"] if v["Attachments"]}

        def said(arn: str) -> list[str]:
            try:
                return [e["message"] for e in logs.get_log_events(
                    logGroupName="/ecs/svc", logStreamName=f"s/app/{arn.rsplit('/', 1)[1]}",
                    startFromHead=True)["events"]]
            except logs.exceptions.ResourceNotFoundException:
                return []

        first = _until("2 tasks running", running)
        vols = by_task()
        assert set(first) <= set(vols) and len({vols[a] for a in first}) == 2
        for arn in first:
            lines = _until("the task's lines", lambda a=arn: len(said(a)) >= 2 and said(a))
            mount = lines[0].split()
            assert mount[:2] == ["mount", "ext4"] and mount[2].startswith("/dev/loop")
            assert lines[1] == "before ['lost+found']"  # a new volume of its own
        victim = first[0]
        ecs.stop_task(cluster="vols", task=victim, reason="replace me")

        def replaced() -> list[str]:
            now = running()
            return now if now and victim not in now else []
        second = _until("the replacement running", replaced)
        (new,) = set(second) - set(first)
        assert _until("its lines", lambda: len(said(new)) >= 2 and said(new))[1] \
            == "before ['lost+found']"
        _until("the victim's volume deleted", lambda: vols[victim] not in {
            v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]})
        assert by_task()[new] not in vols.values()
        ecs.update_service(cluster="vols", service="web", desiredCount=0)
        ecs.delete_service(cluster="vols", service="web")
        _until("no volume left", lambda: ec2.describe_volumes()["Volumes"] == [])
