"""Structured logs for every component: one JSON object per line per event, through the
standard ``logging`` module and this one formatter.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``component`` (router,
frontend, dispatcher, agent, control, store, network, zygote), ``event`` (a stable name: the
record's ``event`` extra, else its message template), ``message`` (rendered), ``logger`` and
``pid``; and, where known, ``request_id``, ``function``, ``version``, ``cell``, ``agent``,
``env`` — from the process (``setup(component, cell=..., agent=...)``) or from the record::

    log.warning("agent %s unreachable", agent_id, extra=fields(event="agent_lost",
                                                               agent=agent_id))

``CELLCLOUD_LOG_FORMAT=text`` switches a process back to one human line per event;
``CELLCLOUD_LOG_LEVEL`` sets the level (INFO by default).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

#: the context fields a line may carry, in this order
CONTEXT = ("request_id", "function", "version", "cell", "agent", "env", "node")


def fields(**kw: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name and context (None values left out)."""
    return {k: v for k, v in kw.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, **context: Any) -> None:
        super().__init__()
        self.component = component
        self.context = {k: v for k, v in context.items() if v is not None}

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "component": self.component,
            "event": getattr(record, "event", None) or str(record.msg),
            "message": record.getMessage(),
            "logger": record.name,
            "pid": record.process,
        }
        for key in CONTEXT:
            value = getattr(record, key, None)
            if value is None:
                value = self.context.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)[-4000:]
        return json.dumps(doc, default=str)


def line(component: str, level: str, event: str, message: str, **context: Any) -> str:
    """One event as a JSON line, for a process that must not configure ``logging`` (the
    zygote: the environments it forks would inherit the handler)."""
    record = logging.LogRecord("cellcloud." + component, logging.getLevelName(level), "", 0,
                               message, None, None)
    record.event = event
    return JsonFormatter(component, **context).format(record) + "\n"


def setup(component: str, **context: Any) -> None:
    """The process's root logger: JSON lines on stderr (the supervisor files them under
    ``<state>/logs/``), at ``CELLCLOUD_LOG_LEVEL``."""
    level = os.environ.get("CELLCLOUD_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("CELLCLOUD_LOG_FORMAT", "json").lower() == "text":
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {component}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(component, **context))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
