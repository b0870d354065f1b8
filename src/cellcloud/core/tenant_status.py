"""What a tenant may see of a cell's status: its own environments and functions, nothing else.

A cell's full status (the frontend's ``status`` op) names every account's functions, every
environment's pid and uid, every process id and counter; that is for the operator. A signed
tenant request gets this view instead: the same shape (cells -> agents -> environments with
function and pid), keeping only entries whose placement key starts with the tenant's account id
(``<account>/<function>/<version>/<revision>``). Pure: a dict in, a dict out.
"""

from __future__ import annotations

from typing import Any


def _own(key: Any, prefix: str) -> bool:
    return isinstance(key, str) and key.startswith(prefix)


def cell_status_for_tenant(cell: dict[str, Any], account: str) -> dict[str, Any]:
    prefix = f"{account}/"
    agents: dict[str, Any] = {}
    for agent_id, agent in (cell.get("agents") or {}).items():
        if not isinstance(agent, dict):
            continue
        view: dict[str, Any] = {"agent_id": agent.get("agent_id", agent_id)}
        if "error" in agent:
            view["error"] = "unavailable"
        view["envs"] = [e for e in agent.get("envs") or []
                        if isinstance(e, dict) and _own(e.get("function_key"), prefix)]
        agents[agent_id] = view
    backlog = ((cell.get("async") or {}).get("backlog") or []) if isinstance(
        cell.get("async"), dict) else []
    shards = ((cell.get("shards") or {}).get("functions") or {}) if isinstance(
        cell.get("shards"), dict) else {}
    throttled = ((cell.get("poison") or {}).get("throttled") or []) if isinstance(
        cell.get("poison"), dict) else []
    out: dict[str, Any] = {
        "cell_id": cell.get("cell_id"),
        "agents": agents,
        "async": {"backlog": [b for b in backlog
                              if isinstance(b, dict) and b.get("account") == account]},
        "shards": {"functions": {k: v for k, v in shards.items() if _own(k, prefix)}},
        "poison": {"throttled": [k for k in throttled if _own(k, prefix)]},
    }
    if "error" in cell:
        out["error"] = "unavailable"
    return out
