"""ECS task definitions (core/ecs_taskdef.py): RegisterTaskDefinition's rules as botocore's
ecs model and Fargate state them, Fargate's size table, and EKS on Fargate's pod rounding."""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core import ecs_taskdef as td

ECS = botocore.session.get_session().get_service_model("ecs")


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "family": "web", "requiresCompatibilities": ["FARGATE"], "networkMode": "awsvpc",
        "cpu": "256", "memory": "512",
        "containerDefinitions": [
            {"name": "web", "image": "127.0.0.1:9009/team/web:v1", "essential": True,
             "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
             "healthCheck": {"command": ["CMD-SHELL", "curl -f localhost:8080"]},
             "dependsOn": [{"containerName": "init", "condition": "SUCCESS"}]},
            {"name": "init", "image": "127.0.0.1:9009/team/init:v1", "essential": False},
            {"name": "sidecar", "image": "127.0.0.1:9009/team/side:v1", "essential": True,
             "dependsOn": [{"containerName": "web", "condition": "HEALTHY"}]},
        ]}
    doc.update(over)
    return doc


def test_a_two_container_task_with_dependencies_is_accepted() -> None:
    t = td.validate_task_definition(_doc())
    assert (t.cpu, t.memory_mib, t.network_mode) == (256, 512, "awsvpc")
    web = t.container("web")
    assert web.health_check == td.HealthCheck(("CMD-SHELL", "curl -f localhost:8080"))
    assert web.ports == (td.PortMapping(8080),)
    assert td.start_order(t) == ["init", "web", "sidecar"]


def test_the_model_agrees_on_enums_and_required_members() -> None:
    assert tuple(ECS.shape_for("ContainerCondition").enum) == td.CONTAINER_CONDITIONS
    assert tuple(ECS.shape_for("NetworkMode").enum) == td.NETWORK_MODES
    assert set(td.LOG_DRIVERS) == set(ECS.shape_for("LogDriver").enum)
    req = ECS.operation_model("RegisterTaskDefinition").input_shape
    assert set(req.required_members) <= td.TASK_FIELDS
    assert td.TASK_FIELDS <= set(req.members)
    assert td.CONTAINER_FIELDS <= set(ECS.shape_for("ContainerDefinition").members)


@pytest.mark.parametrize("cpu,memory,ok", [
    ("256", "512", True), ("256", "4096", False), (".25 vCPU", "0.5 GB", True),
    ("1 vCPU", "2 GB", True), ("1024", "1024", False), ("4096", "30720", True),
    ("4096", "31744", False), ("8192", "20480", True), ("8192", "18432", False),
    ("16384", "122880", True), ("16384", "36864", False), ("3072", "8192", False),
])
def test_fargate_cpu_memory_combinations(cpu: str, memory: str, ok: bool) -> None:
    doc = _doc(cpu=cpu, memory=memory)
    if ok:
        td.validate_task_definition(doc)
        return
    with pytest.raises(td.EcsError) as e:
        td.validate_task_definition(doc)
    assert e.value.type == "ClientException"
    assert "No Fargate configuration exists for given values" in e.value.message


def test_size_table_counts() -> None:  # the table as ECS documents it
    assert {c: len(m) for c, m in td.FARGATE_SIZES.items()} == {
        256: 3, 512: 4, 1024: 7, 2048: 13, 4096: 23, 8192: 12, 16384: 12}


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "no_family": ({"family": ""}, "Family"),
    "bridge_on_fargate": ({"networkMode": "bridge"}, "awsvpc"),
    "no_cpu": ({"cpu": None}, "'cpu' be defined"),
    "ec2": ({"requiresCompatibilities": ["EC2"]}, "FARGATE only"),
    "volumes": ({"volumes": [{"name": "v"}]}, "configuredAtLaunch: true"),
    "host_volume": ({"volumes": [{"name": "v", "host": {"sourcePath": "/"}}]},
                    "volumes.0..host is not supported"),
    "no_containers": ({"containerDefinitions": []}, "at least one container"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_definitions(case: str) -> None:
    over, why = BAD[case]
    with pytest.raises(td.EcsError, match=why):
        td.validate_task_definition(_doc(**over))


def _with_containers(*containers: dict[str, Any]) -> dict[str, Any]:
    return _doc(containerDefinitions=list(containers))


C = {"name": "a", "image": "i"}
BAD_CONTAINERS: dict[str, tuple[list[dict[str, Any]], str]] = {
    "no_image": ([{"name": "a"}], "Container.image should not be null"),
    "no_name": ([{"image": "i"}], "Container.name should not be null"),
    "dupe_name": ([C, C], "unique"),
    "none_essential": ([{**C, "essential": False}], "at least one essential"),
    "port_conflict": ([{**C, "portMappings": [{"containerPort": 80}]},
                       {"name": "b", "image": "i", "portMappings": [{"containerPort": 80}]}],
                      "mapped more than once"),
    "host_port_differs": ([{**C, "portMappings": [{"containerPort": 80, "hostPort": 81}]}],
                          "must match"),
    "port_range": ([{**C, "portMappings": [{"containerPort": 70000}]}], "1 to 65535"),
    "unknown_dependency": ([{**C, "dependsOn": [{"containerName": "x",
                                                 "condition": "START"}]}], "not in the task"),
    "self_dependency": ([{**C, "dependsOn": [{"containerName": "a",
                                              "condition": "START"}]}], "itself"),
    "cycle": ([{**C, "dependsOn": [{"containerName": "b", "condition": "START"}]},
               {"name": "b", "image": "i", "dependsOn": [{"containerName": "a",
                                                          "condition": "START"}]}], "cycle"),
    "success_on_essential": ([C, {"name": "b", "image": "i", "dependsOn": [
        {"containerName": "a", "condition": "SUCCESS"}]}], "essential container"),
    "healthy_without_check": ([C, {"name": "b", "image": "i", "dependsOn": [
        {"containerName": "a", "condition": "HEALTHY"}]}], "no healthCheck"),
    "bad_condition": ([{**C, "dependsOn": [{"containerName": "a", "condition": "READY"}]}],
                      "condition must be one of"),
    "health_command": ([{**C, "healthCheck": {"command": ["curl"]}}], "CMD, CMD-SHELL"),
    "health_interval": ([{**C, "healthCheck": {"command": ["CMD", "x"], "interval": 1}}],
                        "interval must be"),
    "health_retries": ([{**C, "healthCheck": {"command": ["CMD", "x"], "retries": 11}}],
                       "retries must be"),
    "log_driver_fargate": ([{**C, "logConfiguration": {"logDriver": "json-file"}}],
                           "not supported on Fargate"),
    "container_memory": ([{**C, "memory": 1024}], "exceeds the task"),
    "container_cpu": ([{**C, "cpu": 512}], "exceeds the task"),
    "secrets": ([{**C, "secrets": [{"name": "s", "valueFrom": "arn"}]}],
                "secrets is not supported"),
    "too_many": ([{"name": f"c{i}", "image": "i"} for i in range(11)], "at most 10"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTAINERS))
def test_bad_containers(case: str) -> None:
    containers, why = BAD_CONTAINERS[case]
    with pytest.raises(td.EcsError, match=why) as e:
        td.validate_task_definition(_with_containers(*containers))
    assert e.value.type == "ClientException"


def test_health_check_defaults_are_ecs_defaults() -> None:
    t = td.validate_task_definition(_with_containers(
        {**C, "healthCheck": {"command": ["CMD", "true"]}}))
    hc = t.container("a").health_check
    assert hc is not None
    assert (hc.interval_s, hc.timeout_s, hc.retries, hc.start_period_s) == (30, 5, 3, 0)


# -- EKS on Fargate ---------------------------------------------------------------------------

def _pod(containers: list[dict[str, Any]], inits: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    return {"containers": containers, "initContainers": inits or []}


def _c(cpu: str | None = None, mem: str | None = None, limits: bool = False) -> dict[str, Any]:
    res = {k: v for k, v in (("cpu", cpu), ("memory", mem)) if v is not None}
    return {"name": "c", "resources": {"limits" if limits else "requests": res}}


@pytest.mark.parametrize("pod,want", [
    (_pod([_c()]), (256, 512)),  # nothing requested: the smallest (.25 vCPU, 0.5 GB)
    (_pod([_c("250m", "256Mi")]), (256, 512)),  # 256 + 256 overhead = 512
    (_pod([_c("250m", "257Mi")]), (256, 1024)),
    (_pod([_c("1", "8Gi")]), (2048, 9216)),  # AWS's example: 1 vCPU 8 GB -> 2 vCPU 9 GB
    (_pod([_c("500m", "1Gi"), _c("500m", "1Gi")]), (1024, 3072)),  # requests add up
    (_pod([_c("100m", "128Mi")], [_c("2", "4Gi")]), (2048, 5120)),  # init's larger request
    (_pod([_c("300m", "700M", limits=True)]), (512, 1024)),  # a limit stands for a request
    (_pod([_c("16", "100Gi")]), (16384, 106496)),
])
def test_pod_resources_round_up_as_eks_on_fargate(pod: dict[str, Any],
                                                  want: tuple[int, int]) -> None:
    got = td.fargate_pod_size(pod)
    assert (got.cpu, got.memory_mib) == want


def test_a_pod_too_large_for_fargate_is_refused() -> None:
    with pytest.raises(td.EcsError, match="large enough"):
        td.fargate_pod_size(_pod([_c("17", "1Gi")]))
    with pytest.raises(td.EcsError, match="memory quantity"):
        td.fargate_pod_size(_pod([_c("1", "1 gig")]))


def test_quantities() -> None:
    assert td.k8s_cpu_units("250m") == 256 and td.k8s_cpu_units("0.1") == 103
    assert td.k8s_memory_mib("1G") == 954 and td.k8s_memory_mib("512Mi") == 512
    assert td.parse_cpu(".25 vCPU") == 256 and td.parse_memory("0.5GB") == 512


# -- Kubernetes quantities: exact, the whole grammar, bounded -----------------------------------

_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
             "Ei": 2**60}


@given(st.integers(0, 10**9), st.integers(0, 6), st.sampled_from(sorted(_SUFFIXES)))
def test_memory_quantity_is_exact_and_rounds_up(digits: int, decimals: int, suffix: str) -> None:
    from fractions import Fraction
    text = str(digits) if not decimals else \
        f"{digits // 10**decimals}.{digits % 10**decimals:0{decimals}d}"
    exact = Fraction(digits, 10**decimals) * _SUFFIXES[suffix]
    assert td.k8s_memory_mib(text + suffix) == -(-exact // 2**20)


@given(st.integers(0, 10**7), st.integers(-6, 6))
def test_cpu_quantity_with_an_exponent_or_millis(n: int, exponent: int) -> None:
    from fractions import Fraction
    assert td.k8s_cpu_units(f"{n}e{exponent}") == -(-Fraction(n) * Fraction(10) ** exponent
                                                      * 1024 // 1)
    assert td.k8s_cpu_units(f"{n}m") == -(-Fraction(n, 1000) * 1024 // 1)


def test_quantity_forms_yaml_gives_and_refusals() -> None:
    assert td.k8s_cpu_units(2) == 2048 and td.k8s_cpu_units(0.5) == 512
    assert td.k8s_cpu_units("1.") == 1024 and td.k8s_cpu_units(".25") == 256
    assert td.k8s_memory_mib("1E") == 10**18 // 2**20 + 1  # exa, not an exponent
    assert td.k8s_memory_mib("129e6") == 124 and td.k8s_memory_mib("+1Mi") == 1
    assert td.k8s_memory_mib("-0") == 0
    for bad in ("-1", "1.5.5", "1 Gi", "Gi", "1gi", "1e", True, None, "1e31", "9" * 65):
        with pytest.raises(td.EcsError):
            td.k8s_memory_mib(bad)


@given(st.integers(0, 16 * 1024), st.integers(0, 120 * 1024))
def test_round_to_fargate_is_the_smallest_size_that_holds(cpu: int, mem: int) -> None:
    size_cpu, size_mem = td.round_to_fargate(cpu, mem)
    assert size_cpu >= cpu and size_mem >= mem and size_mem in td.FARGATE_SIZES[size_cpu]
    smaller = [(c, m) for c, ms in td.FARGATE_SIZES.items() for m in ms
               if c >= cpu and m >= mem and (c, m) < (size_cpu, size_mem)]
    assert not smaller
