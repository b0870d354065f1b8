"""The Kubernetes API gateway for kubectl (pod_api.py): what kubectl asks, answered over a
PodClient whose ECS and Logs calls go through botocore's Stubber (checked against the models)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.session import get_session
from botocore.stub import Stubber

from cellcloud import pod_api, pod_cli
from tests.unit.test_pod_cli import (
    ARN,
    IMG,
    REGION,
    TASK,
    _deregistered,
    _list_tasks,
    _not_found,
    _plan,
    _task,
    _taskdef,
)

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


@pytest.fixture
def api() -> Iterator[tuple[pod_api.KubeApi, Stubber, Stubber]]:
    kw = dict(region_name=REGION, endpoint_url="http://127.0.0.1:9", aws_access_key_id="k",
              aws_secret_access_key="s")
    session = get_session()
    ecs, logs = session.create_client("ecs", **kw), session.create_client("logs", **kw)
    with Stubber(ecs) as e, Stubber(logs) as lg:
        yield pod_api.KubeApi(pod_cli.PodClient(ecs, logs, REGION), clock=lambda: 160.0), e, lg
        e.assert_no_pending_responses()
        lg.assert_no_pending_responses()


def _call(api: pod_api.KubeApi, method: str, path: str, body: Any = None,
          accept: str = "application/json") -> tuple[int, Any, list[str]]:
    raw = json.dumps(body).encode() if body is not None else b""
    status, ctype, out, warnings = api.handle(method, path, {"accept": accept}, raw)
    return status, json.loads(out) if ctype == "application/json" else out.decode(), warnings


def _pod(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", **meta},
            "spec": {"containers": [{"name": "web", "image": IMG,
                                     "ports": [{"containerPort": 80}]},
                                    {"name": "side", "image": IMG}]}}


def _running(e: Stubber) -> None:
    plan = _plan()
    e.add_response("describe_task_definition", _taskdef(plan), None)
    _list_tasks(e, plan.family, [TASK], [])
    e.add_response("describe_tasks", {"tasks": [_task("RUNNING")]}, None)


def test_discovery_is_what_kubectl_reads(api: Any) -> None:
    a, _, _ = api
    assert _call(a, "GET", "/api?timeout=32s")[1]["versions"] == ["v1"]
    resources = _call(a, "GET", "/api/v1")[1]["resources"]
    assert {r["name"] for r in resources} == {"pods", "pods/log"}
    assert _call(a, "GET", "/apis")[1]["groups"] == []
    doc = _call(a, "GET", "/openapi/v3/api/v1")[1]
    patch = doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "Pod"
    assert patch["parameters"][0]["name"] == "fieldValidation"
    status, doc, _ = _call(a, "GET", "/api/v1/namespaces/default/services")
    assert status == 404 and doc["kind"] == "Status" and doc["reason"] == "NotFound"


def test_create_runs_the_pod_and_answers_it(api: Any) -> None:
    a, e, _ = api
    plan = _plan()
    _not_found(e, plan.family)  # exists?
    _not_found(e, plan.family)  # apply's own look
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_response("register_task_definition", _taskdef(plan), plan.register)
    e.add_response("run_task", {"tasks": [_task("PROVISIONING")]}, None)
    e.add_response("describe_task_definition", _taskdef(plan), None)
    _list_tasks(e, plan.family, [TASK], [])
    e.add_response("describe_tasks", {"tasks": [_task("PROVISIONING")]}, None)
    body = _pod(labels={"app": "w"}, namespace="default", creationTimestamp=None, annotations={
        pod_api.LAST_APPLIED: "{...}"})
    status, doc, warnings = _call(a, "POST", "/api/v1/namespaces/default/pods?fieldManager="
                                  "kubectl-client-side-apply&fieldValidation=Strict", body)
    assert status == 201 and doc["kind"] == "Pod" and doc["status"]["phase"] == "Pending"
    assert doc["metadata"]["uid"] == "0123abcd" and warnings == []


def test_field_validation_strict_refuses_warn_runs_without(api: Any) -> None:
    a, e, _ = api
    body = _pod(annotations={"team": "x"})
    body["spec"]["containers"][0]["volumeMounts"] = []
    status, doc, _ = _call(a, "POST", "/api/v1/namespaces/default/pods", body)
    assert status == 422 and doc["reason"] == "Invalid"
    assert "metadata.annotations" in doc["message"] and "volumeMounts" in doc["message"]
    assert "--validate=warn" in doc["message"]
    plan = _plan()
    _not_found(e, plan.family)
    _not_found(e, plan.family)
    e.add_response("create_cluster", {"cluster": {"clusterName": "default"}}, None)
    e.add_response("register_task_definition", _taskdef(plan), None)
    e.add_client_error("run_task", "UnsupportedFeatureException", "RunTask: not yet")
    e.add_response("deregister_task_definition", _deregistered(plan), {"taskDefinition": ARN})
    status, doc, _ = _call(a, "POST", "/api/v1/namespaces/default/pods?fieldValidation=Warn",
                           body)
    assert status == 503 and doc["reason"] == "ServiceUnavailable"
    assert "does not run tasks yet" in doc["message"]


def test_conflicts_and_what_a_pod_does_not_do(api: Any) -> None:
    a, e, _ = api
    e.add_response("describe_task_definition", _taskdef(_plan()), None)
    status, doc, _ = _call(a, "POST", "/api/v1/namespaces/default/pods", _pod())
    assert (status, doc["reason"]) == (409, "AlreadyExists")
    status, doc, _ = _call(a, "POST", "/api/v1/namespaces/other/pods", _pod(namespace="x"))
    assert (status, doc["reason"]) == (400, "BadRequest")
    status, doc, _ = _call(a, "PATCH", "/api/v1/namespaces/default/pods/web", {})
    assert (status, doc["reason"]) == (405, "MethodNotAllowed")
    status, doc, _ = _call(a, "POST", "/api/v1/namespaces/default/pods", [1])
    assert (status, doc["reason"]) == (400, "BadRequest")
    _not_found(e, "pod_default_nope")
    status, doc, _ = _call(a, "GET", "/api/v1/namespaces/default/pods/nope")
    assert (status, doc["reason"], doc["message"]) == (404, "NotFound", 'pods "nope" not found')


def test_get_list_as_table_delete_and_log(api: Any) -> None:
    a, e, lg = api
    _running(e)
    status, doc, _ = _call(a, "GET", "/api/v1/namespaces/default/pods/web")
    assert status == 200 and doc["status"]["phase"] == "Running"
    e.add_response("list_task_definition_families", {"families": [_plan().family]},
                   {"familyPrefix": "pod_", "status": "ACTIVE"})
    _running(e)
    status, doc, _ = _call(a, "GET", "/api/v1/pods", accept=TABLE)
    assert doc["kind"] == "Table" and [c["name"] for c in doc["columnDefinitions"]][:3] == [
        "Name", "Ready", "Status"]
    assert doc["rows"][0]["cells"][:3] == ["web", "2/2", "Running"]  # running, no check
    assert doc["rows"][0]["cells"][4] == "1m"  # created at 100 s, now 160 s
    _running(e)
    e.add_response("describe_task_definition", _taskdef(_plan()), None)
    e.add_response("list_tasks", {"taskArns": []}, None)
    e.add_response("list_task_definitions", {"taskDefinitionArns": [ARN]}, None)
    e.add_response("deregister_task_definition", _deregistered(_plan()), None)
    status, doc, _ = _call(a, "DELETE", "/api/v1/namespaces/default/pods/web")
    assert status == 200 and doc["metadata"]["name"] == "web"
    _running(e)
    lg.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "hi"}],
                                       "nextForwardToken": "f"}, None)
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f"}, None)
    status, text, _ = _call(a, "GET", "/api/v1/namespaces/default/pods/web/log?container=web")
    assert (status, text) == (200, "hi\n")


def test_log_options_are_honoured_or_refused_by_name(api: Any) -> None:
    a, e, lg = api
    base = "/api/v1/namespaces/default/pods/web/log?container=web"
    for query, word in (("&follow=true", "follow"), ("&previous=true", "previous"),
                        ("&stream=Stderr", "stream"), ("&sinceMinutes=3", "sinceMinutes")):
        status, doc, _ = _call(a, "GET", base + query)
        assert (status, doc["reason"]) == (400, "BadRequest") and word in doc["message"]
    want = {"logGroupName": "/cellcloud/pods/default", "logStreamName": "web/web/0123abcd",
            "startFromHead": True, "startTime": 100_000}  # now 160 s, since 60 s
    _running(e)
    lg.add_response("get_log_events", {"events": [
        {"timestamp": 100_000 + i, "message": f"line {i}"} for i in range(3)],
        "nextForwardToken": "f"}, want)
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f"},
                    {**want, "nextToken": "f"})
    status, text, _ = _call(a, "GET", base + "&sinceSeconds=60&tailLines=2&timestamps=true"
                                        "&timeout=32s")
    assert text == "1970-01-01T00:01:40.001000Z line 1\n1970-01-01T00:01:40.002000Z line 2\n"
    _running(e)
    lg.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "abcdef"}],
                                       "nextForwardToken": "f"}, None)
    lg.add_response("get_log_events", {"events": [], "nextForwardToken": "f"}, None)
    assert _call(a, "GET", base + "&limitBytes=3")[1] == "abc"


def test_the_gateway_listens_on_an_ip_address_only() -> None:
    from typer.testing import CliRunner

    from cellcloud.cli import app
    out = CliRunner().invoke(app, ["pod", "api", "--address", "localhost"])
    assert out.exit_code == 1 and "an IP address, such as 127.0.0.1" in out.output
