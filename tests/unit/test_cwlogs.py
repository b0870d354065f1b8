"""Functions' logs as CloudWatch Logs: LoggingConfig rules and the events it makes
(core/cwlogs.py), the log store's bounds (frontend/logstore.py) and the Logs API over it
(frontend/logs_api.py, time injected), the structured component logs (eventlog.py), and the
agent's accounting of lines pulled while an invocation ran."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import replace
from typing import Any

import pytest

from cellcloud import eventlog
from cellcloud.agent.server import _with_live
from cellcloud.core import cwlogs
from cellcloud.core.cwlogs import LoggingConfig, LogsError, lambda_events, logging_config
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.frontend.logs_api import LogsApi
from cellcloud.frontend.logstore import LogStore

OUTPUT = ("START RequestId: r1 Version: $LATEST\n"
          "hello\n"
          '{"level": "INFO", "message": "quiet"}\n'
          '{"level": "WARNING", "message": "loud"}\n'
          "END RequestId: r1\n"
          "REPORT RequestId: r1\tDuration: 1.50 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB"
          "\tMax Memory Used: 40 MB\tInit Duration: 10.25 ms\n")


def test_logging_config_rules() -> None:
    text = LoggingConfig()
    assert logging_config(None, text, "f") is text
    with pytest.raises(LogsError, match="LogFormat must be JSON"):
        logging_config({"ApplicationLogLevel": "WARN"}, text, "f")
    with pytest.raises(LogsError):
        logging_config({"LogFormat": "XML"}, text, "f")
    with pytest.raises(LogsError):
        logging_config({"LogFormat": "JSON", "SystemLogLevel": "ERROR"}, text, "f")
    with pytest.raises(LogsError):
        logging_config({"LogGroup": "bad name!"}, text, "f")
    js = logging_config({"LogFormat": "JSON", "ApplicationLogLevel": "WARN"}, text, "f")
    assert js.doc("f") == {"LogFormat": "JSON", "LogGroup": "/aws/lambda/f",
                           "ApplicationLogLevel": "WARN", "SystemLogLevel": "INFO"}
    assert js.environment() == {"AWS_LAMBDA_LOG_FORMAT": "JSON", "AWS_LAMBDA_LOG_LEVEL": "WARN"}
    # Back to Text: the levels go (Lambda drops them); the default group is stored as None.
    back = logging_config({"LogFormat": "Text", "LogGroup": "/aws/lambda/f"}, js, "f")
    assert back == LoggingConfig() and back.environment() == {}
    assert LoggingConfig.from_record(js.to_record()) == js


def test_text_keeps_every_line() -> None:
    assert lambda_events(OUTPUT, LoggingConfig(), 0) == OUTPUT.splitlines(keepends=True)


def test_json_platform_records_and_levels() -> None:
    cfg = LoggingConfig("JSON", "WARN", None, None)
    out = lambda_events(OUTPUT, cfg, 1_700_000_000_123)
    records = [json.loads(line) for line in out if line.startswith("{")]
    assert records[0] == {"time": "2023-11-14T22:13:20.123Z", "type": "platform.start",
                          "record": {"requestId": "r1", "version": "$LATEST"}}
    assert out[1] == "hello\n"  # no level: kept
    assert [r.get("message") for r in records if "level" in r] == ["loud"]  # INFO < WARN
    assert records[-1]["type"] == "platform.report"
    assert records[-1]["record"]["metrics"] == {
        "durationMs": 1.5, "billedDurationMs": 2, "memorySizeMB": 128, "maxMemoryUsedMB": 40,
        "initDurationMs": 10.25}
    quiet_system = lambda_events(OUTPUT, replace(cfg, system_level="WARN"), 0)
    assert not any("platform." in line for line in quiet_system)


def test_stream_name() -> None:
    name = cwlogs.stream_name("3", "cell-1-abcd-7", 1_700_000_000_000)
    assert re.fullmatch(r"2023/11/14/\[3\][0-9a-f]{32}", name)
    assert name == cwlogs.stream_name("3", "cell-1-abcd-7", 1_700_000_000_000)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def _api(tmp_path: Any, **limits: int) -> tuple[LogsApi, LogStore, Clock]:
    lim = replace(DEFAULT_LIMITS, **limits)
    store = LogStore(str(tmp_path), lim)
    clock = Clock()
    return LogsApi(store, "cc-local-1", lim, clock=clock), store, clock


def _call(api: LogsApi, op: str, doc: dict[str, Any], account: str = "111") -> dict[str, Any]:
    reply = asyncio.run(api.handle({"target": f"Logs_20140328.{op}",
                                    "b": json.dumps(doc).encode(), "a": account}))
    body: dict[str, Any] = json.loads(reply["b"])
    if reply["s"] != 200:
        raise LogsError(body["__type"], body["message"])
    return body


def test_retention_drops_old_events(tmp_path: Any) -> None:
    api, store, clock = _api(tmp_path)
    now = int(clock() * 1000)
    day = cwlogs.DAY_MS
    store.append([("111", "/g", "s", now - 3 * day, "r", "old\n"),
                  ("111", "/g", "s", now, "r", "new\n")], now)
    assert len(_call(api, "FilterLogEvents", {"logGroupName": "/g"})["events"]) == 2
    _call(api, "PutRetentionPolicy", {"logGroupName": "/g", "retentionInDays": 1})
    assert [e["message"] for e in _call(api, "FilterLogEvents",
                                        {"logGroupName": "/g"})["events"]] == ["new\n"]
    clock.t += 2 * 86_400  # two days later, the sweep drops the rest (and the stream)
    store.sweep(int(clock() * 1000))
    assert _call(api, "FilterLogEvents", {"logGroupName": "/g"})["events"] == []
    assert _call(api, "DescribeLogStreams", {"logGroupName": "/g"})["logStreams"] == []


def test_events_per_group_capped(tmp_path: Any) -> None:
    api, store, clock = _api(tmp_path, log_events_per_group_max=5)
    now = int(clock() * 1000)
    store.append([("111", "/g", "s", now + i, "", f"{i}\n") for i in range(8)], now)
    assert [e["message"] for e in _call(api, "FilterLogEvents", {"logGroupName": "/g"})[
        "events"]] == [f"{i}\n" for i in range(3, 8)]


def test_groups_per_account_capped(tmp_path: Any) -> None:
    api, store, clock = _api(tmp_path, log_groups_per_account_max=2)
    now = int(clock() * 1000)
    store.append([("111", f"/g{i}", "s", now, "", "x\n") for i in range(3)], now)
    assert store.counters["events_dropped"] == 1
    with pytest.raises(LogsError) as e:
        _call(api, "CreateLogGroup", {"logGroupName": "/more"})
    assert e.value.type == "LimitExceededException"
    store.append([("222", "/g0", "s", now, "", "x\n")], now)  # another account's own count
    assert [g["logGroupName"] for g in _call(api, "DescribeLogGroups", {}, "222")[
        "logGroups"]] == ["/g0"]


def test_filter_scan_is_bounded(tmp_path: Any) -> None:
    """A pattern that matches nothing in a long group: each call looks at a bounded number
    of events and answers a nextToken, with no events, as CloudWatch does."""
    api, store, clock = _api(tmp_path, logs_filter_scan_events_max=3)
    now = int(clock() * 1000)
    store.append([("111", "/g", "s", now + i, "", f"line {i}\n") for i in range(7)], now)
    pages = []
    doc: dict[str, Any] = {"logGroupName": "/g", "filterPattern": "6"}
    while True:
        res = _call(api, "FilterLogEvents", doc)
        pages.append([e["message"] for e in res["events"]])
        if "nextToken" not in res:
            break
        doc["nextToken"] = res["nextToken"]
    assert pages == [[], [], ["line 6\n"]]


def test_get_log_events_tokens(tmp_path: Any) -> None:
    api, store, clock = _api(tmp_path)
    now = int(clock() * 1000)
    store.append([("111", "/g", "s", now + i, "", f"{i}\n") for i in range(5)], now)
    head = _call(api, "GetLogEvents", {"logGroupName": "/g", "logStreamName": "s",
                                       "startFromHead": True, "limit": 2})
    assert [e["message"] for e in head["events"]] == ["0\n", "1\n"]
    nxt = _call(api, "GetLogEvents", {"logGroupName": "/g", "logStreamName": "s",
                                      "nextToken": head["nextForwardToken"], "limit": 10})
    assert [e["message"] for e in nxt["events"]] == ["2\n", "3\n", "4\n"]
    end = _call(api, "GetLogEvents", {"logGroupName": "/g", "logStreamName": "s",
                                      "nextToken": nxt["nextForwardToken"]})
    assert end["events"] == [] and end["nextForwardToken"] == nxt["nextForwardToken"]
    # A new line shows up on the same token (how a follower polls).
    store.append([("111", "/g", "s", now + 9, "", "5\n")], now)
    more = _call(api, "GetLogEvents", {"logGroupName": "/g", "logStreamName": "s",
                                       "nextToken": end["nextForwardToken"]})
    assert [e["message"] for e in more["events"]] == ["5\n"]
    with pytest.raises(LogsError):
        _call(api, "GetLogEvents", {"logGroupName": "/g", "logStreamName": "s",
                                    "nextToken": "x/12"})


def test_describe_streams_by_last_event(tmp_path: Any) -> None:
    api, store, clock = _api(tmp_path)
    now = int(clock() * 1000)
    store.append([("111", "/g", f"s{i}", now + (5 - i), "", "x\n") for i in range(5)], now)
    names: list[str] = []
    doc: dict[str, Any] = {"logGroupName": "/g", "orderBy": "LastEventTime",
                           "descending": True, "limit": 2}
    while True:
        res = _call(api, "DescribeLogStreams", doc)
        names += [s["logStreamName"] for s in res["logStreams"]]
        if "nextToken" not in res:
            break
        doc["nextToken"] = res["nextToken"]
    assert names == ["s0", "s1", "s2", "s3", "s4"]
    with pytest.raises(LogsError, match="LastEventTime"):
        _call(api, "DescribeLogStreams", {"logGroupName": "/g", "orderBy": "LastEventTime",
                                          "logStreamNamePrefix": "s"})


def test_unknown_operation_and_bad_body(tmp_path: Any) -> None:
    api, _, _ = _api(tmp_path)
    reply = asyncio.run(api.handle({"target": "Logs_20140328.PutLogEvents", "b": b"{}",
                                    "a": "111"}))
    assert json.loads(reply["b"])["__type"] == "UnknownOperationException"
    reply = asyncio.run(api.handle({"target": "Logs_20140328.FilterLogEvents",
                                    "b": b"[" * 600, "a": "111"}))
    assert json.loads(reply["b"])["__type"] == "SerializationException"


def test_with_live_accounts_for_pulled_bytes() -> None:
    assert _with_live(b"END\n", b"a\nb\n", 2) == (b"a\nb\nEND\n", 2)
    big = b"x" * DEFAULT_LIMITS.invocation_log_bytes_max
    whole, pulled = _with_live(b"END\n", big, 100)
    assert len(whole) == DEFAULT_LIMITS.invocation_log_bytes_max and whole.endswith(b"END\n")
    assert pulled == 96  # the 4 bytes cut from the head were pulled ones


def test_structured_component_logs(capsys: Any) -> None:
    formatter = eventlog.JsonFormatter("frontend", cell="cell-1")
    record = logging.LogRecord("cellcloud.frontend", logging.WARNING, __file__, 1,
                               "agent %s unreachable", ("a1",), None)
    for k, v in eventlog.fields(event="agent_lost", agent="a1", env=None).items():
        setattr(record, k, v)
    doc = json.loads(formatter.format(record))
    assert doc["component"] == "frontend" and doc["level"] == "WARNING"
    assert doc["event"] == "agent_lost" and doc["message"] == "agent a1 unreachable"
    assert doc["cell"] == "cell-1" and doc["agent"] == "a1" and "env" not in doc
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])


def test_tail_follower_prints_each_event_once() -> None:
    from cellcloud.core.logtail import Follower, parse_since

    assert parse_since("10m") == 600_000 and parse_since("2h") == 7_200_000
    assert parse_since("99999999w") == 3653 * 86_400_000  # bounded
    for bad in ("", "10", "m", "-5m", "1y"):
        with pytest.raises(ValueError):
            parse_since(bad)
    f = Follower(1000)
    first = [{"eventId": "1", "timestamp": 1000, "message": "a"},
             {"eventId": "2", "timestamp": 1005, "message": "b"}]
    assert [e["message"] for e in f.new(first)] == ["a", "b"]
    assert f.start_ms == 1005
    # The next poll (startTime inclusive) returns b again, and c at the same instant.
    again = [{"eventId": "2", "timestamp": 1005, "message": "b"},
             {"eventId": "3", "timestamp": 1005, "message": "c"}]
    assert [e["message"] for e in f.new(again)] == ["c"]
    assert [e["message"] for e in f.new(again)] == []
    later = [*again, {"eventId": "10", "timestamp": 1010, "message": "d"}]
    assert [e["message"] for e in f.new(later)] == ["d"]


def test_recent_invocations_for_the_console(tmp_path: Any) -> None:
    from cellcloud.frontend.cell import Cell
    from cellcloud.frontend.store import FunctionRecord, SqliteFunctionStore

    store = SqliteFunctionStore(str(tmp_path / "cell"))
    cell = Cell("cell-t", store, {})
    cell.logstore = LogStore(str(tmp_path / "cell"))
    assert store.put_new(FunctionRecord("111", "fn", "python3.11", "app.handler", "00" * 32, 1))
    key = "111/fn/$LATEST/1"
    cell.file_logs(key, b"START RequestId: r1 Version: $LATEST\nfirst\n", "r1", env_id="e1")
    cell.file_logs(key, b"START RequestId: r2 Version: $LATEST\nsecond\n", "r2", env_id="e1",
                   live_bytes=len(b"START RequestId: r2 Version: $LATEST\n"))
    recent = cell.recent_invocations("111", "fn")
    assert [r["request_id"] for r in recent] == ["r2", "r1"]
    assert recent[1]["lines"] == ["START RequestId: r1 Version: $LATEST\n", "first\n"]
    assert recent[0]["lines"] == ["second\n"]  # the rest had been filed live already
    assert recent[0]["stream"] == recent[1]["stream"]
    # the /cellcloud/v1 view keeps whole invocations
    assert [e["message"] for e in cell.logs("111", "fn", 10)][-1].endswith("second\n")


def test_a_single_event_line() -> None:
    doc = json.loads(eventlog.line("zygote", "WARNING", "tmp_fallback", "using tmpfs",
                                   env="e1"))
    assert (doc["component"], doc["level"], doc["event"], doc["message"], doc["env"]) == (
        "zygote", "WARNING", "tmp_fallback", "using tmpfs", "e1")


def test_a_migration_carries_the_tenants_log_groups(tmp_path: Any) -> None:
    from cellcloud.frontend import clone
    from cellcloud.frontend.cell import Cell
    from cellcloud.frontend.store import SqliteFunctionStore

    def cell(name: str) -> Cell:
        c = Cell(name, SqliteFunctionStore(str(tmp_path / name)), {})
        c.logstore = LogStore(str(tmp_path / name))
        return c

    old, new = cell("old"), cell("new")
    assert old.logstore is not None and new.logstore is not None
    old.logstore.append([("111", "/aws/lambda/f", "s", 5, "r1", "one\n"),
                         ("111", "/aws/lambda/f", "s", 6, "r1", "two\n"),
                         ("222", "/aws/lambda/g", "s", 7, "r2", "other tenant\n")], 10)
    old.logstore.set_retention("111", "/aws/lambda/f", 3653, 10)
    doc = clone.export_tenant(old, "111")
    clone.import_tenant(new, doc)
    clone.import_tenant(new, doc)  # twice: nothing added the second time
    api = LogsApi(new.logstore, "cc-local-1")
    got = _call(api, "FilterLogEvents", {"logGroupName": "/aws/lambda/f"})
    assert [(e["message"], e["timestamp"]) for e in got["events"]] == [("one\n", 5), ("two\n", 6)]
    assert _call(api, "DescribeLogGroups", {})["logGroups"][0]["retentionInDays"] == 3653
    assert _call(api, "DescribeLogGroups", {}, "222")["logGroups"] == []
    clone.forget_tenant(old, "111")
    assert old.logstore.groups("111", "", "", 10) == []
    assert old.logstore.groups("222", "", "", 10) != []
