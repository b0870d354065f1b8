"""Kubernetes Pod manifests as ECS tasks, sans-IO (issue #17; docs/fargate.md, "Pods").

- :func:`load` reads one manifest (YAML or JSON text) into a :class:`Plan`: the
  ``RegisterTaskDefinition`` request and the ``RunTask`` parameters that run the Pod as one
  Fargate task, the paths of the fields it did not understand (``unknown``: the caller refuses
  them unless told to ignore them — never silently dropped) and ``notes`` on what became
  something slightly different (a probe period raised to ECS's minimum, …).
- :func:`pod_view` turns a ``DescribeTasks`` task (and its task definition) back into the
  Pod's status: phase Pending/Running/Succeeded/Failed, container states, readiness.

The mapping (what EKS on Fargate does, where ECS has the words for it):

- the task's size is :func:`ecs_taskdef.fargate_pod_size` (the larger of the largest init
  container's request and the sum of the others', + 256 MiB, rounded up to a Fargate size);
  a container's memory request is its ``memoryReservation``, its memory limit its ``memory``
  (bounded by the task's; enforced in the container's own cgroup), its cpu request (or
  limit) its ``cpu`` units;
- ``command`` → ``entryPoint``, ``args`` → ``command`` (``$(VAR)`` expanded from the
  container's ``env`` as the kubelet does), ``env`` values only (``valueFrom`` refused);
- every container is essential (the Pod is one unit: when one ends, ECS stops the others);
  init containers are non-essential and run one after another (each ``dependsOn`` the previous
  one's ``SUCCESS``; the containers depend on the last);
- ``restartPolicy`` (Always, the default, OnFailure, Never) travels as the task's tag
  :data:`RESTART_POLICY_TAG`; :func:`restart_policy_from_tags` gives the cell's task manager
  ``core/ecs_tasks.Task``'s ``restart_policy`` (crash-loop backoff, init containers restarted
  only until they succeed);
- ``livenessProbe``/``readinessProbe`` → the container's ECS ``healthCheck`` (one per container:
  two different probes are refused): ``exec`` → ``CMD``; ``httpGet`` → a ``CMD-SHELL`` running
  ``wget`` (or ``curl``) against ``127.0.0.1`` inside the container; ``tcpSocket`` → ``nc -z``
  inside the container (the image must have the tool); ``grpc`` refused;
- logs: the ``awslogs`` driver, group ``/cellcloud/pods/<namespace>``, stream prefix the pod's
  name, so a container's stream is ``<name>/<container>/<task id>``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .ecs_taskdef import EcsError, fargate_pod_size, k8s_cpu_units, k8s_memory_mib
from .limits import DEFAULT_LIMITS

API_VERSION, KIND = "v1", "Pod"
CLUSTER = "default"
FAMILY_PREFIX = "pod_"  # pod_<namespace>_<name, dots as underscores>
STARTED_BY = "cellcloud-pod"
TAG_PREFIX = "cellcloud.pod/"
NAME_TAG, NAMESPACE_TAG = TAG_PREFIX + "name", TAG_PREFIX + "namespace"
RESTART_POLICY_TAG, SPEC_TAG = TAG_PREFIX + "restartPolicy", TAG_PREFIX + "spec-sha256"
LOG_GROUP_PREFIX = "/cellcloud/pods/"
RESTART_POLICIES: dict[str, Literal["always", "on-failure", "never"]] = {
    "Always": "always", "OnFailure": "on-failure", "Never": "never"}
ECS_TAGS_MAX = 50  # tags on one ECS resource

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")

_POD_KEYS = {"apiVersion", "kind", "metadata", "spec"}
_METADATA_KEYS = {"name", "namespace", "labels"}
_SPEC_KEYS = {"containers", "initContainers", "restartPolicy", "terminationGracePeriodSeconds"}
_CONTAINER_KEYS = {"name", "image", "command", "args", "env", "ports", "resources",
                   "workingDir", "livenessProbe", "readinessProbe"}
_INIT_KEYS = _CONTAINER_KEYS - {"livenessProbe", "readinessProbe", "ports"}
_PROBE_KEYS = {"exec", "httpGet", "tcpSocket", "initialDelaySeconds", "periodSeconds",
               "timeoutSeconds", "failureThreshold", "successThreshold"}


class PodError(Exception):
    """A manifest that cannot run: ``path`` names where (``spec.containers[0].image``)."""

    def __init__(self, path: str, message: str, unknown: tuple[str, ...] = ()) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message
        self.unknown = unknown  # the paths not understood, when that is the error


@dataclass(frozen=True)
class Plan:
    name: str
    namespace: str
    family: str
    register: dict[str, Any]  # RegisterTaskDefinition's request
    run: dict[str, Any]  # RunTask's parameters
    restart_policy: Literal["always", "on-failure", "never"]
    spec_sha256: str
    log_group: str
    unknown: tuple[str, ...] = ()  # paths of fields not understood (not part of the plan)
    notes: tuple[str, ...] = ()  # what became something slightly different


def family_for(namespace: str, name: str) -> str:
    """The task definition family of a Pod (namespaces have neither ``.`` nor ``_``, names no
    ``_``: the mapping is one-to-one)."""
    return f"{FAMILY_PREFIX}{namespace}_{name.replace('.', '_')}"


def log_group_for(namespace: str) -> str:
    return LOG_GROUP_PREFIX + namespace


def log_stream_for(name: str, container: str, task_id: str) -> str:
    """The awslogs convention: ``<stream prefix>/<container>/<task id>``."""
    return f"{name}/{container}/{task_id}"


def restart_policy_from_tags(tags: Any) -> Literal["always", "on-failure", "never"]:
    """A task's restart policy from its RunTask ``tags`` (``[{key, value}]``): a Pod's, or
    ``never`` (ECS's own behaviour) for any other task."""
    for t in tags or []:
        if isinstance(t, dict) and t.get("key") == RESTART_POLICY_TAG:
            return RESTART_POLICIES.get(str(t.get("value")), "never")
    return "never"


# -- reading ------------------------------------------------------------------------------------

def parse_yaml(text: str | bytes) -> dict[str, Any]:
    """One manifest document, or PodError (malformed YAML with its line and column, more than
    one document, not a mapping, too large)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > DEFAULT_LIMITS.pod_manifest_bytes_max:
        raise PodError("", f"the manifest is {size} bytes; at most "
                           f"pod_manifest_bytes_max={DEFAULT_LIMITS.pod_manifest_bytes_max}")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PodError("", f"malformed YAML: {where}{problem}") from None
    if not docs:
        raise PodError("", "the manifest is empty")
    if len(docs) > 1:
        raise PodError("", f"the manifest has {len(docs)} documents; give one Pod per file")
    if not isinstance(docs[0], dict):
        raise PodError("", "the manifest must be a mapping (apiVersion, kind, metadata, spec)")
    return docs[0]


@dataclass
class _Reader:
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def mapping(self, doc: Any, path: str, known: set[str]) -> dict[str, Any]:
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise PodError(path, "must be a mapping")
        self.unknown += [f"{path}.{k}" for k in doc if k not in known]
        return doc

    def strings(self, doc: Any, path: str) -> list[str]:
        if doc is None:
            return []
        if not isinstance(doc, list) or not all(isinstance(s, str) for s in doc):
            raise PodError(path, "must be a list of strings")
        return list(doc)

    def seconds(self, doc: dict[str, Any], key: str, path: str, default: int) -> int:
        value = doc.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PodError(f"{path}.{key}", "must be a whole number of seconds, 0 or more")
        return value


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion in command and args: a defined variable's value,
    ``$$`` a literal ``$``, anything else left as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _ENV_REF.sub(sub, text)


def _probe(r: _Reader, doc: Any, path: str, ports: dict[str, int]) -> dict[str, Any]:
    probe = r.mapping(doc, path, _PROBE_KEYS)
    handlers = [k for k in ("exec", "httpGet", "tcpSocket", "grpc") if k in probe]
    if len(handlers) != 1:
        raise PodError(path, "needs exactly one of exec, httpGet, tcpSocket")
    if "grpc" in probe:
        raise PodError(f"{path}.grpc", "gRPC probes are not supported (use exec, httpGet or "
                                       "tcpSocket)")

    def port_of(p: dict[str, Any], where: str) -> int:
        port = p.get("port")
        if isinstance(port, str) and not port.isdigit():
            if port not in ports:
                raise PodError(f"{where}.port", f"names no port of the container: {port!r}")
            return ports[port]
        if isinstance(port, bool) or not str(port).isdigit() or not 1 <= int(str(port)) <= 65535:
            raise PodError(f"{where}.port", "must be 1 to 65535 or a named port")
        return int(str(port))

    if "exec" in probe:
        ex = r.mapping(probe["exec"], f"{path}.exec", {"command"})
        command = r.strings(ex.get("command"), f"{path}.exec.command")
        if not command:
            raise PodError(f"{path}.exec.command", "names no command")
        check = ["CMD", *command]
    elif "httpGet" in probe:
        where = f"{path}.httpGet"
        hg = r.mapping(probe["httpGet"], where, {"path", "port", "scheme"})
        if hg.get("scheme", "HTTP") != "HTTP":
            raise PodError(f"{where}.scheme", "only HTTP is supported")
        url_path = hg.get("path", "/")
        if not isinstance(url_path, str) or not url_path.startswith("/"):
            raise PodError(f"{where}.path", "must start with /")
        url = shlex.quote(f"http://127.0.0.1:{port_of(hg, where)}{url_path}")
        check = ["CMD-SHELL", f"if command -v wget >/dev/null; then wget -q -O /dev/null {url}; "
                              f"else curl -fsS -o /dev/null {url}; fi"]
    else:
        where = f"{path}.tcpSocket"
        ts = r.mapping(probe["tcpSocket"], where, {"port"})
        check = ["CMD-SHELL", f"nc -z 127.0.0.1 {port_of(ts, where)}"]
    if probe.get("successThreshold", 1) != 1:
        raise PodError(f"{path}.successThreshold", "must be 1 (ECS counts one success)")
    period = r.seconds(probe, "periodSeconds", path, 10)
    timeout = r.seconds(probe, "timeoutSeconds", path, 1)
    delay = r.seconds(probe, "initialDelaySeconds", path, 0)
    failures = r.seconds(probe, "failureThreshold", path, 3)
    if period > 300 or timeout > 60 or delay > 300 or not 1 <= failures <= 10:
        raise PodError(path, "ECS's health checks allow periodSeconds up to 300, "
                             "timeoutSeconds up to 60, initialDelaySeconds up to 300 and "
                             "failureThreshold 1 to 10")
    if period < 5:
        r.notes.append(f"{path}.periodSeconds {period} raised to 5 (ECS's shortest interval)")
    if "timeoutSeconds" in probe and timeout < 2:
        r.notes.append(f"{path}.timeoutSeconds {timeout} raised to 2 (ECS's shortest timeout)")
    return {"command": check, "interval": max(5, period), "timeout": max(2, timeout),
            "retries": failures, "startPeriod": delay}


def _container(r: _Reader, doc: Any, path: str, init: bool) -> dict[str, Any]:
    c = r.mapping(doc, path, _INIT_KEYS if init else _CONTAINER_KEYS)
    if init and "restartPolicy" in c:
        raise PodError(f"{path}.restartPolicy", "sidecar init containers are not supported")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if init and probe in c:
            raise PodError(f"{path}.{probe}", "init containers have no probes")
    name = c.get("name")
    if not isinstance(name, str) or not name:
        raise PodError(f"{path}.name", "required")
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise PodError(f"{path}.name", f"{name[:80]!r}: at most 63 lowercase letters, digits "
                                       "and '-', starting and ending with a letter or digit")
    image = c.get("image")
    if not isinstance(image, str) or not image.strip():
        raise PodError(f"{path}.image", "required (an image in the region's registry: "
                                        "<endpoint host:port>/<repository>:<tag>)")
    out: dict[str, Any] = {"name": name, "image": image, "essential": not init}
    env: dict[str, str] = {}
    for j, e in enumerate(c.get("env") or []):
        where = f"{path}.env[{j}]"
        e = r.mapping(e, where, {"name", "value", "valueFrom"})
        if "valueFrom" in e:
            raise PodError(f"{where}.valueFrom", "not supported: give the value itself "
                                                 "(secrets and field references are not)")
        if not isinstance(e.get("name"), str) or not e["name"]:
            raise PodError(f"{where}.name", "required")
        value = e.get("value", "")
        if not isinstance(value, str):
            raise PodError(f"{where}.value", "must be a string (quote it in YAML)")
        env[e["name"]] = _expand(value, env)
    if env:
        out["environment"] = [{"name": k, "value": v} for k, v in env.items()]
    command = [_expand(s, env) for s in r.strings(c.get("command"), f"{path}.command")]
    args = [_expand(s, env) for s in r.strings(c.get("args"), f"{path}.args")]
    if command:
        out["entryPoint"] = command
    if args:
        out["command"] = args
    if c.get("workingDir") is not None:
        if not isinstance(c["workingDir"], str):
            raise PodError(f"{path}.workingDir", "must be a string")
        out["workingDirectory"] = c["workingDir"]
    ports: dict[str, int] = {}
    mappings = []
    for j, p in enumerate(c.get("ports") or []):
        where = f"{path}.ports[{j}]"
        p = r.mapping(p, where, {"containerPort", "protocol", "name", "hostPort"})
        port = p.get("containerPort")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise PodError(f"{where}.containerPort", "required, 1 to 65535")
        if p.get("hostPort", port) != port:
            raise PodError(f"{where}.hostPort", "must equal containerPort (the task has its own "
                                                "address, awsvpc)")
        protocol = p.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP"):
            raise PodError(f"{where}.protocol", "TCP or UDP")
        mapping: dict[str, Any] = {"containerPort": port, "protocol": protocol.lower()}
        if "name" in p:
            if not isinstance(p["name"], str) or len(p["name"]) > 15 \
                    or not _PORT_NAME.match(p["name"]):
                raise PodError(f"{where}.name", "at most 15 lowercase letters, digits and '-'")
            ports[p["name"]] = port
            mapping["name"] = p["name"]
        mappings.append(mapping)
    if mappings:
        out["portMappings"] = mappings
    probes = {k: _probe(r, c[k], f"{path}.{k}", ports)
              for k in ("livenessProbe", "readinessProbe") if c.get(k) is not None}
    if len(probes) == 2 and probes["livenessProbe"] != probes["readinessProbe"]:
        raise PodError(path, "livenessProbe and readinessProbe differ; an ECS container has one "
                             "health check: give one probe, or the same for both")
    if probes:
        out["healthCheck"] = next(iter(probes.values()))
    if "livenessProbe" in probes:
        r.notes.append(f"{path}.livenessProbe: a failing check marks the container UNHEALTHY "
                       "(not ready); it is not restarted for it (ECS health-check semantics)")
    res = r.mapping(c.get("resources"), f"{path}.resources", {"requests", "limits"})
    for kind in ("requests", "limits"):
        r.mapping(res.get(kind), f"{path}.resources.{kind}", {"cpu", "memory"})
    return out


def _size_fields(r: _Reader, containers: list[dict[str, Any]], docs: list[Any], paths: list[str],
                 task_cpu: int, task_mem: int) -> None:
    """The containers' own cpu units and memory, from their requests and limits."""
    for out, doc, path in zip(containers, docs, paths, strict=True):
        res = doc.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        cpu = req.get("cpu", lim.get("cpu"))
        if cpu is not None:
            out["cpu"] = k8s_cpu_units(cpu)
        if lim.get("cpu") is not None and k8s_cpu_units(lim["cpu"]) != out.get("cpu"):
            r.notes.append(f"{path}.resources.limits.cpu: the pod's CPU is bounded at its "
                           f"size ({task_cpu} units), not per container")
        if req.get("memory") is not None:
            out["memoryReservation"] = max(6, k8s_memory_mib(req["memory"]))
        if lim.get("memory") is not None:
            limit = max(6, k8s_memory_mib(lim["memory"]))
            if limit < out.get("memoryReservation", 0):
                raise PodError(f"{path}.resources.requests.memory",
                               "must be less than or equal to the memory limit")
            if limit > task_mem:
                r.notes.append(f"{path}.resources.limits.memory ({limit} MiB) is above the "
                               f"pod's size: bounded at {task_mem} MiB")
            out["memory"] = min(limit, task_mem)


def load(text: str | bytes, *, region: str, ignore_unknown: bool = False) -> Plan:
    """A manifest → a :class:`Plan`; PodError for anything that cannot run. Unknown fields are
    a PodError listing their paths unless ``ignore_unknown`` (then they are in
    ``Plan.unknown`` for the caller to print)."""
    return plan(parse_yaml(text), region=region, ignore_unknown=ignore_unknown)


def plan(doc: dict[str, Any], *, region: str, ignore_unknown: bool = False) -> Plan:
    r = _Reader()
    r.mapping(doc, "", _POD_KEYS)
    r.unknown = [u.lstrip(".") for u in r.unknown]
    if doc.get("apiVersion") != API_VERSION:
        raise PodError("apiVersion", f"must be {API_VERSION!r} (got "
                                     f"{str(doc.get('apiVersion'))[:40]!r})")
    if doc.get("kind") != KIND:
        raise PodError("kind", f"must be {KIND!r} (got {str(doc.get('kind'))[:40]!r})")
    meta = r.mapping(doc.get("metadata"), "metadata", _METADATA_KEYS)
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    if not isinstance(name, str) or not name:
        raise PodError("metadata.name", "required")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise PodError("metadata.namespace", "at most 63 lowercase letters, digits and '-'")
    family = family_for(namespace, name)
    if not _DNS_SUBDOMAIN.match(name) or len(family) > 255:
        raise PodError("metadata.name", f"{name[:80]!r}: lowercase letters, digits, '-' and '.' "
                                        f"(at most {255 - len(family_for(namespace, ''))} "
                                        "characters in this namespace)")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PodError("metadata.labels", "must map strings to strings (quote numbers)")
    for k, v in labels.items():
        if k.startswith(TAG_PREFIX) or not 0 < len(k) <= 128 or len(v) > 256:
            raise PodError(f"metadata.labels.{k[:60]}", f"keys of 1 to 128 characters, not "
                                                         f"under {TAG_PREFIX}; values up to 256")
    if len(labels) > ECS_TAGS_MAX - 4:
        raise PodError("metadata.labels", f"at most {ECS_TAGS_MAX - 4} labels")
    spec = r.mapping(doc.get("spec"), "spec", _SPEC_KEYS)
    policy_name = spec.get("restartPolicy", "Always")
    if policy_name not in RESTART_POLICIES:
        raise PodError("spec.restartPolicy", "Always, OnFailure or Never")
    docs = spec.get("containers")
    if not isinstance(docs, list) or not docs:
        raise PodError("spec.containers", "required: at least one container")
    inits = spec.get("initContainers") or []
    if not isinstance(inits, list):
        raise PodError("spec.initContainers", "must be a list")
    limit = DEFAULT_LIMITS.ecs_containers_per_task_max
    if len(docs) + len(inits) > limit:
        raise PodError("spec", f"at most {limit} containers, init containers included")
    init_paths = [f"spec.initContainers[{i}]" for i in range(len(inits))]
    paths = [f"spec.containers[{i}]" for i in range(len(docs))]
    init_out = [_container(r, d, p, True) for d, p in zip(inits, init_paths, strict=True)]
    main_out = [_container(r, d, p, False) for d, p in zip(docs, paths, strict=True)]
    names = [c["name"] for c in init_out + main_out]
    for i, n in enumerate(names):
        if n in names[:i]:
            where = (init_paths + paths)[i]
            raise PodError(f"{where}.name", f"{n!r} is used by another container of the pod")
    seen: dict[tuple[int, str], str] = {}
    for c, p in zip(main_out, paths, strict=True):
        for j, m in enumerate(c.get("portMappings", [])):
            taken = (m["containerPort"], m["protocol"])
            if taken in seen:
                raise PodError(f"{p}.ports[{j}]", f"port {taken[0]}/{taken[1].upper()} is "
                                                  f"already the port of container "
                                                  f"{seen[taken]!r}")
            seen[taken] = c["name"]
    for d, p in zip(inits + docs, init_paths + paths, strict=True):
        res = d.get("resources") or {}
        for kind in ("requests", "limits"):
            for key, parse in (("cpu", k8s_cpu_units), ("memory", k8s_memory_mib)):
                value = (res.get(kind) or {}).get(key)
                if value is not None:
                    try:
                        parse(value)
                    except EcsError as e:
                        raise PodError(f"{p}.resources.{kind}.{key}", e.message) from None
    try:
        size = fargate_pod_size({"containers": docs, "initContainers": inits})
    except EcsError as e:
        raise PodError("spec.containers[*].resources", e.message) from None
    _size_fields(r, main_out, docs, paths, size.cpu, size.memory_mib)
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None:
        if not isinstance(grace, int) or isinstance(grace, bool) or grace < 0:
            raise PodError("spec.terminationGracePeriodSeconds", "a whole number of seconds")
        stop = min(120, max(2, grace))
        if stop != grace:
            r.notes.append(f"spec.terminationGracePeriodSeconds {grace} became {stop} "
                           "(ECS's stopTimeout is 2 to 120 s)")
        for c in init_out + main_out:
            c["stopTimeout"] = stop
    log_group = log_group_for(namespace)
    for i, c in enumerate(init_out):
        if i:
            c["dependsOn"] = [{"containerName": init_out[i - 1]["name"], "condition": "SUCCESS"}]
    for c in init_out + main_out:
        if init_out and c["essential"]:
            c["dependsOn"] = [{"containerName": init_out[-1]["name"], "condition": "SUCCESS"}]
        c["logConfiguration"] = {"logDriver": "awslogs", "options": {
            "awslogs-group": log_group, "awslogs-region": region,
            "awslogs-stream-prefix": name, "awslogs-create-group": "true"}}
    own = [{"key": NAME_TAG, "value": name}, {"key": NAMESPACE_TAG, "value": namespace}]
    label_tags = [{"key": k, "value": v} for k, v in sorted(labels.items())]
    register = {"family": family, "networkMode": "awsvpc", "requiresCompatibilities": ["FARGATE"],
                "cpu": str(size.cpu), "memory": str(size.memory_mib),
                "containerDefinitions": init_out + main_out, "tags": own + label_tags}
    run_tags = [*own, {"key": RESTART_POLICY_TAG, "value": policy_name}, *label_tags]
    digest = hashlib.sha256(json.dumps([register, run_tags], sort_keys=True).encode()).hexdigest()
    register["tags"] = [*register["tags"], {"key": SPEC_TAG, "value": digest}]
    run = {"cluster": CLUSTER, "taskDefinition": family, "count": 1, "launchType": "FARGATE",
           "startedBy": STARTED_BY, "tags": [*run_tags, {"key": SPEC_TAG, "value": digest}]}
    if r.unknown and not ignore_unknown:
        raise PodError("", "fields cellcloud does not understand: " + ", ".join(r.unknown),
                       tuple(r.unknown))
    return Plan(name=name, namespace=namespace, family=family, register=register, run=run,
                restart_policy=RESTART_POLICIES[policy_name], spec_sha256=digest,
                log_group=log_group, unknown=tuple(r.unknown), notes=tuple(r.notes))


# -- status ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContainerView:
    name: str
    image: str
    init: bool
    state: Literal["waiting", "running", "terminated"]
    ready: bool
    exit_code: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class PodView:
    name: str
    namespace: str
    phase: Literal["Pending", "Running", "Succeeded", "Failed"]
    status: str  # kubectl's STATUS column: ContainerCreating, Running, Completed, Error, …
    ready: str  # "1/2": ready containers (init containers not counted)
    ip: str
    task_id: str
    task_arn: str
    created_ms: int | None
    reason: str
    containers: tuple[ContainerView, ...]
    labels: tuple[tuple[str, str], ...] = ()
    restart_policy: str = "Always"


def _tags(doc: dict[str, Any]) -> dict[str, str]:
    return {str(t.get("key")): str(t.get("value", "")) for t in doc.get("tags") or []
            if isinstance(t, dict)}


def timestamp_ms(value: Any) -> int | None:
    """A DescribeTasks timestamp (boto3: a datetime; JSON: epoch seconds) in ms."""
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1000)
    return int(float(value) * 1000)


def pod_view(task: dict[str, Any] | None, taskdef: dict[str, Any], *,
             name: str, namespace: str) -> PodView:
    """A Pod's status from its newest task (``DescribeTasks``' shape; None: it has no task)
    and its task definition (``DescribeTaskDefinition``' ``taskDefinition`` with ``tags``)."""
    defs = {c["name"]: c for c in taskdef.get("containerDefinitions") or []}
    tags = _tags(taskdef)
    labels = tuple(sorted((k, v) for k, v in tags.items() if not k.startswith(TAG_PREFIX)))
    if task is None:
        views = tuple(ContainerView(n, c.get("image", ""), not c.get("essential", True),
                                    "waiting", False, reason="NoTask")
                      for n, c in defs.items())
        return PodView(name, namespace, "Pending", "Pending", _ready(views), "", "", "", None,
                       "no task runs this pod", views, labels)
    run_tags = _tags(task)
    last, desired = task.get("lastStatus", "PROVISIONING"), task.get("desiredStatus", "RUNNING")
    views_list = []
    for c in task.get("containers") or []:
        spec = defs.get(c.get("name"), {})
        init = not spec.get("essential", True)
        status = c.get("lastStatus", "PENDING")
        reason = str(c.get("reason") or "")
        code = c.get("exitCode")
        if status == "RUNNING":
            state: Literal["waiting", "running", "terminated"] = "running"
            ready = c.get("healthStatus", "UNKNOWN") == "HEALTHY" or "healthCheck" not in spec
        elif status == "STOPPED" or code is not None:
            state, ready = "terminated", False
            if reason.startswith("OutOfMemoryError"):
                reason = "OOMKilled"
            elif not reason or reason.startswith("exit code") or reason == "killed":
                reason = "Completed" if code == 0 else "Error"  # the kubelet's words
        else:
            state, ready = "waiting", False
            reason = reason or "ContainerCreating"
        views_list.append(ContainerView(str(c.get("name")), str(c.get("image") or
                                                                  spec.get("image", "")),
                                        init, state, ready, code, reason))
    views = tuple(views_list)
    mains = [v for v in views if not v.init]
    phase: Literal["Pending", "Running", "Succeeded", "Failed"]
    if last in ("PROVISIONING", "PENDING", "ACTIVATING"):
        phase, status_text = "Pending", "ContainerCreating" if last == "PENDING" else "Pending"
    elif last == "STOPPED":
        ok = task.get("stopCode") != "TaskFailedToStart" and mains and all(
            v.exit_code == 0 for v in mains)
        phase = "Succeeded" if ok else "Failed"
        status_text = "Completed" if ok else "Error"
    else:
        phase, status_text = "Running", "Running"
    if desired == "STOPPED" and last != "STOPPED":
        status_text = "Terminating"
    elif phase in ("Pending", "Running") and any(
            v.reason.startswith("CrashLoopBackOff") for v in views):
        status_text = "CrashLoopBackOff"
    ip = ""
    for att in task.get("attachments") or []:
        for d in att.get("details") or []:
            if d.get("name") == "privateIPv4Address":
                ip = str(d.get("value") or "")
    for c in task.get("containers") or []:
        for ni in c.get("networkInterfaces") or []:
            ip = ip or str(ni.get("privateIpv4Address") or "")
    arn = str(task.get("taskArn") or "")
    return PodView(name, namespace, phase, status_text, _ready(views), ip,
                   arn.rsplit("/", 1)[-1], arn, timestamp_ms(task.get("createdAt")),
                   str(task.get("stoppedReason") or ""), views, labels,
                   run_tags.get(RESTART_POLICY_TAG, "Always"))


def _ready(views: tuple[ContainerView, ...]) -> str:
    mains = [v for v in views if not v.init]
    return f"{sum(v.ready for v in mains)}/{len(mains)}"


def _rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def pod_object(v: PodView) -> dict[str, Any]:
    """The Pod as Kubernetes' API shows it (``pod get -o json``): metadata, the spec's
    containers and restartPolicy, status with phase, podIP and container states."""
    def status(c: ContainerView) -> dict[str, Any]:
        if c.state == "running":
            state: dict[str, Any] = {"running": {}}
        elif c.state == "terminated":
            state = {"terminated": {"exitCode": c.exit_code, "reason": c.reason}}
        else:
            state = {"waiting": {"reason": c.reason}}
        return {"name": c.name, "image": c.image, "ready": c.ready, "state": state}

    inits = [c for c in v.containers if c.init]
    mains = [c for c in v.containers if not c.init]
    meta: dict[str, Any] = {"name": v.name, "namespace": v.namespace, "uid": v.task_id or None,
                            "creationTimestamp": _rfc3339(v.created_ms)}
    if v.labels:
        meta["labels"] = dict(v.labels)
    spec: dict[str, Any] = {"containers": [{"name": c.name, "image": c.image} for c in mains],
                            "restartPolicy": v.restart_policy}
    st: dict[str, Any] = {"phase": v.phase, "containerStatuses": [status(c) for c in mains]}
    if inits:
        spec["initContainers"] = [{"name": c.name, "image": c.image} for c in inits]
        st["initContainerStatuses"] = [status(c) for c in inits]
    if v.ip:
        st["podIP"] = v.ip
    if v.reason:
        st["message"] = v.reason
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec,
            "status": st}
