"""Functions' logs as CloudWatch Logs holds them, pure: Lambda's ``LoggingConfig``, log group
and stream names, an invocation's output split into events (one per line), the JSON form of
the platform's lines, level filters, and the CloudWatch Logs API's request bounds.

No I/O and no clock: times come in as arguments (Unix milliseconds).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# LoggingConfig (Lambda's API): LogFormat Text | JSON; levels only with JSON.
LOG_FORMATS = ("Text", "JSON")
APP_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
SYSTEM_LEVELS = ("DEBUG", "INFO", "WARN")
_RANK = {name: i for i, name in enumerate(APP_LEVELS)}
_RANK.update({"WARNING": _RANK["WARN"], "CRITICAL": _RANK["FATAL"]})

# CloudWatch Logs' accepted retention values (PutRetentionPolicy's retentionInDays).
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                  2192, 2557, 2922, 3288, 3653)
DAY_MS = 86_400_000
LOG_GROUP_NAME = re.compile(r"^[\.\-_/#A-Za-z0-9]{1,512}$")
LOG_STREAM_NAME_CHARS_MAX = 512


class LogsError(ValueError):
    """An invalid request to the Logs API or an invalid LoggingConfig: (type, message)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


@dataclass(frozen=True)
class LoggingConfig:
    log_format: str = "Text"
    application_level: str | None = None  # JSON only; None: INFO (Lambda's default)
    system_level: str | None = None  # JSON only; None: INFO
    log_group: str | None = None  # None: /aws/lambda/<name>

    def group_for(self, function_name: str) -> str:
        return self.log_group or f"/aws/lambda/{function_name}"

    def doc(self, function_name: str) -> dict[str, Any]:
        """LoggingConfig as GetFunctionConfiguration shows it."""
        out: dict[str, Any] = {"LogFormat": self.log_format,
                               "LogGroup": self.group_for(function_name)}
        if self.log_format == "JSON":
            out["ApplicationLogLevel"] = self.application_level or "INFO"
            out["SystemLogLevel"] = self.system_level or "INFO"
        return out

    def to_record(self) -> dict[str, Any]:
        return {"log_format": self.log_format, "application_level": self.application_level,
                "system_level": self.system_level, "log_group": self.log_group}

    @classmethod
    def from_record(cls, doc: Any) -> LoggingConfig:
        if not isinstance(doc, dict):
            return cls()
        return cls(str(doc.get("log_format") or "Text"), doc.get("application_level"),
                   doc.get("system_level"), doc.get("log_group"))

    def environment(self) -> dict[str, str]:
        """What the runtime is told (awslambdaric and the built-in runtime read these)."""
        if self.log_format != "JSON":
            return {}
        return {"AWS_LAMBDA_LOG_FORMAT": "JSON",
                "AWS_LAMBDA_LOG_LEVEL": self.application_level or "INFO"}


def logging_config(given: Any, current: LoggingConfig, function_name: str) -> LoggingConfig:
    """A request's ``LoggingConfig`` applied over the current one, checked as Lambda does:
    levels only with LogFormat JSON; a LogGroup name CloudWatch accepts."""
    if given is None:
        return current
    if not isinstance(given, dict):
        raise LogsError("InvalidParameterValueException", "LoggingConfig must be an object")
    fmt = given.get("LogFormat", current.log_format)
    if fmt not in LOG_FORMATS:
        raise LogsError("InvalidParameterValueException",
                        f"LoggingConfig.LogFormat must be one of {list(LOG_FORMATS)}")
    app = given.get("ApplicationLogLevel", current.application_level if fmt == "JSON" else None)
    sysl = given.get("SystemLogLevel", current.system_level if fmt == "JSON" else None)
    if fmt != "JSON" and ("ApplicationLogLevel" in given or "SystemLogLevel" in given):
        raise LogsError("InvalidParameterValueException",
                        "LoggingConfig: to use ApplicationLogLevel or SystemLogLevel, "
                        "LogFormat must be JSON")
    if app is not None and app not in APP_LEVELS:
        raise LogsError("InvalidParameterValueException",
                        f"LoggingConfig.ApplicationLogLevel must be one of {list(APP_LEVELS)}")
    if sysl is not None and sysl not in SYSTEM_LEVELS:
        raise LogsError("InvalidParameterValueException",
                        f"LoggingConfig.SystemLogLevel must be one of {list(SYSTEM_LEVELS)}")
    group = given.get("LogGroup", current.log_group)
    if group is not None:
        if not isinstance(group, str) or not LOG_GROUP_NAME.match(group):
            raise LogsError("InvalidParameterValueException",
                            "LoggingConfig.LogGroup must be 1 to 512 characters of "
                            "[.-_/#A-Za-z0-9]")
        if group == f"/aws/lambda/{function_name}":
            group = None  # the default, stored as such
    return LoggingConfig(fmt, app, sysl, group)


def stream_name(version: str, env_id: str, created_ms: int) -> str:
    """``YYYY/MM/DD/[<version>]<32 hex>`` as Lambda names an environment's stream (the date
    of its creation, UTC; the hex a digest of the environment id)."""
    day = _utc(created_ms).strftime("%Y/%m/%d")
    return f"{day}/[{version}]{hashlib.sha256(env_id.encode()).hexdigest()[:32]}"


def _utc(t_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t_ms // 1000, datetime.UTC)


def iso_ms(t_ms: int) -> str:
    return _utc(t_ms).strftime("%Y-%m-%dT%H:%M:%S") + f".{t_ms % 1000:03d}Z"


_REPORT_FIELDS = {"Duration": "durationMs", "Billed Duration": "billedDurationMs",
                  "Memory Size": "memorySizeMB", "Max Memory Used": "maxMemoryUsedMB",
                  "Init Duration": "initDurationMs"}


def _platform_record(line: str) -> tuple[str, dict[str, Any]] | None:
    """A platform line (START/END/REPORT) as (type, record); None for anything else."""
    if line.startswith("START RequestId: "):
        rest = line[len("START RequestId: "):]
        rid, _, version = rest.partition(" Version: ")
        return "platform.start", {"requestId": rid.strip(), "version": version.strip()}
    if line.startswith("END RequestId: "):
        return "platform.runtimeDone", {"requestId": line[len("END RequestId: "):].strip(),
                                        "status": "success"}
    if line.startswith("REPORT RequestId: "):
        parts = line.rstrip("\n").split("\t")
        metrics: dict[str, Any] = {}
        for part in parts[1:]:
            key, _, value = part.partition(": ")
            name = _REPORT_FIELDS.get(key.strip())
            if name is None:
                continue
            number = value.split(" ")[0]
            try:
                metrics[name] = float(number) if "." in number else int(number)
            except ValueError:
                continue
        return "platform.report", {"requestId": parts[0][len("REPORT RequestId: "):].strip(),
                                   "metrics": metrics, "status": "success"}
    return None


def split_lines(text: str) -> list[str]:
    """One event per line of output (each keeps its newline, as Lambda's events do)."""
    return [line for line in text.splitlines(keepends=True) if line.strip("\r\n")]


def lambda_events(text: str, cfg: LoggingConfig, now_ms: int) -> list[str]:
    """An environment's output as the events CloudWatch would hold under ``cfg``: Text keeps
    every line as it is; JSON turns the platform's lines into JSON records and drops, by
    level, the platform's lines (``SystemLogLevel``) and the application's JSON lines that
    carry a ``level`` (``ApplicationLogLevel``); lines without a level are kept."""
    lines = split_lines(text)
    if cfg.log_format != "JSON":
        return lines
    system_rank = _RANK[cfg.system_level or "INFO"]
    app_rank = _RANK[cfg.application_level or "INFO"]
    out: list[str] = []
    for line in lines:
        platform = _platform_record(line)
        if platform is not None:
            if system_rank > _RANK["INFO"]:
                continue  # the platform's START/END/REPORT are INFO
            kind, record = platform
            out.append(json.dumps({"time": iso_ms(now_ms), "type": kind, "record": record})
                       + "\n")
            continue
        level = _json_level(line)
        if level is not None and _RANK.get(level, app_rank) < app_rank:
            continue
        out.append(line)
    return out


def _json_level(line: str) -> str | None:
    s = line.strip()
    if not s.startswith("{"):
        return None
    try:
        doc = json.loads(s)
    except ValueError:
        return None
    if isinstance(doc, dict):
        level = doc.get("level")
        if isinstance(level, str):
            return level.upper()
    return None


# -- the Logs API's tokens and bounds ---------------------------------------------------------
def encode_token(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_token(token: Any, kind: str) -> dict[str, Any]:
    if not isinstance(token, str) or len(token) > 1024:
        raise LogsError("InvalidParameterException", "The specified nextToken is invalid.")
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error) as e:
        raise LogsError("InvalidParameterException", "The specified nextToken is invalid.") from e
    if not isinstance(doc, dict) or doc.get("k") != kind:
        raise LogsError("InvalidParameterException", "The specified nextToken is invalid.")
    return doc


def get_events_token(token: Any) -> tuple[str, int]:
    """GetLogEvents' ``f/<id>`` (forward) or ``b/<id>`` (backward) tokens."""
    if isinstance(token, str) and len(token) < 64:
        direction, _, ident = token.partition("/")
        if direction in ("f", "b") and ident.isdigit():
            return direction, int(ident)
    raise LogsError("InvalidParameterException", "The specified nextToken is invalid.")


def int_param(req: dict[str, Any], name: str, default: int | None, lo: int,
              hi: int) -> int | None:
    value = req.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LogsError("InvalidParameterException",
                        f"1 validation error detected: Value '{value}' at '{name}' failed to "
                        f"satisfy constraint: Member must have value between {lo} and {hi}")
    return value


def time_range(req: dict[str, Any]) -> tuple[int | None, int | None]:
    """``startTime``/``endTime`` (ms since the epoch), checked as CloudWatch does: not
    negative, the end not before the start. Any range is accepted: what bounds a query is the
    number of events one call scans (``logs_filter_scan_events_max``), not its span."""
    start = int_param(req, "startTime", None, 0, 2**53)
    end = int_param(req, "endTime", None, 0, 2**53)
    if start is not None and end is not None and end < start:
        raise LogsError("InvalidParameterException",
                        "endTime must be greater than or equal to startTime")
    return start, end
