"""Autoscaling of ECS services (issue #17, docs/fargate.md "Autoscaling"): the
application-autoscaling API's subset (control/autoscaling.py) and the scaler loop in the cell
(frontend/services.py over core/autoscale.py), with the FAKE agents of test_ecs_tasks.py
reporting the tasks' CPU on the test's clock.

Shapes and errors as botocore's ``application-autoscaling`` model has them; high CPU scales
out to ceil(current × metric / target) at once, low CPU scales in after a stable window; the
scale-in cooldown holds a second scale-in, also across a restart of the frontend;
DisableScaleIn never scales in; with several policies, out if any says out, in only if all
say in. Windows here are short on the test's clock: a sample each 100 ms, a 2 s stable
window, a 300 ms panic window."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.session

from cellcloud.control.autoscaling import TARGET_PREFIX
from tests.control.test_ecs_services import LIMITS as SVC_LIMITS
from tests.control.test_ecs_services import SvcWorld, answer_ok, run, web_def
from tests.control.test_ecs_tasks import REGION, A

AAS = botocore.session.get_session().get_service_model("application-autoscaling")
AAS_ERRORS = {s for s in AAS.shape_names if AAS.shape_for(s).metadata.get("exception")}
LIMITS = replace(SVC_LIMITS, ecs_autoscale_sample_interval_ms=100,
                 ecs_autoscale_stable_window_ms=2_000, ecs_autoscale_panic_window_ms=300,
                 ecs_scaling_policies_per_target_max=2, ecs_task_poll_interval_ms=20)
RID = "service/default/web"
TARGET = {"ServiceNamespace": "ecs", "ResourceId": RID,
          "ScalableDimension": "ecs:service:DesiredCount"}


async def aas(w: SvcWorld, op: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await w.ecs.op({"target": TARGET_PREFIX + op, "b": json.dumps(doc).encode(),
                        "a": A})
    out: dict[str, Any] = json.loads(r["b"])
    if r["s"] != 200:
        assert out["__type"] in AAS_ERRORS, out
    else:
        shape = AAS.operation_model(op).output_shape
        assert set(out) <= set(shape.members if shape else {}), out
    return r["s"], out


async def ok(w: SvcWorld, op: str, doc: dict[str, Any]) -> dict[str, Any]:
    status, out = await aas(w, op, doc)
    assert status == 200, out
    return out


async def err(w: SvcWorld, op: str, doc: dict[str, Any]) -> tuple[str, str]:
    status, out = await aas(w, op, doc)
    assert status == 400, out
    return out["__type"], out["message"]


def policy(target: float, metric: str = "ECSServiceAverageCPUUtilization",
           **cfg: Any) -> dict[str, Any]:
    return {**TARGET, "PolicyName": "cpu", "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": target,
                "PredefinedMetricSpecification": {"PredefinedMetricType": metric}, **cfg}}


async def web_service(w: SvcWorld, desired: int) -> None:
    for a in w.agents.values():
        a.clock = lambda: w.now
    await w.ok("CreateCluster", {})
    await w.ok("RegisterTaskDefinition", web_def())  # cpu 256: a quarter of a vCPU
    await w.ok("CreateService", {"serviceName": "web", "taskDefinition": "web",
                                 "desiredCount": desired})
    await w.steady()


def cpu(w: SvcWorld, vcpus: float) -> None:
    for a in w.agents.values():
        a.cpu_vcpus = vcpus


async def desired(w: SvcWorld) -> int:
    return int((await w.service())["desiredCount"])


def datapoints(w: SvcWorld) -> int:
    assert w.cell.tasks is not None
    return w.cell.tasks.services.counters["autoscale_datapoints"]


def test_targets_and_policies_shapes_and_errors(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        assert await err(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1,
                                                       "MaxCapacity": 4}) \
            == ("ValidationException", f"ECS service doesn't exist: {RID}")
        await web_service(w, 1)
        out = await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 2,
                                                     "MaxCapacity": 4})
        assert out["ScalableTargetARN"] == (f"arn:aws:application-autoscaling:{REGION}:{A}:"
                                            "scalable-target/ecs/default/web")
        assert await desired(w) == 2  # raised to MinCapacity at once
        acts = (await ok(w, "DescribeScalingActivities", {"ServiceNamespace": "ecs"}))[
            "ScalingActivities"]
        assert [a["Description"] for a in acts] == ["Setting desired count to 2."]
        assert "range became [2, 4]" in acts[0]["Cause"]
        (t,) = (await ok(w, "DescribeScalableTargets", {"ServiceNamespace": "ecs"}))[
            "ScalableTargets"]
        assert set(t) <= set(AAS.shape_for("ScalableTarget").members)
        assert (t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) == (RID, 2, 4)
        assert (await ok(w, "DescribeScalableTargets", {
            "ServiceNamespace": "ecs", "ResourceIds": ["service/default/other"]})) \
            == {"ScalableTargets": []}
        # only the MaxCapacity: the MinCapacity kept
        await ok(w, "RegisterScalableTarget", {**TARGET, "MaxCapacity": 6})
        (t,) = (await ok(w, "DescribeScalableTargets", {"ServiceNamespace": "ecs"}))[
            "ScalableTargets"]
        assert (t["MinCapacity"], t["MaxCapacity"]) == (2, 6)
        e, msg = await err(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 7})
        assert e == "ValidationException" and "cannot be less than" in msg
        e, msg = await err(w, "RegisterScalableTarget", {
            **TARGET, "ServiceNamespace": "dynamodb", "MinCapacity": 1, "MaxCapacity": 2})
        assert e == "ValidationException" and "ServiceNamespace" in msg
        e, msg = await err(w, "RegisterScalableTarget", {
            **TARGET, "MinCapacity": 1, "MaxCapacity": 2, "SuspendedState": {
                "DynamicScalingInSuspended": True}})
        assert e == "ValidationException" and "SuspendedState" in msg
        # policies: target tracking on a predefined metric only, others refused by name
        out = await ok(w, "PutScalingPolicy", policy(50, ScaleInCooldown=60))
        assert out["PolicyARN"].endswith(":resource/ecs/service/default/web:policyName/cpu")
        (p,) = (await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs",
                                                        "ResourceId": RID}))["ScalingPolicies"]
        assert set(p) <= set(AAS.shape_for("ScalingPolicy").members)
        cfg = p["TargetTrackingScalingPolicyConfiguration"]
        assert (p["PolicyName"], p["PolicyType"], cfg["TargetValue"], cfg["ScaleInCooldown"],
                cfg["ScaleOutCooldown"], cfg["DisableScaleIn"]) \
            == ("cpu", "TargetTrackingScaling", 50, 60, 300, False)
        # kept with the service: a restarted frontend describes (and drives) them the same
        targets = await ok(w, "DescribeScalableTargets", {"ServiceNamespace": "ecs"})
        policies = await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs"})
        assert w.cell.tasks is not None
        await w.cell.tasks.close()
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        assert await ok(w, "DescribeScalableTargets", {"ServiceNamespace": "ecs"}) == targets
        assert await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs"}) == policies
        for bad, word in [
                ({**policy(50), "PolicyType": "StepScaling"}, "TargetTrackingScaling"),
                (policy(50, CustomizedMetricSpecification={"MetricName": "x"}),
                 "CustomizedMetricSpecification"),
                (policy(50, metric="DynamoDBReadCapacityUtilization"), "PredefinedMetricType"),
                (policy(0), "TargetValue"), (policy(50, ScaleOutCooldown=-1), "ScaleOut")]:
            e, msg = await err(w, "PutScalingPolicy", bad)
            assert e == "ValidationException" and word in msg, (bad, msg)
        await ok(w, "PutScalingPolicy", {**policy(9), "PolicyName": "second"})
        assert len((await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs"}))[
            "ScalingPolicies"]) == 2
        e, msg = await err(w, "PutScalingPolicy", {**policy(9), "PolicyName": "third"})
        assert e == "LimitExceededException" and "at most 2" in msg
        await ok(w, "DeleteScalingPolicy", {**TARGET, "PolicyName": "second"})
        e, _ = await err(w, "DeleteScalingPolicy", {**TARGET, "PolicyName": "nope"})
        assert e == "ObjectNotFoundException"
        await ok(w, "DeleteScalingPolicy", {**TARGET, "PolicyName": "cpu"})
        assert (await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs"})) \
            == {"ScalingPolicies": []}
        await ok(w, "DeregisterScalableTarget", TARGET)
        assert (await ok(w, "DescribeScalableTargets", {"ServiceNamespace": "ecs"})) \
            == {"ScalableTargets": []}
        e, _ = await err(w, "DeregisterScalableTarget", TARGET)
        assert e == "ObjectNotFoundException"
        e, _ = await err(w, "PutScalingPolicy", policy(50))
        assert e == "ObjectNotFoundException"
        e, msg = await err(w, "PutScheduledAction", {"ServiceNamespace": "ecs"})
        assert e == "ValidationException" and "not supported" in msg
    run(body, tmp_path, limits=LIMITS)


def test_high_cpu_scales_out_and_low_cpu_scales_in(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await web_service(w, 2)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1,
                                               "MaxCapacity": 10})
        await ok(w, "PutScalingPolicy", policy(50, ScaleOutCooldown=0, ScaleInCooldown=0))
        cpu(w, 0.25)  # each task: all of its 256 units, 100 %: twice the target
        await w.until("4 tasks", lambda: _is(desired(w), 4))
        cpu(w, 0.125)  # 50 %: on the target (no further scale-out to 8 meanwhile)
        s = await w.steady()
        # ceil(2 × 100 / 50) = 4; the stable window still holds 100 % seconds for a while,
        # so one more step out (its average over target, never past 4 × 100 / 50 = 8) is
        # the policy working, not a fault
        assert 4 <= s["runningCount"] <= 8
        cpu(w, 0.025)  # 10 %: ceil(4 × 10 / 50) = 1, as the stable window's average falls
        await w.until("1 task", lambda: _is(desired(w), 1))
        assert (await w.steady())["runningCount"] == 1
        acts = (await ok(w, "DescribeScalingActivities", {"ServiceNamespace": "ecs"}))[
            "ScalingActivities"]
        assert all(set(a) <= set(AAS.shape_for("ScalingActivity").members) for a in acts)
        assert acts[0]["Description"] == "Setting desired count to 1."
        assert all(a["StatusCode"] == "Successful" for a in acts)
        # Oldest first: scale-outs up to 4, then scale-ins down to 1. How many steps each
        # took depends on which per-second samples the windows held when each decision was
        # made (under load the first may see only some tasks at 100 %: 2 → 3 → 4).
        chrono = acts[::-1]
        outs = [a for a in chrono if "over target 50" in a["Cause"]]
        ins = [a for a in chrono if "under target 50" in a["Cause"]]
        assert outs and ins and chrono == outs + ins, chrono

        def count(a: dict[str, Any]) -> int:
            return int(a["Description"].rsplit(" ", 1)[1].rstrip("."))
        ups, downs = [count(a) for a in outs], [count(a) for a in ins]
        assert ups == sorted(set(ups)) and 4 <= ups[-1] <= 8, ups  # out, step by step
        assert downs == sorted(set(downs), reverse=True) and downs[-1] == 1, downs
    run(body, tmp_path, limits=LIMITS)


async def _is(got: Any, want: int) -> bool:
    return bool(await got == want)


def test_the_scale_in_cooldown_holds_and_disable_scale_in_never_scales_in(
        tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await web_service(w, 4)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1,
                                               "MaxCapacity": 10})
        await ok(w, "PutScalingPolicy", policy(50, ScaleOutCooldown=0,
                                                ScaleInCooldown=3600))
        cpu(w, 0.075)  # 30 %: ceil(4 × 30 / 50) = 3, then ceil(3 × 30 / 50) = 2
        await w.until("3 tasks", lambda: _is(desired(w), 3))
        seen = datapoints(w)
        await w.until("40 more datapoints", lambda: datapoints(w) >= seen + 40)
        assert await desired(w) == 3  # the cooldown (an hour) holds the next scale-in
        w.now += 3_600_000
        await w.until("2 tasks", lambda: _is(desired(w), 2))
        # DisableScaleIn: low CPU (10 %: ceil(2 × 10 / 50) = 1) never scales in
        await ok(w, "PutScalingPolicy", policy(50, ScaleInCooldown=0, DisableScaleIn=True))
        cpu(w, 0.025)
        seen = datapoints(w)
        await w.until("40 more datapoints", lambda: datapoints(w) >= seen + 40)
        assert await desired(w) == 2
        # ... and high CPU still scales out
        cpu(w, 0.25)
        await w.until("4 tasks", lambda: _is(desired(w), 4))
    run(body, tmp_path, limits=LIMITS)


def test_the_cooldown_holds_across_a_restart_of_the_frontend(tmp_path: Path) -> None:
    """The scalers' cooldowns are kept with the service's row: a frontend restarted within
    a scale-in cooldown does not scale in again (before, its scaler started afresh)."""
    async def body(w: SvcWorld) -> None:
        await web_service(w, 4)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1,
                                               "MaxCapacity": 10})
        await ok(w, "PutScalingPolicy", policy(50, ScaleOutCooldown=0,
                                                ScaleInCooldown=3600))
        cpu(w, 0.075)  # 30 %: ceil(4 × 30 / 50) = 3, then ceil(3 × 30 / 50) = 2
        await w.until("3 tasks", lambda: _is(desired(w), 3))
        assert w.cell.tasks is not None
        await w.cell.tasks.close()
        w.cell = w.make_cell()
        assert w.cell.tasks is not None
        w.cell.tasks.load()
        await w.steady()
        seen = datapoints(w)
        await w.until("60 more datapoints", lambda: datapoints(w) >= seen + 60)
        assert await desired(w) == 3  # three stable windows: the cooldown (an hour) held
        w.now += 3_600_000
        await w.until("2 tasks", lambda: _is(desired(w), 2))
    run(body, tmp_path, limits=LIMITS)


def test_several_policies_out_if_any_says_out_in_only_if_all_say_in(tmp_path: Path) -> None:
    async def body(w: SvcWorld) -> None:
        await web_service(w, 2)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1,
                                               "MaxCapacity": 10})
        await ok(w, "PutScalingPolicy", policy(50, ScaleOutCooldown=0, ScaleInCooldown=0))
        # no requests at all: this one wants MinCapacity, but never scales in
        await ok(w, "PutScalingPolicy", {**policy(1000, metric="ALBRequestCountPerTarget",
                                                  ScaleOutCooldown=0, DisableScaleIn=True),
                                         "PolicyName": "requests"})
        cpu(w, 0.25)  # 100 % of each task: the CPU policy says out
        await w.until("4 tasks", lambda: _is(desired(w), 4))
        acts = (await ok(w, "DescribeScalingActivities", {"ServiceNamespace": "ecs"}))[
            "ScalingActivities"]
        assert "policy cpu" in acts[0]["Cause"]
        cpu(w, 0.025)  # 10 %: the CPU policy says in, the requests policy does not
        seen = datapoints(w)
        await w.until("80 more datapoints", lambda: datapoints(w) >= seen + 80)
        assert await desired(w) == 4
        await ok(w, "DeleteScalingPolicy", {**TARGET, "PolicyName": "requests"})
        await w.until("1 task", lambda: _is(desired(w), 1))
    run(body, tmp_path, limits=LIMITS)


def test_requests_per_task_scale_out_in_to_zero_and_a_request_scales_from_zero(
        tmp_path: Path) -> None:
    """ALBRequestCountPerTarget: the requests the cell proxied per task and period. A
    request to the service at zero is held at the proxy while Demand brings one task, and
    answered by it; steady requests scale out; none scale in to MinCapacity 0."""
    async def body(w: SvcWorld) -> None:
        server = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
        await w.web_service_on(server.sockets[0].getsockname()[1], desired=0)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 0, "MaxCapacity": 4})
        # a per-minute count per task: 1,000 a minute is one each 60 ms
        await ok(w, "PutScalingPolicy", policy(1000, metric="ALBRequestCountPerTarget",
                                                ScaleOutCooldown=0, ScaleInCooldown=0))
        assert w.cell.tasks is not None
        sm = w.cell.tasks.services
        req = {"a": A, "cluster": "default", "service": "web", "m": "GET", "p": "/",
               "h": [], "b": b""}

        async def from_zero() -> None:
            assert await desired(w) == 0
            held = sm.counters["http_held"]
            got = asyncio.ensure_future(sm.http(req))
            await w.until("the held request answered", got.done)  # the clock moves on
            out = got.result()
            assert (out["s"], out["b"]) == (200, b"ok"), out
            assert sm.counters["http_held"] == held + 1
            assert await desired(w) == 1

        await from_zero()

        async def busy() -> bool:  # ~5 requests per 100 ms of the clock: 3,000 a minute
            for _ in range(5):
                assert (await sm.http(req))["s"] == 200
            return await desired(w) > 1
        await w.until("a scale-out on requests", busy)
        assert await desired(w) <= 4
        await w.until("scaled in to zero", lambda: _is(desired(w), 0))
        await w.until("no task left", lambda: not w.task_ids())
        await from_zero()
        server.close()
    run(body, tmp_path, limits=LIMITS)


def test_concurrency_per_task_scales_out_while_requests_are_in_flight(tmp_path: Path) -> None:
    """ECSServiceAverageConcurrency (cellcloud's own metric): the requests in flight per task,
    averaged over each sample. Six requests held by a slow task, target 1 per task: over 2x
    the target, so the panic window scales out at once (to ceil(6 / 1), capped at 4); once
    they are answered the service goes back to its minimum."""
    async def body(w: SvcWorld) -> None:
        release = asyncio.Event()

        async def handle(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            await release.wait()
            wr.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await wr.drain()
            wr.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        await w.web_service_on(server.sockets[0].getsockname()[1], desired=1)
        await w.steady()
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 1, "MaxCapacity": 4})
        await ok(w, "PutScalingPolicy", policy(1, metric="ECSServiceAverageConcurrency",
                                                ScaleOutCooldown=0, ScaleInCooldown=0))
        (p,) = (await ok(w, "DescribeScalingPolicies", {"ServiceNamespace": "ecs"}))[
            "ScalingPolicies"]
        assert p["TargetTrackingScalingPolicyConfiguration"][
            "PredefinedMetricSpecification"]["PredefinedMetricType"] \
            == "ECSServiceAverageConcurrency"
        assert w.cell.tasks is not None
        sm = w.cell.tasks.services
        seen = datapoints(w)
        await w.until("a sample", lambda: datapoints(w) > seen)  # the sampling started
        req = {"a": A, "cluster": "default", "service": "web", "m": "GET", "p": "/",
               "h": [], "b": b""}
        held = [asyncio.ensure_future(sm.http(req)) for _ in range(6)]
        await w.until("4 tasks", lambda: _is(desired(w), 4))
        release.set()
        for h in held:
            assert (await h)["s"] == 200
        await w.until("back to 1 task", lambda: _is(desired(w), 1))
        server.close()
    run(body, tmp_path, limits=LIMITS)


def test_a_request_held_from_zero_waits_for_its_task_to_listen(tmp_path: Path) -> None:
    """A request held while its service scales from zero is sent once the first task is
    RUNNING and healthy; a server that does not listen yet (RUNNING comes first) refuses it.
    It is tried again within its hold, not answered 502 (before: 502 at the first refusal,
    a flaky tests/compat/test_ecs_api.py::test_a_request_scales_a_service_from_zero)."""
    async def body(w: SvcWorld) -> None:
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
        spare.close()  # nothing listens there until the test starts its server
        await w.web_service_on(port, desired=0)
        await ok(w, "RegisterScalableTarget", {**TARGET, "MinCapacity": 0, "MaxCapacity": 1})
        await ok(w, "PutScalingPolicy", policy(1000, metric="ALBRequestCountPerTarget"))
        assert w.cell.tasks is not None
        sm = w.cell.tasks.services
        req = {"a": A, "cluster": "default", "service": "web", "m": "GET", "p": "/",
               "h": [], "b": b""}
        got = asyncio.ensure_future(sm.http(req))
        await w.until("the task refused the held request",
                      lambda: sm.counters["http_task_unreachable"] >= 1)
        assert not got.done()  # still held, not a 502
        server = await asyncio.start_server(answer_ok, "127.0.0.1", port)
        await w.until("the held request answered", got.done)
        out = got.result()
        assert (out["s"], out["b"]) == (200, b"ok"), out
        server.close()
    run(body, tmp_path, limits=LIMITS)

