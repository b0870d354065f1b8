"""The ECS API's first slice (issue #17: clusters and task definitions) against a real region
(one for the module), through boto3's ``ecs`` client and the AWS CLI: shapes and modelled
errors, bad cpu/memory combinations, unknown clusters, an image that must be the tenant's own
in the region's registry, tenant isolation, and an unsupported operation named as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.integration.conftest import Region, boto_client, create_tenant, running_region
from tests.oci_images import host_python_layers, image_layout, layer_tar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "ecs-api") as r:
        yield r




@pytest.fixture(scope="module")
def ecs(region: Region) -> Any:
    return boto_client(region, "ecs")


@pytest.fixture(scope="module")
def other(region: Region) -> Any:
    return boto_client(region, "ecs", create_tenant(region, "ecs-other"))


@pytest.fixture(scope="module")
def image(region: Region, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tenant A's ecs/web:v1 in the region's registry, pushed with ``cellcloud image push``."""
    tmp = tmp_path_factory.mktemp("ecs-image")
    layout = str(tmp / "img")
    image_layout(layout, [{"srv/index.html": b"hello\n"}], tag="v1")
    archive = str(tmp / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    region.cli("image", "push", archive, "ecs/web:v1")
    return f"{region.endpoint.split('//', 1)[1]}/ecs/web:v1"


def _taskdef(image: str, family: str = "web", cpu: str = "256", memory: str = "512"
             ) -> dict[str, Any]:
    return {"family": family, "networkMode": "awsvpc", "requiresCompatibilities": ["FARGATE"],
            "cpu": cpu, "memory": memory,
            "containerDefinitions": [{"name": "web", "image": image, "essential": True,
                                      "portMappings": [{"containerPort": 8080}]}]}


def _code(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


def test_clusters_through_boto3(ecs: Any, region: Region) -> None:
    account = str(region.doc["account_id"])
    c = ecs.create_cluster(clusterName="prod", tags=[{"key": "env", "value": "prod"}])["cluster"]
    assert c["clusterArn"] == f"arn:aws:ecs:{region.doc['region']}:{account}:cluster/prod"
    assert c["status"] == "ACTIVE"
    assert c["clusterArn"] in ecs.list_clusters()["clusterArns"]
    d = ecs.describe_clusters(clusters=["prod", "missing"], include=["TAGS"])
    assert d["clusters"][0]["tags"] == [{"key": "env", "value": "prod"}]
    assert d["failures"][0]["reason"] == "MISSING"
    assert ecs.delete_cluster(cluster="prod")["cluster"]["status"] == "INACTIVE"
    with pytest.raises(ClientError) as e:
        ecs.delete_cluster(cluster="prod")
    assert _code(e) == "ClusterNotFoundException"
    with pytest.raises(ecs.exceptions.ClusterNotFoundException):
        ecs.delete_cluster(cluster="never-was")


def test_task_definitions_through_boto3(ecs: Any, image: str) -> None:
    r1 = ecs.register_task_definition(**_taskdef(image))["taskDefinition"]
    r2 = ecs.register_task_definition(**_taskdef(image, cpu="512", memory="1024"))[
        "taskDefinition"]
    assert r2["revision"] == r1["revision"] + 1 and r2["status"] == "ACTIVE"
    assert r2["containerDefinitions"][0]["portMappings"] == [
        {"containerPort": 8080, "hostPort": 8080, "protocol": "tcp"}]
    latest = ecs.describe_task_definition(taskDefinition="web")["taskDefinition"]
    assert (latest["revision"], latest["cpu"], latest["memory"]) == (r2["revision"], "512", "1024")
    assert latest["registeredAt"].year >= 2024  # a timestamp botocore parsed
    assert r1["taskDefinitionArn"] in ecs.list_task_definitions(familyPrefix="web")[
        "taskDefinitionArns"]
    assert "web" in ecs.list_task_definition_families()["families"]
    gone = ecs.deregister_task_definition(taskDefinition=r1["taskDefinitionArn"])
    assert gone["taskDefinition"]["status"] == "INACTIVE"
    assert ecs.list_task_definitions(familyPrefix="web", status="INACTIVE")[
        "taskDefinitionArns"] == [r1["taskDefinitionArn"]]
    out = ecs.delete_task_definitions(taskDefinitions=[r1["taskDefinitionArn"]])
    assert out["taskDefinitions"][0]["status"] == "DELETE_IN_PROGRESS"
    # a paginator walks every page
    for i in range(3):
        ecs.register_task_definition(**_taskdef(image, family=f"pages-{i}"))
    pages = ecs.get_paginator("list_task_definition_families").paginate(
        familyPrefix="pages-", PaginationConfig={"PageSize": 2})
    assert [f for p in pages for f in p["families"]] == ["pages-0", "pages-1", "pages-2"]


def test_bad_definitions_are_modelled_client_errors(ecs: Any, image: str) -> None:
    for cpu, memory in (("256", "4096"), ("1024", "1024"), ("3000", "8192")):
        with pytest.raises(ecs.exceptions.ClientException) as e:
            ecs.register_task_definition(**_taskdef(image, family="bad", cpu=cpu, memory=memory))
        assert "No Fargate configuration exists for given values" in str(e.value)
    with pytest.raises(ecs.exceptions.ClientException) as e:
        ecs.register_task_definition(**_taskdef("nginx:latest", family="bad"))
    assert "this region's registry" in str(e.value)
    with pytest.raises(ecs.exceptions.ClientException) as e:
        ecs.register_task_definition(**_taskdef(image.replace(":v1", ":v9"), family="bad"))
    assert "no image 'v9'" in str(e.value)
    with pytest.raises(ecs.exceptions.ClientException):
        ecs.describe_task_definition(taskDefinition="bad")
    assert "bad" not in ecs.list_task_definition_families(status="ALL")["families"]


def test_tenants_are_isolated(ecs: Any, other: Any, image: str, region: Region) -> None:
    ecs.create_cluster(clusterName="mine")
    arn = ecs.register_task_definition(**_taskdef(image, family="private"))[
        "taskDefinition"]["taskDefinitionArn"]
    assert other.list_clusters()["clusterArns"] == []
    assert "private" not in other.list_task_definition_families(status="ALL")["families"]
    mine = f"arn:aws:ecs:{region.doc['region']}:{region.doc['account_id']}:cluster/mine"
    assert other.describe_clusters(clusters=[mine])["failures"][0]["reason"] == "MISSING"
    with pytest.raises(other.exceptions.ClientException):
        other.describe_task_definition(taskDefinition=arn)
    with pytest.raises(other.exceptions.ClusterNotFoundException):
        other.delete_cluster(cluster=mine)
    # A's image is not in B's namespace: B cannot use it
    with pytest.raises(other.exceptions.ClientException) as e:
        other.register_task_definition(**_taskdef(image, family="private"))
    assert "no image 'v1'" in str(e.value)
    assert ecs.describe_clusters(clusters=["mine"])["clusters"][0]["status"] == "ACTIVE"


def test_an_unsupported_operation_is_named(ecs: Any) -> None:
    with pytest.raises(ecs.exceptions.UnsupportedFeatureException) as e:
        ecs.list_container_instances(cluster="default")
    assert "ListContainerInstances" in str(e.value)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_aws_cli(region: Region, image: str, tmp_path: Any) -> None:
    exports = subprocess.run([sys.executable, "-m", "cellcloud", "env", "--state-dir",
                              region.state_dir], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    (tmp_path / "td.json").write_text(json.dumps(_taskdef(image, family="cli")))
    script = f"""set -e
eval "$1"
{aws} ecs create-cluster --cluster-name cli > {tmp_path}/c.json
{aws} ecs register-task-definition --cli-input-json file://{tmp_path}/td.json > {tmp_path}/t.json
{aws} ecs list-task-definitions --family-prefix cli > {tmp_path}/l.json
{aws} ecs register-task-definition --cli-input-json file://{tmp_path}/td.json \
  --cpu 256 --memory 8192 2> {tmp_path}/err.txt && exit 9 || true
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)
    subprocess.run(["bash", "-c", script, "bash", exports], check=True, timeout=120, env=env)
    assert json.loads((tmp_path / "c.json").read_text())["cluster"]["clusterName"] == "cli"
    arn = json.loads((tmp_path / "t.json").read_text())["taskDefinition"]["taskDefinitionArn"]
    assert json.loads((tmp_path / "l.json").read_text())["taskDefinitionArns"] == [arn]
    err = (tmp_path / "err.txt").read_text()
    assert "ClientException" in err and "No Fargate configuration exists" in err


def test_an_oversized_request_is_refused_by_name(ecs: Any, image: str, region: Region) -> None:
    """Refused by the router from its declared length, before the body is read."""
    def refused() -> int:
        return int(region.client.status()["router"]["counters"]["refused_before_body"])

    before = refused()
    td = _taskdef(image, family="big")
    td["containerDefinitions"][0]["environment"] = [{"name": "PAD", "value": "x" * 70_000}]
    with pytest.raises(ecs.exceptions.ClientException) as e:
        ecs.register_task_definition(**td)
    assert "ecs_request_bytes_max" in str(e.value)
    assert refused() == before + 1


WEB_CLIENT = """
import time, urllib.request
for _ in range(600):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8080/hello.txt", timeout=5).read()
        break
    except OSError:
        time.sleep(0.1)
print("got", body.decode().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def pair_image(region: Region, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image with the host's Python libraries, a page and a client script: ecs/pair:v1."""
    tmp = tmp_path_factory.mktemp("pair-image")
    layout = str(tmp / "img")
    app = layer_tar({"srv/hello.txt": b"hello over localhost\n",
                     "app/client.py": WEB_CLIENT.encode()})
    image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                 blobs=[host_python_layers()[0], app])
    archive = str(tmp / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    region.cli("image", "push", archive, "ecs/pair:v1")
    return f"{region.endpoint.split('//', 1)[1]}/ecs/pair:v1"


def _wait_task(ecs: Any, cluster: str, arn: str, ok: Any, what: str) -> dict[str, Any]:
    """DescribeTasks until ``ok(task)`` holds (a generous bound, not a deadline)."""
    deadline = time.monotonic() + 120
    while True:
        t: dict[str, Any] = ecs.describe_tasks(cluster=cluster, tasks=[arn])["tasks"][0]
        if ok(t):
            return t
        assert time.monotonic() < deadline, (what, t)
        time.sleep(0.2)


def test_a_two_container_task_runs_stops_and_logs(ecs: Any, region: Region,
                                                  pair_image: str) -> None:
    """RunTask of a web server and a sidecar that reads it over localhost (the task's one
    network namespace), from an image pushed to the region's registry: RUNNING, the sidecar's
    exit code, StopTask → STOPPED (UserInitiated), both containers' output through the Logs
    API (awslogs)."""
    image = pair_image
    name = str(region.doc["region"])
    logs = {"logDriver": "awslogs", "options": {"awslogs-group": "/ecs/pair",
                                                "awslogs-region": name,
                                                "awslogs-stream-prefix": "pair"}}
    ecs.create_cluster(clusterName="tasks")
    ecs.register_task_definition(
        family="pair", networkMode="awsvpc", requiresCompatibilities=["FARGATE"], cpu="256",
        memory="512", containerDefinitions=[
            {"name": "web", "image": image, "logConfiguration": logs,
             "command": [sys.executable, "-u", "-m", "http.server", "8080", "--directory",
                         "/srv"], "portMappings": [{"containerPort": 8080}]},
            {"name": "side", "image": image, "essential": False, "logConfiguration": logs,
             "command": [sys.executable, "/app/client.py"],
             "dependsOn": [{"containerName": "web", "condition": "START"}]}])
    out = ecs.run_task(cluster="tasks", taskDefinition="pair", launchType="FARGATE")
    assert out["failures"] == []
    arn = out["tasks"][0]["taskArn"]
    task_id = arn.rsplit("/", 1)[1]

    def wait(ok: Any, what: str) -> dict[str, Any]:
        return _wait_task(ecs, "tasks", arn, ok, what)

    t = wait(lambda t: t["lastStatus"] == "RUNNING"
             or t["lastStatus"] == "STOPPED", "RUNNING")
    assert t["lastStatus"] == "RUNNING", t.get("stoppedReason")
    assert ecs.describe_clusters(clusters=["tasks"])["clusters"][0]["runningTasksCount"] == 1
    t = wait(lambda t: "exitCode" in t["containers"][1], "the sidecar's exit")
    assert t["containers"][1]["exitCode"] == 0 and t["lastStatus"] == "RUNNING"
    with pytest.raises(ecs.exceptions.ClusterContainsTasksException):
        ecs.delete_cluster(cluster="tasks")
    ecs.stop_task(cluster="tasks", task=arn, reason="test done")
    t = wait(lambda t: t["lastStatus"] == "STOPPED", "STOPPED")
    assert t["stopCode"] == "UserInitiated" and t["stoppedReason"] == "test done"
    assert t["containers"][0]["exitCode"] in (0, 143, 137)  # SIGTERM / SIGKILL
    cwl = boto3.client("logs", endpoint_url=region.endpoint, region_name=name,
                        aws_access_key_id=str(region.doc["access_key_id"]),
                        aws_secret_access_key=str(region.doc["secret_access_key"]))
    side = cwl.get_log_events(logGroupName="/ecs/pair",
                              logStreamName=f"pair/side/{task_id}")["events"]
    assert [e["message"] for e in side] == ["got hello over localhost"]
    web = cwl.get_log_events(logGroupName="/ecs/pair",
                             logStreamName=f"pair/web/{task_id}")["events"]
    assert any("GET /hello.txt" in e["message"] for e in web), web
    ecs.delete_cluster(cluster="tasks")


def test_a_restarted_frontend_still_describes_and_drives_its_task(
        ecs: Any, region: Region, pair_image: str) -> None:
    """The cell's frontend is killed while a task runs: the supervisor restarts it, and the
    new process describes the task from its records and still drives it (StopTask)."""
    ecs.create_cluster(clusterName="restart")
    ecs.register_task_definition(
        family="sleeper", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
        cpu="256", memory="512", containerDefinitions=[
            {"name": "web", "image": pair_image,
             "command": [sys.executable, "-u", "-m", "http.server", "8080", "--directory",
                         "/srv"]}])
    arn = ecs.run_task(cluster="restart", taskDefinition="sleeper")["tasks"][0]["taskArn"]
    t = _wait_task(ecs, "restart", arn, lambda t: t["lastStatus"] in ("RUNNING", "STOPPED"),
                   "RUNNING")
    assert t["lastStatus"] == "RUNNING", t.get("stoppedReason")
    before = region.region_json()["components"]["cell-1-frontend"]  # type: ignore[index]
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while region.region_json()["components"]["cell-1-frontend"]["pid"] == before["pid"]:  # type: ignore[index]
        assert time.monotonic() < deadline, "the frontend was not restarted"
        time.sleep(0.1)
    again = _wait_task(ecs, "restart", arn, lambda t: True, "described again")
    assert again["lastStatus"] == "RUNNING"
    assert again["containers"][0]["networkInterfaces"] == t["containers"][0]["networkInterfaces"]
    ecs.stop_task(cluster="restart", task=arn, reason="after the restart")
    t = _wait_task(ecs, "restart", arn, lambda t: t["lastStatus"] == "STOPPED", "STOPPED")
    assert t["stopCode"] == "UserInitiated" and t["stoppedReason"] == "after the restart"
    ecs.delete_cluster(cluster="restart")


def _wait_service(ecs: Any, cluster: str, ok: Any, what: str) -> dict[str, Any]:
    """DescribeServices until ``ok(service)`` holds (a generous bound, not a deadline)."""
    deadline = time.monotonic() + 120
    while True:
        s: dict[str, Any] = ecs.describe_services(cluster=cluster,
                                                  services=["web"])["services"][0]
        if ok(s):
            return s
        assert time.monotonic() < deadline, (what, s)
        time.sleep(0.2)


def _steady_on(revision: int) -> Any:
    def ok(s: dict[str, Any]) -> bool:
        (d, *rest) = s["deployments"]
        return (not rest and d["rolloutState"] == "COMPLETED" and s["runningCount"] == 2
                and d["taskDefinition"].endswith(f":{revision}"))
    return ok


def test_a_service_keeps_its_tasks_and_rolls(ecs: Any, region: Region, pair_image: str
                                             ) -> None:
    """CreateService of 2 web servers → 2 RUNNING, answering through the router by Host
    header; StopTask of one → replaced; UpdateService
    to a new revision → rolled, every task of it; DeleteService (force) → INACTIVE."""
    ecs.create_cluster(clusterName="svc")
    web = {"name": "web", "image": pair_image, "portMappings": [{"containerPort": 8080}],
           "command": [sys.executable, "-u", "-m", "http.server", "8080", "--directory",
                       "/srv"]}
    for env in ("1", "2"):
        ecs.register_task_definition(
            family="svcweb", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="256", memory="512",
            containerDefinitions=[{**web, "environment": [{"name": "V", "value": env}]}])
    # networkConfiguration as a Fargate script passes it: assignPublicIp DISABLED (ECS's
    # default) is no egress, and the router still reaches the tasks' mapped port
    net = {"awsvpcConfiguration": {"subnets": ["subnet-0123456789abcdef0"],
                                   "securityGroups": ["sg-0123456789abcdef0"],
                                   "assignPublicIp": "DISABLED"}}
    ecs.create_service(cluster="svc", serviceName="web", taskDefinition="svcweb:1",
                       desiredCount=2, launchType="FARGATE", networkConfiguration=net)
    s = _wait_service(ecs, "svc", _steady_on(1), "2 RUNNING")
    assert s["networkConfiguration"] == net
    first = ecs.list_tasks(cluster="svc", serviceName="web")["taskArns"]
    assert len(first) == 2
    for t in ecs.describe_tasks(cluster="svc", tasks=first)["tasks"]:
        details = {d["name"]: d["value"] for d in t["attachments"][0]["details"]}
        assert details["subnetId"] == "subnet-0123456789abcdef0"
    # its traffic: the router routes on the Host header to the account's cell, which proxies
    # to one RUNNING task's privateIpv4:containerPort
    host = (f"web.svc.{region.doc['account_id']}.{region.doc['region']}.localhost:"
            f"{region.endpoint.rsplit(':', 1)[1]}")
    for _ in range(2):
        req = urllib.request.Request(region.endpoint + "/hello.txt", headers={"Host": host})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.read() == b"hello over localhost\n"
    ecs.stop_task(cluster="svc", task=first[0], reason="killed by the test")
    _wait_service(ecs, "svc", lambda s: s["runningCount"] == 2 and first[0] not in
                  ecs.list_tasks(cluster="svc", serviceName="web")["taskArns"], "replaced")
    ecs.update_service(cluster="svc", service="web", taskDefinition="svcweb:2")
    s = _wait_service(ecs, "svc", _steady_on(2), "rolled to revision 2")
    arns = ecs.list_tasks(cluster="svc", serviceName="web")["taskArns"]
    tasks = ecs.describe_tasks(cluster="svc", tasks=arns)["tasks"]
    assert len(tasks) == 2 and all(t["taskDefinitionArn"].endswith("svcweb:2")
                                   and t["lastStatus"] == "RUNNING" for t in tasks)
    assert any("steady state" in e["message"] for e in s["events"])
    assert ecs.describe_clusters(clusters=["svc"])["clusters"][0]["activeServicesCount"] == 1
    with pytest.raises(ecs.exceptions.ClusterContainsServicesException):
        ecs.delete_cluster(cluster="svc")
    with pytest.raises(ecs.exceptions.InvalidParameterException):
        ecs.delete_service(cluster="svc", service="web")  # scaled above 0
    ecs.delete_service(cluster="svc", service="web", force=True)
    _wait_service(ecs, "svc", lambda s: s["status"] == "INACTIVE", "INACTIVE")
    ecs.delete_cluster(cluster="svc")


def test_application_autoscaling_through_boto3(ecs: Any, region: Region, image: str) -> None:
    """The application-autoscaling client, unmodified: signed for its own service, routed to
    the control plane, answered in its model's shapes and errors."""
    aas = boto_client(region, "application-autoscaling")
    target = {"ServiceNamespace": "ecs", "ResourceId": "service/scale/web",
              "ScalableDimension": "ecs:service:DesiredCount"}
    ecs.create_cluster(clusterName="scale")
    ecs.register_task_definition(**_taskdef(image, family="scaleweb"))
    with pytest.raises(ClientError) as e:
        aas.register_scalable_target(**target, MinCapacity=0, MaxCapacity=2)
    assert _code(e) == "ValidationException"
    ecs.create_service(cluster="scale", serviceName="web", taskDefinition="scaleweb:1",
                       desiredCount=0)
    tracking = {"TargetValue": 50.0, "PredefinedMetricSpecification": {
        "PredefinedMetricType": "ECSServiceAverageCPUUtilization"}}
    with pytest.raises(ClientError) as e:
        aas.put_scaling_policy(**target, PolicyName="cpu", PolicyType="TargetTrackingScaling",
                               TargetTrackingScalingPolicyConfiguration=tracking)
    assert _code(e) == "ObjectNotFoundException"
    arn = aas.register_scalable_target(**target, MinCapacity=0, MaxCapacity=2)[
        "ScalableTargetARN"]
    (t,) = aas.describe_scalable_targets(ServiceNamespace="ecs")["ScalableTargets"]
    assert (t["ScalableTargetARN"], t["MinCapacity"], t["MaxCapacity"]) == (arn, 0, 2)
    aas.put_scaling_policy(**target, PolicyName="cpu", PolicyType="TargetTrackingScaling",
                           TargetTrackingScalingPolicyConfiguration=tracking)
    (p,) = aas.describe_scaling_policies(ServiceNamespace="ecs")["ScalingPolicies"]
    assert p["PolicyName"] == "cpu" and p["PolicyType"] == "TargetTrackingScaling"
    aas.delete_scaling_policy(**target, PolicyName="cpu")
    aas.deregister_scalable_target(**target)
    assert aas.describe_scalable_targets(ServiceNamespace="ecs")["ScalableTargets"] == []
    ecs.delete_service(cluster="scale", service="web")


def test_a_request_scales_a_service_from_zero(ecs: Any, region: Region, pair_image: str
                                              ) -> None:
    """An autoscaled service at desiredCount 0: a request through the router by Host header
    is held at the cell's proxy while the scaler brings one task, and answered by it."""
    aas = boto_client(region, "application-autoscaling")
    ecs.create_cluster(clusterName="cold")
    ecs.register_task_definition(
        family="coldweb", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
        cpu="256", memory="512", containerDefinitions=[{
            "name": "web", "image": pair_image, "portMappings": [{"containerPort": 8080}],
            "command": [sys.executable, "-u", "-m", "http.server", "8080", "--directory",
                        "/srv"]}])
    ecs.create_service(cluster="cold", serviceName="web", taskDefinition="coldweb:1",
                       desiredCount=0)
    target = {"ServiceNamespace": "ecs", "ResourceId": "service/cold/web",
              "ScalableDimension": "ecs:service:DesiredCount"}
    aas.register_scalable_target(**target, MinCapacity=0, MaxCapacity=2)
    aas.put_scaling_policy(**target, PolicyName="requests", PolicyType="TargetTrackingScaling",
                           TargetTrackingScalingPolicyConfiguration={
                               "TargetValue": 100.0, "PredefinedMetricSpecification": {
                                   "PredefinedMetricType": "ALBRequestCountPerTarget"}})
    assert ecs.list_tasks(cluster="cold", serviceName="web")["taskArns"] == []
    host = (f"web.cold.{region.doc['account_id']}.{region.doc['region']}.localhost:"
            f"{region.endpoint.rsplit(':', 1)[1]}")
    req = urllib.request.Request(region.endpoint + "/hello.txt", headers={"Host": host})
    with urllib.request.urlopen(req, timeout=90) as r:
        assert r.read() == b"hello over localhost\n"
    s = ecs.describe_services(cluster="cold", services=["web"])["services"][0]
    assert s["desiredCount"] == 1 and s["runningCount"] == 1
    ecs.delete_service(cluster="cold", service="web", force=True)
