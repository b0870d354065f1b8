"""Functions' logs through boto3's CloudWatch Logs client (issue #16): groups, streams,
GetLogEvents' tokens, FilterLogEvents' patterns and bounds, retention, tenant scope,
LoggingConfig JSON, and a running invocation's lines seen while it still runs."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cellcloud.sdk import Client
from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

pytestmark = pytest.mark.integration

WAIT_S = 60  # generous bounds: every wait below is for a condition


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "logs-region", "--agents-per-cell", "2") as r:
        yield r


def _client(region: Region, service: str, akid: str | None = None,
            secret: str | None = None, validate: bool = True) -> Any:
    return boto3.client(
        service, endpoint_url=region.endpoint, region_name=str(region.doc["region"]),
        aws_access_key_id=akid or str(region.doc["access_key_id"]),
        aws_secret_access_key=secret or str(region.doc["secret_access_key"]),
        config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                      parameter_validation=validate, read_timeout=120))


@pytest.fixture(scope="module")
def logs(region: Region) -> Any:
    return _client(region, "logs")


@pytest.fixture(scope="module")
def lam(region: Region) -> Any:
    return _client(region, "lambda")


def _deploy(lam: Any, code: str, timeout: int = 3, **kw: Any) -> str:
    name = f"lg-{uuid.uuid4().hex[:8]}"
    lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler",
                        Role="arn:aws:iam::123456789012:role/x", Timeout=timeout,
                        Code={"ZipFile": make_zip({"app.py": code})}, **kw)
    return name


def _wait_for(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.2)  # polling a condition, bounded by the deadline above


def _filter_all(logs: Any, group: str, **kw: Any) -> list[dict[str, Any]]:
    """FilterLogEvents, every page (as `aws logs tail` reads them)."""
    events: list[dict[str, Any]] = []
    token = None
    for _ in range(1000):
        res = logs.filter_log_events(logGroupName=group, **kw,
                                     **({"nextToken": token} if token else {}))
        events += res["events"]
        token = res.get("nextToken")
        if not token:
            return events
    raise AssertionError("FilterLogEvents never ended its pages")


PRINTS = ("import sys\ndef handler(event, context):\n"
          "    print('hello', event['n'])\n    print('oops', event['n'], file=sys.stderr)\n"
          "    return event['n']\n")


def test_groups_streams_and_events(region: Region, logs: Any, lam: Any) -> None:
    name = _deploy(lam, PRINTS)
    group = f"/aws/lambda/{name}"
    for n in (1, 2):
        assert json.loads(lam.invoke(FunctionName=name, Payload=json.dumps({"n": n}))[
            "Payload"].read()) == n
    groups = logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"]
    assert [g["logGroupName"] for g in groups] == [group]
    assert groups[0]["arn"].endswith(f":log-group:{group}:*")
    streams = logs.describe_log_streams(logGroupName=group, orderBy="LastEventTime",
                                        descending=True)["logStreams"]
    assert len(streams) == 1  # one warm environment
    stream = streams[0]["logStreamName"]
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}", stream)
    # One event per line, in order, with Lambda's platform lines.
    res = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)
    messages = [e["message"] for e in res["events"]]
    assert messages[0].startswith("START RequestId: ")
    assert "hello 1\n" in messages and "oops 1\n" in messages and "hello 2\n" in messages
    assert sum(m.startswith("REPORT RequestId: ") for m in messages) == 2
    # At the end, the forward token comes back unchanged (how a reader knows it is there).
    again = logs.get_log_events(logGroupName=group, logStreamName=stream,
                                nextToken=res["nextForwardToken"])
    assert again["events"] == [] and again["nextForwardToken"] == res["nextForwardToken"]
    # A page of 2 from the tail, then backwards.
    tail = logs.get_log_events(logGroupName=group, logStreamName=stream, limit=2)
    assert [e["message"] for e in tail["events"]] == messages[-2:]
    back = logs.get_log_events(logGroupName=group, logStreamName=stream, limit=2,
                               nextToken=tail["nextBackwardToken"])
    assert [e["message"] for e in back["events"]] == messages[-4:-2]
    # Filters: a term, an exclusion, any-of, a time window, pagination by limit.
    assert [e["message"] for e in _filter_all(logs, group, filterPattern="hello")] == [
        "hello 1\n", "hello 2\n"]
    assert [e["message"] for e in _filter_all(logs, group, filterPattern="hello -2")] == [
        "hello 1\n"]
    assert {e["message"] for e in _filter_all(logs, group, filterPattern="?oops ?hello")} == {
        "hello 1\n", "hello 2\n", "oops 1\n", "oops 2\n"}
    page = logs.filter_log_events(logGroupName=group, limit=1)
    assert len(page["events"]) == 1 and page["nextToken"]
    everything = _filter_all(logs, group)
    assert len({e["eventId"] for e in everything}) == len(everything) == len(messages)
    assert all(e["logStreamName"] == stream for e in everything)
    assert _filter_all(logs, group, startTime=everything[-1]["timestamp"] + 1) == []


def test_bad_queries_are_refused(region: Region, logs: Any, lam: Any) -> None:
    raw = _client(region, "logs", validate=False)
    name = _deploy(lam, PRINTS)
    lam.invoke(FunctionName=name, Payload=b'{"n": 0}')
    group = f"/aws/lambda/{name}"
    for kw in ({"filterPattern": '"unterminated'}, {"filterPattern": "[ip, user]"},
               {"filterPattern": "x" * 1025}, {"limit": 10_001}, {"limit": 0},
               {"startTime": 10, "endTime": 5}, {"nextToken": "garbage"},
               {"logStreamNames": [f"s{i}" for i in range(101)]}):
        with pytest.raises(ClientError) as e:
            raw.filter_log_events(logGroupName=group, **kw)
        assert e.value.response["Error"]["Code"] == "InvalidParameterException", kw
    # An absurd time range is accepted and answered (the scan is bounded, not the range).
    assert _filter_all(logs, group, startTime=0, endTime=2**52, filterPattern="hello")
    with pytest.raises(ClientError) as e:
        logs.filter_log_events(logGroupName="/aws/lambda/nope-" + uuid.uuid4().hex)
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    with pytest.raises(ClientError) as e:
        raw.describe_log_groups(limit=51)
    assert e.value.response["Error"]["Code"] == "InvalidParameterException"


def test_retention_and_groups(region: Region, logs: Any, lam: Any) -> None:
    name = _deploy(lam, PRINTS)
    lam.invoke(FunctionName=name, Payload=b'{"n": 0}')
    group = f"/aws/lambda/{name}"
    with pytest.raises(ClientError) as e:
        logs.put_retention_policy(logGroupName=group, retentionInDays=2)
    assert e.value.response["Error"]["Code"] == "InvalidParameterException"
    logs.put_retention_policy(logGroupName=group, retentionInDays=1)
    assert logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"][0][
        "retentionInDays"] == 1
    logs.delete_retention_policy(logGroupName=group)
    assert "retentionInDays" not in logs.describe_log_groups(logGroupNamePrefix=group)[
        "logGroups"][0]
    own = f"/custom/{uuid.uuid4().hex[:8]}"
    logs.create_log_group(logGroupName=own)
    with pytest.raises(ClientError) as e:
        logs.create_log_group(logGroupName=own)
    assert e.value.response["Error"]["Code"] == "ResourceAlreadyExistsException"
    # Pagination of groups by name.
    others = [f"{own}/{i}" for i in range(3)]
    for g in others:
        logs.create_log_group(logGroupName=g)
    seen, token = [], None
    while True:
        res = logs.describe_log_groups(logGroupNamePrefix=own, limit=2,
                                       **({"nextToken": token} if token else {}))
        seen += [g["logGroupName"] for g in res["logGroups"]]
        token = res.get("nextToken")
        if not token:
            break
    assert seen == [own, *others]
    for g in [own, *others]:
        logs.delete_log_group(logGroupName=g)
    assert logs.describe_log_groups(logGroupNamePrefix=own)["logGroups"] == []


def test_logs_are_tenant_scoped(region: Region, logs: Any, lam: Any) -> None:
    name = _deploy(lam, PRINTS)
    lam.invoke(FunctionName=name, Payload=b'{"n": 0}')
    out = region.cli("tenant", "create", f"logs-{uuid.uuid4().hex[:6]}").stdout
    fields = {k: v.strip() for k, v in (line.split(None, 1) for line in out.strip().splitlines())}
    other = _client(region, "logs", fields["aws_access_key_id"], fields["aws_secret_access_key"])
    assert other.describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{name}")["logGroups"] == []
    with pytest.raises(ClientError) as e:
        other.filter_log_events(logGroupName=f"/aws/lambda/{name}")
    assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"


JSON_LOGS = ("import logging, os\nlog = logging.getLogger()\n"
             "def handler(event, context):\n"
             "    log.info('quiet %s', event['n'])\n    log.warning('loud %s', event['n'])\n"
             "    print('plain', event['n'])\n"
             "    return [os.environ.get('AWS_LAMBDA_LOG_FORMAT'), "
             "os.environ.get('AWS_LAMBDA_LOG_LEVEL')]\n")


def test_logging_config_json(region: Region, logs: Any, lam: Any) -> None:
    raw_lam = _client(region, "lambda", validate=False)
    with pytest.raises(ClientError) as e:  # levels only with JSON, as Lambda
        _deploy(raw_lam, JSON_LOGS, LoggingConfig={"LogFormat": "Text",
                                                   "ApplicationLogLevel": "WARN"})
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    name = _deploy(lam, JSON_LOGS, LoggingConfig={"LogFormat": "JSON",
                                                  "ApplicationLogLevel": "WARN"})
    cfg = lam.get_function_configuration(FunctionName=name)["LoggingConfig"]
    assert cfg == {"LogFormat": "JSON", "ApplicationLogLevel": "WARN", "SystemLogLevel": "INFO",
                   "LogGroup": f"/aws/lambda/{name}"}
    res = lam.invoke(FunctionName=name, Payload=b'{"n": 7}', LogType="Tail")
    assert json.loads(res["Payload"].read()) == ["JSON", "WARN"]
    tail = base64.b64decode(res["LogResult"]).decode()
    assert '"type": "platform.start"' in tail
    group = f"/aws/lambda/{name}"
    messages = [e["message"] for e in _filter_all(logs, group)]
    records = [json.loads(m) for m in messages if m.startswith("{")]
    assert [r["type"] for r in records if "type" in r] == [
        "platform.start", "platform.runtimeDone", "platform.report"]
    assert [r["message"] for r in records if "level" in r] == ["loud 7"]  # INFO filtered
    assert "plain 7\n" in messages  # a line without a level is kept
    assert [e["message"] for e in _filter_all(logs, group,
                                              filterPattern='{ $.level = "WARNING" }')]
    # System lines filtered at WARN; a custom log group; back to Text.
    lam.update_function_configuration(FunctionName=name, LoggingConfig={
        "SystemLogLevel": "WARN", "LogGroup": f"/custom/{name}"})
    _wait_updated(lam, name)
    lam.invoke(FunctionName=name, Payload=b'{"n": 8}')
    moved = [e["message"] for e in _filter_all(logs, f"/custom/{name}")]
    assert not any("platform." in m for m in moved) and "plain 8\n" in moved
    lam.update_function_configuration(FunctionName=name, LoggingConfig={"LogFormat": "Text"})
    _wait_updated(lam, name)
    assert lam.get_function_configuration(FunctionName=name)["LoggingConfig"] == {
        "LogFormat": "Text", "LogGroup": f"/custom/{name}"}


def _wait_updated(lam: Any, name: str) -> None:
    _wait_for("the update applied", lambda: lam.get_function_configuration(
        FunctionName=name)["LastUpdateStatus"] == "Successful")


LIVE = ("import os, time\n"
        "def handler(event, context):\n"
        "    print('LIVE', event['token'], flush=True)\n"
        "    deadline = time.monotonic() + 100\n"
        "    while time.monotonic() < deadline:\n"
        "        if os.path.exists('/tmp/go'):\n"
        "            print('AFTER', event['token'])\n"
        "            return 'released'\n"
        "        time.sleep(0.05)\n"
        "    return 'never released'\n")


def test_lines_are_seen_while_the_invocation_runs(region: Region, logs: Any, lam: Any) -> None:
    """A handler prints, then waits for a file that the test creates only once
    FilterLogEvents has shown the line: the line was visible while the invocation ran."""
    name = _deploy(lam, LIVE, timeout=120)
    token = uuid.uuid4().hex
    group = f"/aws/lambda/{name}"
    result: dict[str, Any] = {}
    client = Client(region.endpoint, (str(region.doc["access_key_id"]),
                                      str(region.doc["secret_access_key"])), timeout_s=180)

    def run() -> None:
        result["res"] = client.invoke(name, {"token": token})

    t = threading.Thread(target=run)
    t.start()
    try:
        def seen() -> list[dict[str, Any]]:
            try:
                return _filter_all(logs, group, filterPattern=f'"LIVE {token}"')
            except ClientError:  # the group appears with its first line
                return []
        live = _wait_for("the running invocation's line in FilterLogEvents", seen)
        assert t.is_alive() and "res" not in result  # still running: it waits for us
        status = region.client.status()
        pids = [e["pid"] for c in status["cells"].values() for a in c["agents"].values()
                for e in a["envs"] if name in str(e.get("function"))]
        assert len(pids) == 1
        with open(f"/proc/{pids[0]}/root/tmp/go", "w"):
            pass
    finally:
        t.join(WAIT_S * 2)
    assert result["res"].json() == "released"
    client.close()
    # The live line once (no duplicate when the reply came), the rest after it.
    events = _filter_all(logs, group)
    messages = [e["message"] for e in events]
    assert messages.count(f"LIVE {token}\n") == 1 and f"AFTER {token}\n" in messages
    assert messages.index(f"LIVE {token}\n") < messages.index(f"AFTER {token}\n")
    assert live[0]["eventId"] in {e["eventId"] for e in events}
    # ... and the function's own logs (the /cellcloud/v1 view) hold the whole invocation.
    text = "".join(e["message"] for e in region.client.logs(name, limit=50))
    assert f"LIVE {token}" in text and f"AFTER {token}" in text


def test_cli_logs_tails_and_follows(region: Region, lam: Any) -> None:
    name = _deploy(lam, PRINTS)
    lam.invoke(FunctionName=name, Payload=b'{"n": 1}')
    out = region.cli("logs", name, "--since", "1h", "--filter", "hello").stdout
    assert "hello 1" in out and "oops" not in out and "START" not in out
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} \d{4}/\d\d/\d\d/\[\$LATEST\]"
                     r"[0-9a-f]{32} hello 1$", out, re.M)
    # --follow: a line written after the tail started shows up, each line once.
    proc = subprocess.Popen([sys.executable, "-m", "cellcloud", "logs", name, "--follow",
                             "--interval", "0.5", "--since", "1h", "--filter", "hello",
                             "--state-dir", region.state_dir],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        lines = _lines_of(proc.stdout)
        while not any("hello 1" in line for line in seen):
            seen.append(next(lines))
        lam.invoke(FunctionName=name, Payload=b'{"n": 2}')
        while not any("hello 2" in line for line in seen):
            seen.append(next(lines))
        assert sum("hello 1" in line for line in seen) == 1
    finally:
        proc.terminate()
        proc.wait(WAIT_S)


def _lines_of(stream: Any) -> Iterator[str]:
    """Lines of a child's stdout (read unbuffered), each awaited at most WAIT_S."""
    fd = stream.fileno()
    pending = b""
    while True:
        while b"\n" not in pending:
            ready, _, _ = select.select([fd], [], [], WAIT_S)
            assert ready, f"no line within {WAIT_S} s"
            chunk = os.read(fd, 65536)
            assert chunk, "the tail ended"
            pending += chunk
        line, _, pending = pending.partition(b"\n")
        yield line.decode()


def test_components_log_structured_json(region: Region, lam: Any) -> None:
    """Every line each component wrote is one JSON event with the common fields."""
    name = _deploy(lam, PRINTS)
    lam.invoke(FunctionName=name, Payload=b'{"n": 0}')
    logs_dir = os.path.join(region.state_dir, "logs")
    seen: dict[str, int] = {}
    for fname in sorted(os.listdir(logs_dir)):
        if fname == "supervisor.log":
            continue  # the supervisor's own console output (the CLI's, not a component's)
        with open(os.path.join(logs_dir, fname)) as f:
            for line in f:
                if not line.strip():
                    continue
                doc = json.loads(line)
                assert {"time", "level", "component", "event", "message"} <= set(doc), line
                seen[doc["component"]] = seen.get(doc["component"], 0) + 1
                if doc["component"] == "agent":
                    assert doc["agent"].startswith("cell-1-agent-") and doc["cell"] == "cell-1"
    assert "agent" in seen, seen  # agents log their start (cgroups, network)


def test_json_tail_and_events_under_router_leases(region: Region, lam: Any) -> None:
    """Warm invokes the router runs under a lease (router -> agent) answer the tail in the
    function's JSON format too, and each invocation's lines are filed once."""
    logs = _client(region, "logs")
    name = _deploy(lam, JSON_LOGS, LoggingConfig={"LogFormat": "JSON"})
    before = region.client.status()["router"]["leases"]["leased_invokes"]

    def leased() -> bool:  # (only this test invokes meanwhile: the counter is this function's)
        res = lam.invoke(FunctionName=name, Payload=b'{"n": 0}', LogType="Tail")
        assert '"type": "platform.start"' in base64.b64decode(res["LogResult"]).decode()
        return bool(region.client.status()["router"]["leases"]["leased_invokes"] > before)

    _wait_for("an invocation under a router lease", leased)
    group = f"/aws/lambda/{name}"
    starts = _wait_for("the leased invocations' lines", lambda: [
        e for e in _filter_all(logs, group, filterPattern='{ $.type = "platform.start" }')])
    ids = [json.loads(e["message"])["record"]["requestId"] for e in starts]
    assert len(ids) == len(set(ids))  # each invocation's START once
