"""Schedules in the control plane: the ``scheduler`` op (boto3's ``scheduler`` client, through
the router) and the loop that fires them. Decisions are ``core/schedule.py``'s; this is the
shell: the configuration store, the cells' async intake, the clock.

Exactly once, across restarts (docs/schedules.md):
1. a due tick is *claimed* by compare-and-set of the schedule's record (its cursor moves to the
   tick, the tick becomes ``pending``) before anything is sent;
2. the pending tick is sent to the tenant's cell as an async invoke whose event id is derived
   from (schedule uid, tick time); the cell's intake accepts an id once (it remembers ids for
   ``async_event_ids_remembered_ms``), so a re-send after a crash is answered 202 and not queued;
3. the send's outcome clears ``pending`` (or schedules a retry) by compare-and-set.
A control plane that dies anywhere in between finds the pending tick (or the cursor) in the
store when it starts and goes on from there: no tick is claimed twice, none is skipped except
by the retry policy (older than MaximumEventAgeInSeconds), and a re-sent tick is one event.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, unquote

from ..core import schedule as core
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.messages import HttpRequest
from ..core.schedule import Schedule, ScheduleError
from ..transport import CallTimeout, Client, RemoteError, TransportError
from .configstore import ConfigStore, ConfigStoreError, ConfigStoreUnavailable

log = logging.getLogger("cellcloud.control.schedules")

SCHEDULES = "cellcloud/schedules/"
GROUPS = "cellcloud/schedule-groups/"
DELETED = "cellcloud/schedule-deletes/"  # recent deletes' idempotency tokens
DEFAULT_GROUP = "default"
EVENT_ID_HEADER = "x-cellcloud-event-id"  # frontend/events.py's; internal callers only

_NAME = re.compile(r"^[0-9a-zA-Z\-_.]{1,64}$")
_ROLE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_LAMBDA = re.compile(r"^arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                     r"function:(?P<name>[a-zA-Z0-9-_]{1,64})(?::(?P<qualifier>[a-zA-Z0-9-_$]+))?$")
_SQS = re.compile(r"^arn:aws[a-zA-Z-]*:sqs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                  r"(?P<name>[a-zA-Z0-9_-]{1,80})$")


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    def reply(self) -> dict[str, Any]:
        return {"s": self.status, "h": {"x-amzn-errortype": self.type,
                                        "content-type": "application/json"},
                "b": json.dumps({"Message": self.message}).encode()}


def invalid(message: str) -> ApiError:
    return ApiError(400, "ValidationException", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "ResourceNotFoundException", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "ConflictException", message)


def quota(message: str) -> ApiError:
    return ApiError(402, "ServiceQuotaExceededException", message)


def schedule_arn(region: str, account: str, group: str, name: str) -> str:
    return f"arn:aws:scheduler:{region}:{account}:schedule/{group}/{name}"


def group_arn(region: str, account: str, group: str) -> str:
    return f"arn:aws:scheduler:{region}:{account}:schedule-group/{group}"


# -- request checks (pure) -----------------------------------------------------------------------
_CREATE_MEMBERS = frozenset({"GroupName", "ScheduleExpression", "StartDate", "EndDate",
                             "Description", "ScheduleExpressionTimezone", "State", "KmsKeyArn",
                             "Target", "FlexibleTimeWindow", "ClientToken",
                             "ActionAfterCompletion"})
_TARGET_MEMBERS = frozenset({"Arn", "RoleArn", "DeadLetterConfig", "RetryPolicy", "Input"})


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise invalid(f"{what} must match [0-9a-zA-Z-_.]+ (1 to 64 characters)")
    return v


def _date_ms(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise invalid(f"{what} must be a timestamp")
    return int(float(v) * 1000)


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise invalid(f"{what} must be an integer from {lo} to {hi}")
    return v


def check_schedule(doc: dict[str, Any], *, account: str, region: str, name: str,
                   now_ms: int, limits: Limits) -> dict[str, Any]:
    """A CreateSchedule/UpdateSchedule body → the Schedule fields it sets, or ValidationException.
    Every member is honoured or refused by name (targets other than a Lambda function are)."""
    unknown = sorted(set(doc) - _CREATE_MEMBERS)
    if unknown:
        raise invalid(f"Unsupported member(s): {', '.join(unknown)}")
    for req in ("ScheduleExpression", "Target", "FlexibleTimeWindow"):
        if req not in doc:
            raise invalid(f"{req} is required")
    expr = doc["ScheduleExpression"]
    if not isinstance(expr, str) or not 1 <= len(expr) <= 256:
        raise invalid("ScheduleExpression must be 1 to 256 characters")
    tz = doc.get("ScheduleExpressionTimezone", "UTC")
    try:
        parsed = core.parse_expression(expr)
        if not isinstance(tz, str) or not 1 <= len(tz) <= 50:
            raise ScheduleError("ScheduleExpressionTimezone must be 1 to 50 characters")
        core.zone(tz)
    except ScheduleError as e:
        raise invalid(str(e)) from None
    start, end = _date_ms(doc.get("StartDate"), "StartDate"), _date_ms(doc.get("EndDate"),
                                                                        "EndDate")
    if start is not None and end is not None and end <= start:
        raise invalid("The EndDate must be after the StartDate.")
    if end is not None and end <= now_ms and not isinstance(parsed, core.At):
        raise invalid("The EndDate must be in the future.")
    state = doc.get("State", "ENABLED")
    if state not in ("ENABLED", "DISABLED"):
        raise invalid("State must be ENABLED or DISABLED")
    description = doc.get("Description", "")
    if not isinstance(description, str) or len(description) > 512:
        raise invalid("Description must be at most 512 characters")
    action = doc.get("ActionAfterCompletion", "NONE")
    if action not in ("NONE", "DELETE"):
        raise invalid("ActionAfterCompletion must be NONE or DELETE")
    token = doc.get("ClientToken", "")
    if not isinstance(token, str) or len(token) > 64:
        raise invalid("ClientToken must be at most 64 characters")
    if "KmsKeyArn" in doc:  # refused by name: there is no KMS to encrypt the Input with
        raise invalid("KmsKeyArn is not supported: this region has no KMS (the Input is kept "
                      "in the configuration store as sent)")
    kms = ""
    ftw = doc["FlexibleTimeWindow"]
    if not isinstance(ftw, dict) or ftw.get("Mode") not in ("OFF", "FLEXIBLE") or (
            set(ftw) - {"Mode", "MaximumWindowInMinutes"}):
        raise invalid("FlexibleTimeWindow.Mode must be OFF or FLEXIBLE")
    if ftw["Mode"] == "FLEXIBLE":
        window = _int(ftw.get("MaximumWindowInMinutes"), "MaximumWindowInMinutes", 1, 1440)
    elif "MaximumWindowInMinutes" in ftw:
        raise invalid("MaximumWindowInMinutes is only valid with Mode FLEXIBLE")
    else:
        window = 0
    target = doc["Target"]
    if not isinstance(target, dict):
        raise invalid("Target must be an object")
    unknown = sorted(set(target) - _TARGET_MEMBERS)
    if unknown:
        raise invalid(f"Unsupported Target member(s): {', '.join(unknown)} (targets are "
                      "Lambda functions)")
    arn = target.get("Arn")
    m = _LAMBDA.match(arn) if isinstance(arn, str) else None
    if m is None:
        raise invalid("Target.Arn must be a Lambda function ARN (the only target type here)")
    if m["region"] != region or m["account"] != account:
        raise invalid(f"Target.Arn must name a function of account {account} in {region}")
    role = target.get("RoleArn")
    if not isinstance(role, str) or not _ROLE.match(role):
        raise invalid("Target.RoleArn must be an IAM role ARN")
    inp = target.get("Input")
    if inp is not None and (not isinstance(inp, str) or not inp
                            or len(inp.encode()) > limits.schedule_input_bytes_max):
        raise invalid(f"Target.Input must be 1 to {limits.schedule_input_bytes_max} bytes")
    if inp is not None:  # a Lambda target's event is JSON (context attributes filled in)
        sample = core.render_input(inp, schedule_arn="arn", nominal_ms=0, event_id="id",
                                   attempt=1)
        try:
            json.loads(sample)
        except ValueError:
            raise invalid("Target.Input must be JSON for a Lambda function target") from None
    rp = target.get("RetryPolicy") or {}
    if not isinstance(rp, dict) or set(rp) - {"MaximumRetryAttempts", "MaximumEventAgeInSeconds"}:
        raise invalid("RetryPolicy has MaximumRetryAttempts and MaximumEventAgeInSeconds")
    retry = core.RetryPolicy(
        _int(rp.get("MaximumRetryAttempts", 185), "MaximumRetryAttempts", 0, 185),
        _int(rp.get("MaximumEventAgeInSeconds", 86_400), "MaximumEventAgeInSeconds", 60, 86_400))
    dlq = target.get("DeadLetterConfig") or {}
    if not isinstance(dlq, dict) or set(dlq) - {"Arn"}:
        raise invalid("DeadLetterConfig has one member, Arn")
    dlq_arn = dlq.get("Arn", "")
    if dlq_arn:
        q = _SQS.match(dlq_arn) if isinstance(dlq_arn, str) else None
        if q is None or q["region"] != region or q["account"] != account:
            raise invalid(f"DeadLetterConfig.Arn must be an SQS queue of account {account} in "
                          f"{region}")
    return {"expression": expr, "timezone": tz, "start_ms": start, "end_ms": end,
            "state": state, "description": description, "action_after_completion": action,
            "kms_key_arn": kms, "flexible_window_min": window, "target_arn": arn,
            "role_arn": role, "input": inp, "retry": retry, "dead_letter_arn": dlq_arn,
            "client_token": token}


def describe(s: Schedule, region: str) -> dict[str, Any]:
    target: dict[str, Any] = {"Arn": s.target_arn, "RoleArn": s.role_arn,
                              "RetryPolicy": {
                                  "MaximumRetryAttempts": s.retry.maximum_retry_attempts,
                                  "MaximumEventAgeInSeconds": s.retry.maximum_event_age_s}}
    if s.input is not None:
        target["Input"] = s.input
    if s.dead_letter_arn:
        target["DeadLetterConfig"] = {"Arn": s.dead_letter_arn}
    ftw: dict[str, Any] = {"Mode": "FLEXIBLE" if s.flexible_window_min else "OFF"}
    if s.flexible_window_min:
        ftw["MaximumWindowInMinutes"] = s.flexible_window_min
    out: dict[str, Any] = {
        "Arn": schedule_arn(region, s.account, s.group, s.name), "GroupName": s.group,
        "Name": s.name, "ScheduleExpression": s.expression,
        "ScheduleExpressionTimezone": s.timezone, "State": s.state,
        "Description": s.description, "CreationDate": s.created_ms / 1000,
        "LastModificationDate": s.modified_ms / 1000, "Target": target,
        "FlexibleTimeWindow": ftw, "ActionAfterCompletion": s.action_after_completion}
    if s.start_ms is not None:
        out["StartDate"] = s.start_ms / 1000
    if s.end_ms is not None:
        out["EndDate"] = s.end_ms / 1000
    if s.kms_key_arn:
        out["KmsKeyArn"] = s.kms_key_arn
    return out


def initial_cursor(fields: dict[str, Any], now_ms: int) -> int:
    """Where a new schedule's ticks start: at its StartDate (ticks since a past StartDate are
    due at once, within MaximumEventAgeInSeconds), else now."""
    start = fields.get("start_ms")
    if start is not None and not isinstance(core.parse_expression(fields["expression"]), core.At):
        return int(start) - 1
    return now_ms


# -- the shell -----------------------------------------------------------------------------------
class Schedules:
    """The ``scheduler`` op and the firing loop of one control plane."""

    def __init__(self, store: ConfigStore, region: str,
                 frontend_for: Callable[[str], Client | None],
                 clock: Callable[[], int] | None = None, limits: Limits = DEFAULT_LIMITS,
                 seed: int | None = None) -> None:
        self.store = store
        self.region = region
        self.frontend_for = frontend_for  # account -> its cell's frontend client
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.limits = limits
        self.rng = random.Random(seed)
        #: (key, revision) -> the time before which the schedule needs nothing
        self._waits: dict[str, tuple[int, int]] = {}
        self.counters = {"claimed": 0, "sent": 0, "send_failed": 0,
                         "expired": 0, "dead_lettered": 0, "dead_letter_failed": 0,
                         "cas_lost": 0, "completed_deleted": 0}

    # -- the API -------------------------------------------------------------------------------
    async def op(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            status, doc = await self._route(str(req["m"]), str(req["p"]), str(req.get("q") or ""),
                                            bytes(req.get("b") or b""), str(req["a"]))
        except ApiError as e:
            return e.reply()
        except ConfigStoreUnavailable as e:
            log.warning("config store: %s", e)
            return ApiError(500, "InternalServerException",
                            "The schedule store is unavailable; try again").reply()
        except ConfigStoreError as e:  # a limit of the region's store (e.g. a value's size)
            return invalid(f"The schedule does not fit the region's configuration store: {e}"
                           ).reply()
        return {"s": status, "h": {"content-type": "application/json"},
                "b": json.dumps(doc).encode()}

    async def _route(self, method: str, path: str, query: str, body: bytes,
                     account: str) -> tuple[int, Any]:
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        doc: dict[str, Any] = {}
        if body:
            try:
                doc = json.loads(body)
            except ValueError:
                raise invalid("The request body is not JSON") from None
            if not isinstance(doc, dict):
                raise invalid("The request body must be a JSON object")
        if parts == ["schedules"] and method == "GET":
            return 200, await self.list_schedules(account, q)
        if len(parts) == 2 and parts[0] == "schedules":
            name = _name(parts[1], "Name")
            if method == "POST":
                return 200, await self.create(account, name, doc)
            if method == "PUT":
                return 200, await self.update(account, name, doc)
            group = _name(q.get("groupName", DEFAULT_GROUP), "GroupName")
            if method == "GET":
                return 200, await self.get(account, group, name)
            if method == "DELETE":
                return 200, await self.delete(account, group, name, q.get("clientToken", ""))
        if parts == ["schedule-groups"] and method == "GET":
            return 200, await self.list_groups(account, q)
        if len(parts) == 2 and parts[0] == "schedule-groups":
            group = _name(parts[1], "Name")
            if method == "POST":
                return 200, await self.create_group(account, group, doc)
            if method == "GET":
                return 200, self._group_doc(account, group, await self._group(account, group))
            if method == "DELETE":
                return 200, await self.delete_group(account, group, q.get("clientToken", ""))
        if len(parts) >= 2 and parts[0] == "tags":
            arn = "/".join(parts[1:])
            if method == "GET":
                return 200, {"Tags": await self._tags(account, arn)}
            if method == "POST":
                return 200, await self.tag(account, arn, doc)
            if method == "DELETE":
                keys = parse_qs(query).get("TagKeys", [])
                return 200, await self.untag(account, arn, keys)
        raise ApiError(404, "ResourceNotFoundException", f"No such operation: {method} {path}")

    def _key(self, account: str, group: str, name: str) -> str:
        return f"{SCHEDULES}{account}/{group}/{name}"

    async def _group(self, account: str, group: str) -> dict[str, Any]:
        if group == DEFAULT_GROUP:
            return {"created_ms": 0, "tags": []}
        e = await self.store.get(f"{GROUPS}{account}/{group}")
        if e is None:
            raise not_found(f"Schedule group {group} does not exist.")
        out: dict[str, Any] = json.loads(e.value)
        return out

    def _group_doc(self, account: str, group: str, g: dict[str, Any]) -> dict[str, Any]:
        return {"Arn": group_arn(self.region, account, group), "Name": group, "State": "ACTIVE",
                "CreationDate": g["created_ms"] / 1000,
                "LastModificationDate": g["created_ms"] / 1000}

    async def create(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        group = _name(doc.get("GroupName", DEFAULT_GROUP), "GroupName")
        now = self.clock()
        fields = check_schedule(doc, account=account, region=self.region, name=name,
                                now_ms=now, limits=self.limits)
        await self._group(account, group)
        existing = await self.store.list(f"{SCHEDULES}{account}/")
        if len(existing) >= self.limits.schedules_per_tenant_max:
            raise quota(f"At most {self.limits.schedules_per_tenant_max} schedules per account "
                        "(schedules_per_tenant_max)")
        # The firing loop lists every schedule of the region each round: keep that list under
        # the store's list limit (config_list_max), refusing here rather than failing there.
        if len(await self.store.list(SCHEDULES)) >= self.limits.schedules_per_region_max:
            raise quota(f"At most {self.limits.schedules_per_region_max} schedules per region "
                        "(schedules_per_region_max)")
        s = Schedule(account=account, group=group, name=name,
                     uid=f"{now:x}-{self.rng.getrandbits(64):016x}", created_ms=now,
                     modified_ms=now, cursor_ms=initial_cursor(fields, now), **fields)
        rev = await self.store.cas(self._key(account, group, name), 0, s.to_json())
        if rev is None:
            old = await self.store.get(self._key(account, group, name))
            if not (old is not None and s.client_token
                    and Schedule.from_json(old.value).client_token == s.client_token):
                raise conflict(f"Schedule {name} already exists.")
        return {"ScheduleArn": schedule_arn(self.region, account, group, name)}

    async def _load(self, account: str, group: str, name: str) -> tuple[Schedule, int]:
        e = await self.store.get(self._key(account, group, name))
        if e is None:
            raise not_found(f"Schedule {name} does not exist.")
        return Schedule.from_json(e.value), e.revision

    async def get(self, account: str, group: str, name: str) -> dict[str, Any]:
        s, _ = await self._load(account, group, name)
        return describe(s, self.region)

    async def update(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Replaces the definition (as AWS does); the firing state stays: a claimed tick is
        still sent, and ticks before the update are not fired under the new definition."""
        group = _name(doc.get("GroupName", DEFAULT_GROUP), "GroupName")
        for _ in range(self.limits.schedule_cas_attempts_max):
            now = self.clock()
            fields = check_schedule(doc, account=account, region=self.region, name=name,
                                    now_ms=now, limits=self.limits)
            old, rev = await self._load(account, group, name)
            new = replace(old, modified_ms=now, cursor_ms=max(old.cursor_ms, now), **fields)
            if await self.store.cas(self._key(account, group, name), rev, new.to_json()):
                return {"ScheduleArn": schedule_arn(self.region, account, group, name)}
        raise conflict(f"Schedule {name} is being changed; try again")

    async def _deleted(self, what: str, token: str) -> bool:
        """Whether ``what`` was deleted by a request with this idempotency token lately."""
        if not token:
            return False
        e = await self.store.get(f"{DELETED}{what}")
        if e is None:
            return False
        doc = json.loads(e.value)
        return bool(doc["token"] == token
                    and self.clock() - doc["ms"] < self.limits.schedule_client_token_ms)

    async def _remember_delete(self, account: str, what: str, token: str) -> None:
        """A delete's token, kept ``schedule_client_token_ms`` (older ones of the account are
        dropped here), so that a retried delete answers as the first one did."""
        if not token:
            return
        now = self.clock()
        for e in await self.store.list(f"{DELETED}{account}/"):
            if now - json.loads(e.value)["ms"] >= self.limits.schedule_client_token_ms:
                await self.store.delete(e.key)
        await self.store.put(f"{DELETED}{what}", json.dumps({"token": token, "ms": now}).encode())

    async def delete(self, account: str, group: str, name: str,
                     token: str = "") -> dict[str, Any]:
        what = f"{account}/{group}/{name}"
        if not await self.store.delete(self._key(account, group, name)):
            if await self._deleted(what, token):
                return {}
            raise not_found(f"Schedule {name} does not exist.")
        await self._remember_delete(account, what, token)
        return {}

    async def list_schedules(self, account: str, q: dict[str, str]) -> dict[str, Any]:
        group = q.get("ScheduleGroup")
        prefix = f"{SCHEDULES}{account}/" + (f"{_name(group, 'ScheduleGroup')}/" if group else "")
        if group:
            await self._group(account, group)
        name_prefix, state = q.get("NamePrefix", ""), q.get("State")
        if state is not None and state not in ("ENABLED", "DISABLED"):
            raise invalid("State must be ENABLED or DISABLED")
        items = []
        for e in await self.store.list(prefix):
            s = Schedule.from_json(e.value)
            if s.name.startswith(name_prefix) and state in (None, s.state):
                items.append({"Arn": schedule_arn(self.region, account, s.group, s.name),
                              "Name": s.name, "GroupName": s.group, "State": s.state,
                              "CreationDate": s.created_ms / 1000,
                              "LastModificationDate": s.modified_ms / 1000,
                              "Target": {"Arn": s.target_arn}})
        return _page(items, "Schedules", q)

    async def create_group(self, account: str, group: str, doc: dict[str, Any]) -> dict[str, Any]:
        if set(doc) - {"Tags", "ClientToken"}:
            raise invalid(f"Unsupported member(s): {sorted(set(doc) - {'Tags', 'ClientToken'})}")
        if group == DEFAULT_GROUP:
            raise conflict("Schedule group default already exists.")
        tags = _tags_of(doc.get("Tags", []))
        groups = await self.store.list(f"{GROUPS}{account}/")
        if len(groups) >= self.limits.schedule_groups_per_tenant_max:
            raise quota(f"At most {self.limits.schedule_groups_per_tenant_max} schedule groups "
                        "per account (schedule_groups_per_tenant_max)")
        token = doc.get("ClientToken", "")
        g = {"created_ms": self.clock(), "tags": tags, "client_token": token}
        if await self.store.cas(f"{GROUPS}{account}/{group}", 0, json.dumps(g).encode()) is None:
            old = await self.store.get(f"{GROUPS}{account}/{group}")
            if not (old is not None and token
                    and json.loads(old.value).get("client_token") == token):
                raise conflict(f"Schedule group {group} already exists.")
        return {"ScheduleGroupArn": group_arn(self.region, account, group)}

    async def delete_group(self, account: str, group: str, token: str = "") -> dict[str, Any]:
        if group == DEFAULT_GROUP:
            raise invalid("The default schedule group cannot be deleted.")
        what = f"{account}/group:{group}"
        try:
            await self._group(account, group)
        except ApiError:
            if await self._deleted(what, token):
                return {}
            raise
        await self._remember_delete(account, what, token)
        # Its schedules go with it (AWS deletes them asynchronously; here before the answer).
        for e in await self.store.list(f"{SCHEDULES}{account}/{group}/"):
            await self.store.delete(e.key)
        await self.store.delete(f"{GROUPS}{account}/{group}")
        return {}

    async def list_groups(self, account: str, q: dict[str, str]) -> dict[str, Any]:
        prefix = q.get("NamePrefix", "")
        items = [self._group_doc(account, DEFAULT_GROUP, {"created_ms": 0})] if (
            DEFAULT_GROUP.startswith(prefix)) else []
        for e in await self.store.list(f"{GROUPS}{account}/"):
            name = e.key.rsplit("/", 1)[1]
            if name.startswith(prefix):
                items.append(self._group_doc(account, name, json.loads(e.value)))
        return _page(items, "ScheduleGroups", q)

    def _group_of_arn(self, account: str, arn: str) -> str:
        want = f"arn:aws:scheduler:{self.region}:{account}:schedule-group/"
        if not arn.startswith(want) or not _NAME.match(arn[len(want):]):
            raise not_found(f"No schedule group {arn} (tags are on schedule groups)")
        return arn[len(want):]

    async def _tags(self, account: str, arn: str) -> list[dict[str, str]]:
        group = self._group_of_arn(account, arn)
        tags: list[dict[str, str]] = (await self._group(account, group))["tags"]
        return tags

    async def _retag(self, account: str, arn: str,
                     change: Callable[[dict[str, str]], None]) -> dict[str, Any]:
        group = self._group_of_arn(account, arn)
        if group == DEFAULT_GROUP:
            raise invalid("The default schedule group takes no tags.")
        key = f"{GROUPS}{account}/{group}"
        for _ in range(self.limits.schedule_cas_attempts_max):
            e = await self.store.get(key)
            if e is None:
                raise not_found(f"Schedule group {group} does not exist.")
            g = json.loads(e.value)
            tags = {t["Key"]: t["Value"] for t in g["tags"]}
            change(tags)
            if len(tags) > 50:
                raise invalid("A resource has at most 50 tags")
            g["tags"] = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
            if await self.store.cas(key, e.revision, json.dumps(g).encode()):
                return {}
        raise conflict(f"Schedule group {group} is being changed; try again")

    async def tag(self, account: str, arn: str, doc: dict[str, Any]) -> dict[str, Any]:
        new = {t["Key"]: t["Value"] for t in _tags_of(doc.get("Tags"))}
        return await self._retag(account, arn, lambda tags: tags.update(new))

    async def untag(self, account: str, arn: str, keys: list[str]) -> dict[str, Any]:
        if not keys:
            raise invalid("TagKeys is required")

        def drop(tags: dict[str, str]) -> None:
            for k in keys:
                tags.pop(k, None)

        return await self._retag(account, arn, drop)

    # -- firing --------------------------------------------------------------------------------
    async def fire_due(self) -> int:
        """One round: every schedule whose next step is due takes it. Returns the number of
        store writes done (a test's measure of progress)."""
        writes = 0
        entries = await self.store.list(SCHEDULES)
        live = {e.key for e in entries}
        for k in [k for k in self._waits if k not in live]:
            del self._waits[k]
        for e in entries:
            now = self.clock()
            w = self._waits.get(e.key)
            if w is not None and w[0] == e.revision and w[1] > now:
                continue
            try:
                writes += await self._step(e.key, Schedule.from_json(e.value), e.revision)
            except ConfigStoreError as err:  # the next round retries
                log.warning("schedule %s: config store: %s", e.key, err)
        return writes

    async def _step(self, key: str, s: Schedule, rev: int) -> int:
        """Advance one schedule as far as it is due now (bounded per round)."""
        writes = 0
        for _ in range(self.limits.schedule_ticks_per_round_max):
            now = self.clock()
            d = core.decide(s, now, count_max=self.limits.schedule_expired_count_max)
            if isinstance(d, core.Wait):
                self._waits[key] = (rev, d.until_ms)
                return writes
            if isinstance(d, core.Idle):
                self._waits[key] = (rev, 2**62)
                return writes
            if isinstance(d, core.Complete):
                if d.delete and await self.store.delete(key):
                    self.counters["completed_deleted"] += 1
                    writes += 1
                self._waits[key] = (rev, 2**62)
                return writes
            if isinstance(d, core.Claim):
                new_rev = await self.store.cas(key, rev, d.schedule.to_json())
                writes += 1
                if new_rev is None:
                    self.counters["cas_lost"] += 1
                    return writes
                s, rev = d.schedule, new_rev
                self.counters["claimed"] += d.schedule.pending is not None
                self.counters["expired"] += d.expired
                continue
            assert isinstance(d, core.Send)
            outcome = await self._send(s, d)
            after = core.on_sent(s, outcome, self.clock(), self.rng,
                                 backoff_base_ms=self.limits.schedule_retry_backoff_base_ms,
                                 backoff_cap_ms=self.limits.schedule_retry_backoff_cap_ms)
            if after.dead_letter:
                await self._dead_letter(s, d, outcome, after.exhausted)
            new_rev = await self.store.cas(key, rev, after.schedule.to_json())
            writes += 1
            if new_rev is None:  # changed under us (an update): its pending tick is re-sent
                self.counters["cas_lost"] += 1
                return writes
            s, rev = after.schedule, new_rev
        return writes

    def _invoke_request(self, s: Schedule, d: core.Send) -> dict[str, Any]:
        m = _LAMBDA.match(s.target_arn)
        assert m is not None
        payload = core.render_input(s.input, schedule_arn=schedule_arn(
            self.region, s.account, s.group, s.name), nominal_ms=d.nominal_ms,
            event_id=d.event_id, attempt=d.attempt)
        return HttpRequest(method="POST", path=f"/2015-03-31/functions/{m['name']}/invocations",
                           query=f"Qualifier={m['qualifier']}" if m["qualifier"] else "",
                           headers={"x-amz-invocation-type": "Event", EVENT_ID_HEADER: d.event_id,
                                    "content-type": "application/json"},
                           body=payload, account=s.account).to_wire()

    async def _send(self, s: Schedule, d: core.Send) -> core.SendOutcome:
        client = self.frontend_for(s.account)
        if client is None:
            self.counters["send_failed"] += 1
            return core.SendOutcome(False, True, "the tenant's cell is unknown")
        try:
            resp = await client.call("http", self._invoke_request(s, d), timeout_s=self.limits.schedule_send_timeout_ms / 1000)
        except (TransportError, CallTimeout, RemoteError) as e:
            self.counters["send_failed"] += 1
            return core.SendOutcome(False, True, f"cell unavailable: {e}"[:500])
        status = int(resp["s"])
        if status == 202:
            self.counters["sent"] += 1
            return core.SendOutcome(True)
        self.counters["send_failed"] += 1
        try:
            err = json.loads(resp["b"]).get("message", "")
        except (ValueError, AttributeError):
            err = ""
        etype = resp["h"].get("x-amzn-errortype", str(status))
        return core.SendOutcome(False, status == 429 or status >= 500, f"{etype}: {err}"[:500])

    async def _dead_letter(self, s: Schedule, d: core.Send, outcome: core.SendOutcome,
                           exhausted: str) -> None:
        if not s.dead_letter_arn:
            return
        m = _SQS.match(s.dead_letter_arn)
        client = self.frontend_for(s.account)
        if m is None or client is None:
            self.counters["dead_letter_failed"] += 1
            return
        code, _, message = outcome.error.partition(": ")

        def attr(v: str) -> dict[str, str]:
            return {"DataType": "String", "StringValue": v or "-"}

        body = {"QueueUrl": f"http://cellcloud.internal/{s.account}/{m['name']}",
                "MessageBody": core.render_input(
                    s.input, schedule_arn=schedule_arn(self.region, s.account, s.group, s.name),
                    nominal_ms=d.nominal_ms, event_id=d.event_id, attempt=d.attempt).decode(),
                "MessageAttributes": {
                    "ERROR_CODE": attr(code), "ERROR_MESSAGE": attr(message),
                    "EXHAUSTED_RETRY_CONDITION": attr(exhausted),
                    "RETRY_ATTEMPTS": {"DataType": "Number", "StringValue": str(d.attempt - 1)},
                    "SCHEDULE_ARN": attr(schedule_arn(self.region, s.account, s.group, s.name)),
                    "TARGET_ARN": attr(s.target_arn)}}
        try:
            resp = await client.call("sqs", {"target": "AmazonSQS.SendMessage",
                                             "b": json.dumps(body).encode(), "a": s.account,
                                             "host": ""}, timeout_s=self.limits.schedule_send_timeout_ms / 1000)
        except (TransportError, CallTimeout, RemoteError) as e:
            log.warning("schedule %s/%s: dead-letter queue unreachable: %s", s.group, s.name, e)
            self.counters["dead_letter_failed"] += 1
            return
        if int(resp["s"]) == 200:
            self.counters["dead_lettered"] += 1
        else:
            log.warning("schedule %s/%s: dead-letter queue refused: %s", s.group, s.name,
                        resp["b"][:200])
            self.counters["dead_letter_failed"] += 1

    def statistics(self) -> dict[str, Any]:
        return dict(self.counters)


def _tags_of(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or len(v) > 50 or not all(
            isinstance(t, dict) and set(t) == {"Key", "Value"} and isinstance(t["Key"], str)
            and isinstance(t["Value"], str) and 1 <= len(t["Key"]) <= 128
            and len(t["Value"]) <= 256 for t in v):
        raise invalid("Tags is a list of at most 50 {Key, Value}")
    return list(v)


def _page(items: list[dict[str, Any]], member: str, q: dict[str, str]) -> dict[str, Any]:
    try:
        size = int(q.get("MaxResults", "100"))
        start = int(q.get("NextToken", "0"))
    except ValueError:
        raise invalid("MaxResults and NextToken must be integers") from None
    if not 1 <= size <= 100 or start < 0:
        raise invalid("MaxResults must be from 1 to 100")
    out: dict[str, Any] = {member: items[start:start + size]}
    if start + size < len(items):
        out["NextToken"] = str(start + size)
    return out
