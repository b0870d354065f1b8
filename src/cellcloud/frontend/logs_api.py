"""The CloudWatch Logs API subset over the cell's log store (JSON 1.1, ``X-Amz-Target:
Logs_20140328.<Operation>``, SigV4 service ``logs``; the router forwards it as the ``logs``
op): DescribeLogGroups, DescribeLogStreams, GetLogEvents, FilterLogEvents,
PutRetentionPolicy, DeleteRetentionPolicy, CreateLogGroup, DeleteLogGroup. Every call is
scoped to the caller's account.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..core import cwlogs
from ..core.cwlogs import LogsError
from ..core.jsondepth import json_depth_within
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.logfilter import PatternError, compile_pattern
from .logstore import Event, LogStore

TARGET_PREFIX = "Logs_20140328."
_JSON = "application/x-amz-json-1.1"

Reply = dict[str, Any]


def _ok(doc: dict[str, Any]) -> Reply:
    return {"s": 200, "h": {"content-type": _JSON}, "b": json.dumps(doc).encode()}


def _err(type_: str, message: str, status: int = 400) -> Reply:
    return {"s": status, "h": {"content-type": _JSON, "x-amzn-errortype": type_},
            "b": json.dumps({"__type": type_, "message": message}).encode()}


class LogsApi:
    def __init__(self, store: LogStore, region: str, limits: Limits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.time,
                 before_read: Callable[[], None] | None = None) -> None:
        self.store = store
        self.region = region
        self.limits = limits
        self.clock = clock
        # Called before every read: the cell files the events it holds in memory first, so a
        # read sees every line the cell has.
        self.before_read = before_read
        self._ops: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "DescribeLogGroups": self.describe_log_groups,
            "DescribeLogStreams": self.describe_log_streams,
            "GetLogEvents": self.get_log_events,
            "FilterLogEvents": self.filter_log_events,
            "PutRetentionPolicy": self.put_retention_policy,
            "DeleteRetentionPolicy": self.delete_retention_policy,
            "CreateLogGroup": self.create_log_group,
            "DeleteLogGroup": self.delete_log_group,
        }

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def handle(self, req: dict[str, Any]) -> Reply:
        target = str(req.get("target") or "")
        account = str(req["a"])
        op = self._ops.get(target[len(TARGET_PREFIX):]) if target.startswith(
            TARGET_PREFIX) else None
        if op is None:
            return _err("UnknownOperationException", f"Operation {target!r} is not supported "
                        "(supported: " + ", ".join(sorted(self._ops)) + ")")
        body = req.get("b") or b"{}"
        if not json_depth_within(body, self.limits.json_depth_max):
            return _err("SerializationException",
                        f"The request body nests deeper than {self.limits.json_depth_max} levels")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _err("SerializationException", f"The request body is not valid JSON: {e}")
        if not isinstance(doc, dict):
            return _err("SerializationException", "The request body must be a JSON object")
        if self.before_read is not None:
            self.before_read()
        try:
            return _ok(op(account, doc))
        except LogsError as e:
            return _err(e.type, e.message)

    # -- helpers ---------------------------------------------------------------------------
    def _group_name(self, doc: dict[str, Any], key: str = "logGroupName") -> str:
        name = doc.get(key)
        if name is None and key == "logGroupName" and "logGroupIdentifier" in doc:
            ident = doc["logGroupIdentifier"]
            # an ARN (arn:aws:logs:<region>:<account>:log-group:<name>[:*]) or a name
            name = ident.split(":log-group:", 1)[1].removesuffix(":*") if isinstance(
                ident, str) and ":log-group:" in ident else ident
        if not isinstance(name, str) or not cwlogs.LOG_GROUP_NAME.match(name):
            raise LogsError("InvalidParameterException",
                            f"1 validation error detected: Value at '{key}' failed to satisfy "
                            "constraint: Member must satisfy regular expression pattern: "
                            "[\\.\\-_/#A-Za-z0-9]+ (1 to 512 characters)")
        return name

    def _existing_group(self, account: str, doc: dict[str, Any]) -> str:
        name = self._group_name(doc)
        if self.store.group(account, name) is None:
            raise LogsError("ResourceNotFoundException", "The specified log group does not exist.")
        return name

    def _arn(self, account: str, grp: str) -> str:
        return f"arn:aws:logs:{self.region}:{account}:log-group:{grp}"

    def _limit(self, doc: dict[str, Any], hi: int, default: int) -> int:
        value = cwlogs.int_param(doc, "limit", default, 1, hi)
        assert value is not None
        return value

    @staticmethod
    def _event(e: Event, *, with_stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"timestamp": e.ts_ms, "message": e.message,
                               "ingestionTime": e.ingest_ms}
        if with_stream:
            out["logStreamName"] = e.stream
            out["eventId"] = str(e.id)
        return out

    # -- operations ------------------------------------------------------------------------
    def describe_log_groups(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        limit = self._limit(doc, self.limits.logs_describe_limit_max,
                            self.limits.logs_describe_limit_max)
        prefix = doc.get("logGroupNamePrefix", "")
        if not isinstance(prefix, str) or len(prefix) > 512:
            raise LogsError("InvalidParameterException", "logGroupNamePrefix must be a string "
                            "of at most 512 characters")
        if "logGroupNamePattern" in doc:
            raise LogsError("InvalidParameterException",
                            "logGroupNamePattern is not supported (use logGroupNamePrefix)")
        after = cwlogs.decode_token(doc["nextToken"], "groups")["after"] if "nextToken" in doc \
            else ""
        rows = self.store.groups(account, prefix, str(after), limit + 1)
        out: dict[str, Any] = {"logGroups": [
            {"logGroupName": name, "creationTime": created, "metricFilterCount": 0,
             "arn": self._arn(account, name) + ":*", "logGroupArn": self._arn(account, name),
             "storedBytes": stored, "logGroupClass": "STANDARD",
             **({"retentionInDays": days} if days else {})}
            for name, created, days, stored in rows[:limit]]}
        if len(rows) > limit:
            out["nextToken"] = cwlogs.encode_token({"k": "groups", "after": rows[limit - 1][0]})
        return out

    def describe_log_streams(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._existing_group(account, doc)
        limit = self._limit(doc, self.limits.logs_describe_limit_max,
                            self.limits.logs_describe_limit_max)
        order = doc.get("orderBy", "LogStreamName")
        if order not in ("LogStreamName", "LastEventTime"):
            raise LogsError("InvalidParameterException",
                            "orderBy must be LogStreamName or LastEventTime")
        descending = doc.get("descending", False)
        if not isinstance(descending, bool):
            raise LogsError("InvalidParameterException", "descending must be a boolean")
        prefix = doc.get("logStreamNamePrefix", "")
        if not isinstance(prefix, str) or len(prefix) > cwlogs.LOG_STREAM_NAME_CHARS_MAX:
            raise LogsError("InvalidParameterException", "logStreamNamePrefix must be a string "
                            "of at most 512 characters")
        by_time = order == "LastEventTime"
        if by_time and prefix:
            raise LogsError("InvalidParameterException",
                            "Cannot order by LastEventTime with a logStreamNamePrefix.")
        cursor: tuple[int, str] | None = None
        if "nextToken" in doc:
            tok = cwlogs.decode_token(doc["nextToken"], "streams")
            if tok.get("t") != by_time or tok.get("d") != descending:
                raise LogsError("InvalidParameterException", "The specified nextToken is invalid.")
            cursor = (int(tok["ms"]), str(tok["name"]))
        rows = self.store.streams(account, grp, by_time=by_time, descending=descending,
                                  prefix=prefix, cursor=cursor, limit=limit + 1)
        arn = self._arn(account, grp)
        out: dict[str, Any] = {"logStreams": [
            {"logStreamName": name, "creationTime": created, "firstEventTimestamp": first,
             "lastEventTimestamp": last, "lastIngestionTime": ingest,
             "arn": f"{arn}:log-stream:{name}", "storedBytes": 0}
            for name, created, first, last, ingest in rows[:limit]]}
        if len(rows) > limit:
            name, _c, _f, last, _i = rows[limit - 1]
            out["nextToken"] = cwlogs.encode_token({"k": "streams", "t": by_time,
                                                    "d": descending, "ms": last, "name": name})
        return out

    def get_log_events(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._existing_group(account, doc)
        stream = doc.get("logStreamName")
        if not isinstance(stream, str) or not stream or len(stream) > 512:
            raise LogsError("InvalidParameterException", "logStreamName is required")
        limit = self._limit(doc, self.limits.logs_events_limit_max,
                            self.limits.logs_events_limit_max)
        start, end = cwlogs.time_range(doc)
        from_head = doc.get("startFromHead", False)
        if not isinstance(from_head, bool):
            raise LogsError("InvalidParameterException", "startFromHead must be a boolean")
        after_id = before_id = None
        if "nextToken" in doc:
            direction, ident = cwlogs.get_events_token(doc["nextToken"])
            if direction == "f":
                after_id = ident
            else:
                before_id = ident
        events = self.store.stream_events(account, grp, stream, start=start, end=end,
                                          after_id=after_id, before_id=before_id,
                                          from_head=from_head, limit=limit)
        if events:
            forward, backward = events[-1].id, events[0].id
        elif after_id is not None:  # at the end: the same token again, as CloudWatch does
            forward, backward = after_id, after_id + 1
        elif before_id is not None:
            forward, backward = before_id - 1, before_id
        else:
            forward, backward = 0, 1
        return {"events": [self._event(e, with_stream=False) for e in events],
                "nextForwardToken": f"f/{forward:056d}",
                "nextBackwardToken": f"b/{backward:056d}"}

    def filter_log_events(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._existing_group(account, doc)
        limit = self._limit(doc, self.limits.logs_events_limit_max,
                            self.limits.logs_events_limit_max)
        start, end = cwlogs.time_range(doc)
        streams = doc.get("logStreamNames")
        stream_prefix = doc.get("logStreamNamePrefix")
        if streams is not None and stream_prefix is not None:
            raise LogsError("InvalidParameterException", "logStreamNames and "
                            "logStreamNamePrefix cannot both be given")
        if streams is not None:
            if (not isinstance(streams, list) or not streams
                    or len(streams) > self.limits.logs_filter_streams_max
                    or not all(isinstance(s, str) and s for s in streams)):
                raise LogsError("InvalidParameterException",
                                f"logStreamNames must list 1 to "
                                f"{self.limits.logs_filter_streams_max} stream names")
        if stream_prefix is not None:
            if not isinstance(stream_prefix, str) or len(stream_prefix) > 512:
                raise LogsError("InvalidParameterException", "logStreamNamePrefix must be a "
                                "string of at most 512 characters")
            rows = self.store.streams(account, grp, by_time=False, descending=False,
                                      prefix=stream_prefix, cursor=None,
                                      limit=self.limits.logs_filter_streams_max + 1)
            if len(rows) > self.limits.logs_filter_streams_max:
                raise LogsError("InvalidParameterException", "logStreamNamePrefix names more "
                                f"than {self.limits.logs_filter_streams_max} streams")
            streams = [r[0] for r in rows]
            if not streams:
                return {"events": [], "searchedLogStreams": []}
        pattern = doc.get("filterPattern", "")
        if not isinstance(pattern, str) or len(pattern) > self.limits.logs_filter_pattern_chars_max:
            raise LogsError("InvalidParameterException",
                            f"filterPattern must be a string of at most "
                            f"{self.limits.logs_filter_pattern_chars_max} characters")
        try:
            match = compile_pattern(pattern)
        except PatternError as e:
            raise LogsError("InvalidParameterException", f"Invalid filter pattern: {e}") from e
        if doc.get("interleaved") not in (None, True, False):
            raise LogsError("InvalidParameterException", "interleaved must be a boolean")
        after: tuple[int, int] | None = None
        if "nextToken" in doc:
            tok = cwlogs.decode_token(doc["nextToken"], "filter")
            after = (int(tok["ts"]), int(tok["id"]))
        scan_max = self.limits.logs_filter_scan_events_max
        scanned = self.store.scan(account, grp, streams=streams, start=start, end=end,
                                  after=after, limit=scan_max)
        found: list[Event] = []
        last: Event | None = None
        for ev in scanned:
            last = ev
            if match(ev.message):
                found.append(ev)
                if len(found) >= limit:
                    break
        out: dict[str, Any] = {"events": [self._event(ev, with_stream=True) for ev in found],
                               "searchedLogStreams": []}
        # More may follow: the limit was reached, or the scan's bound was (CloudWatch, too,
        # answers a partial page with a nextToken, possibly with no events).
        if last is not None and (len(found) >= limit or len(scanned) >= scan_max):
            out["nextToken"] = cwlogs.encode_token({"k": "filter", "ts": last.ts_ms,
                                                    "id": last.id})
        return out

    def put_retention_policy(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._existing_group(account, doc)
        days = doc.get("retentionInDays")
        if days not in cwlogs.RETENTION_DAYS or isinstance(days, bool):
            raise LogsError("InvalidParameterException",
                            f"1 validation error detected: Value '{days}' at 'retentionInDays' "
                            "failed to satisfy constraint: Member must satisfy enum value set: "
                            f"{list(cwlogs.RETENTION_DAYS)}")
        self.store.set_retention(account, grp, int(days), self.now_ms())
        return {}

    def delete_retention_policy(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._existing_group(account, doc)
        self.store.set_retention(account, grp, None, self.now_ms())
        return {}

    def create_log_group(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._group_name(doc)
        for key in ("kmsKeyId", "tags", "logGroupClass"):
            if key in doc and not (key == "logGroupClass" and doc[key] == "STANDARD"):
                raise LogsError("InvalidParameterException", f"{key} is not supported")
        try:
            created = self.store.create_group(account, grp, self.now_ms())
        except OverflowError as e:
            raise LogsError("LimitExceededException",
                            f"Resource limit exceeded: at most {e.args[0]} log groups") from e
        if not created:
            raise LogsError("ResourceAlreadyExistsException",
                            "The specified log group already exists")
        return {}

    def delete_log_group(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        grp = self._group_name(doc)
        if not self.store.delete_group(account, grp):
            raise LogsError("ResourceNotFoundException", "The specified log group does not exist.")
        return {}
