"""ECS task definitions, sans-IO (issue #17): ``RegisterTaskDefinition``'s validation as
botocore's ``ecs`` model and Fargate state it, Fargate's valid task cpu/memory combinations,
and EKS on Fargate's rounding of a Pod's resources up to one of them.

Nothing here does I/O; errors are :class:`EcsError` with the model's exception names
(``ClientException``, ``InvalidParameterException``), which the API shell answers as botocore's
JSON protocol (400, ``__type``) so boto3 raises the modelled exception. A field the model has
but cellcloud does not honour is refused by name (``ClientException``), never accepted and
ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .limits import DEFAULT_LIMITS

# Fargate's task sizes (cpu units -> memory MiB), as ECS documents them for Linux tasks.
GiB_in_MiB = 1024


def _steps(lo_gib: int, hi_gib: int, step_gib: int) -> tuple[int, ...]:
    return tuple(g * GiB_in_MiB for g in range(lo_gib, hi_gib + 1, step_gib))


FARGATE_SIZES: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: _steps(1, 4, 1),
    1024: _steps(2, 8, 1),
    2048: _steps(4, 16, 1),
    4096: _steps(8, 30, 1),
    8192: _steps(16, 60, 4),
    16384: _steps(32, 120, 8),
}

# The ECS API's JSON 1.1 target prefix (X-Amz-Target), as botocore's ``ecs`` model names it.
TARGET_PREFIX = "AmazonEC2ContainerServiceV20141113."
CONTAINER_CONDITIONS = ("START", "COMPLETE", "SUCCESS", "HEALTHY")
NETWORK_MODES = ("bridge", "host", "awsvpc", "none")
COMPATIBILITIES = ("EC2", "FARGATE", "EXTERNAL", "MANAGED_INSTANCES")
FARGATE_LOG_DRIVERS = ("awslogs", "splunk", "awsfirelens")
LOG_DRIVERS = ("json-file", "syslog", "journald", "gelf", "fluentd", "awslogs", "splunk",
               "awsfirelens")
PROTOCOLS = ("tcp", "udp")
APP_PROTOCOLS = ("http", "http2", "grpc")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,255}$")

# What cellcloud honours; any other member of the model given a value is refused by name.
TASK_FIELDS = frozenset({"family", "taskRoleArn", "executionRoleArn", "networkMode",
                         "containerDefinitions", "requiresCompatibilities", "cpu", "memory",
                         "tags"}) | {"volumes"}  # volumes: core/ecs_volumes.py
CONTAINER_FIELDS = frozenset({"name", "image", "cpu", "memory", "memoryReservation",
                              "portMappings", "essential", "entryPoint", "command",
                              "environment", "dependsOn", "startTimeout", "stopTimeout",
                              "workingDirectory", "user", "logConfiguration", "healthCheck"}) \
    | {"mountPoints"}  # core/ecs_volumes.py


class EcsError(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


def client(message: str) -> EcsError:
    return EcsError("ClientException", message)


def invalid(message: str) -> EcsError:
    return EcsError("InvalidParameterException", message)


@dataclass(frozen=True)
class HealthCheck:
    command: tuple[str, ...]
    interval_s: int = 30
    timeout_s: int = 5
    retries: int = 3
    start_period_s: int = 0


@dataclass(frozen=True)
class PortMapping:
    container_port: int
    protocol: str = "tcp"
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True)
class Dependency:
    container: str
    condition: str


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    essential: bool = True
    cpu: int = 0
    memory_mib: int | None = None  # hard limit
    memory_reservation_mib: int | None = None  # soft
    entry_point: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    ports: tuple[PortMapping, ...] = ()
    depends_on: tuple[Dependency, ...] = ()
    health_check: HealthCheck | None = None
    start_timeout_s: int | None = None
    stop_timeout_s: int | None = None
    working_directory: str = ""
    user: str = ""
    log_driver: str = ""
    log_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TaskDefinition:
    family: str
    containers: tuple[Container, ...]
    cpu: int  # units (1024 = one vCPU)
    memory_mib: int
    network_mode: str = "awsvpc"
    compatibilities: tuple[str, ...] = ("FARGATE",)
    task_role_arn: str = ""
    execution_role_arn: str = ""
    tags: tuple[tuple[str, str], ...] = field(default=())

    def container(self, name: str) -> Container:
        return next(c for c in self.containers if c.name == name)


# -- sizes ----------------------------------------------------------------------------------

def parse_cpu(value: Any) -> int:
    """Task ``cpu``: ``"1024"`` (units) or ``"1 vCPU"`` / ``".25 vCPU"`` (ECS accepts both)."""
    return _parse_size(value, "cpu", "vcpu", "'256' or '0.25 vCPU'")


def parse_memory(value: Any) -> int:
    """Task ``memory``: ``"2048"`` (MiB) or ``"2 GB"`` / ``"0.5GB"``."""
    return _parse_size(value, "memory", "gb", "'512' or '1 GB'")


def _parse_size(value: Any, name: str, big: str, example: str) -> int:
    """A task size ``name``: an integer, a string of a whole number, or a number followed by
    the unit ``big`` (any case; 1,024 of the small unit) that comes to a whole number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise client(f"{name} must be a string such as {example}")
    m = re.fullmatch(rf"\s*(\d+(?:\.\d+)?|\.\d+)\s*({big})?\s*", value, re.I)
    if m is None:
        raise client(f"Invalid '{name}' setting for task: {value[:40]!r}")
    number = float(m.group(1))
    units = number * 1024 if m.group(2) else number
    if units != int(units):
        raise client(f"Invalid '{name}' setting for task: {value[:40]!r}")
    return int(units)


def check_fargate_size(cpu: int, memory_mib: int) -> None:
    if memory_mib not in FARGATE_SIZES.get(cpu, ()):
        raise client(f"No Fargate configuration exists for given values: {cpu} CPU, "
                     f"{memory_mib} memory. See the Amazon ECS documentation for the valid "
                     "values.")


def round_to_fargate(cpu: int, memory_mib: int) -> tuple[int, int]:
    """The smallest Fargate size with at least ``cpu`` units and ``memory_mib``: the fewest
    vCPUs that can hold the memory, then the least memory (EKS on Fargate's rounding)."""
    for size_cpu in sorted(FARGATE_SIZES):
        if size_cpu < cpu:
            continue
        for size_mem in FARGATE_SIZES[size_cpu]:
            if size_mem >= memory_mib:
                return size_cpu, size_mem
    raise client(f"No Fargate configuration is large enough for {cpu} CPU and {memory_mib} "
                 "MiB (at most 16 vCPU and 120 GB)")


# -- Kubernetes quantities and Pods on Fargate ------------------------------------------------

# Kubernetes' quantity grammar (apimachinery's resource.Quantity): a signed decimal number and
# one suffix, binary SI (Ki … Ei), decimal SI (m, k, M … E) or a decimal exponent (e3, E-2).
_QUANTITY = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)"
                       r"(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|m|k|M|G|T|P|E)?$")
_SUFFIX = {"": Fraction(1), "m": Fraction(1, 1000), "k": Fraction(1000), "M": Fraction(1000**2),
           "G": Fraction(1000**3), "T": Fraction(1000**4), "P": Fraction(1000**5),
           "E": Fraction(1000**6), "Ki": Fraction(1024), "Mi": Fraction(1024**2),
           "Gi": Fraction(1024**3), "Ti": Fraction(1024**4), "Pi": Fraction(1024**5),
           "Ei": Fraction(1024**6)}
eks_fargate_overhead_mib = 256  # kubelet, kube-proxy, containerd: added to every pod


def k8s_quantity(q: Any, what: str = "quantity") -> Fraction:
    """A Kubernetes quantity (``"250m"``, ``"1.5Gi"``, ``"129e6"``, YAML's ``2`` or ``0.5``)
    as an exact non-negative number; at most ``k8s_quantity_chars_max`` characters and an
    exponent of at most ``k8s_quantity_exponent_max`` (so no quantity costs a huge integer)."""
    if isinstance(q, bool) or not isinstance(q, str | int | float):
        raise invalid(f"not a {what}: {str(q)[:40]!r}")
    text = str(q).strip()
    if len(text) > DEFAULT_LIMITS.k8s_quantity_chars_max:
        raise invalid(f"not a {what}: longer than {DEFAULT_LIMITS.k8s_quantity_chars_max} "
                      "characters")
    m = _QUANTITY.match(text)
    if m is None:
        raise invalid(f"not a {what}: {text[:40]!r}")
    sign, number, suffix = m.group(1), m.group(2), m.group(3) or ""
    if suffix not in _SUFFIX:  # a decimal exponent
        exponent = int(suffix[1:])
        if abs(exponent) > DEFAULT_LIMITS.k8s_quantity_exponent_max:
            raise invalid(f"not a {what}: exponent {exponent} out of range "
                          f"(±{DEFAULT_LIMITS.k8s_quantity_exponent_max})")
        scale = Fraction(10) ** exponent
    else:
        scale = _SUFFIX[suffix]
    value = Fraction(number if not number.endswith(".") else number[:-1]) * scale
    if sign == "-" and value:
        raise invalid(f"a {what} must not be negative: {text[:40]!r}")
    return value


def k8s_cpu_units(q: Any) -> int:
    """A Kubernetes CPU quantity (``"250m"``, ``"0.5"``, ``2``) as ECS cpu units, rounded up
    (exactly: 1 core = 1024 units)."""
    return math.ceil(k8s_quantity(q, "CPU quantity") * 1024)


def k8s_memory_mib(q: Any) -> int:
    """A Kubernetes memory quantity (``"512Mi"``, ``"1G"``, ``"1e9"``) in MiB, rounded up
    (exactly)."""
    return math.ceil(k8s_quantity(q, "memory quantity") / 1024**2)


@dataclass(frozen=True)
class PodResources:
    cpu: int  # units
    memory_mib: int


def _container_request(c: dict[str, Any]) -> PodResources:
    """A container's request; a limit where no request is given (Fargate runs every pod with
    guaranteed QoS, so requests and limits are the same thing to it)."""
    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    cpu = req.get("cpu", lim.get("cpu"))
    mem = req.get("memory", lim.get("memory"))
    return PodResources(k8s_cpu_units(cpu) if cpu is not None else 0,
                        k8s_memory_mib(mem) if mem is not None else 0)


def fargate_pod_size(spec: dict[str, Any]) -> PodResources:
    """EKS on Fargate's size for a Pod spec: the larger of (the largest init container's
    request) and (the sum of the long-running containers' requests), for CPU and memory each;
    plus 256 MiB of memory for the Kubernetes components; rounded up to the nearest Fargate
    size (none given: the smallest, 0.25 vCPU and 0.5 GB)."""
    inits = [_container_request(c) for c in spec.get("initContainers") or []]
    mains = [_container_request(c) for c in spec.get("containers") or []]
    cpu = max(max((r.cpu for r in inits), default=0), sum(r.cpu for r in mains))
    mem = max(max((r.memory_mib for r in inits), default=0), sum(r.memory_mib for r in mains))
    size_cpu, size_mem = round_to_fargate(cpu, mem + eks_fargate_overhead_mib)
    return PodResources(size_cpu, size_mem)


# -- RegisterTaskDefinition ---------------------------------------------------------------------

def _int_in(doc: dict[str, Any], key: str, lo: int, hi: int, default: int | None,
            where: str) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise client(f"{where}.{key} must be an integer from {lo} to {hi}")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise client(f"{what} must be a list of strings")
    return tuple(value)


def _refuse_unhonoured(doc: dict[str, Any], honoured: frozenset[str], where: str) -> None:
    for key, value in doc.items():
        if key not in honoured and value not in (None, [], {}, ""):
            raise client(f"{where}.{key} is not supported by cellcloud")


def _health_check(doc: Any, where: str) -> HealthCheck | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise client(f"{where}.healthCheck must be an object")
    command = _strings(doc.get("command"), f"{where}.healthCheck.command")
    if not command or command[0] not in ("CMD", "CMD-SHELL", "NONE"):
        raise client(f"{where}.healthCheck.command must start with CMD, CMD-SHELL or NONE")
    if command[0] != "NONE" and len(command) < 2:
        raise client(f"{where}.healthCheck.command names no command")
    w = f"{where}.healthCheck"
    return HealthCheck(command,
                       _int_in(doc, "interval", 5, 300, 30, w) or 30,
                       _int_in(doc, "timeout", 2, 60, 5, w) or 5,
                       _int_in(doc, "retries", 1, 10, 3, w) or 3,
                       _int_in(doc, "startPeriod", 0, 300, 0, w) or 0)


def _container(doc: Any, i: int, network_mode: str, fargate: bool) -> Container:
    where = f"containerDefinitions[{i}]"
    if not isinstance(doc, dict):
        raise client(f"{where} must be an object")
    _refuse_unhonoured(doc, CONTAINER_FIELDS, where)
    name, image = doc.get("name"), doc.get("image")
    if not isinstance(name, str) or not name:
        raise client("Container.name should not be null or empty.")
    if not NAME_PATTERN.match(name):
        raise client(f"Container.name {name[:80]!r}: up to 255 letters, numbers, hyphens "
                     "and underscores")
    if not isinstance(image, str) or not image:
        raise client("Container.image should not be null or empty.")
    essential = doc.get("essential", True)
    if not isinstance(essential, bool):
        raise client(f"{where}.essential must be a boolean")
    ports = []
    for j, pm in enumerate(doc.get("portMappings") or []):
        if not isinstance(pm, dict):
            raise client(f"{where}.portMappings[{j}] must be an object")
        port = pm.get("containerPort")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise client(f"{where}.portMappings[{j}].containerPort must be 1 to 65535")
        host = pm.get("hostPort")
        if network_mode == "awsvpc" and host not in (None, port):
            raise client("When networkMode=awsvpc, the host ports and container ports in port "
                         "mappings must match.")
        protocol = pm.get("protocol", "tcp")
        if protocol not in PROTOCOLS:
            raise client(f"{where}.portMappings[{j}].protocol must be tcp or udp")
        app = pm.get("appProtocol", "")
        if app and app not in APP_PROTOCOLS:
            raise client(f"{where}.portMappings[{j}].appProtocol must be one of "
                         f"{', '.join(APP_PROTOCOLS)}")
        ports.append(PortMapping(port, protocol, str(pm.get("name") or ""), app))
    deps = []
    for j, d in enumerate(doc.get("dependsOn") or []):
        if not isinstance(d, dict) or not isinstance(d.get("containerName"), str):
            raise client(f"{where}.dependsOn[{j}] needs containerName and condition")
        if d.get("condition") not in CONTAINER_CONDITIONS:
            raise client(f"{where}.dependsOn[{j}].condition must be one of "
                         f"{', '.join(CONTAINER_CONDITIONS)}")
        deps.append(Dependency(d["containerName"], d["condition"]))
    env = []
    for j, kv in enumerate(doc.get("environment") or []):
        if not isinstance(kv, dict) or not isinstance(kv.get("name"), str) \
                or not isinstance(kv.get("value", ""), str):
            raise client(f"{where}.environment[{j}] must be {{name, value}} strings")
        env.append((kv["name"], kv.get("value", "")))
    log = doc.get("logConfiguration")
    log_driver = ""
    log_options: tuple[tuple[str, str], ...] = ()
    if log is not None:
        if not isinstance(log, dict) or log.get("logDriver") not in LOG_DRIVERS:
            raise client(f"{where}.logConfiguration.logDriver must be one of "
                         f"{', '.join(LOG_DRIVERS)}")
        log_driver = log["logDriver"]
        if fargate and log_driver not in FARGATE_LOG_DRIVERS:
            raise client(f"Log driver {log_driver} is not supported on Fargate "
                         f"({', '.join(FARGATE_LOG_DRIVERS)})")
        opts = log.get("options") or {}
        if not isinstance(opts, dict) or not all(isinstance(v, str) for v in opts.values()):
            raise client(f"{where}.logConfiguration.options must map strings to strings")
        log_options = tuple(sorted(opts.items()))
    memory = _int_in(doc, "memory", 6, 10**7, None, where)
    reservation = _int_in(doc, "memoryReservation", 6, 10**7, None, where)
    if memory is not None and reservation is not None and reservation > memory:
        raise client(f"{where}: memoryReservation must not exceed memory")
    return Container(
        name=name, image=image, essential=essential,
        cpu=_int_in(doc, "cpu", 0, 10 * 16384, 0, where) or 0,
        memory_mib=memory, memory_reservation_mib=reservation,
        entry_point=_strings(doc.get("entryPoint"), f"{where}.entryPoint"),
        command=_strings(doc.get("command"), f"{where}.command"),
        environment=tuple(env), ports=tuple(ports), depends_on=tuple(deps),
        health_check=_health_check(doc.get("healthCheck"), where),
        start_timeout_s=_int_in(doc, "startTimeout", 2, 120, None, where),
        stop_timeout_s=_int_in(doc, "stopTimeout", 2, 120, None, where),
        working_directory=str(doc.get("workingDirectory") or ""),
        user=str(doc.get("user") or ""), log_driver=log_driver, log_options=log_options)


def _check_dependencies(containers: tuple[Container, ...]) -> None:
    by_name = {c.name: c for c in containers}
    for c in containers:
        for d in c.depends_on:
            target = by_name.get(d.container)
            if target is None:
                raise client(f"Container {c.name} depends on {d.container}, which is not in "
                             "the task definition")
            if target.name == c.name:
                raise client(f"Container {c.name} cannot depend on itself")
            if d.condition in ("COMPLETE", "SUCCESS") and target.essential:
                raise client(f"Container {c.name} depends on {d.container} with condition "
                             f"{d.condition}, which cannot be set on an essential container")
            if d.condition == "HEALTHY" and target.health_check is None:
                raise client(f"Container {c.name} depends on {d.container} with condition "
                             "HEALTHY, but it has no healthCheck")
    # No cycles: containers must have a start order.
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise client("Container dependencies form a cycle: "
                         + " -> ".join([*path, name]))
        state[name] = 1
        for d in by_name[name].depends_on:
            visit(d.container, (*path, name))
        state[name] = 2

    for c in containers:
        visit(c.name, ())


def start_order(task: TaskDefinition) -> list[str]:
    """Container names in an order that starts every dependency before its dependents
    (ties in definition order)."""
    done: list[str] = []
    pending = [c.name for c in task.containers]
    while pending:
        ready = next(n for n in pending
                     if all(d.container in done for d in task.container(n).depends_on))
        done.append(ready)
        pending.remove(ready)
    return done


def validate_task_definition(doc: Any) -> TaskDefinition:
    """``RegisterTaskDefinition``'s request → a TaskDefinition, or EcsError."""
    if not isinstance(doc, dict):
        raise client("the request must be a JSON object")
    _refuse_unhonoured(doc, TASK_FIELDS, "taskDefinition")
    family = doc.get("family")
    if not isinstance(family, str) or not NAME_PATTERN.match(family):
        raise client("Family must be 1 to 255 letters (uppercase and lowercase), numbers, "
                     "hyphens and underscores.")
    compat = _strings(doc.get("requiresCompatibilities"), "requiresCompatibilities") \
        or ("FARGATE",)
    for kind in compat:
        if kind not in COMPATIBILITIES:
            raise invalid(f"requiresCompatibilities: {kind!r} is not one of "
                          f"{', '.join(COMPATIBILITIES)}")
        if kind != "FARGATE":
            raise client(f"requiresCompatibilities {kind} is not supported by cellcloud "
                         "(FARGATE only)")
    fargate = "FARGATE" in compat
    network_mode = doc.get("networkMode", "awsvpc" if fargate else "bridge")
    if network_mode not in NETWORK_MODES:
        raise invalid(f"networkMode must be one of {', '.join(NETWORK_MODES)}")
    if fargate and network_mode != "awsvpc":
        raise client("Fargate only supports network mode 'awsvpc'.")
    if fargate and doc.get("cpu") is None:
        raise client("Fargate requires that 'cpu' be defined at the task level.")
    if fargate and doc.get("memory") is None:
        raise client("Fargate requires that 'memory' be defined at the task level.")
    cpu, memory = parse_cpu(doc.get("cpu")), parse_memory(doc.get("memory"))
    if fargate:
        check_fargate_size(cpu, memory)
    defs = doc.get("containerDefinitions")
    if not isinstance(defs, list) or not defs:
        raise client("containerDefinitions must name at least one container")
    if len(defs) > DEFAULT_LIMITS.ecs_containers_per_task_max:
        raise client(f"a task definition has at most "
                     f"{DEFAULT_LIMITS.ecs_containers_per_task_max} containers")
    containers = tuple(_container(d, i, network_mode, fargate) for i, d in enumerate(defs))
    names = [c.name for c in containers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise client(f"Container names must be unique within a task definition: {dupes[0]}")
    if not any(c.essential for c in containers):
        raise client("A task definition must have at least one essential container.")
    seen: dict[tuple[int, str], str] = {}
    for c in containers:  # one network namespace (awsvpc): a port is one container's
        for p in c.ports:
            key = (p.container_port, p.protocol)
            if key in seen:
                raise client(f"Port {p.container_port}/{p.protocol} is mapped more than once "
                             f"in the task ({seen[key]}, {c.name}): containers share the "
                             "task's network namespace")
            seen[key] = c.name
    if sum(c.cpu for c in containers) > cpu:
        raise client(f"The containers' cpu ({sum(c.cpu for c in containers)}) exceeds the "
                     f"task's ({cpu})")
    for c in containers:
        need = c.memory_mib or c.memory_reservation_mib or 0
        if need > memory:
            raise client(f"Container {c.name}'s memory ({need} MiB) exceeds the task's "
                         f"({memory} MiB)")
    if sum(c.memory_reservation_mib or c.memory_mib or 0 for c in containers) > memory:
        raise client(f"The containers' memory reservations exceed the task's {memory} MiB")
    _check_dependencies(containers)
    from . import ecs_volumes  # (it imports this module)

    vol_names = ecs_volumes.task_volumes(doc)
    for i, d in enumerate(defs):
        ecs_volumes.mount_points(d, vol_names, f"containerDefinitions[{i}]")
    tags = []
    for t in doc.get("tags") or []:
        if not isinstance(t, dict) or not isinstance(t.get("key"), str):
            raise invalid("tags must be {key, value} objects")
        tags.append((t["key"], str(t.get("value", ""))))
    return TaskDefinition(family=family, containers=containers, cpu=cpu, memory_mib=memory,
                          network_mode=network_mode, compatibilities=compat,
                          task_role_arn=str(doc.get("taskRoleArn") or ""),
                          execution_role_arn=str(doc.get("executionRoleArn") or ""),
                          tags=tuple(tags))
