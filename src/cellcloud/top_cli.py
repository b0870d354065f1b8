"""``cellcloud top``: a live terminal view of the region, from its ``/metrics`` and status.

Every frame is two reads with the operator's token: ``GET /metrics`` (the cells' Prometheus
text, parsed with ``prometheus_client.parser``) and ``GET /cellcloud/v1/status`` (what
``cellcloud status --json`` shows). Rates are the counters' change between two scrapes over
the time between them; p50/p99 come from the duration histogram's buckets (interpolated within
a bucket, as Prometheus' ``histogram_quantile`` does), over the window when it saw
invocations, else since the cells started. ``--once`` prints one frame (two scrapes
``--interval`` apart) and exits; without it the frame is redrawn every ``--interval`` seconds
until Ctrl-C (off a terminal: printed, one frame after another).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

from . import sdk
from .region.supervisor import default_state_dir

Key = tuple[str, str]  # (account, function)


@dataclass
class FunctionSample:
    invocations: float = 0.0
    errors: float = 0.0
    throttles: float = 0.0
    concurrent: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class Scrape:
    at_s: float
    functions: dict[Key, FunctionSample]


def parse_metrics(text: str, at_s: float) -> Scrape:
    """One scrape of the region's exposition, summed over cells, per (account, function)."""
    out: dict[Key, FunctionSample] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            fn = s.labels.get("function")
            if fn is None:
                continue
            f = out.setdefault((s.labels.get("account", ""), fn), FunctionSample())
            if s.name == "cellcloud_invocations_total":
                f.invocations += s.value
            elif s.name == "cellcloud_function_errors_total":
                f.errors += s.value
            elif s.name == "cellcloud_throttles_total":
                f.throttles += s.value
            elif s.name == "cellcloud_concurrent_executions":
                f.concurrent += s.value
            elif s.name == "cellcloud_invocation_duration_seconds_bucket":
                le = float(s.labels["le"])
                f.buckets[le] = f.buckets.get(le, 0.0) + s.value
    return Scrape(at_s, out)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile``: the q-quantile of cumulative buckets (le -> count); None when
    they hold nothing."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


@dataclass
class FunctionRow:
    account: str
    function: str
    rate_per_s: float | None
    invocations: int
    errors: int
    throttles: int
    p50_s: float | None
    p99_s: float | None
    concurrent: int


def function_rows(now: Scrape, before: Scrape | None) -> list[FunctionRow]:
    rows = []
    dt = (now.at_s - before.at_s) if before is not None else 0.0
    for key, f in sorted(now.functions.items()):
        old = before.functions.get(key) if before is not None else None
        rate = None
        window = f.buckets
        if before is not None and dt > 0:
            rate = max(0.0, f.invocations - (old.invocations if old else 0.0)) / dt
            if old is not None:
                delta = {le: c - old.buckets.get(le, 0.0) for le, c in f.buckets.items()}
                if delta and max(delta.values()) > 0:
                    window = delta
            elif f.buckets:
                window = f.buckets
        rows.append(FunctionRow(key[0], key[1], rate, int(f.invocations), int(f.errors),
                                int(f.throttles), quantile(0.5, window), quantile(0.99, window),
                                int(f.concurrent)))
    return rows


@dataclass
class AgentRow:
    cell: str
    agent: str
    state: str  # "ok" | "failed"
    envs: int
    busy: int
    detail: str = ""


def agent_rows(status: dict[str, Any]) -> list[AgentRow]:
    rows = []
    for cell_id, cell in sorted((status.get("cells") or {}).items()):
        if "error" in cell:
            rows.append(AgentRow(cell_id, "-", "failed", 0, 0, str(cell["error"])[:80]))
            continue
        failed = (cell.get("shards") or {}).get("failed_agents") or {}
        for agent_id, a in sorted((cell.get("agents") or {}).items()):
            envs = a.get("envs") or []
            if "error" in a or agent_id in failed:
                why = a.get("error") or (failed.get(agent_id) or {}).get("error", "")
                rows.append(AgentRow(cell_id, agent_id, "failed", len(envs),
                                     sum(bool(e.get("busy")) for e in envs), str(why)[:80]))
            else:
                rows.append(AgentRow(cell_id, agent_id, "ok", len(envs),
                                     sum(bool(e.get("busy")) for e in envs)))
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def render(fns: list[FunctionRow], agents: list[AgentRow], endpoint: str,
           window_s: float | None) -> Group:
    title = f"functions ({endpoint}" + (f", rate over {window_s:.1f} s)" if window_s else ")")
    ft = Table("account", "function", "rate/s", "invocations", "errors", "throttles",
               "p50", "p99", "concurrency", title=title)
    for r in fns:
        ft.add_row(r.account, r.function, "-" if r.rate_per_s is None else f"{r.rate_per_s:.2f}",
                   str(r.invocations), str(r.errors), str(r.throttles), _ms(r.p50_s),
                   _ms(r.p99_s), str(r.concurrent))
    at = Table("cell", "agent", "state", "envs", "busy", "detail", title="agents")
    for a in agents:
        at.add_row(a.cell, a.agent, a.state if a.state == "ok" else f"[red]{a.state}[/red]",
                   str(a.envs), str(a.busy), a.detail)
    return Group(ft, at)


class _Source:
    """The region's two reads, with the operator's token."""

    def __init__(self, state_dir: str) -> None:
        self.client = sdk.Client.from_region(state_dir)
        if not self.client.operator_token:
            raise sdk.CellcloudError(403, "Forbidden", "top needs the operator token "
                                     "(operator.json in the state directory)")

    def scrape(self) -> Scrape:
        status, _, body = self.client.request(
            "GET", "/metrics", headers={"authorization": f"Bearer {self.client.operator_token}"},
            sign=False)
        if status != 200:
            raise sdk.CellcloudError(status, "MetricsUnavailable", body.decode()[:200])
        return parse_metrics(body.decode(), time.monotonic())

    def frame(self, before: Scrape | None) -> tuple[Group, Scrape]:
        now = self.scrape()
        st = self.client.status()
        window = (now.at_s - before.at_s) if before is not None else None
        return render(function_rows(now, before), agent_rows(st), self.client.endpoint,
                      window), now


def top(state_dir: Annotated[str | None, typer.Option("--state-dir")] = None,
        once: Annotated[bool, typer.Option("--once", help="Print one frame and exit")] = False,
        interval: Annotated[float, typer.Option(help="Seconds between frames")] = 2.0) -> None:
    """A live view: per-function rate, errors, throttles, p50/p99 duration, concurrency;
    agents with their environments and failed state."""
    from rich.live import Live

    sd = os.path.abspath(state_dir or default_state_dir())
    interval = min(max(interval, 0.1), 60.0)
    # Not a terminal (a pipe, a test): plain text, wide enough that no row wraps.
    console = Console() if Console().is_terminal else Console(width=200, no_color=True)
    try:
        src = _Source(sd)
        before = src.scrape()
        if once:
            time.sleep(interval)  # the window the rates are measured over
            group, _ = src.frame(before)
            console.print(group)
            return
        group, before = src.frame(None)
        if not console.is_terminal:  # a pipe: frame after frame, as plain text
            while True:
                console.print(group)
                time.sleep(interval)
                group, before = src.frame(before)
        with Live(group, console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                group, before = src.frame(before)
                live.update(group, refresh=True)
    except sdk.CellcloudError as e:
        Console(stderr=True).print(f"[red]{e.type}[/red]: {e.message}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return
