"""The Application Auto Scaling API's subset for ECS services (issue #17, docs/fargate.md
"Autoscaling"): JSON 1.1, ``X-Amz-Target: AnyScaleFrontendService.<Op>``, SigV4 service
``application-autoscaling``; the router sends it to the control plane's ``ecs`` op
(control/ecs.py hands it here).

Only ``ServiceNamespace`` ``ecs`` and ``ScalableDimension`` ``ecs:service:DesiredCount``;
``TargetTrackingScaling`` policies on ``ECSServiceAverageCPUUtilization``, cellcloud's own
``ECSServiceAverageConcurrency`` (requests in flight per task) or
``ALBRequestCountPerTarget`` (here: requests proxied through the Host routing to the service,
per RUNNING healthy task, a per-minute rate sampled each ``ecs_autoscale_sample_interval_ms``);
up to ``ecs_scaling_policies_per_target_max`` policies on one target (out if any says out, in
only if all say in). The state and the scalers live in the tenant's cell next to the service
loop (frontend/services.py, ops ``service_scaling_*``), which has the metrics; any member
cellcloud does not honour is refused by name.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core import autoscale as core_autoscale

if TYPE_CHECKING:
    from .ecs import Ecs

TARGET_PREFIX = core_autoscale.TARGET_PREFIX
DIMENSION = "ecs:service:DesiredCount"
# ECSServiceAverageConcurrency is cellcloud's own (no AWS metric has that name): the requests
# in flight per task, time-averaged, as Knative scales on
METRICS = ("ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget",
           "ECSServiceAverageConcurrency")
_RESOURCE = re.compile(r"^service/([A-Za-z0-9_-]{1,255})/([A-Za-z][A-Za-z0-9_-]{0,254})$")
_POLICY_NAME = re.compile(r"^[\x21-\x7e]{1,256}$")
_COOLDOWN_S_MAX = 365 * 24 * 3600
_TT_MEMBERS = frozenset({"TargetValue", "PredefinedMetricSpecification", "ScaleOutCooldown",
                         "ScaleInCooldown", "DisableScaleIn"})


class AasError(Exception):
    def __init__(self, type_: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.type, self.message, self.status = type_, message, status


def _invalid(message: str) -> AasError:
    return AasError("ValidationException", message)


def _target(doc: dict[str, Any], dimension_required: bool = True) -> tuple[str, str] | None:
    """(cluster, service) of ResourceId; ServiceNamespace and ScalableDimension checked."""
    if doc.get("ServiceNamespace") != "ecs":
        raise _invalid(f"ServiceNamespace {str(doc.get('ServiceNamespace'))[:40]!r} is not "
                       "supported by cellcloud (ecs only)")
    dim = doc.get("ScalableDimension")
    if (dim is not None or dimension_required) and dim != DIMENSION:
        raise _invalid(f"ScalableDimension must be {DIMENSION}")
    rid = doc.get("ResourceId")
    if rid is None and not dimension_required:
        return None
    m = _RESOURCE.match(rid) if isinstance(rid, str) else None
    if m is None:
        raise _invalid("ResourceId must be service/<cluster>/<service>")
    return m.group(1), m.group(2)


def _refuse(doc: dict[str, Any], members: set[str]) -> None:
    for k, v in doc.items():
        if k not in members and v not in (None, [], {}, ""):
            raise _invalid(f"{k} is not supported by cellcloud")


def _capacity(doc: dict[str, Any], key: str, top: int) -> int | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
        raise _invalid(f"{key} must be an integer from 0 to {top} "
                       "(ecs_service_desired_count_max)")
    return v


def _cooldown(cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key, 300)  # AAS's default for ECS services
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _COOLDOWN_S_MAX:
        raise _invalid(f"TargetTrackingScalingPolicyConfiguration.{key} must be an integer "
                       f"number of seconds from 0 to {_COOLDOWN_S_MAX}")
    return v


class AutoScaling:
    """The ops; the cell is reached through ``Ecs._cell``."""

    def __init__(self, ecs: Ecs) -> None:
        self.ecs = ecs
        self._ops: dict[str, Callable[[str, dict[str, Any]], Any]] = {
            "RegisterScalableTarget": self.register, "DescribeScalableTargets": self.describe,
            "DeregisterScalableTarget": self.deregister, "PutScalingPolicy": self.put_policy,
            "DescribeScalingPolicies": self.describe_policies,
            "DeleteScalingPolicy": self.delete_policy,
            "DescribeScalingActivities": self.describe_activities}

    async def call(self, name: str, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        handler = self._ops.get(name)
        if handler is None:
            raise _invalid(f"The Application Auto Scaling operation {name[:100]} is not "
                           f"supported by cellcloud (served: {', '.join(sorted(self._ops))})")
        out: dict[str, Any] = await handler(account, doc)
        return out

    async def _cell(self, account: str, body: dict[str, Any]) -> dict[str, Any]:
        from .ecs import ApiError
        try:
            out = await self.ecs.cell(account, body)
        except ApiError as e:
            if e.type == "ServerException":
                raise AasError("InternalServiceException", e.message, 500) from None
            raise AasError(e.type if e.type in ("ValidationException",
                                                "ObjectNotFoundException",
                                                "LimitExceededException")
                           else "ValidationException", e.message) from None
        assert out is not None
        return out

    def _target_arn(self, account: str, cluster: str, service: str) -> str:
        return (f"arn:aws:application-autoscaling:{self.ecs.region}:{account}:"
                f"scalable-target/ecs/{cluster}/{service}")

    def _policy_arn(self, account: str, cluster: str, service: str, policy: str) -> str:
        return (f"arn:aws:autoscaling:{self.ecs.region}:{account}:scalingPolicy:"
                f"ecs:resource/ecs/service/{cluster}/{service}:policyName/{policy}")

    async def register(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"ServiceNamespace", "ResourceId", "ScalableDimension", "MinCapacity",
                      "MaxCapacity"})
        found = _target(doc)
        assert found is not None
        top = self.ecs.limits.ecs_service_desired_count_max
        lo, hi = _capacity(doc, "MinCapacity", top), _capacity(doc, "MaxCapacity", top)
        await self._cell(account, {"op": "service_scaling_register", "cluster": found[0],
                                   "service": found[1], "min": lo, "max": hi})
        return {"ScalableTargetARN": self._target_arn(account, *found)}

    async def _targets(self, account: str) -> list[dict[str, Any]]:
        out = await self._cell(account, {"op": "service_scaling_describe", "cluster": ""})
        return list(out["targets"])

    async def describe(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"ServiceNamespace", "ResourceIds", "ScalableDimension", "MaxResults",
                      "NextToken"})
        _target(doc, dimension_required=False)
        ids = doc.get("ResourceIds")
        if ids is not None and (not isinstance(ids, list)
                                or not all(isinstance(i, str) for i in ids)):
            raise _invalid("ResourceIds must be a list of strings")
        out = []
        for t in await self._targets(account):
            rid = f"service/{t['cluster']}/{t['service']}"
            if ids and rid not in ids:
                continue
            out.append({"ServiceNamespace": "ecs", "ResourceId": rid,
                        "ScalableDimension": DIMENSION, "MinCapacity": t["min"],
                        "MaxCapacity": t["max"],
                        "RoleARN": f"arn:aws:iam::{account}:role/aws-service-role/"
                                   "ecs.application-autoscaling.amazonaws.com/"
                                   "AWSServiceRoleForApplicationAutoScaling_ECSService",
                        "CreationTime": t["created_ms"] / 1000,
                        "SuspendedState": {"DynamicScalingInSuspended": False,
                                           "DynamicScalingOutSuspended": False,
                                           "ScheduledScalingSuspended": False},
                        "ScalableTargetARN": self._target_arn(account, t["cluster"],
                                                              t["service"])})
        return {"ScalableTargets": out}

    async def deregister(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"ServiceNamespace", "ResourceId", "ScalableDimension"})
        found = _target(doc)
        assert found is not None
        await self._cell(account, {"op": "service_scaling_deregister", "cluster": found[0],
                                   "service": found[1]})
        return {}

    async def put_policy(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"PolicyName", "ServiceNamespace", "ResourceId", "ScalableDimension",
                      "PolicyType", "TargetTrackingScalingPolicyConfiguration"})
        found = _target(doc)
        assert found is not None
        name = doc.get("PolicyName")
        if not isinstance(name, str) or not _POLICY_NAME.match(name):
            raise _invalid("PolicyName is 1 to 256 printable characters")
        if doc.get("PolicyType", "StepScaling") != "TargetTrackingScaling":
            raise _invalid("PolicyType: cellcloud runs TargetTrackingScaling policies only")
        cfg = doc.get("TargetTrackingScalingPolicyConfiguration")
        if not isinstance(cfg, dict):
            raise _invalid("TargetTrackingScalingPolicyConfiguration is required")
        for k, v in cfg.items():
            if k not in _TT_MEMBERS and v not in (None, [], {}, ""):
                raise _invalid(f"TargetTrackingScalingPolicyConfiguration.{k} is not "
                               "supported by cellcloud")
        target = cfg.get("TargetValue")
        if isinstance(target, bool) or not isinstance(target, int | float) \
                or not math.isfinite(target) or not 0 < target <= 1e9:
            raise _invalid("TargetValue must be a number over 0")
        spec = cfg.get("PredefinedMetricSpecification")
        if not isinstance(spec, dict) or spec.get("PredefinedMetricType") not in METRICS:
            raise _invalid("PredefinedMetricSpecification.PredefinedMetricType must be one of "
                           f"{', '.join(METRICS)}")
        if spec.get("ResourceLabel") not in (None, ""):
            raise _invalid("PredefinedMetricSpecification.ResourceLabel is not supported by "
                           "cellcloud (requests are counted per task of the service)")
        disable_in = cfg.get("DisableScaleIn", False)
        if not isinstance(disable_in, bool):
            raise _invalid("DisableScaleIn must be a boolean")
        config = {"target": float(target), "metric": spec["PredefinedMetricType"],
                  "out_cooldown_s": _cooldown(cfg, "ScaleOutCooldown"),
                  "in_cooldown_s": _cooldown(cfg, "ScaleInCooldown"),
                  "disable_in": disable_in}
        await self._cell(account, {"op": "service_scaling_put_policy", "cluster": found[0],
                                   "service": found[1], "policy": name, "config": config})
        return {"PolicyARN": self._policy_arn(account, *found, name), "Alarms": []}

    async def describe_policies(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"PolicyNames", "ServiceNamespace", "ResourceId", "ScalableDimension",
                      "MaxResults", "NextToken"})
        found = _target(doc, dimension_required=False)
        names = doc.get("PolicyNames")
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(i, str) for i in names)):
            raise _invalid("PolicyNames must be a list of strings")
        out = []
        for t in await self._targets(account):
            if found is not None and found != (t["cluster"], t["service"]):
                continue
            for name, p in sorted(t["policies"].items()):
                if names and name not in names:
                    continue
                cfg: dict[str, Any] = {
                    "TargetValue": p["target"],
                    "PredefinedMetricSpecification": {"PredefinedMetricType": p["metric"]},
                    "ScaleOutCooldown": p["out_cooldown_s"],
                    "ScaleInCooldown": p["in_cooldown_s"], "DisableScaleIn": p["disable_in"]}
                out.append({"PolicyARN": self._policy_arn(account, t["cluster"],
                                                          t["service"], name),
                            "PolicyName": name, "ServiceNamespace": "ecs",
                            "ResourceId": f"service/{t['cluster']}/{t['service']}",
                            "ScalableDimension": DIMENSION,
                            "PolicyType": "TargetTrackingScaling",
                            "TargetTrackingScalingPolicyConfiguration": cfg, "Alarms": [],
                            "CreationTime": p["created_ms"] / 1000})
        return {"ScalingPolicies": out}

    async def delete_policy(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        _refuse(doc, {"PolicyName", "ServiceNamespace", "ResourceId", "ScalableDimension"})
        found = _target(doc)
        assert found is not None
        name = doc.get("PolicyName")
        if not isinstance(name, str) or not name:
            raise _invalid("PolicyName is required")
        await self._cell(account, {"op": "service_scaling_delete_policy", "cluster": found[0],
                                   "service": found[1], "policy": name})
        return {}

    async def describe_activities(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        """The scaler's changes of ``desiredCount``, newest first (each applied at once:
        Successful); at most ``ecs_service_events_max`` per target."""
        _refuse(doc, {"ServiceNamespace", "ResourceId", "ScalableDimension", "MaxResults",
                      "NextToken", "IncludeNotScaledActivities"})
        found = _target(doc, dimension_required=False)
        out = []
        for t in await self._targets(account):
            if found is not None and found != (t["cluster"], t["service"]):
                continue
            rid = f"service/{t['cluster']}/{t['service']}"
            for a in t.get("activities") or []:
                h = hashlib.sha256(f"{rid}\0{a['ms']}\0{a['to']}".encode()).hexdigest()
                out.append({
                    "ActivityId": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}",
                    "ServiceNamespace": "ecs", "ResourceId": rid,
                    "ScalableDimension": DIMENSION,
                    "Description": f"Setting desired count to {a['to']}.",
                    "Cause": a["cause"], "StartTime": a["ms"] / 1000,
                    "EndTime": a["ms"] / 1000, "StatusCode": "Successful",
                    "StatusMessage": f"Successfully set desired count to {a['to']} (from "
                                     f"{a['from']})."})
        out.sort(key=lambda a: a["StartTime"], reverse=True)
        return {"ScalingActivities": out}
