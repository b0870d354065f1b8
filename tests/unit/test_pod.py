"""Pod manifests as ECS tasks (core/pod.py): the plan, every refusal with its path, and the
Pod status read back from DescribeTasks. Each plan is checked by the ECS validator itself
(core/ecs_taskdef.validate_task_definition), so what `pod apply` registers is what ECS takes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cellcloud.core import ecs_taskdef as td
from cellcloud.core import ecs_tasks as tasks
from cellcloud.core import pod

IMG = "127.0.0.1:9009/web:1"
WEB = f"""\
apiVersion: v1
kind: Pod
metadata:
  name: web.app
  namespace: team-a
  labels: {{app: web}}
spec:
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 10
  initContainers:
  - name: migrate
    image: {IMG}
    command: [/bin/migrate]
  - name: seed
    image: {IMG}
  containers:
  - name: web
    image: {IMG}
    command: [/bin/server]
    args: ["--port", "$(PORT)", "$$(PORT)", "$(MISSING)"]
    env:
    - {{name: PORT, value: "8080"}}
    - {{name: URL, value: "http://localhost:$(PORT)/"}}
    ports:
    - {{containerPort: 8080, name: http}}
    resources:
      requests: {{cpu: 500m, memory: 512Mi}}
      limits: {{memory: 1Gi}}
    readinessProbe:
      httpGet: {{path: /healthz, port: http}}
      periodSeconds: 3
  - name: side
    image: {IMG}
    workingDir: /srv
    ports: [{{containerPort: 9000, protocol: UDP}}]
    resources: {{limits: {{cpu: "1", memory: 256Mi}}}}
    livenessProbe:
      exec: {{command: [cat, /tmp/ok]}}
      initialDelaySeconds: 5
      failureThreshold: 4
"""


def _load(text: str, **kw: Any) -> pod.Plan:
    return pod.load(text, region="cc-local-1", **kw)


def _manifest(**spec: Any) -> str:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": IMG}], **spec}}
    return yaml.safe_dump(doc)


def _error(text: str) -> pod.PodError:
    with pytest.raises(pod.PodError) as e:
        _load(text)
    return e.value


def test_a_pod_becomes_a_task_definition_ecs_accepts() -> None:
    plan = _load(WEB)
    assert (plan.name, plan.namespace, plan.family) == ("web.app", "team-a", "pod_team-a_web_app")
    reg = plan.register
    taskdef = td.validate_task_definition(reg)  # what the region's RegisterTaskDefinition runs
    # cpu: 500m + 1 = 1.5 vCPU -> 2 vCPU; memory 512 + 256 + 256 (overhead) -> 4 GB at 2 vCPU
    assert (taskdef.cpu, taskdef.memory_mib) == (2048, 4096)
    assert [c.name for c in taskdef.containers] == ["migrate", "seed", "web", "side"]
    migrate, seed, web, side = taskdef.containers
    assert not migrate.essential and not seed.essential and web.essential and side.essential
    assert seed.depends_on == (td.Dependency("migrate", "SUCCESS"),)
    assert web.depends_on == side.depends_on == (td.Dependency("seed", "SUCCESS"),)
    assert web.entry_point == ("/bin/server",)
    assert web.command == ("--port", "8080", "$(PORT)", "$(MISSING)")
    assert web.environment == (("PORT", "8080"), ("URL", "http://localhost:8080/"))
    assert web.ports == (td.PortMapping(8080, "tcp", "http"),)
    assert side.ports == (td.PortMapping(9000, "udp"),)
    assert (web.cpu, web.memory_reservation_mib, web.memory_mib) == (512, 512, 1024)
    assert (side.cpu, side.memory_mib, side.working_directory) == (1024, 256, "/srv")
    assert migrate.cpu == 0 and migrate.memory_mib is None  # inits run in the task's size
    assert web.health_check is not None and web.health_check.command[0] == "CMD-SHELL"
    assert "http://127.0.0.1:8080/healthz" in web.health_check.command[1]
    assert web.health_check.interval_s == 5  # raised from 3, and said so
    assert side.health_check == td.HealthCheck(("CMD", "cat", "/tmp/ok"), 10, 2, 4, 5)
    assert all(c.stop_timeout_s == 10 for c in taskdef.containers)
    assert web.log_driver == "awslogs" and dict(web.log_options) == {
        "awslogs-group": "/cellcloud/pods/team-a", "awslogs-region": "cc-local-1",
        "awslogs-stream-prefix": "web.app", "awslogs-create-group": "true"}
    assert any("periodSeconds 3 raised to 5" in n for n in plan.notes)
    assert any("livenessProbe" in n and "not restarted" in n for n in plan.notes)
    run = plan.run
    assert run["taskDefinition"] == plan.family and run["cluster"] == "default"
    assert run["startedBy"] == pod.STARTED_BY and run["launchType"] == "FARGATE"
    assert pod.restart_policy_from_tags(run["tags"]) == plan.restart_policy == "on-failure"
    assert {"key": "app", "value": "web"} in run["tags"]
    assert plan.unknown == ()


def test_the_task_core_runs_the_inits_in_order_then_the_containers() -> None:
    plan = _load(WEB)
    task = tasks.Task(td.validate_task_definition(plan.register), 0,
                      restart_policy=pod.restart_policy_from_tags(plan.run["tags"]))
    assert task.handle(tasks.Provisioned(), 0) == [tasks.StartContainer("migrate")]
    task.handle(tasks.ContainerStarted("migrate"), 1)
    assert task.handle(tasks.ContainerExited("migrate", 0), 2) == [tasks.StartContainer("seed")]
    task.handle(tasks.ContainerStarted("seed"), 3)
    assert task.handle(tasks.ContainerExited("seed", 0), 4) == [
        tasks.StartContainer("web"), tasks.StartContainer("side")]


def test_defaults_the_smallest_size_and_always() -> None:
    plan = _load(_manifest())
    assert (plan.register["cpu"], plan.register["memory"]) == ("256", "512")
    assert plan.namespace == "default" and plan.restart_policy == "always"
    assert pod.restart_policy_from_tags(plan.run["tags"]) == "always"
    assert pod.restart_policy_from_tags([{"key": "other", "value": "x"}]) == "never"
    td.validate_task_definition(plan.register)


def test_unknown_fields_are_reported_by_path_never_dropped() -> None:
    doc = yaml.safe_load(_manifest(volumes=[{"name": "v"}], nodeSelector={"a": "b"}))
    doc["status"] = {"phase": "Running"}
    doc["metadata"]["annotations"] = {"a": "b"}
    c = doc["spec"]["containers"][0]
    c["volumeMounts"] = [{"name": "v", "mountPath": "/v"}]
    c["resources"] = {"requests": {"cpu": "1", "ephemeral-storage": "1Gi"}}
    c["ports"] = [{"containerPort": 80, "hostIP": "1.2.3.4"}]
    text = yaml.safe_dump(doc)
    paths = ["status", "metadata.annotations", "spec.volumes", "spec.nodeSelector",
             "spec.containers[0].volumeMounts", "spec.containers[0].ports[0].hostIP",
             "spec.containers[0].resources.requests.ephemeral-storage"]
    e = _error(text)
    assert sorted(e.unknown) == sorted(paths)
    for p in paths:
        assert p in e.message
    plan = _load(text, ignore_unknown=True)
    assert sorted(plan.unknown) == sorted(paths)
    td.validate_task_definition(plan.register)


@pytest.mark.parametrize("text, path, words", [
    ("a: [1, 2", "", "malformed YAML: line 1"),
    ("kind: Pod\n  bad: indent\n", "", "malformed YAML: line 2"),
    ("", "", "empty"),
    ("- 1\n", "", "must be a mapping"),
    ("apiVersion: v1\nkind: Pod\n---\napiVersion: v1\n", "", "2 documents"),
    (_manifest().replace("kind: Pod", "kind: Deployment"), "kind", "'Pod'"),
    (_manifest().replace("apiVersion: v1", "apiVersion: apps/v1"), "apiVersion", "'v1'"),
    (_manifest().replace("name: p", "name: P_Q"), "metadata.name", "lowercase"),
    (_manifest().replace(f"image: {IMG}", "image: ''"), "spec.containers[0].image", "required"),
    (_manifest().replace(f"image: {IMG}", "command: [x]"), "spec.containers[0].image",
     "required"),
    (_manifest(containers=[]), "spec.containers", "at least one"),
    (_manifest(restartPolicy="Sometimes"), "spec.restartPolicy", "OnFailure"),
    (_manifest(containers=[{"name": "c", "image": IMG}, {"name": "c", "image": IMG}]),
     "spec.containers[1].name", "used by another"),
    (_manifest(containers=[{"name": "c", "image": IMG, "env": [
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]),
     "spec.containers[0].env[0].valueFrom", "not supported"),
    (_manifest(containers=[{"name": "c", "image": IMG, "env": [{"name": "A", "value": 1}]}]),
     "spec.containers[0].env[0].value", "string"),
    (_manifest(containers=[{"name": "c", "image": IMG, "ports": [
        {"containerPort": 80, "protocol": "SCTP"}]}]), "spec.containers[0].ports[0].protocol",
     "TCP or UDP"),
    (_manifest(containers=[{"name": "c", "image": IMG, "ports": [
        {"containerPort": 80, "hostPort": 81}]}]), "spec.containers[0].ports[0].hostPort",
     "equal"),
    (_manifest(containers=[{"name": "a", "image": IMG, "ports": [{"containerPort": 80}]},
                           {"name": "b", "image": IMG, "ports": [{"containerPort": 80}]}]),
     "spec.containers[1].ports[0]", "already the port of container 'a'"),
    (_manifest(containers=[{"name": "c", "image": IMG, "resources": {
        "requests": {"memory": "lots"}}}]), "spec.containers[0].resources.requests.memory",
     "not a memory quantity"),
    (_manifest(containers=[{"name": "c", "image": IMG, "resources": {
        "requests": {"cpu": "17"}}}]), "spec.containers[*].resources", "large enough"),
    (_manifest(containers=[{"name": "c", "image": IMG, "resources": {
        "requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}]),
     "spec.containers[0].resources.requests.memory", "less than or equal"),
    (_manifest(containers=[{"name": "c", "image": IMG, "livenessProbe": {
        "grpc": {"port": 9}}}]), "spec.containers[0].livenessProbe.grpc", "not supported"),
    (_manifest(containers=[{"name": "c", "image": IMG, "livenessProbe": {
        "httpGet": {"port": "web"}}}]), "spec.containers[0].livenessProbe.httpGet.port",
     "names no port"),
    (_manifest(containers=[{"name": "c", "image": IMG, "livenessProbe": {}}]),
     "spec.containers[0].livenessProbe", "exactly one"),
    (_manifest(containers=[{"name": "c", "image": IMG,
                            "livenessProbe": {"exec": {"command": ["a"]}},
                            "readinessProbe": {"exec": {"command": ["b"]}}}]),
     "spec.containers[0]", "differ"),
    (_manifest(containers=[{"name": "c", "image": IMG, "readinessProbe": {
        "exec": {"command": ["a"]}, "successThreshold": 2}}]),
     "spec.containers[0].readinessProbe.successThreshold", "must be 1"),
    (_manifest(containers=[{"name": "c", "image": IMG, "readinessProbe": {
        "exec": {"command": ["a"]}, "periodSeconds": 301}}]),
     "spec.containers[0].readinessProbe", "up to 300"),
    (_manifest(initContainers=[{"name": "i", "image": IMG, "restartPolicy": "Always"}]),
     "spec.initContainers[0].restartPolicy", "sidecar"),
    (_manifest(initContainers=[{"name": "i", "image": IMG, "readinessProbe": {
        "exec": {"command": ["a"]}}}]), "spec.initContainers[0].readinessProbe", "no probes"),
    (_manifest(containers=[{"name": f"c{i}", "image": IMG} for i in range(11)]), "spec",
     "at most 10"),
    (_manifest().replace("name: p", "name: p\n  labels: {cellcloud.pod/name: x}"),
     "metadata.labels.cellcloud.pod/name", "not under"),
    (_manifest().replace("name: p", "name: p\n  labels: {v: 1}"), "metadata.labels",
     "strings"),
    (_manifest().replace("name: p", "name: " + "a" * 250), "metadata.name", "at most 243"),
])
def test_what_cannot_run_is_a_clear_error_with_its_path(text: str, path: str,
                                                        words: str) -> None:
    e = _error(text)
    assert e.path == path and words in e.message, (e.path, e.message)
    assert str(e) == (f"{path}: {e.message}" if path else e.message)


def test_a_manifest_over_its_limit_is_refused_before_parsing() -> None:
    big = _manifest() + "#" * (1024 * 1024)
    assert "pod_manifest_bytes_max" in _error(big).message


def test_tcp_and_exec_probes_and_grace_bounds() -> None:
    plan = _load(_manifest(terminationGracePeriodSeconds=600, containers=[
        {"name": "c", "image": IMG, "ports": [{"containerPort": 5432}],
         "livenessProbe": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 1},
         "readinessProbe": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 1}}]))
    c = td.validate_task_definition(plan.register).containers[0]
    assert c.health_check == td.HealthCheck(("CMD-SHELL", "nc -z 127.0.0.1 5432"), 10, 2, 3, 0)
    assert c.stop_timeout_s == 120
    assert any("timeoutSeconds 1 raised to 2" in n for n in plan.notes)
    assert any("600 became 120" in n for n in plan.notes)


def test_the_spec_digest_follows_the_spec_not_the_text() -> None:
    a = _load(WEB)
    reordered = yaml.safe_dump(yaml.safe_load(WEB), sort_keys=True)
    assert _load(reordered).spec_sha256 == a.spec_sha256
    assert _load(WEB.replace("8080", "8081")).spec_sha256 != a.spec_sha256
    assert _load(WEB.replace("OnFailure", "Never")).spec_sha256 != a.spec_sha256
    assert {"key": pod.SPEC_TAG, "value": a.spec_sha256} in a.register["tags"]


_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)


@given(_label, st.lists(_label, min_size=1, max_size=3), _label,
       st.lists(_label, min_size=1, max_size=3))
def test_families_are_one_to_one(ns1: str, n1: list[str], ns2: str, n2: list[str]) -> None:
    a, b = ".".join(n1), ".".join(n2)
    assert (pod.family_for(ns1, a) == pod.family_for(ns2, b)) == ((ns1, a) == (ns2, b))


_quantity = st.one_of(st.none(), st.integers(1, 4000).map(lambda m: f"{m}m"))
_memory = st.one_of(st.none(), st.integers(1, 8192).map(lambda m: f"{m}Mi"))


@settings(max_examples=150)
@given(st.lists(st.tuples(_quantity, _memory, _quantity, _memory), min_size=1, max_size=4),
       st.lists(st.tuples(_quantity, _memory), max_size=2))
def test_any_sizes_give_a_definition_ecs_takes(mains: list[Any], inits: list[Any]) -> None:
    def res(cpu: Any, mem: Any, lcpu: Any = None, lmem: Any = None) -> dict[str, Any]:
        req = {k: v for k, v in (("cpu", cpu), ("memory", mem)) if v is not None}
        lim = {k: v for k, v in (("cpu", lcpu), ("memory", lmem)) if v is not None}
        return {"requests": req, "limits": lim}

    containers = [{"name": f"c{i}", "image": IMG, "resources": res(*m)}
                  for i, m in enumerate(mains)]
    init = [{"name": f"i{i}", "image": IMG, "resources": res(*m)} for i, m in enumerate(inits)]
    spec = {"containers": containers, "initContainers": init}
    try:
        plan = _load(_manifest(**spec))
    except pod.PodError as e:
        # Only a memory request above its limit is the manifest's fault.
        assert "less than or equal to the memory limit" in e.message
        return
    taskdef = td.validate_task_definition(plan.register)
    size = td.fargate_pod_size(spec)
    assert (taskdef.cpu, taskdef.memory_mib) == (size.cpu, size.memory_mib)


def _task(last: str, containers: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"taskArn": "arn:aws:ecs:cc-local-1:1:task/default/abc", "lastStatus": last,
            "desiredStatus": kw.pop("desired", "RUNNING"), "containers": containers,
            "createdAt": 1_700_000_000.5, "tags": [{"key": pod.RESTART_POLICY_TAG,
                                                      "value": "Never"}],
            "attachments": [{"type": "ElasticNetworkInterface", "details": [
                {"name": "privateIPv4Address", "value": "100.64.0.7"}]}], **kw}


def test_the_pods_status_from_its_task() -> None:
    taskdef = {**_load(WEB).register}
    view = pod.pod_view(None, taskdef, name="web.app", namespace="team-a")
    assert (view.phase, view.ready, view.reason) == ("Pending", "0/2", "no task runs this pod")
    assert dict(view.labels) == {"app": "web"}

    pending = _task("PENDING", [{"name": "migrate", "lastStatus": "RUNNING"},
                                {"name": "web", "lastStatus": "PENDING"},
                                {"name": "side", "lastStatus": "PENDING"}])
    view = pod.pod_view(pending, taskdef, name="web.app", namespace="team-a")
    assert (view.phase, view.status, view.ready) == ("Pending", "ContainerCreating", "0/2")
    assert [c.init for c in view.containers] == [True, False, False]

    running = _task("RUNNING", [
        {"name": "migrate", "lastStatus": "STOPPED", "exitCode": 0},
        {"name": "web", "lastStatus": "RUNNING", "healthStatus": "UNKNOWN"},
        {"name": "side", "lastStatus": "RUNNING", "healthStatus": "HEALTHY"}])
    view = pod.pod_view(running, taskdef, name="web.app", namespace="team-a")
    assert (view.phase, view.status, view.ready, view.ip) == (
        "Running", "Running", "1/2", "100.64.0.7")
    assert view.task_id == "abc" and view.created_ms == 1_700_000_000_500
    assert view.restart_policy == "Never"

    looping = _task("RUNNING", [{"name": "web", "lastStatus": "PENDING", "exitCode": 1,
                                 "reason": "CrashLoopBackOff: exit code 1; restarting in 20 s"}])
    assert pod.pod_view(looping, taskdef, name="w", namespace="n").status == "CrashLoopBackOff"
    stopping = _task("RUNNING", [], desired="STOPPED")
    assert pod.pod_view(stopping, taskdef, name="w", namespace="n").status == "Terminating"

    done = _task("STOPPED", [{"name": "web", "lastStatus": "STOPPED", "exitCode": 0},
                             {"name": "side", "lastStatus": "STOPPED", "exitCode": 0}],
                 stopCode="EssentialContainerExited", stoppedReason="Essential container …")
    view = pod.pod_view(done, taskdef, name="w", namespace="n")
    assert (view.phase, view.status) == ("Succeeded", "Completed")
    failed = _task("STOPPED", [{"name": "web", "lastStatus": "STOPPED", "exitCode": 0,
                                "reason": "exit code 0"},
                               {"name": "side", "lastStatus": "STOPPED", "exitCode": 137,
                                "reason": "OutOfMemoryError: the task's memory limit"}],
                   stopCode="EssentialContainerExited")
    view = pod.pod_view(failed, taskdef, name="w", namespace="n")
    assert (view.phase, view.status) == ("Failed", "Error")
    assert [c.reason for c in view.containers] == ["Completed", "OOMKilled"]
    never = _task("STOPPED", [{"name": "web", "lastStatus": "STOPPED"}],
                  stopCode="TaskFailedToStart", stoppedReason="CannotPullContainerError")
    assert pod.pod_view(never, taskdef, name="w", namespace="n").phase == "Failed"

    obj = pod.pod_object(pod.pod_view(running, taskdef, name="web.app", namespace="team-a"))
    assert obj["kind"] == "Pod" and obj["metadata"]["labels"] == {"app": "web"}
    assert obj["metadata"]["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert obj["status"]["phase"] == "Running" and obj["status"]["podIP"] == "100.64.0.7"
    assert obj["status"]["initContainerStatuses"][0]["state"] == {
        "terminated": {"exitCode": 0, "reason": "Completed"}}
    assert [c["name"] for c in obj["spec"]["containers"]] == ["web", "side"]
