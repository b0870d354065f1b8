"""The control plane's ECS shell (control/ecs.py) in-process, over a real SQLite configuration
store and a fake cell registry: shapes and errors as botocore's ``ecs`` model names them,
revisions per family, pagination, tenant isolation and the image check."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from cellcloud.control.configstore import SqliteConfigStore
from cellcloud.control.ecs import TARGET_PREFIX, Ecs, parse_image
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.transport import TransportError

A, B = "111122223333", "444455556666"
REGION = "cc-local-1"
HOST = "127.0.0.1:8080"
MODEL = botocore.session.get_session().get_service_model("ecs")
ERRORS = {s.name for s in MODEL.error_shapes}


class FakeRegistry:
    """A cell frontend's ``registry`` op: (account, repository, reference) images it holds."""

    def __init__(self) -> None:
        self.images = {(A, "team/web", "v1"), (B, "other/app", "latest")}
        self.down = False
        self.calls: list[dict[str, Any]] = []

    async def call(self, op: str, req: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if op == "ecs_tasks":  # a cell that runs no task (tests/control/test_ecs_tasks.py)
            assert req["op"] in ("counts", "list", "describe", "service_list",
                                 "service_describe"), req
            return {"running": 0, "pending": 0, "taskIds": [], "tasks": [],
                    "serviceArns": [], "services": [],
                    "failures": [{"arn": t, "reason": "MISSING"} for t in req.get("tasks", [])]}
        assert op == "registry" and req["m"] == "HEAD" and req["k"] == "manifest"
        self.calls.append(req)
        if self.down:
            raise TransportError("connection refused")
        found = (req["a"], req["n"], req["r"]) in self.images
        return {"s": 200 if found else 404, "h": {}, "b": b""}


class Api:
    def __init__(self, store: SqliteConfigStore, registry: FakeRegistry) -> None:
        self.now = 1_800_000_000_000
        self.ecs = Ecs(store, REGION, lambda account: registry,  # type: ignore[arg-type,return-value]
                       clock=lambda: self.now)

    def __call__(self, op: str, doc: Any = None, account: str = A,
                 raw: bytes | None = None) -> tuple[int, str, dict[str, Any]]:
        body = raw if raw is not None else json.dumps(doc or {}).encode()
        r = asyncio.run(self.ecs.op({"target": TARGET_PREFIX + op, "b": body, "a": account}))
        out = json.loads(r["b"])
        if r["s"] != 200:
            assert r["h"]["x-amzn-errortype"] == out["__type"]
            assert r["h"]["content-type"] == "application/x-amz-json-1.1"
            return r["s"], out["__type"], out
        return 200, "", out

    def ok(self, op: str, doc: Any = None, account: str = A) -> dict[str, Any]:
        status, err, out = self(op, doc, account)
        assert status == 200, (err, out)
        return out

    def err(self, op: str, doc: Any = None, account: str = A) -> tuple[str, str]:
        status, err, out = self(op, doc, account)
        assert status in (400, 500), out
        # Every error is one botocore's model names, so boto3 raises the modelled exception
        # (SerializationException/UnknownOperationException are the protocol's own).
        assert err in ERRORS | {"SerializationException", "UnknownOperationException"}, err
        return err, out["message"]


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def api(tmp_path: Path, registry: FakeRegistry) -> Api:
    return Api(SqliteConfigStore(str(tmp_path / "config.db")), registry)


def taskdef(family: str = "web", image: str = f"{HOST}/team/web:v1", cpu: str = "256",
            memory: str = "512", **extra: Any) -> dict[str, Any]:
    return {"family": family, "networkMode": "awsvpc", "requiresCompatibilities": ["FARGATE"],
            "cpu": cpu, "memory": memory,
            "containerDefinitions": [{"name": "app", "image": image,
                                      "portMappings": [{"containerPort": 8080}]}], **extra}


def test_clusters_create_describe_list_delete(api: Api) -> None:
    c = api.ok("CreateCluster", {"clusterName": "prod", "tags": [{"key": "team",
                                                                   "value": "a"}]})["cluster"]
    assert c["clusterArn"] == f"arn:aws:ecs:{REGION}:{A}:cluster/prod"
    assert c["status"] == "ACTIVE" and c["clusterName"] == "prod"
    # creating it again returns the same cluster (ECS is idempotent here)
    assert api.ok("CreateCluster", {"clusterName": "prod"})["cluster"]["clusterArn"] \
        == c["clusterArn"]
    api.ok("CreateCluster", {})  # "default"
    arns = api.ok("ListClusters")["clusterArns"]
    assert arns == [f"arn:aws:ecs:{REGION}:{A}:cluster/default", c["clusterArn"]]
    d = api.ok("DescribeClusters", {"clusters": ["prod", c["clusterArn"], "nope"],
                                    "include": ["TAGS"]})
    assert [x["clusterName"] for x in d["clusters"]] == ["prod", "prod"]
    assert d["clusters"][0]["tags"] == [{"key": "team", "value": "a"}]
    assert d["failures"] == [{"arn": f"arn:aws:ecs:{REGION}:{A}:cluster/nope",
                              "reason": "MISSING"}]
    assert "tags" not in api.ok("DescribeClusters", {"clusters": ["prod"]})["clusters"][0]
    assert api.ok("DeleteCluster", {"cluster": "prod"})["cluster"]["status"] == "INACTIVE"
    assert api.err("DeleteCluster", {"cluster": "prod"})[0] == "ClusterNotFoundException"
    assert api.err("CreateCluster", {"clusterName": "bad name!"})[0] \
        == "InvalidParameterException"
    assert api.err("CreateCluster", {"clusterName": "x", "capacityProviders": ["FARGATE"]}) \
        == ("InvalidParameterException", "capacityProviders is not supported by cellcloud")


def test_clusters_and_task_definitions_are_per_tenant(api: Api) -> None:
    api.ok("CreateCluster", {"clusterName": "mine"})
    api.ok("RegisterTaskDefinition", taskdef())
    assert api.ok("ListClusters", account=B)["clusterArns"] == []
    arn_a = f"arn:aws:ecs:{REGION}:{A}:cluster/mine"
    assert api.ok("DescribeClusters", {"clusters": [arn_a, "mine"]}, account=B)["failures"] \
        == [{"arn": arn_a, "reason": "MISSING"},
            {"arn": f"arn:aws:ecs:{REGION}:{B}:cluster/mine", "reason": "MISSING"}]
    assert api.err("DeleteCluster", {"cluster": arn_a}, account=B)[0] \
        == "ClusterNotFoundException"
    assert api.ok("ListTaskDefinitions", account=B)["taskDefinitionArns"] == []
    assert api.ok("ListTaskDefinitionFamilies", account=B)["families"] == []
    for ident in ("web", "web:1", f"arn:aws:ecs:{REGION}:{A}:task-definition/web:1"):
        assert api.err("DescribeTaskDefinition", {"taskDefinition": ident}, account=B) \
            == ("ClientException", "Unable to describe task definition.")
    assert api.err("DeregisterTaskDefinition", {"taskDefinition": "web:1"}, account=B)[0] \
        == "ClientException"
    # B's own family of the same name starts at revision 1 and A's is untouched.
    b = api.ok("RegisterTaskDefinition", taskdef(image=f"{HOST}/other/app"), account=B)
    assert b["taskDefinition"]["revision"] == 1
    assert api.ok("DescribeTaskDefinition", {"taskDefinition": "web"})["taskDefinition"][
        "containerDefinitions"][0]["image"] == f"{HOST}/team/web:v1"


def test_register_describe_revisions_and_deregister(api: Api) -> None:
    r1 = api.ok("RegisterTaskDefinition", taskdef(tags=[{"key": "k", "value": "v"}]))
    d = r1["taskDefinition"]
    assert d["taskDefinitionArn"] == f"arn:aws:ecs:{REGION}:{A}:task-definition/web:1"
    assert (d["revision"], d["status"], d["cpu"], d["memory"], d["networkMode"]) \
        == (1, "ACTIVE", "256", "512", "awsvpc")
    assert d["requiresCompatibilities"] == ["FARGATE"]
    assert d["containerDefinitions"][0]["portMappings"] == [
        {"containerPort": 8080, "hostPort": 8080, "protocol": "tcp"}]
    assert d["containerDefinitions"][0]["essential"] is True
    assert d["registeredAt"] == api.now / 1000
    assert r1["tags"] == [{"key": "k", "value": "v"}]
    r2 = api.ok("RegisterTaskDefinition", taskdef(cpu="1 vCPU", memory="2 GB"))
    assert r2["taskDefinition"]["revision"] == 2
    assert (r2["taskDefinition"]["cpu"], r2["taskDefinition"]["memory"]) == ("1024", "2048")
    # a family alone names its latest ACTIVE revision
    assert api.ok("DescribeTaskDefinition", {"taskDefinition": "web"})["taskDefinition"][
        "revision"] == 2
    got = api.ok("DescribeTaskDefinition", {"taskDefinition": "web:1", "include": ["TAGS"]})
    assert got["tags"] == [{"key": "k", "value": "v"}]
    api.now += 5_000
    dereg = api.ok("DeregisterTaskDefinition", {"taskDefinition": "web:2"})["taskDefinition"]
    assert dereg["status"] == "INACTIVE" and dereg["deregisteredAt"] == api.now / 1000
    assert api.ok("DescribeTaskDefinition", {"taskDefinition": "web"})["taskDefinition"][
        "revision"] == 1
    # the revision is still described, INACTIVE
    assert api.ok("DescribeTaskDefinition", {"taskDefinition": "web:2"})["taskDefinition"][
        "status"] == "INACTIVE"
    assert api.err("DeregisterTaskDefinition", {"taskDefinition": "web"})[0] == "ClientException"
    assert api.err("DescribeTaskDefinition", {"taskDefinition": "web:9"})[0] == "ClientException"
    assert api.err("DescribeTaskDefinition", {"taskDefinition": "web:x"}) \
        == ("ClientException", "Invalid revision number. Number: x")
    # delete: only INACTIVE revisions; the number is never reused
    out = api.ok("DeleteTaskDefinitions", {"taskDefinitions": ["web:1", "web:2"]})
    assert [t["revision"] for t in out["taskDefinitions"]] == [2]
    assert out["taskDefinitions"][0]["status"] == "DELETE_IN_PROGRESS"
    assert "still in ACTIVE status" in out["failures"][0]["reason"]
    assert api.ok("ListTaskDefinitions", {"status": "INACTIVE"})["taskDefinitionArns"] == []
    assert api.ok("RegisterTaskDefinition", taskdef())["taskDefinition"]["revision"] == 3


def test_bad_cpu_memory_and_invalid_definitions_are_client_errors(api: Api) -> None:
    for cpu, memory in (("256", "4096"), ("512", "512"), ("300", "1024"), ("1 vCPU", "1 GB")):
        err, msg = api.err("RegisterTaskDefinition", taskdef(cpu=cpu, memory=memory))
        assert err == "ClientException"
        assert msg.startswith("No Fargate configuration exists for given values"), msg
    assert api.err("RegisterTaskDefinition", taskdef(networkMode="bridge")) \
        == ("ClientException", "Fargate only supports network mode 'awsvpc'.")
    err, msg = api.err("RegisterTaskDefinition", taskdef(volumes=[{"name": "v"}]))
    assert err == "ClientException" and "configuredAtLaunch: true" in msg  # managed only
    assert api.err("RegisterTaskDefinition", {"family": "x"})[0] == "ClientException"
    assert api("RegisterTaskDefinition", raw=b"{nope")[1] == "SerializationException"
    # nothing was registered by any of them
    assert api.ok("ListTaskDefinitionFamilies", {"status": "ALL"})["families"] == []


def test_images_must_be_the_tenants_own_in_the_region_registry(api: Api,
                                                               registry: FakeRegistry) -> None:
    for image in ("nginx:latest", "library/nginx", "x/", "h.io:1/"):
        err, msg = api.err("RegisterTaskDefinition", taskdef(image=image))
        assert err == "ClientException" and "this region's registry" in msg, (image, msg)
    assert registry.calls == []  # refused before asking the registry
    # a host that is not this region's: looked up in the tenant's registry all the same
    err, msg = api.err("RegisterTaskDefinition", taskdef(image="docker.io/library/nginx:1"))
    assert err == "ClientException" and "images of other registries cannot be used" in msg
    registry.calls.clear()
    # another tenant's image (B's other/app) is not found in A's namespace, the same answer
    # as an image that does not exist anywhere
    err, msg = api.err("RegisterTaskDefinition", taskdef(image=f"{HOST}/other/app:latest"))
    assert err == "ClientException" and "no image 'latest' in repository 'other/app'" in msg
    assert api.err("RegisterTaskDefinition", taskdef(image=f"{HOST}/team/web:v2"))[0] \
        == "ClientException"
    assert {(c["a"], c["n"], c["r"]) for c in registry.calls} == {
        (A, "other/app", "latest"), (A, "team/web", "v2")}
    registry.down = True
    err, msg = api.err("RegisterTaskDefinition", taskdef())
    assert err == "ServerException" and "registry is unavailable" in msg
    assert api.ok("ListTaskDefinitionFamilies", {"status": "ALL"})["families"] == []
    assert parse_image(f"{HOST}/team/web@sha256:{'a' * 64}") == ("team/web", f"sha256:{'a' * 64}")
    assert parse_image("localhost:5000/a/b/c") == ("a/b/c", "latest")


def test_listing_filters_sorts_and_pages(api: Api) -> None:
    for fam in ("api", "web", "web", "webhook", "api"):
        api.ok("RegisterTaskDefinition", taskdef(family=fam))
    api.ok("DeregisterTaskDefinition", {"taskDefinition": "webhook:1"})
    arn = f"arn:aws:ecs:{REGION}:{A}:task-definition/"
    assert api.ok("ListTaskDefinitions")["taskDefinitionArns"] == [
        arn + "api:1", arn + "api:2", arn + "web:1", arn + "web:2"]
    # familyPrefix is the whole family name, as ECS has it (webhook is not web's)
    assert api.ok("ListTaskDefinitions", {"familyPrefix": "web", "sort": "DESC"})[
        "taskDefinitionArns"] == [arn + "web:2", arn + "web:1"]
    assert api.ok("ListTaskDefinitions", {"status": "INACTIVE"})["taskDefinitionArns"] \
        == [arn + "webhook:1"]
    assert api.ok("ListTaskDefinitionFamilies")["families"] == ["api", "web"]
    assert api.ok("ListTaskDefinitionFamilies", {"familyPrefix": "web", "status": "ALL"})[
        "families"] == ["web", "webhook"]
    assert api.ok("ListTaskDefinitionFamilies", {"status": "INACTIVE"})["families"] \
        == ["webhook"]
    pages, doc = [], {"maxResults": 3}
    while True:
        out = api.ok("ListTaskDefinitions", doc)
        pages.append(out["taskDefinitionArns"])
        if "nextToken" not in out:
            break
        doc = {"maxResults": 3, "nextToken": out["nextToken"]}
    assert pages == [[arn + "api:1", arn + "api:2", arn + "web:1"], [arn + "web:2"]]
    assert api.err("ListTaskDefinitions", {"nextToken": "garbage"})[0] \
        == "InvalidParameterException"
    assert api.err("ListTaskDefinitions", {"maxResults": 0})[0] == "InvalidParameterException"
    assert api.err("ListTaskDefinitions", {"sort": "UP"})[0] == "InvalidParameterException"


def test_tags_on_clusters_and_task_definitions(api: Api) -> None:
    c = api.ok("CreateCluster", {"clusterName": "t"})["cluster"]["clusterArn"]
    t = api.ok("RegisterTaskDefinition", taskdef())["taskDefinition"]["taskDefinitionArn"]
    for arn in (c, t):
        api.ok("TagResource", {"resourceArn": arn, "tags": [{"key": "a", "value": "1"},
                                                            {"key": "b", "value": "2"}]})
        api.ok("TagResource", {"resourceArn": arn, "tags": [{"key": "a", "value": "3"}]})
        api.ok("UntagResource", {"resourceArn": arn, "tagKeys": ["b"]})
        assert api.ok("ListTagsForResource", {"resourceArn": arn})["tags"] \
            == [{"key": "a", "value": "3"}]
        assert api.err("ListTagsForResource", {"resourceArn": arn}, account=B)[0] \
            == "InvalidParameterException"


def test_other_operations_are_named_as_not_supported(api: Api) -> None:
    err, msg = api.err("CreateTaskSet", {"service": "web"})
    assert err == "UnsupportedFeatureException" and "CreateTaskSet" in msg
    assert "CreateTaskSet" in MODEL.operation_names
    r = asyncio.run(api.ecs.op({"target": "Nope.X", "b": b"{}", "a": A}))
    assert r["s"] == 400 and json.loads(r["b"])["__type"] == "UnknownOperationException"


def test_served_operations_and_limits(api: Api) -> None:
    for op in api.ecs._ops:  # every served name is an operation of botocore's model
        assert op in MODEL.operation_names, op
    big = b'{"family": "' + b"x" * DEFAULT_LIMITS.ecs_request_bytes_max + b'"}'
    status, err, out = api("RegisterTaskDefinition", raw=big)
    assert (status, err) == (400, "ClientException") and "ecs_request_bytes_max" in out["message"]
    api.ecs.limits = replace(DEFAULT_LIMITS, ecs_clusters_per_tenant_max=2,
                             ecs_task_definitions_per_tenant_max=2)
    for name in ("a", "b"):
        api.ok("CreateCluster", {"clusterName": name})
        api.ok("RegisterTaskDefinition", taskdef(family=name))
    assert api.err("CreateCluster", {"clusterName": "c"})[0] == "LimitExceededException"
    assert api.err("RegisterTaskDefinition", taskdef())[0] == "LimitExceededException"
    api.ok("CreateCluster", {"clusterName": "a"})  # an existing one is still returned
    api.ok("CreateCluster", {"clusterName": "c"}, account=B)  # per account


def test_concurrent_registrations_get_distinct_revisions(api: Api) -> None:
    """The family's revision counter moves by compare-and-set: registrations racing each
    other (the SQLite store answers from a worker thread) never share a revision."""
    async def race() -> list[dict[str, Any]]:
        body = json.dumps(taskdef()).encode()
        return list(await asyncio.gather(*(
            api.ecs.op({"target": TARGET_PREFIX + "RegisterTaskDefinition", "b": body, "a": A})
            for _ in range(6))))

    replies = asyncio.run(race())
    assert [r["s"] for r in replies] == [200] * 6
    revisions = sorted(json.loads(r["b"])["taskDefinition"]["revision"] for r in replies)
    assert revisions == [1, 2, 3, 4, 5, 6]
    assert len(api.ok("ListTaskDefinitions")["taskDefinitionArns"]) == 6


def test_listing_and_counting_read_only_the_small_status_records(tmp_path: Path,
                                                                  registry: FakeRegistry) -> None:
    """A revision's definition may be up to ecs_request_bytes_max: listing, counting and
    finding the latest revision read the status records only, never every definition."""
    store = SqliteConfigStore(str(tmp_path / "config.db"))
    listed: list[str] = []
    real_list = store.list

    async def spy(prefix: str) -> Any:
        listed.append(prefix)
        return await real_list(prefix)

    store.list = spy  # type: ignore[method-assign]
    api = Api(store, registry)
    for fam in ("a", "a", "b"):
        api.ok("RegisterTaskDefinition", taskdef(family=fam))
    api.ok("DeregisterTaskDefinition", {"taskDefinition": "a:1"})
    api.ok("DescribeTaskDefinition", {"taskDefinition": "a"})
    api.ok("ListTaskDefinitions", {"status": "INACTIVE"})
    api.ok("ListTaskDefinitionFamilies", {"status": "ALL"})
    api.ok("DeleteTaskDefinitions", {"taskDefinitions": ["a:1"]})
    assert listed and all(p.startswith("cellcloud/ecs/taskdef-status/") for p in listed), listed
    assert api.ok("DescribeTaskDefinition", {"taskDefinition": "a"})["taskDefinition"][
        "revision"] == 2


def test_every_operation_of_the_model_gets_an_ecs_shaped_answer(api: Api) -> None:
    """Each of botocore's ECS operations: served, or UnsupportedFeatureException naming it
    (a modelled error, so boto3 raises ``ecs.exceptions.UnsupportedFeatureException``)."""
    served = set(api.ecs._ops)
    for op in MODEL.operation_names:
        status, err, out = api(op, {})
        if op in served:
            assert err != "UnsupportedFeatureException", op
        else:
            assert (status, err) == (400, "UnsupportedFeatureException"), (op, out)
            assert op in out["message"]
    assert api.ecs.counters["unsupported"] == len(set(MODEL.operation_names) - served)
