"""`cellcloud pod` over the ECS and Logs APIs (pod_cli.py), against botocore's Stubber: the
calls it makes are checked against botocore's own model (parameters and answers), so what the
CLI sends a region is what any ECS endpoint takes, and each answer is mapped as ECS gives it."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError
from botocore.session import get_session
from botocore.stub import Stubber
from typer.testing import CliRunner

from cellcloud import pod_cli
from cellcloud.cli import app
from cellcloud.core import pod

REGION = "cc-local-1"
IMG = "127.0.0.1:9009/web:1"
ARN = "arn:aws:ecs:cc-local-1:000000000001:task-definition/pod_default_web:1"
TASK = "arn:aws:ecs:cc-local-1:000000000001:task/default/0123abcd"
MANIFEST = yaml.safe_dump({
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "w"}},
    "spec": {"containers": [{"name": "web", "image": IMG, "ports": [{"containerPort": 80}]},
                            {"name": "side", "image": IMG}]}})


@pytest.fixture
def stubbed() -> Iterator[tuple[pod_cli.PodClient, Stubber, Stubber]]:
    kw = dict(region_name=REGION, endpoint_url="http://127.0.0.1:9", aws_access_key_id="k",
              aws_secret_access_key="s")
    session = get_session()
    ecs, logs = session.create_client("ecs", **kw), session.create_client("logs", **kw)
    with Stubber(ecs) as e, Stubber(logs) as lg:
        yield pod_cli.PodClient(ecs, logs, REGION), e, lg
        e.assert_no_pending_responses()
        lg.assert_no_pending_responses()


def _plan() -> pod.Plan:
    return pod.load(MANIFEST, region=REGION)


def _taskdef(plan: pod.Plan, arn: str = ARN) -> dict[str, Any]:
    reg = plan.register
    return {"taskDefinition": {"taskDefinitionArn": arn, "family": plan.family, "revision": 1,
                               "status": "ACTIVE", "cpu": reg["cpu"], "memory": reg["memory"],
                               "containerDefinitions": reg["containerDefinitions"]},
            "tags": reg["tags"]}


def _deregistered(plan: pod.Plan) -> dict[str, Any]:
    return {"taskDefinition": {**_taskdef(plan)["taskDefinition"], "status": "INACTIVE"}}


def _not_found(e: Stubber, family: str) -> None:
    e.add_client_error("describe_task_definition", "ClientException",
                       "Unable to describe task definition.",
                       expected_params={"taskDefinition": family, "include": ["TAGS"]})


def _task(status: str, arn: str = TASK, td: str = ARN, created: int = 100,
          **kw: Any) -> dict[str, Any]:
    return {"taskArn": arn, "taskDefinitionArn": td, "lastStatus": status,
            "desiredStatus": kw.pop("desired", "RUNNING"),
            "createdAt": datetime.datetime.fromtimestamp(created, datetime.UTC),
            "containers": kw.pop("containers", [
                {"name": "web", "lastStatus": status}, {"name": "side", "lastStatus": status}]),
            **kw}


def _list_tasks(e: Stubber, family: str, running: list[str], stopped: list[str]) -> None:
    for desired, arns in (("RUNNING", running), ("STOPPED", stopped)):
        e.add_response("list_tasks", {"taskArns": arns},
                       {"cluster": "default", "family": family, "desiredStatus": desired})


def test_apply_registers_and_runs_in_the_default_cluster(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}},
                   {"clusterName": "default"})
    e.add_response("register_task_definition", _taskdef(plan), plan.register)
    e.add_response("run_task", {"tasks": [_task("PROVISIONING")], "failures": []},
                   {**plan.run, "taskDefinition": ARN})
    assert client.apply(plan) == "pod/web created"
    # The same spec again is unchanged; another spec under the name is refused.
    e.add_response("describe_task_definition", _taskdef(plan), None)
    assert client.apply(plan) == "pod/web unchanged"
    other = pod.load(MANIFEST.replace("containerPort: 80", "containerPort: 81"), region=REGION)
    e.add_response("describe_task_definition", _taskdef(plan), None)
    with pytest.raises(pod_cli.PodCliError, match="cannot change in place: delete it first"):
        client.apply(other)


def test_a_region_without_runtask_is_said_plainly_and_leaves_no_pod(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_response("register_task_definition", _taskdef(plan), None)
    e.add_client_error("run_task", "UnsupportedFeatureException",
                       "The ECS operation RunTask is not supported by cellcloud yet")
    e.add_response("deregister_task_definition", _deregistered(plan), {"taskDefinition": ARN})
    with pytest.raises(pod_cli.PodCliError) as got:
        client.apply(plan)
    assert "this region does not run tasks yet" in str(got.value)
    assert "RunTask is not supported" in str(got.value)


def test_runtask_failures_are_the_error_and_the_registration_is_undone(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_response("register_task_definition", _taskdef(plan), None)
    e.add_response("run_task", {"tasks": [], "failures": [
        {"reason": "RESOURCE:MEMORY", "detail": "no agent has 512 MiB free"}]}, None)
    e.add_response("deregister_task_definition", _deregistered(plan), {"taskDefinition": ARN})
    with pytest.raises(pod_cli.PodCliError, match=r"RESOURCE:MEMORY \(no agent has 512 MiB"):
        client.apply(plan)


def test_a_refused_registration_names_the_regions_reason(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_client_error("register_task_definition", "ClientException",
                       "Container image '127.0.0.1:9009/web:1': no image '1' in your registry")
    with pytest.raises(pod_cli.PodCliError,
                       match="RegisterTaskDefinition: ClientException: Container image"):
        client.apply(plan)


def test_get_reads_the_newest_task_of_the_current_revision(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    e.add_response("describe_task_definition", _taskdef(plan), None)
    old_rev = ARN.replace(":1", ":0")
    _list_tasks(e, plan.family, [TASK], [TASK + "old", TASK + "older"])
    e.add_response("describe_tasks", {"tasks": [
        _task("RUNNING", containers=[
            {"name": "web", "lastStatus": "RUNNING", "networkInterfaces": [
                {"privateIpv4Address": "100.64.0.9"}]},
            {"name": "side", "lastStatus": "RUNNING"}]),
        _task("STOPPED", arn=TASK + "old", created=50),
        _task("RUNNING", arn=TASK + "older", td=old_rev, created=500)]},
        {"cluster": "default", "tasks": [TASK, TASK + "old", TASK + "older"],
         "include": ["TAGS"]})
    [view] = client.get("web", "default")
    assert (view.name, view.phase, view.ready, view.ip, view.task_id) == (
        "web", "Running", "2/2", "100.64.0.9", "0123abcd")


def test_get_lists_the_namespaces_pods_and_a_missing_one_is_not_found(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    e.add_response("list_task_definition_families", {"families": [plan.family]},
                   {"familyPrefix": "pod_default_", "status": "ACTIVE"})
    e.add_response("describe_task_definition", _taskdef(plan), None)
    _list_tasks(e, plan.family, [], [])
    views = client.get(None, "default")
    assert [(v.name, v.phase, v.reason) for v in views] == [
        ("web", "Pending", "no task runs this pod")]
    _not_found(e, "pod_default_nope")
    with pytest.raises(pod_cli.PodCliError, match='pods "nope" not found'):
        client.get("nope", "default")


def test_get_says_when_the_region_runs_no_tasks(stubbed: Any) -> None:
    client, e, _ = stubbed
    e.add_response("describe_task_definition", _taskdef(_plan()), None)
    e.add_client_error("list_tasks", "UnsupportedFeatureException", "ListTasks not supported")
    with pytest.raises(pod_cli.PodCliError, match="does not run tasks yet.*ListTasks"):
        client.get("web", "default")


def test_delete_stops_the_task_and_deregisters_every_revision(stubbed: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    e.add_response("describe_task_definition", _taskdef(plan), None)
    e.add_response("list_tasks", {"taskArns": [TASK]},
                   {"cluster": "default", "family": plan.family, "desiredStatus": "RUNNING"})
    e.add_response("stop_task", {"task": _task("RUNNING", desired="STOPPED")},
                   {"cluster": "default", "task": TASK,
                    "reason": "pod/web deleted (cellcloud pod delete)"})
    e.add_response("list_task_definitions", {"taskDefinitionArns": [ARN], "nextToken": "n"},
                   {"familyPrefix": plan.family, "status": "ACTIVE"})
    e.add_response("list_task_definitions", {"taskDefinitionArns": [ARN + "2"]},
                   {"familyPrefix": plan.family, "status": "ACTIVE", "nextToken": "n"})
    for arn in (ARN, ARN + "2"):
        e.add_response("deregister_task_definition", _deregistered(plan), {"taskDefinition": arn})
    assert client.delete("web", "default") == "pod/web deleted"


def test_logs_read_the_awslogs_stream_page_by_page(stubbed: Any) -> None:
    client, e, lg = stubbed
    plan = _plan()

    def get_running() -> None:
        e.add_response("describe_task_definition", _taskdef(plan), None)
        _list_tasks(e, plan.family, [TASK], [])
        e.add_response("describe_tasks", {"tasks": [_task("RUNNING")]}, None)

    get_running()
    with pytest.raises(pod_cli.PodCliError, match="-c for pod web: one of web, side"):
        list(client.log_lines("web", "default", None))
    get_running()
    want = {"logGroupName": "/cellcloud/pods/default",
            "logStreamName": "web/side/0123abcd", "startFromHead": True}
    lg.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "one\n"}],
                                       "nextForwardToken": "f/1"}, want)
    lg.add_response("get_log_events", {"events": [{"timestamp": 2, "message": "two"}],
                                       "nextForwardToken": "f/2"},
                    {**want, "nextToken": "f/1"})
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f/2"},
                    {**want, "nextToken": "f/2"})
    assert list(client.log_lines("web", "default", "side")) == ["one", "two"]
    get_running()
    lg.add_client_error("get_log_events", "ResourceNotFoundException", "no stream")
    assert list(client.log_lines("web", "default", "web")) == []


def test_the_cli_prints_tables_json_and_clean_errors(stubbed: Any, tmp_path: Any,
                                                     monkeypatch: Any) -> None:
    client, e, _ = stubbed
    plan = _plan()
    monkeypatch.setattr(pod_cli, "connect", lambda state_dir, tenant: client)
    runner = CliRunner()

    def get_running() -> None:
        e.add_response("describe_task_definition", _taskdef(plan), None)
        _list_tasks(e, plan.family, [TASK], [])
        e.add_response("describe_tasks", {"tasks": [_task("RUNNING")]}, None)

    get_running()
    out = runner.invoke(app, ["pod", "get", "web", "-o", "wide"])
    assert out.exit_code == 0, out.output
    assert out.output.split("\n")[0].split() == ["NAME", "READY", "STATUS", "AGE", "IP", "TASK"]
    assert out.output.split("\n")[1].split()[:3] == ["web", "2/2", "Running"]
    get_running()
    out = runner.invoke(app, ["pod", "get", "web", "-o", "json"])
    doc = json.loads(out.output)
    assert doc["kind"] == "Pod" and doc["status"]["phase"] == "Running"
    assert doc["metadata"]["labels"] == {"app": "w"}

    bad = tmp_path / "pod.yaml"
    bad.write_text(MANIFEST.replace("image: " + IMG, "image: ''", 1))
    out = runner.invoke(app, ["pod", "apply", "-f", str(bad)])
    assert out.exit_code == 1
    assert "spec.containers[0].image: required" in out.output
    unknown = tmp_path / "unknown.yaml"
    doc = yaml.safe_load(MANIFEST)
    doc["spec"]["containers"][0]["volumeMounts"] = []
    unknown.write_text(yaml.safe_dump(doc))
    out = runner.invoke(app, ["pod", "apply", "-f", str(unknown)])
    assert out.exit_code == 1 and "spec.containers[0].volumeMounts" in out.output
    assert "(remove them, or give --ignore-unknown to run without them)" in out.output
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_response("register_task_definition", _taskdef(plan), plan.register)
    e.add_client_error("run_task", "UnsupportedFeatureException", "RunTask: not yet")
    e.add_response("deregister_task_definition", _deregistered(plan), None)
    out = runner.invoke(app, ["pod", "apply", "-f", str(unknown), "--ignore-unknown"])
    assert out.exit_code == 1, out.output
    assert "warning" in out.output and "volumeMounts" in out.output
    assert "does not run tasks yet" in out.output and "Traceback" not in out.output


def test_without_a_region_the_cli_says_so(tmp_path: Any) -> None:
    out = CliRunner().invoke(app, ["pod", "get", "--state-dir", str(tmp_path)])
    assert out.exit_code == 1 and "No region is running" in out.output


def test_client_error_codes_are_read_from_botocores_shape() -> None:
    e = ClientError({"Error": {"Code": "X", "Message": "m"}}, "Op")
    assert pod_cli._code(e) == "X" and pod_cli._code(ValueError()) == ""


def test_logs_follow_until_the_task_stops(stubbed: Any) -> None:
    client, e, lg = stubbed
    plan = _plan()
    e.add_response("describe_task_definition", _taskdef(plan), None)
    _list_tasks(e, plan.family, [TASK], [])
    e.add_response("describe_tasks", {"tasks": [_task("RUNNING")]}, None)
    want = {"logGroupName": "/cellcloud/pods/default", "logStreamName": "web/web/0123abcd",
            "startFromHead": True}
    lg.add_client_error("get_log_events", "ResourceNotFoundException", "no stream yet")
    e.add_response("describe_tasks", {"tasks": [_task("RUNNING")]},
                   {"cluster": "default", "tasks": [TASK]})
    lg.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "one"}],
                                       "nextForwardToken": "f/1"}, want)
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f/1"},
                    {**want, "nextToken": "f/1"})
    e.add_response("describe_tasks", {"tasks": [_task("STOPPED")]}, None)
    lg.add_response("get_log_events", {"events": [{"timestamp": 2, "message": "last"}],
                                       "nextForwardToken": "f/2"}, {**want, "nextToken": "f/1"})
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f/2"},
                    {**want, "nextToken": "f/2"})
    waits: list[float] = []
    got = list(client.log_events("web", "default", "web", follow=True, wait=waits.append))
    assert got == [(1, "one"), (2, "last")] and waits == [pod_cli.follow_poll_s]
