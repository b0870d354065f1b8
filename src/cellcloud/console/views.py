"""What the console's pages show, shaped from the region's public reads: pure functions, no
I/O (the region's status document, the operator's Prometheus exposition, the cells' queue
and async reads go in; JSON-ready documents come out)."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ACCOUNT_RE = re.compile(r"^[0-9]{12}$")
# A function's name as Lambda allows it (no ARN: the console names account and name apart).
FUNCTION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STORE_CELL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def agent_state(agent_id: str, doc: dict[str, Any], cell: dict[str, Any]) -> str:
    """The cell's own view, the authority (its 2 s liveness poll of each agent): ``failed``
    when it holds the agent down or lost (out of every shard), or when the cell does not
    list the agent at all and its status read failed; ``up`` otherwise. A full status read
    that timed out on an agent the cell still polls is shown apart (``status_error``): under
    load an agent's full status can be slower than its liveness answer."""
    if agent_id in (cell.get("shards") or {}).get("failed_agents", {}):
        return "failed"
    placed = ((cell.get("placement") or {}).get("agents") or {}).get(agent_id)
    if placed is not None:
        return "up" if placed.get("up", True) else "failed"
    return "failed" if "error" in doc else "up"


def _env(e: dict[str, Any]) -> dict[str, Any]:
    key = str(e.get("function_key", ""))
    parts = key.split("/")
    return {"env_id": e.get("env_id"), "function": e.get("function"),
            "account": parts[0] if len(parts) > 1 else None,
            "version": parts[2] if len(parts) > 2 else None,
            "pid": e.get("pid"), "busy": bool(e.get("busy")),
            "invocations": e.get("invocations", 0), "memory_bytes": e.get("memory_bytes", 0)}


def region_map(status: dict[str, Any]) -> dict[str, Any]:
    """cells → agents → environments (the shape of ``cellcloud status --json``), each agent
    marked up or failed, and each cell's shards (``account/function`` → agents)."""
    cells = []
    for cell_id, cell in sorted((status.get("cells") or {}).items()):
        if "error" in cell:
            cells.append({"cell_id": cell_id, "error": str(cell["error"]), "agents": [],
                          "shards": {}})
            continue
        placed = (cell.get("placement") or {}).get("agents") or {}
        ids = sorted(set(cell.get("agents") or {}) | set(placed))
        agents = []
        for agent_id in ids:
            doc = (cell.get("agents") or {}).get(agent_id, {"error": "no status"})
            agents.append({
                "agent_id": agent_id,
                "state": agent_state(agent_id, doc, cell),
                "status_error": doc.get("error"),
                "backend": doc.get("backend"),
                "pid": doc.get("pid"),
                "envs_max": doc.get("envs_max"),
                "envs": [_env(e) for e in doc.get("envs") or []],
            })
        shards = cell.get("shards") or {}
        cells.append({"cell_id": cell_id, "agents": agents,
                      "shards": dict(shards.get("functions") or {}),
                      "sharding": shards.get("sharding"), "k": shards.get("k"),
                      "failed_agents": sorted(shards.get("failed_agents") or {})})
    router = status.get("router") or {}
    return {"cells": cells,
            "router": {"pid": router.get("pid"), "cell_map_version": router.get("cell_map_version"),
                       "cell_map": router.get("cell_map")}}


def shard_of(region: dict[str, Any], account: str, name: str) -> dict[str, Any] | None:
    """The cell and agents of one function's shard on the map (None before its first
    placement)."""
    key = f"{account}/{name}"
    for cell in region["cells"]:
        if key in cell["shards"]:
            return {"cell_id": cell["cell_id"], "agents": list(cell["shards"][key]), "key": key}
    return None


_COUNTERS = {
    "cellcloud_invocations_total": "invocations",
    "cellcloud_function_errors_total": "errors",
    "cellcloud_throttles_total": "throttles",
    "cellcloud_cold_starts_total": "cold_starts",
    "cellcloud_invocation_duration_seconds_sum": "duration_sum_s",
    "cellcloud_invocation_duration_seconds_count": "duration_count",
    "cellcloud_concurrent_executions": "concurrent",
    "cellcloud_async_queue_depth": "async_depth",
}


def metrics_summary(text: str) -> dict[str, Any]:
    """Per (account, function) and region-wide totals of the counters the charts turn into
    rates (the page keeps the previous sample: rate = Δcount / Δt, mean latency = Δsum /
    Δcount), plus environments by state and agents failed."""
    funcs: dict[tuple[str, str], dict[str, float]] = {}
    totals = {v: 0.0 for v in _COUNTERS.values()}
    envs: dict[str, float] = {}
    agents = failed = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            field = _COUNTERS.get(s.name)
            if field is not None:
                key = (s.labels.get("account", ""), s.labels.get("function", ""))
                row = funcs.setdefault(key, {v: 0.0 for v in _COUNTERS.values()})
                row[field] += s.value
                totals[field] += s.value
            elif s.name == "cellcloud_environments":
                state = s.labels.get("state", "")
                envs[state] = envs.get(state, 0.0) + s.value
            elif s.name == "cellcloud_agents":
                agents += s.value
            elif s.name == "cellcloud_agents_failed":
                failed += s.value
    return {"totals": totals,
            "functions": [{"account": a, "function": f, **row}
                          for (a, f), row in sorted(funcs.items())],
            "environments": envs, "agents": agents, "agents_failed": failed}


def invocations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log events grouped by invocation (request id), newest first."""
    out: dict[str, dict[str, Any]] = {}
    for ev in events:
        rid = str(ev.get("requestId") or "")
        row = out.setdefault(rid, {"request_id": rid, "timestamp": ev.get("timestamp", 0),
                                   "lines": []})
        row["timestamp"] = max(row["timestamp"], ev.get("timestamp", 0))
        row["lines"] += str(ev.get("message", "")).rstrip("\n").split("\n")
    return sorted(out.values(), key=lambda r: r["timestamp"], reverse=True)


def queue_row(url: str, attrs: dict[str, str]) -> dict[str, Any]:
    """One SQS queue as the queues page shows it (its dead-letter target, if any)."""
    dlq = None
    if attrs.get("RedrivePolicy"):
        try:
            dlq = json.loads(attrs["RedrivePolicy"]).get("deadLetterTargetArn")
        except (ValueError, AttributeError):
            dlq = None
    return {"url": url, "name": url.rstrip("/").rsplit("/", 1)[-1],
            "arn": attrs.get("QueueArn"),
            "visible": int(attrs.get("ApproximateNumberOfMessages", 0) or 0),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0) or 0),
            "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0) or 0),
            "dead_letter_target": dlq}


def mark_dead_letter_queues(queues: list[dict[str, Any]],
                            functions: list[dict[str, Any]]) -> None:
    """Name, on each queue, who sends it what it gives up on: queues whose redrive policy and
    functions whose ``DeadLetterConfig`` target it."""
    for q in queues:
        q["dead_letter_for"] = sorted(
            [o["name"] for o in queues if o.get("dead_letter_target") == q.get("arn")]
            + [f"function {f['name']}" for f in functions
               if q.get("arn") and f.get("dead_letter_target") == q.get("arn")])
