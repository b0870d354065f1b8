"""The ECS API's first slice in the control plane (issue #17, docs/fargate.md): clusters and
task definitions, per tenant, in the region's configuration store. boto3's ``ecs`` client and
the AWS CLI reach it through the router (JSON 1.1, ``X-Amz-Target:
AmazonEC2ContainerServiceV20141113.<Operation>``, SigV4 service ``ecs``), which forwards the
body and the caller's account here (op ``ecs``, pki.OPS_ALLOWED).

Validation is ``core/ecs_taskdef.py``'s; this is the shell: the store (compare-and-set for a
family's revision counter, so two registrations never share a revision), the image check
against the tenant's own registry (in its cell: the frontend's ``registry`` op, HEAD of the
manifest), and botocore's shapes and error names. Any other ECS operation is answered
``UnsupportedFeatureException`` naming it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import ecs_taskdef as td
from ..core import ecs_volumes as ev
from ..core.ecs_taskdef import EcsError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..registry import core as reg
from ..transport import CallTimeout, Client, RemoteError, TransportError
from . import autoscaling as aas
from .configstore import ConfigStore, ConfigStoreError, ConfigStoreUnavailable
from .ec2 import Ec2

log = logging.getLogger("cellcloud.control.ecs")

TARGET_PREFIX = td.TARGET_PREFIX
CLUSTERS = "cellcloud/ecs/clusters/"  # <account>/<name> -> the cluster
# A revision is two records: its definition and tags (up to ecs_request_bytes_max), and a small
# status record ({"status", "deregisteredAt"}) that alone is listed, counted and changed by
# Deregister. Written definition first, status second (the status record's existence is the
# revision's); deleted status first.
TASKDEFS = "cellcloud/ecs/taskdefs/"  # <account>/<family>/<revision, 7 digits> -> definition
STATUS = "cellcloud/ecs/taskdef-status/"  # <account>/<family>/<revision, 7 digits> -> status
FAMILIES = "cellcloud/ecs/families/"  # <account>/<family> -> {"last": revision}
# A task's managed volume (RunTask volumeConfigurations), until it is detached (and deleted,
# deleteOnTermination) after its task stopped: <account>/<volume id> -> {cluster, task, ...}
TASK_VOLUMES = "cellcloud/ecs/task-volumes/"
# Accounts with a service that has managed volumes (its cell's pools are topped up by the
# volume round): <account> -> {}
SERVICE_VOLUMES = "cellcloud/ecs/service-volumes/"
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_REVISION_DIGITS = 7
revisions_max = 10 ** _REVISION_DIGITS - 1
registry_check_timeout_s = 10.0
tasks_call_timeout_s = 30.0  # the tenant's cell's ecs_tasks op (RunTask places up to 10)
_TASK_ID = re.compile(r"^[0-9a-f]{32}$")
EBS_ATTACHMENT = "AmazonElasticBlockStorage"  # a task's attachments[] entry of its volume
_STARTED_BY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# RunTask's members cellcloud honours; any other given a value is refused by name.
_RUN_TASK_MEMBERS = frozenset({"cluster", "taskDefinition", "count", "launchType",
                               "overrides", "startedBy", "group", "tags", "platformVersion",
                               "clientToken", "networkConfiguration"}) | {"volumeConfigurations"}
# Errors of the cell's ecs_tasks op that are the API's own (botocore's model names them).
_CELL_ERRORS = frozenset({"InvalidParameterException", "ClientException",
                          "LimitExceededException", "ClusterNotFoundException",
                          "ServiceNotFoundException", "ServiceNotActiveException",
                          # the application-autoscaling API's (control/autoscaling.py)
                          "ValidationException", "ObjectNotFoundException"})
# CreateService's and UpdateService's members cellcloud honours; any other given a value is
# refused by name (a load balancer, capacity providers, placement, Service Connect, …).
_CREATE_SERVICE_MEMBERS = frozenset({
    "cluster", "serviceName", "taskDefinition", "desiredCount", "clientToken", "launchType",
    "platformVersion", "deploymentConfiguration", "schedulingStrategy",
    "deploymentController", "tags", "propagateTags", "networkConfiguration",
    "volumeConfigurations"})
_UPDATE_SERVICE_MEMBERS = frozenset({
    "cluster", "service", "desiredCount", "taskDefinition", "deploymentConfiguration",
    "platformVersion", "forceNewDeployment", "deploymentController", "propagateTags",
    "networkConfiguration", "volumeConfigurations"})
_SERVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,254}$")


class ApiError(Exception):
    def __init__(self, type_: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.type, self.message, self.status = type_, message, status

    def reply(self) -> dict[str, Any]:
        return {"s": self.status, "h": {"x-amzn-errortype": self.type,
                                        "content-type": "application/x-amz-json-1.1"},
                "b": json.dumps({"__type": self.type, "message": self.message}).encode()}


def client_error(message: str) -> ApiError:
    return ApiError("ClientException", message)


def invalid(message: str) -> ApiError:
    return ApiError("InvalidParameterException", message)


def cluster_not_found() -> ApiError:
    return ApiError("ClusterNotFoundException", "Cluster not found.")


def _now_s(clock_ms: int) -> float:
    return clock_ms / 1000


# -- request members (pure) ----------------------------------------------------------------------
def _str(doc: dict[str, Any], key: str, default: str | None = None) -> str | None:
    v = doc.get(key, default)
    if v is not None and not isinstance(v, str):
        raise invalid(f"{key} must be a string")
    return v


def _str_list(doc: dict[str, Any], key: str) -> list[str]:
    v = doc.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid(f"{key} must be a list of strings")
    return v


def _max_results(doc: dict[str, Any]) -> int:
    v = doc.get("maxResults", 100)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100:
        raise invalid("maxResults must be an integer from 1 to 100")
    return v


def _page(items: list[str], doc: dict[str, Any], member: str) -> dict[str, Any]:
    """One page of ``items`` from ``nextToken`` (an opaque offset), ``maxResults`` long."""
    n = _max_results(doc)
    token = _str(doc, "nextToken")
    start = 0
    if token:
        try:
            start = int(json.loads(base64.b64decode(token, validate=True))["o"])
        except (ValueError, KeyError, TypeError):
            raise invalid("Invalid nextToken") from None
        if not 0 <= start <= len(items):
            raise invalid("Invalid nextToken")
    out: dict[str, Any] = {member: items[start:start + n]}
    if start + n < len(items):
        out["nextToken"] = base64.b64encode(json.dumps({"o": start + n}).encode()).decode()
    return out


def _tags(v: Any) -> list[dict[str, str]]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise invalid("tags must be a list of {key, value}")
    out = []
    for t in v:
        if not isinstance(t, dict) or not isinstance(t.get("key"), str) \
                or not 1 <= len(t["key"]) <= 128 or not isinstance(t.get("value", ""), str) \
                or len(t.get("value", "")) > 256:
            raise invalid("a tag is {key: 1 to 128 characters, value: at most 256}")
        out.append({"key": t["key"], "value": t.get("value", "")})
    if len(out) > 50:
        raise invalid("a resource has at most 50 tags")
    return out


_SUBNET = re.compile(r"^subnet-[0-9a-z][0-9a-z-]{0,62}$")
_SECURITY_GROUP = re.compile(r"^sg-[0-9a-z][0-9a-z-]{0,62}$")


def network_configuration(v: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any] | None:
    """RunTask's, CreateService's and UpdateService's ``networkConfiguration`` as ECS shapes
    it: ``{awsvpcConfiguration: {subnets, securityGroups, assignPublicIp}}``, with
    ``assignPublicIp`` filled in (DISABLED, as ECS's default); None: not given. The region is
    one flat network: a subnet id (``subnet-…``, as many as ECS takes) names no placement and
    is echoed (DescribeTasks' ENI ``subnetId`` is the first), as are the security groups
    (``sg-…``), which all stand for the one rule set every task has (the host and the router
    reach its mapped ports, nothing else does). ``assignPublicIp`` is what is enforced:
    ENABLED, the task has egress under the region's policy; DISABLED, it opens no connection
    out (docs/fargate.md)."""
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - {"awsvpcConfiguration"}:
        raise invalid("networkConfiguration is {awsvpcConfiguration: {subnets, "
                      "securityGroups, assignPublicIp}}")
    cfg = v.get("awsvpcConfiguration")
    if not isinstance(cfg, dict):
        raise invalid("networkConfiguration.awsvpcConfiguration is required")
    for k in cfg:
        if k not in ("subnets", "securityGroups", "assignPublicIp"):
            raise invalid(f"networkConfiguration.awsvpcConfiguration.{str(k)[:40]} is not "
                          "supported by cellcloud")
    subnets = cfg.get("subnets")
    if not isinstance(subnets, list) or not subnets \
            or not all(isinstance(x, str) for x in subnets):
        raise invalid("subnets can not be empty.")
    if len(subnets) > limits.ecs_awsvpc_subnets_max:
        raise invalid(f"subnets can have at most {limits.ecs_awsvpc_subnets_max} items.")
    for x in subnets:
        if not _SUBNET.match(x):
            raise invalid(f"Error retrieving subnet information for {x[:80]!r}: a subnet id "
                          "is subnet- and up to 63 lowercase letters, digits and hyphens")
    groups = cfg.get("securityGroups")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(x, str) for x in groups):
        raise invalid("securityGroups must be a list of strings")
    if len(groups) > limits.ecs_awsvpc_security_groups_max:
        raise invalid(f"securityGroups can have at most "
                      f"{limits.ecs_awsvpc_security_groups_max} items.")
    for x in groups:
        if not _SECURITY_GROUP.match(x):
            raise invalid(f"Error retrieving security group information for {x[:80]!r}: a "
                          "security group id is sg- and up to 63 lowercase letters, digits "
                          "and hyphens")
    public = cfg.get("assignPublicIp", "DISABLED")
    if public not in ("ENABLED", "DISABLED"):
        raise invalid("assignPublicIp must be ENABLED or DISABLED")
    return {"awsvpcConfiguration": {"subnets": list(dict.fromkeys(subnets)),
                                    "securityGroups": list(dict.fromkeys(groups)),
                                    "assignPublicIp": public}}


def parse_image(image: str) -> tuple[str, str]:
    """A container ``image`` → (repository, tag or digest) in the region's registry: it must
    be ``<endpoint host:port>/<repository>[:tag | @sha256:…]``; the repository is looked up in
    the caller's own namespace (as Lambda's ImageUri is, frontend/image_functions.py)."""
    host, sep, rest = image.partition("/")
    if not sep or not rest or not _HOST.match(host) \
            or ("." not in host and ":" not in host and host != "localhost"):
        raise client_error(
            f"Container image {image[:300]!r} must name an image in this region's registry "
            "(<endpoint host:port>/<repository>:<tag> or @sha256:<digest>); other registries "
            "are not reachable from cellcloud")
    if "@" in rest:
        repo, _, ref = rest.partition("@")
    else:
        slash, colon = rest.rfind("/"), rest.rfind(":")
        repo, ref = (rest[:colon], rest[colon + 1:]) if colon > slash else (rest, "latest")
    try:
        reg.check_repo_name(repo)
        reg.check_reference(ref)
    except reg.RegistryError as e:
        raise client_error(f"Container image {image[:300]!r}: {e.message}") from None
    return repo, ref


def describe_container(c: dict[str, Any]) -> dict[str, Any]:
    """A container definition as DescribeTaskDefinition shows it: ECS's defaults filled in."""
    out = {k: v for k, v in c.items() if v not in (None, [], {}, "")}
    out.setdefault("cpu", 0)
    out.setdefault("essential", True)
    out["portMappings"] = [{**p, "hostPort": p.get("hostPort", p.get("containerPort")),
                            "protocol": p.get("protocol", "tcp")}
                           for p in c.get("portMappings") or []]
    out.setdefault("environment", [])
    out["mountPoints"], out["volumesFrom"] = [], []
    return out


def _container_overrides(overrides: Any) -> list[dict[str, Any]]:
    """RunTask's ``overrides``: ``containerOverrides`` with ``command`` and ``environment``;
    any other member given a value is refused by name."""
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        raise invalid("overrides must be an object")
    for k, v in overrides.items():
        if k != "containerOverrides" and v not in (None, [], {}, ""):
            raise invalid(f"overrides.{k} is not supported by cellcloud")
    items = overrides.get("containerOverrides") or []
    if not isinstance(items, list) or len(items) > 10:
        raise invalid("overrides.containerOverrides is a list of at most 10 containers")
    out: list[dict[str, Any]] = []
    for o in items:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise invalid("each containerOverrides entry needs a name")
        for k, v in o.items():
            if k not in ("name", "command", "environment") and v not in (None, [], {}, ""):
                raise invalid(f"overrides.containerOverrides[].{k} is not supported by "
                              "cellcloud")
        one: dict[str, Any] = {"name": o["name"]}
        if o.get("command") is not None:
            if not isinstance(o["command"], list) or not all(
                    isinstance(a, str) for a in o["command"]):
                raise invalid("containerOverrides[].command must be a list of strings")
            one["command"] = o["command"]
        if o.get("environment") is not None:
            env = o["environment"]
            if not isinstance(env, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("name"), str)
                    and isinstance(e.get("value", ""), str) for e in env):
                raise invalid("containerOverrides[].environment must be {name, value} strings")
            one["environment"] = [{"name": e["name"], "value": e.get("value", "")}
                                  for e in env]
        out.append(one)
    return out


class Ecs:
    """The ``ecs`` op of one control plane."""

    def __init__(self, store: ConfigStore, region: str,
                 frontend_for: Callable[[str], Client | None],
                 clock: Callable[[], int] | None = None, limits: Limits = DEFAULT_LIMITS,
                 check_images: bool = True) -> None:
        self.store = store
        self.region = region
        self.frontend_for = frontend_for  # account -> its cell's frontend (the registry)
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.limits = limits
        self.check_images = check_images
        self.counters = {"requests": 0, "errors": 0, "unsupported": 0, "cas_lost": 0}
        self._ops: dict[str, Callable[[str, dict[str, Any]], Any]] = {
            "CreateCluster": self.create_cluster, "DescribeClusters": self.describe_clusters,
            "ListClusters": self.list_clusters, "DeleteCluster": self.delete_cluster,
            "RegisterTaskDefinition": self.register_task_definition,
            "DescribeTaskDefinition": self.describe_task_definition,
            "ListTaskDefinitions": self.list_task_definitions,
            "ListTaskDefinitionFamilies": self.list_task_definition_families,
            "DeregisterTaskDefinition": self.deregister_task_definition,
            "DeleteTaskDefinitions": self.delete_task_definitions,
            "TagResource": self.tag_resource, "UntagResource": self.untag_resource,
            "ListTagsForResource": self.list_tags_for_resource,
            "RunTask": self.run_task, "StopTask": self.stop_task,
            "DescribeTasks": self.describe_tasks, "ListTasks": self.list_tasks,
            "CreateService": self.create_service, "UpdateService": self.update_service,
            "DeleteService": self.delete_service, "DescribeServices": self.describe_services,
            "ListServices": self.list_services,
        }
        self.autoscaling = aas.AutoScaling(self)
        #: the EC2 volume records (control/ec2.py): a task's managed volumes are made there
        self.ec2: Ec2 | None = None

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    # -- the op --------------------------------------------------------------------------------
    async def op(self, req: dict[str, Any]) -> dict[str, Any]:
        self.counters["requests"] += 1
        try:
            out = await self._call(str(req.get("target") or ""), bytes(req.get("b") or b"{}"),
                                   str(req["a"]))
        except EcsError as e:
            self.counters["errors"] += 1
            return ApiError(e.type, e.message).reply()
        except ApiError as e:
            self.counters["errors"] += 1
            return e.reply()
        except ConfigStoreUnavailable as e:
            log.warning("config store: %s", e)
            return ApiError("ServerException", "The ECS store is unavailable; try again",
                            500).reply()
        except ConfigStoreError as e:
            return client_error(f"The request does not fit the region's configuration store: "
                                f"{e}").reply()
        return {"s": 200, "h": {"content-type": "application/x-amz-json-1.1"},
                "b": json.dumps(out).encode()}

    async def _call(self, target: str, body: bytes, account: str) -> dict[str, Any]:
        if target.startswith(aas.TARGET_PREFIX):  # Application Auto Scaling's ECS subset
            if len(body) > self.limits.ecs_request_bytes_max:
                raise ApiError("ValidationException", "The request is larger than "
                               f"ecs_request_bytes_max={self.limits.ecs_request_bytes_max} "
                               "bytes")
            try:
                doc = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise ApiError("SerializationException", "The request body is not JSON") \
                    from None
            if not isinstance(doc, dict):
                raise ApiError("SerializationException", "The request body must be a JSON "
                               "object")
            try:
                return await self.autoscaling.call(target[len(aas.TARGET_PREFIX):], account,
                                                   doc)
            except aas.AasError as e:
                raise ApiError(e.type, e.message, e.status) from None
        if not target.startswith(TARGET_PREFIX):
            raise ApiError("UnknownOperationException", f"Unknown target {target[:100]!r}")
        name = target[len(TARGET_PREFIX):]
        handler = self._ops.get(name)
        if handler is None:
            self.counters["unsupported"] += 1
            raise ApiError("UnsupportedFeatureException",
                           f"The ECS operation {name[:100]} is not supported by cellcloud yet "
                           f"(served: {', '.join(sorted(self._ops))})")
        if len(body) > self.limits.ecs_request_bytes_max:
            raise client_error(f"The request is larger than ecs_request_bytes_max="
                               f"{self.limits.ecs_request_bytes_max} bytes")
        try:
            doc = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError("SerializationException", "The request body is not JSON") from None
        if not isinstance(doc, dict):
            raise ApiError("SerializationException", "The request body must be a JSON object")
        result: dict[str, Any] = await handler(account, doc)
        return result

    # -- clusters ------------------------------------------------------------------------------
    def cluster_arn(self, account: str, name: str) -> str:
        return f"arn:aws:ecs:{self.region}:{account}:cluster/{name}"

    def _cluster_name(self, account: str, ident: Any) -> str:
        """A cluster's name from its name or ARN; another account's ARN is not found."""
        if ident is None:
            return "default"
        if not isinstance(ident, str):
            raise invalid("cluster must be a string")
        if ident.startswith("arn:"):
            prefix = f"arn:aws:ecs:{self.region}:{account}:cluster/"
            if not ident.startswith(prefix):
                raise cluster_not_found()
            ident = ident[len(prefix):]
        if not _CLUSTER_NAME.match(ident):
            raise cluster_not_found()
        return ident

    def _cluster_doc(self, account: str, c: dict[str, Any], tags: bool = True,
                     counts: dict[str, int] | None = None) -> dict[str, Any]:
        counts = counts or {}
        out = {"clusterArn": self.cluster_arn(account, c["name"]), "clusterName": c["name"],
               "status": c.get("status", "ACTIVE"), "registeredContainerInstancesCount": 0,
               "runningTasksCount": counts.get("running", 0),
               "pendingTasksCount": counts.get("pending", 0),
               "activeServicesCount": counts.get("services", 0),
               "statistics": [], "settings": [{"name": "containerInsights",
                                               "value": "disabled"}],
               "capacityProviders": [], "defaultCapacityProviderStrategy": []}
        if tags:
            out["tags"] = c.get("tags", [])
        return out

    async def create_cluster(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        for k, v in doc.items():
            if k not in ("clusterName", "tags") and v not in (None, [], {}, ""):
                raise invalid(f"{k} is not supported by cellcloud")
        name = _str(doc, "clusterName", "default") or "default"
        if not _CLUSTER_NAME.match(name):
            raise invalid("Cluster name must be 1 to 255 letters (uppercase and lowercase), "
                          "numbers, hyphens and underscores.")
        tags = _tags(doc.get("tags"))
        key = f"{CLUSTERS}{account}/{name}"
        existing = await self.store.get(key)
        if existing is not None:  # ECS: creating an existing cluster returns it
            return {"cluster": self._cluster_doc(account, json.loads(existing.value))}
        if len(await self.store.list(f"{CLUSTERS}{account}/")) \
                >= self.limits.ecs_clusters_per_tenant_max:
            raise ApiError("LimitExceededException",
                           f"An account has at most {self.limits.ecs_clusters_per_tenant_max} "
                           "clusters (ecs_clusters_per_tenant_max)")
        c = {"name": name, "status": "ACTIVE", "tags": tags, "createdAt": self.clock()}
        if await self.store.cas(key, 0, json.dumps(c).encode()) is None:
            self.counters["cas_lost"] += 1
            again = await self.store.get(key)
            if again is not None:
                c = json.loads(again.value)
        return {"cluster": self._cluster_doc(account, c)}

    async def describe_clusters(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        idents = _str_list(doc, "clusters") or ["default"]
        if len(idents) > 100:
            raise invalid("clusters names at most 100 clusters")
        include = _str_list(doc, "include")
        clusters, failures = [], []
        for ident in idents:
            try:
                name = self._cluster_name(account, ident)
            except ApiError:
                failures.append({"arn": ident, "reason": "MISSING"})
                continue
            e = await self.store.get(f"{CLUSTERS}{account}/{name}")
            if e is None:
                failures.append({"arn": self.cluster_arn(account, name), "reason": "MISSING"})
            else:
                clusters.append(self._cluster_doc(account, json.loads(e.value),
                                                  tags="TAGS" in include,
                                                  counts=await self._counts(account, name)))
        return {"clusters": clusters, "failures": failures}

    async def list_clusters(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        names = [e.key.rsplit("/", 1)[1]
                 for e in await self.store.list(f"{CLUSTERS}{account}/")]
        return _page([self.cluster_arn(account, n) for n in names], doc, "clusterArns")

    async def delete_cluster(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        if "cluster" not in doc:
            raise invalid("cluster is required")
        name = self._cluster_name(account, doc["cluster"])
        key = f"{CLUSTERS}{account}/{name}"
        e = await self.store.get(key)
        if e is None:
            raise cluster_not_found()
        counts = await self._counts(account, name)
        if counts.pop("services", 0):  # ACTIVE or DRAINING services
            raise ApiError("ClusterContainsServicesException",
                           "The Cluster cannot be deleted while Services are active.")
        if any(counts.values()):  # running, pending or stopping tasks
            raise ApiError("ClusterContainsTasksException",
                           "The Cluster cannot be deleted while Tasks are active.")
        if not await self.store.delete(key):
            raise cluster_not_found()
        c = json.loads(e.value)
        c["status"] = "INACTIVE"
        return {"cluster": self._cluster_doc(account, c)}

    # -- task definitions ----------------------------------------------------------------------
    def taskdef_arn(self, account: str, family: str, revision: int) -> str:
        return f"arn:aws:ecs:{self.region}:{account}:task-definition/{family}:{revision}"

    def _taskdef_ident(self, account: str, ident: Any) -> tuple[str, int | None]:
        """``family``, ``family:revision`` or the ARN → (family, revision or None)."""
        if not isinstance(ident, str) or not ident:
            raise client_error("taskDefinition is required")
        if ident.startswith("arn:"):
            prefix = f"arn:aws:ecs:{self.region}:{account}:task-definition/"
            if not ident.startswith(prefix):
                raise client_error("Unable to describe task definition.")
            ident = ident[len(prefix):]
        family, sep, rev = ident.partition(":")
        if not td.NAME_PATTERN.match(family):
            raise client_error("Unable to describe task definition.")
        if not sep:
            return family, None
        if not rev.isdigit() or not 1 <= int(rev) <= revisions_max:
            raise client_error(f"Invalid revision number. Number: {rev[:20]}")
        return family, int(rev)

    def _key(self, account: str, family: str, revision: int, prefix: str = TASKDEFS) -> str:
        return f"{prefix}{account}/{family}/{revision:0{_REVISION_DIGITS}d}"

    async def _index(self, account: str, family: str | None = None
                     ) -> list[tuple[str, int, str]]:
        """(family, revision, status) of the account's revisions (the small records only)."""
        prefix = f"{STATUS}{account}/" + (f"{family}/" if family is not None else "")
        out = []
        for e in await self.store.list(prefix):
            fam, rev = e.key[len(f"{STATUS}{account}/"):].rsplit("/", 1)
            out.append((fam, int(rev), str(json.loads(e.value)["status"])))
        return out

    async def _find(self, account: str, ident: Any) -> _Found:
        family, rev = self._taskdef_ident(account, ident)
        if rev is None:  # the family's latest ACTIVE revision
            active = [r for _, r, st in await self._index(account, family) if st == "ACTIVE"]
            if not active:
                raise client_error("Unable to describe task definition.")
            rev = active[-1]
        st = await self.store.get(self._key(account, family, rev, STATUS))
        body = await self.store.get(self._key(account, family, rev))
        if st is None or body is None:
            raise client_error("Unable to describe task definition.")
        return _Found(self._key(account, family, rev), json.loads(body.value), body.revision,
                      st.key, json.loads(st.value), st.revision)

    async def _check_image(self, account: str, image: str) -> None:
        repo, ref = parse_image(image)
        if not self.check_images:
            return
        frontend = self.frontend_for(account)
        if frontend is None:
            raise ApiError("ServerException", "The registry of this account's cell is not "
                           "reachable yet; try again", 500)
        try:
            resp = await frontend.call("registry", {"a": account, "m": "HEAD", "k": "manifest",
                                                    "n": repo, "r": ref},
                                       timeout_s=registry_check_timeout_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            raise ApiError("ServerException", f"The registry is unavailable: {e}", 500) from e
        if resp.get("s") != 200:
            raise client_error(f"Container image {image[:300]!r}: no image {ref!r} in "
                               f"repository {repo!r} of this account in this region's "
                               "registry (the host part is not checked; images of other "
                               "registries cannot be used)")

    async def register_task_definition(self, account: str, doc: dict[str, Any]
                                       ) -> dict[str, Any]:
        parsed = td.validate_task_definition(doc)
        vol_names = ev.task_volumes(doc)
        mounts = [ev.mount_points(c, vol_names, f"containerDefinitions[{i}]")
                  for i, c in enumerate(doc["containerDefinitions"])]
        for c in parsed.containers:
            await self._check_image(account, c.image)
        if len(await self._index(account)) >= self.limits.ecs_task_definitions_per_tenant_max:
            raise ApiError("LimitExceededException",
                           f"An account keeps at most "
                           f"{self.limits.ecs_task_definitions_per_tenant_max} task definition "
                           "revisions (ecs_task_definitions_per_tenant_max); delete INACTIVE "
                           "ones (DeleteTaskDefinitions)")
        fam_key = f"{FAMILIES}{account}/{parsed.family}"
        for _ in range(self.limits.ecs_cas_attempts_max):  # the family's revision counter
            e = await self.store.get(fam_key)
            last = json.loads(e.value)["last"] if e is not None else 0
            if last >= revisions_max:
                raise client_error(f"Family {parsed.family} has used every revision number")
            if await self.store.cas(fam_key, e.revision if e is not None else 0,
                                    json.dumps({"last": last + 1}).encode()) is not None:
                revision = last + 1
                break
            self.counters["cas_lost"] += 1
        else:
            raise ApiError("ServerException", "Too many concurrent registrations of this "
                           "family; try again", 500)
        tags = _tags(doc.get("tags"))
        desc: dict[str, Any] = {
            "taskDefinitionArn": self.taskdef_arn(account, parsed.family, revision),
            "containerDefinitions": [describe_container(c) for c in doc["containerDefinitions"]],
            "family": parsed.family, "revision": revision,
            "networkMode": parsed.network_mode, "volumes": [], "placementConstraints": [],
            "requiresAttributes": [], "compatibilities": ["EC2", "FARGATE"],
            "requiresCompatibilities": list(parsed.compatibilities),
            "cpu": str(parsed.cpu), "memory": str(parsed.memory_mib),
            "registeredAt": _now_s(self.clock()),
            "registeredBy": f"arn:aws:iam::{account}:root",
        }
        desc["volumes"] = [{"name": n, "configuredAtLaunch": True} for n in vol_names]
        for c, mps in zip(desc["containerDefinitions"], mounts, strict=True):
            c["mountPoints"] = [mp.to_wire() for mp in mps]
        if parsed.task_role_arn:
            desc["taskRoleArn"] = parsed.task_role_arn
        if parsed.execution_role_arn:
            desc["executionRoleArn"] = parsed.execution_role_arn
        record = {"taskDefinition": desc, "tags": tags}
        await self.store.put(self._key(account, parsed.family, revision),
                             json.dumps(record).encode())
        status = {"status": "ACTIVE"}
        await self.store.put(self._key(account, parsed.family, revision, STATUS),
                             json.dumps(status).encode())
        return {"taskDefinition": {**desc, **status}, "tags": tags}

    async def describe_task_definition(self, account: str, doc: dict[str, Any]
                                       ) -> dict[str, Any]:
        found = await self._find(account, doc.get("taskDefinition"))
        out = {"taskDefinition": found.described()}
        if "TAGS" in _str_list(doc, "include"):
            out["tags"] = found.body.get("tags", [])
        return out

    async def list_task_definitions(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        family = _str(doc, "familyPrefix")  # ECS: the full family name, despite the name
        status = _str(doc, "status", "ACTIVE")
        if status not in ("ACTIVE", "INACTIVE", "DELETE_IN_PROGRESS"):
            raise invalid("status must be ACTIVE, INACTIVE or DELETE_IN_PROGRESS")
        sort = _str(doc, "sort", "ASC")
        if sort not in ("ASC", "DESC"):
            raise invalid("sort must be ASC or DESC")
        if family is not None and not td.NAME_PATTERN.match(family):
            return {"taskDefinitionArns": []}
        chosen = sorted(((f, r) for f, r, st in await self._index(account, family)
                         if st == status), reverse=sort == "DESC")
        return _page([self.taskdef_arn(account, f, r) for f, r in chosen], doc,
                     "taskDefinitionArns")

    async def list_task_definition_families(self, account: str, doc: dict[str, Any]
                                            ) -> dict[str, Any]:
        prefix = _str(doc, "familyPrefix") or ""
        status = _str(doc, "status", "ACTIVE")
        if status not in ("ACTIVE", "INACTIVE", "ALL"):
            raise invalid("status must be ACTIVE, INACTIVE or ALL")
        active: dict[str, bool] = {}
        for fam, _, st in await self._index(account):
            if fam.startswith(prefix):
                active[fam] = active.get(fam, False) or st == "ACTIVE"
        families = sorted(f for f, a in active.items()
                          if status == "ALL" or a == (status == "ACTIVE"))
        return _page(families, doc, "families")

    async def deregister_task_definition(self, account: str, doc: dict[str, Any]
                                         ) -> dict[str, Any]:
        family, rev = self._taskdef_ident(account, doc.get("taskDefinition"))
        if rev is None:
            raise client_error("Invalid revision number. Number: (none): name the revision "
                               "(family:revision or the ARN)")
        for _ in range(self.limits.ecs_cas_attempts_max):
            found = await self._find(account, f"{family}:{rev}")
            if found.status["status"] != "ACTIVE":
                return {"taskDefinition": found.described()}
            found.status = {"status": "INACTIVE", "deregisteredAt": _now_s(self.clock())}
            if await self.store.cas(found.status_key, found.status_rev,
                                    json.dumps(found.status).encode()) is not None:
                return {"taskDefinition": found.described()}
            self.counters["cas_lost"] += 1
        raise ApiError("ServerException", "The task definition kept changing; try again", 500)

    async def delete_task_definitions(self, account: str, doc: dict[str, Any]
                                      ) -> dict[str, Any]:
        idents = _str_list(doc, "taskDefinitions")
        if not 1 <= len(idents) <= 10:
            raise invalid("taskDefinitions names 1 to 10 task definitions")
        deleted, failures = [], []
        for ident in idents:
            try:
                family, rev = self._taskdef_ident(account, ident)
                if rev is None:
                    raise client_error("The revision must be named")
                found = await self._find(account, f"{family}:{rev}")
            except ApiError as e:
                failures.append({"arn": ident, "reason": e.message})
                continue
            d = found.described()
            if d["status"] == "ACTIVE":
                failures.append({"arn": d["taskDefinitionArn"],
                                 "reason": "The specified task definition is still in ACTIVE "
                                           "status. Please deregister the target and try again."})
                continue
            # Nothing runs tasks yet (docs/fargate.md), so nothing holds it: gone at once; the
            # family's counter stays, so the revision number is never reused.
            if not await self.store.delete(found.status_key):
                continue  # deleted meanwhile by another request, which answers for it
            await self.store.delete(found.key)
            deleted.append({**d, "status": "DELETE_IN_PROGRESS"})
        return {"taskDefinitions": deleted, "failures": failures}

    # -- tasks (the tenant's cell runs them: frontend/tasks.py) ---------------------------------
    async def _cell(self, account: str, body: dict[str, Any], *, none_ok: bool = False
                    ) -> dict[str, Any] | None:
        """The tenant's cell's ``ecs_tasks`` op; its typed errors are the API's."""
        frontend = self.frontend_for(account)
        if frontend is None:
            if none_ok:
                return None
            raise ApiError("ServerException", "This account's cell is not reachable yet; "
                           "try again", 500)
        try:
            out: dict[str, Any] = await frontend.call("ecs_tasks", {"a": account, **body},
                                                      timeout_s=tasks_call_timeout_s)
        except RemoteError as e:
            if e.type in _CELL_ERRORS:
                raise ApiError(e.type, e.message) from None
            raise ApiError("ServerException", f"The account's cell failed: {e}", 500) from e
        except (TransportError, CallTimeout) as e:
            raise ApiError("ServerException", f"The account's cell is unavailable: {e}",
                           500) from e
        return out

    async def cell(self, account: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """``_cell`` for the application-autoscaling ops (control/autoscaling.py)."""
        return await self._cell(account, body)

    async def _counts(self, account: str, cluster: str) -> dict[str, int]:
        """The cluster's running and pending (not yet RUNNING) tasks, as its cell counts."""
        out = await self._cell(account, {"op": "counts", "cluster": cluster}, none_ok=True)
        return out or {}

    async def _existing_cluster(self, account: str, ident: Any) -> str:
        name = self._cluster_name(account, ident)
        if await self.store.get(f"{CLUSTERS}{account}/{name}") is None:
            raise cluster_not_found()
        return name

    def _task_id(self, account: str, cluster: str, ident: Any) -> str | None:
        """A task's id from its id or ARN (of this account and cluster); None: not one."""
        if not isinstance(ident, str):
            return None
        if ident.startswith("arn:"):
            prefix = f"arn:aws:ecs:{self.region}:{account}:task/"
            if not ident.startswith(prefix):
                return None
            c, _, ident = ident[len(prefix):].rpartition("/")
            if c and c != cluster:
                return None
        return ident if _TASK_ID.match(ident) else None

    async def run_task(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        for k, v in doc.items():
            if k not in _RUN_TASK_MEMBERS and v not in (None, [], {}, "", False):
                raise invalid(f"{k} is not supported by cellcloud")
        if doc.get("platformVersion") not in (None, "LATEST", "1.4.0"):
            raise invalid("platformVersion must be LATEST or 1.4.0")
        launch = doc.get("launchType", "FARGATE")
        if launch != "FARGATE":
            raise invalid(f"launchType {str(launch)[:40]} is not supported: cellcloud runs "
                          "tasks on FARGATE only")
        count = doc.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10:
            raise invalid("count must be an integer from 1 to 10")
        started_by = _str(doc, "startedBy") or ""
        if started_by and not _STARTED_BY.match(started_by):
            raise invalid("startedBy is up to 128 letters, numbers, hyphens and underscores")
        group = _str(doc, "group") or ""
        if len(group) > 255:
            raise invalid("group is at most 255 characters")
        tags = _tags(doc.get("tags"))
        token = _str(doc, "clientToken") or ""  # boto3 and the CLI fill one in
        if len(token) > 64:
            raise invalid("clientToken is at most 64 characters")
        overrides = _container_overrides(doc.get("overrides"))
        network = network_configuration(doc.get("networkConfiguration"), self.limits)
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        if not doc.get("taskDefinition"):
            raise invalid("taskDefinition is required")
        try:
            found = await self._find(account, doc["taskDefinition"])
        except ApiError:
            raise client_error("TaskDefinition not found.") from None
        desc = found.described()
        if desc["status"] != "ACTIVE":
            raise client_error("TaskDefinition is inactive")
        managed = ev.volume_configurations(
            doc.get("volumeConfigurations"),
            tuple(str(v["name"]) for v in desc.get("volumes") or []), account, self.limits)
        volumes: dict[str, Any] = {}
        if managed:  # made and attached to the tasks before they are placed
            volumes = await self._make_task_volumes(account, cluster, count, managed)
        try:
            out = await self._cell(account, {
                "op": "run", "cluster": cluster, "taskDefinition": desc, "count": count,
                "containerOverrides": overrides, "startedBy": started_by, "group": group,
                "tags": tags, "clientToken": token, **volumes,
                **({"networkConfiguration": network} if network else {})})
        except BaseException:
            if volumes:
                await self._end_task_volumes(account, volumes["taskIds"])
            raise
        assert out is not None
        if volumes:  # a task not placed (no room; a clientToken's earlier tasks) has none
            placed = {t["taskArn"].rsplit("/", 1)[1] for t in out["tasks"]}
            await self._end_task_volumes(
                account, [i for i in volumes["taskIds"] if i not in placed])
        return out

    # -- managed volumes of tasks (docs/fargate.md#volumes) -------------------------------------
    async def _make_task_volumes(self, account: str, cluster: str, count: int,
                                 managed: tuple[ev.ManagedVolume, ...]) -> dict[str, Any]:
        """One volume per task and configuration, made through EC2's CreateVolume path and
        attached to the task (its ARN the attachment's target) before the task exists: the
        cell is given the task ids to use and each task's volumes."""
        if self.ec2 is None:
            raise invalid("This region serves no volumes (volumeConfigurations)")
        ids = [uuid.uuid4().hex for _ in range(count)]
        per_task: dict[str, list[dict[str, Any]]] = {}
        try:
            for task_id in ids:
                per_task[task_id] = []
                for mv in managed:
                    per_task[task_id].append(
                        await self._make_task_volume(account, cluster, task_id, mv))
        except BaseException:
            await self._end_task_volumes(account, ids)
            raise
        return {"taskIds": ids, "volumes": per_task}

    async def _make_task_volume(self, account: str, cluster: str, task_id: str,
                                mv: ev.ManagedVolume) -> dict[str, Any]:
        from ..core.ec2_query import Ec2Error

        assert self.ec2 is not None
        params: dict[str, Any] = {"Size": mv.size_gib, "VolumeType": mv.volume_type,
                                  "AvailabilityZone": f"{self.region}a"}
        if mv.tags:
            params["TagSpecification"] = [{"ResourceType": "volume", "Tag": [
                {"Key": k, "Value": v} for k, v in mv.tags]}]
        try:
            made = await self.ec2.create_volume(account, params)
        except Ec2Error as e:
            if e.code == "VolumeLimitExceeded":
                raise ApiError("LimitExceededException", e.message) from None
            if e.status >= 500:
                raise ApiError("ServerException", f"The task's volume {mv.name} could not be "
                               f"made: {e.code}: {e.message}", 500) from None
            raise invalid(f"volumeConfigurations {mv.name}: {e.code}: {e.message}") from None
        volume_id = str(made["volumeId"])
        arn = f"arn:aws:ecs:{self.region}:{account}:task/{cluster}/{task_id}"
        record = {"cluster": cluster, "task": task_id, "name": mv.name,
                  "delete": mv.delete_on_termination, "epoch": 0, "made_ms": self.clock()}
        # Recorded before the attachment: whatever happens next, the sweep finds and ends it.
        await self.store.put(f"{TASK_VOLUMES}{account}/{volume_id}", json.dumps(record).encode())
        rec = await self.ec2.attach(account, volume_id, arn)
        record["epoch"] = int(rec["attach_epoch"])
        await self.store.put(f"{TASK_VOLUMES}{account}/{volume_id}", json.dumps(record).encode())
        return {**mv.to_wire(), "volumeId": volume_id, "attachEpoch": record["epoch"],
                "replicated": rec.get("storage") == "replicated"}

    async def _end_task_volumes(self, account: str, task_ids: list[str]) -> None:
        """The volumes of these tasks, which will not run (or ran and stopped): detached,
        then deleted if their configuration says so (deleteOnTermination, the default)."""
        if not task_ids:
            return
        wanted = set(task_ids)
        for e in await self.store.list(f"{TASK_VOLUMES}{account}/"):
            record = json.loads(e.value)
            if record["task"] in wanted:
                await self._end_task_volume(account, e.key.rsplit("/", 1)[1], record)

    async def _end_task_volume(self, account: str, volume_id: str, record: dict[str, Any]
                               ) -> None:
        from ..core.ec2_query import Ec2Error

        assert self.ec2 is not None
        try:
            if record["epoch"]:
                try:
                    await self.ec2.detach(account, volume_id, int(record["epoch"]))
                except Ec2Error as e:
                    if e.code not in ("IncorrectState", "InvalidVolume.NotFound"):
                        raise
            if record["delete"]:
                try:
                    await self.ec2.delete_volume(account, {"VolumeId": volume_id})
                except Ec2Error as e:
                    if e.code != "InvalidVolume.NotFound":
                        raise
        except Ec2Error as e:  # kept: the next sweep tries again
            log.warning("task volume %s of task %s: %s: %s", volume_id, record["task"],
                        e.code, e.message)
            return
        await self.store.delete(f"{TASK_VOLUMES}{account}/{volume_id}")
        self.counters["task_volumes_ended"] = self.counters.get("task_volumes_ended", 0) + 1

    async def sweep_task_volumes(self) -> int:
        """Managed volumes whose task stopped and whose host let go of them (the cell's
        view of the task says its volume attachment is DETACHED; or the cell no longer knows
        the task, ``ecs_task_volume_orphan_ms`` after it was made) are ended. Answers how
        many were."""
        if self.ec2 is None:
            return 0
        held = await self.service_volume_round()
        by_cluster: dict[tuple[str, str], dict[str, tuple[str, dict[str, Any]]]] = {}
        for e in await self.store.list(TASK_VOLUMES):
            account, volume_id = e.key[len(TASK_VOLUMES):].split("/", 1)
            record = json.loads(e.value)
            by_cluster.setdefault((account, record["cluster"]), {})[volume_id] = (
                record["task"], record)
        ended = 0
        now = self.clock()
        for (account, cluster), vols in by_cluster.items():
            ids = sorted({task for task, _ in vols.values()})
            views: dict[str, dict[str, Any]] = {}
            missing: set[str] = set()
            for i in range(0, len(ids), 100):
                try:
                    out = await self._cell(account, {"op": "describe", "cluster": cluster,
                                                     "tasks": ids[i:i + 100], "tags": False},
                                           none_ok=True)
                except ApiError:
                    out = None
                if out is None:
                    continue
                for t in out["tasks"]:
                    views[t["taskArn"].rsplit("/", 1)[1]] = t
                missing |= {f["arn"] for f in out["failures"]}
            for volume_id, (task, record) in vols.items():
                view = views.get(task)
                done = False
                if view is not None:
                    done = view["lastStatus"] == "STOPPED" and any(
                        a["type"] == EBS_ATTACHMENT and a["status"] == "DETACHED"
                        for a in view.get("attachments", []))
                elif task in missing and task not in held.get(account, ()) \
                        and "*" not in held.get(account, ()):
                    done = now - int(record["made_ms"]) > self.limits.ecs_task_volume_orphan_ms
                if done:
                    await self._end_task_volume(account, volume_id, record)
                    ended += 1
        return ended

    async def stop_task(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        reason = _str(doc, "reason") or ""
        if len(reason) > 1024:
            raise invalid("reason is at most 1024 characters")
        task_id = self._task_id(account, cluster, doc.get("task"))
        if task_id is None:
            raise invalid("The referenced task was not found.")
        out = await self._cell(account, {"op": "stop", "cluster": cluster, "task": task_id,
                                         "reason": reason})
        assert out is not None
        return out

    async def describe_tasks(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        idents = _str_list(doc, "tasks")
        if not 1 <= len(idents) <= 100:
            raise invalid("tasks names 1 to 100 tasks")
        include = _str_list(doc, "include")
        ids, failures = [], []
        for ident in idents:
            task_id = self._task_id(account, cluster, ident)
            if task_id is None:
                failures.append({"arn": ident, "reason": "MISSING"})
            else:
                ids.append(task_id)
        out: dict[str, Any] = {"tasks": [], "failures": []}
        if ids:
            out = await self._cell(account, {"op": "describe", "cluster": cluster, "tasks": ids,
                                             "tags": "TAGS" in include}) or out
        arn = f"arn:aws:ecs:{self.region}:{account}:task/{cluster}/"
        return {"tasks": out["tasks"],
                "failures": failures + [{**f, "arn": arn + f["arn"]} for f in out["failures"]]}

    async def list_tasks(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        for k in ("containerInstance", "daemonName"):
            if doc.get(k):
                raise invalid(f"{k} is not supported by cellcloud (no container instances "
                              "or daemons)")
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        desired = _str(doc, "desiredStatus", "RUNNING")
        if desired not in ("RUNNING", "PENDING", "STOPPED"):
            raise invalid("desiredStatus must be RUNNING, PENDING or STOPPED")
        launch = _str(doc, "launchType")
        if launch is not None and launch not in ("EC2", "FARGATE", "EXTERNAL",
                                                 "MANAGED_INSTANCES"):
            raise invalid("launchType must be EC2, FARGATE, EXTERNAL or MANAGED_INSTANCES")
        family = _str(doc, "family")
        ids: list[str] = []
        if desired != "PENDING" and launch in (None, "FARGATE"):  # PENDING: never desired here
            out = await self._cell(account, {"op": "list", "cluster": cluster,
                                             "family": family,
                                             "started_by": _str(doc, "startedBy"),
                                             "service": _str(doc, "serviceName"),
                                             "desired": desired}, none_ok=True)
            ids = list(out["taskIds"]) if out else []
        arn = f"arn:aws:ecs:{self.region}:{account}:task/{cluster}/"
        return _page([arn + i for i in ids], doc, "taskArns")

    # -- services (the tenant's cell runs them: frontend/services.py) ---------------------------
    def _refuse_unhonoured(self, doc: dict[str, Any], members: frozenset[str]) -> None:
        for k, v in doc.items():
            if k not in members and v not in (None, [], {}, "", False):
                raise invalid(f"{k} is not supported by cellcloud")
        if doc.get("platformVersion") not in (None, "LATEST", "1.4.0"):
            raise invalid("platformVersion must be LATEST or 1.4.0")
        if doc.get("deploymentController") not in (None, {}, {"type": "ECS"}):
            raise invalid("deploymentController: cellcloud runs the ECS (rolling update) "
                          "deployment controller only")
        if doc.get("propagateTags") not in (None, "NONE"):
            raise invalid("propagateTags is not supported by cellcloud (NONE only)")

    def _desired(self, doc: dict[str, Any], default: int | None) -> int | None:
        v = doc.get("desiredCount", default)
        if v is None:
            return None
        top = self.limits.ecs_service_desired_count_max
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
            raise invalid(f"desiredCount must be an integer from 0 to {top} "
                          "(ecs_service_desired_count_max)")
        return v

    @staticmethod
    def _deployment_config(doc: dict[str, Any]) -> dict[str, Any] | None:
        """``deploymentConfiguration``: minimumHealthyPercent, maximumPercent and
        deploymentCircuitBreaker {enable, rollback}; other members refused by name."""
        cfg = doc.get("deploymentConfiguration")
        if cfg is None:
            return None
        if not isinstance(cfg, dict):
            raise invalid("deploymentConfiguration must be an object")
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            if k in ("minimumHealthyPercent", "maximumPercent"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise invalid(f"deploymentConfiguration.{k} must be an integer")
                out[k] = v
            elif k == "deploymentCircuitBreaker":
                if not isinstance(v, dict) or not isinstance(v.get("enable"), bool) \
                        or not isinstance(v.get("rollback"), bool) or set(v) - {"enable",
                                                                                 "rollback"}:
                    raise invalid("deploymentCircuitBreaker is {enable: boolean, "
                                  "rollback: boolean}")
                out[k] = {"enable": v["enable"], "rollback": v["rollback"]}
            elif v not in (None, [], {}, ""):
                raise invalid(f"deploymentConfiguration.{k} is not supported by cellcloud")
        return out

    async def _service_taskdef(self, account: str, ident: Any) -> dict[str, Any]:
        if not ident:
            raise invalid("taskDefinition is required")
        try:
            found = await self._find(account, ident)
        except ApiError:
            raise client_error("TaskDefinition not found.") from None
        desc = found.described()
        if desc["status"] != "ACTIVE":
            raise client_error("TaskDefinition is inactive")
        return desc

    # -- managed volumes of services (frontend/services.py's pools) ------------------------------
    def _service_volumes(self, account: str, desc: dict[str, Any], value: Any, op: str
                         ) -> tuple[ev.ManagedVolume, ...]:
        return ev.volume_configurations(
            value, tuple(str(v["name"]) for v in desc.get("volumes") or []), account,
            self.limits, op=op)

    async def _premake(self, account: str, cluster: str,
                       managed: tuple[ev.ManagedVolume, ...], count: int
                       ) -> list[dict[str, Any]]:
        """``count`` tasks' volumes, made and attached ahead (a pool's entries)."""
        count = min(count, self.limits.ecs_service_volumes_made_per_round_max)
        if not managed or count <= 0:
            return []
        made = await self._make_task_volumes(account, cluster, count, managed)
        return [{"taskId": i, "volumes": made["volumes"][i]} for i in made["taskIds"]]

    @staticmethod
    def _volumes_body(managed: tuple[ev.ManagedVolume, ...]) -> dict[str, Any]:
        return {"configs": [mv.to_wire() for mv in managed],
                "wire": [mv.service_wire() for mv in managed]}

    async def service_volume_round(self) -> dict[str, set[str]]:
        """Each account with services that have managed volumes: its cell's pools topped up
        to what their primary deployments still have to start, and the pooled volumes no
        deployment will use ended. Answers the task ids still pooled, by account (the sweep
        keeps their volumes)."""
        held: dict[str, set[str]] = {}
        if self.ec2 is None:
            return held
        for e in await self.store.list(SERVICE_VOLUMES):
            account = e.key[len(SERVICE_VOLUMES):]
            try:
                out = await self._cell(account, {"op": "service_volumes"}, none_ok=True)
            except ApiError:
                out = None
            if out is None:  # its pools unknown: the sweep ends none of its orphans now
                held[account] = {"*"}
                continue
            held[account] = set(out["held"])
            try:
                await self._fill_pools(account, out, held[account])
            except Exception:  # the other accounts' go on; the next round tries again
                log.exception("service volumes of account %s", account)
                held[account] = {"*"}
            # none left (and none just being made: CreateService or UpdateService writes the
            # record before its cell has the service's volumes)
            if not out["services"] and not out["held"] and self.clock() - int(
                    json.loads(e.value).get("ms", 0)) > self.limits.ecs_task_volume_orphan_ms:
                await self.store.delete(e.key)
        return held

    async def _fill_pools(self, account: str, out: dict[str, Any], held: set[str]) -> None:
        """One account's part of the volume round (``out``: its cell's ``service_volumes``)."""
        await self._end_task_volumes(account, list(out["release"]))
        for want in out["wants"]:
            configs = want["configs"]
            managed = tuple(ev.ManagedVolume(
                str(c["name"]), int(c["sizeInGiB"]), str(c["volumeType"]),
                str(c["filesystemType"]), str(c["roleArn"]), True,
                tuple((str(t["key"]), str(t["value"])) for t in c.get("tags") or []),
                "NONE") for c in configs)
            try:
                entries = await self._premake(account, want["cluster"], managed,
                                              int(want["count"]))
            except ApiError as err:  # (EC2's limits): the next round tries again
                log.warning("service %s/%s: volumes not made: %s", want["cluster"],
                            want["service"], err)
                continue
            try:
                added = await self._cell(account, {
                    "op": "service_volumes_add", "cluster": want["cluster"],
                    "service": want["service"], "configs": configs, "entries": entries})
            except ApiError:  # (the cell may hold them: its next answer says; if not,
                held.add("*")  # they are orphans, ended ecs_task_volume_orphan_ms on)
                continue
            assert added is not None
            refused = list(added["refused"])
            await self._end_task_volumes(account, refused)
            held |= {x["taskId"] for x in entries} - set(refused)

    def _service_name(self, account: str, cluster: str, ident: Any) -> str:
        """A service's name from its name or ARN (of this account and cluster)."""
        if not isinstance(ident, str) or not ident:
            raise invalid("service is required")
        if ident.startswith("arn:"):
            prefix = f"arn:aws:ecs:{self.region}:{account}:service/"
            if not ident.startswith(prefix):
                raise ApiError("ServiceNotFoundException", "Service not found.")
            c, _, ident = ident[len(prefix):].rpartition("/")
            if c and c != cluster:
                raise ApiError("ServiceNotFoundException", "Service not found.")
        return ident

    async def create_service(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        self._refuse_unhonoured(doc, _CREATE_SERVICE_MEMBERS)
        launch = doc.get("launchType", "FARGATE")
        if launch != "FARGATE":
            raise invalid(f"launchType {str(launch)[:40]} is not supported: cellcloud runs "
                          "services on FARGATE only")
        if doc.get("schedulingStrategy") not in (None, "REPLICA"):
            raise invalid("schedulingStrategy: cellcloud runs REPLICA services only")
        name = _str(doc, "serviceName")
        if not name or not _SERVICE_NAME.match(name):
            raise invalid("serviceName is up to 255 letters, numbers, hyphens and "
                          "underscores, starting with a letter")
        desired = self._desired(doc, None)
        if desired is None:
            raise invalid("desiredCount is required for the REPLICA scheduling strategy")
        tags = _tags(doc.get("tags"))
        config = self._deployment_config(doc)
        network = network_configuration(doc.get("networkConfiguration"), self.limits)
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        desc = await self._service_taskdef(account, doc.get("taskDefinition"))
        managed = self._service_volumes(account, desc, doc.get("volumeConfigurations"),
                                        "CreateService")
        extra: dict[str, Any] = {}
        if managed:  # the first tasks' volumes, made ahead (docs/fargate.md#volumes)
            if self.ec2 is None:
                raise invalid("This region serves no volumes (volumeConfigurations)")
            await self.store.put(f"{SERVICE_VOLUMES}{account}",
                                 json.dumps({"ms": self.clock()}).encode())
            extra = {"volumes": self._volumes_body(managed),
                     "pool": await self._premake(account, cluster, managed, desired)}
        try:
            out = await self._cell(account, {"op": "service_create", "cluster": cluster,
                                             "service": name, "taskDefinition": desc,
                                             "desired": desired, "config": config,
                                             "tags": tags, **extra,
                                             **({"networkConfiguration": network}
                                                if network else {})})
        except BaseException:
            await self._end_task_volumes(account, [x["taskId"] for x in extra.get("pool", [])])
            raise
        assert out is not None
        return out

    async def update_service(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        self._refuse_unhonoured(doc, _UPDATE_SERVICE_MEMBERS)
        force = doc.get("forceNewDeployment", False)
        if not isinstance(force, bool):
            raise invalid("forceNewDeployment must be a boolean")
        desired = self._desired(doc, None)
        config = self._deployment_config(doc)
        network = network_configuration(doc.get("networkConfiguration"), self.limits)
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        name = self._service_name(account, cluster, doc.get("service"))
        desc = None
        if doc.get("taskDefinition"):
            desc = await self._service_taskdef(account, doc["taskDefinition"])
        extra: dict[str, Any] = {}
        if desc is not None or doc.get("volumeConfigurations") is not None \
                or desired is not None:
            extra = await self._update_volumes(account, cluster, name, desc, doc, desired,
                                               force)
        try:
            out = await self._cell(account, {"op": "service_update", "cluster": cluster,
                                             "service": name, "taskDefinition": desc,
                                             "desired": desired, "config": config,
                                             "force": force, **extra,
                                             **({"networkConfiguration": network}
                                                if network else {})})
        except BaseException:
            await self._end_task_volumes(account, [x["taskId"] for x in extra.get("pool", [])])
            raise
        assert out is not None
        return out

    async def _update_volumes(self, account: str, cluster: str, name: str,
                              desc: dict[str, Any] | None, doc: dict[str, Any],
                              desired: int | None, force: bool) -> dict[str, Any]:
        """UpdateService's volume configurations against the task definition it deploys
        (the given one, or the service's): the given ones, or (none given) the service's
        kept; and the volumes of the tasks it will start, made ahead ({}: the service has
        none, nothing changes)."""
        seen = await self._cell(account, {"op": "service_describe", "cluster": cluster,
                                          "services": [name], "tags": False})
        assert seen is not None
        if not seen["services"]:
            raise ApiError("ServiceNotFoundException", "Service not found.")
        svc = seen["services"][0]
        primary = (svc["deployments"] or [{}])[0]
        kept = primary.get("volumeConfigurations") or []
        value = doc.get("volumeConfigurations")
        if desc is None and value is None and not kept:
            return {}  # (a desiredCount of a service without volumes)
        new_def = desc is not None and desc["taskDefinitionArn"] != svc["taskDefinition"]
        if desc is None:
            desc = (await self._find(account, svc["taskDefinition"])).described()
        if value is None:  # kept (those of the service's primary deployment), if still fit
            value = kept if desc.get("volumes") else []
        managed = self._service_volumes(account, desc, value, "UpdateService")
        if not managed:
            return {"volumes": {"configs": [], "wire": []}}
        if self.ec2 is None:
            raise invalid("This region serves no volumes (volumeConfigurations)")
        await self.store.put(f"{SERVICE_VOLUMES}{account}",
                             json.dumps({"ms": self.clock()}).encode())
        count = int(svc["desiredCount"]) if desired is None else desired
        same = [mv.service_wire() for mv in managed] == kept
        if same and not new_def and not force:  # no new deployment: what its tasks lack
            count -= int(primary.get("runningCount", 0)) + int(primary.get("pendingCount", 0))
        return {"volumes": self._volumes_body(managed),
                "pool": await self._premake(account, cluster, managed, count)}

    async def delete_service(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        force = doc.get("force", False)
        if not isinstance(force, bool):
            raise invalid("force must be a boolean")
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        name = self._service_name(account, cluster, doc.get("service"))
        out = await self._cell(account, {"op": "service_delete", "cluster": cluster,
                                         "service": name, "force": force})
        assert out is not None
        return out

    async def describe_services(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        idents = _str_list(doc, "services")
        if not 1 <= len(idents) <= 10:
            raise invalid("services names 1 to 10 services")
        include = _str_list(doc, "include")
        names, failures = [], []
        for ident in idents:
            try:
                names.append(self._service_name(account, cluster, ident))
            except ApiError:
                failures.append({"arn": ident, "reason": "MISSING"})
        out: dict[str, Any] = {"services": [], "failures": []}
        if names:
            out = await self._cell(account, {"op": "service_describe", "cluster": cluster,
                                             "services": names, "tags": "TAGS" in include},
                                   none_ok=True) or out
        return {"services": out["services"], "failures": failures + out["failures"]}

    async def list_services(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        if doc.get("resourceManagementType"):
            raise invalid("resourceManagementType is not supported by cellcloud")
        cluster = await self._existing_cluster(account, doc.get("cluster"))
        launch = _str(doc, "launchType")
        strategy = _str(doc, "schedulingStrategy")
        arns: list[str] = []
        if launch in (None, "FARGATE") and strategy in (None, "REPLICA"):
            out = await self._cell(account, {"op": "service_list", "cluster": cluster},
                                   none_ok=True)
            arns = list(out["serviceArns"]) if out else []
        return _page(arns, doc, "serviceArns")

    # -- tags ----------------------------------------------------------------------------------
    async def _resource(self, account: str, arn: Any) -> tuple[str, dict[str, Any], int]:
        if not isinstance(arn, str):
            raise invalid("resourceArn is required")
        prefix = f"arn:aws:ecs:{self.region}:{account}:"
        if arn.startswith(prefix + "cluster/"):
            name = self._cluster_name(account, arn)
            key = f"{CLUSTERS}{account}/{name}"
            e = await self.store.get(key)
            if e is None:
                raise cluster_not_found()
            return key, json.loads(e.value), e.revision
        if arn.startswith(prefix + "task-definition/"):
            found = await self._find(account, arn)
            return found.key, found.body, found.body_rev
        raise invalid("The ARN names no cluster or task definition of this account")

    async def _retag(self, account: str, doc: dict[str, Any],
                     change: Callable[[list[dict[str, str]]], list[dict[str, str]]]) -> None:
        for _ in range(self.limits.ecs_cas_attempts_max):
            key, record, store_rev = await self._resource(account, doc.get("resourceArn"))
            record["tags"] = _tags(change(list(record.get("tags", []))))
            if await self.store.cas(key, store_rev, json.dumps(record).encode()) is not None:
                return
            self.counters["cas_lost"] += 1
        raise ApiError("ServerException", "The resource kept changing; try again", 500)

    async def tag_resource(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        new = _tags(doc.get("tags"))
        keys = {t["key"] for t in new}
        await self._retag(account, doc, lambda old: [t for t in old if t["key"] not in keys]
                          + new)
        return {}

    async def untag_resource(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        keys = set(_str_list(doc, "tagKeys"))
        await self._retag(account, doc, lambda old: [t for t in old if t["key"] not in keys])
        return {}

    async def list_tags_for_resource(self, account: str, doc: dict[str, Any]
                                     ) -> dict[str, Any]:
        _, record, _ = await self._resource(account, doc.get("resourceArn"))
        return {"tags": record.get("tags", [])}


@dataclass
class _Found:
    """One task definition revision as the store holds it: its definition and its status."""
    key: str
    body: dict[str, Any]
    body_rev: int
    status_key: str
    status: dict[str, Any]
    status_rev: int

    def described(self) -> dict[str, Any]:
        return {**self.body["taskDefinition"], **self.status}
