"""``cellcloud rollout``: deploy a build to the region's cells in waves (Supervisor.rollout)."""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import cli_progress
from .ask import ask_supervisor
from .supervisor import default_state_dir


def rollout(state_dir: Annotated[str | None, typer.Option("--state-dir")] = None,
            to: Annotated[str | None, typer.Option(
                "--to", help="a directory holding the new build (a cellcloud source tree: "
                             "<dir>/src/cellcloud); default: restart on the running build")
            ] = None,
            bake_s: Annotated[float, typer.Option(
                "--bake-s", help="seconds each wave serves before it is judged against "
                                 "the other cells (a regression rolls back)")] = 0.0,
            first: Annotated[int, typer.Option("--first-wave",
                                               help="cells in the first wave")] = 1,
            growth: Annotated[int, typer.Option(
                "--growth", help="each later wave is this many times the previous")] = 2,
            components: Annotated[str, typer.Option(
                "--components", help="what to roll out, comma-separated: cells (wave by "
                                     "wave), router (replaced live on its listening socket), "
                                     "control (drained); router and control go after every "
                                     "cell, a wave each")] = "cells,router,control",
            timeout_s: Annotated[float, typer.Option(help="Seconds to wait in all")] = 900.0
            ) -> None:
    """Deploy cell by cell (one cell, then growing waves): agents handed over live,
    frontends drained, health and error rates checked after each wave, rolled back on a
    regression; then the router (a new process on the same listening socket, the old one
    drained) and the control plane (drained), a wave each. A rollout interrupted by the supervisor's crash: run it again (without --to)
    to resume it or finish its rollback."""
    sd = os.path.abspath(state_dir or default_state_dir())
    parts = [c.strip() for c in components.split(",") if c.strip()]
    unknown = sorted(set(parts) - {"cells", "router", "control"})
    if not parts or unknown:
        typer.echo(f"--components takes cells, router, control (got {components!r})", err=True)
        raise typer.Exit(2)
    req = {"to": os.path.abspath(to) if to else None, "bake_s": bake_s, "first": first,
           "growth": growth, "components": parts}
    with cli_progress.waiting("rolling out, wave by wave"):
        report = ask_supervisor(sd, signal.SIGUSR1, "rollout.json", timeout_s,
                                request=("rollout-request.json", req))
    if report.get("error") and not report.get("waves"):
        typer.echo(f"rollout refused: {report['error']}", err=True)
        raise typer.Exit(1)
    table = Table("wave", "step", "cells", "healthy", "seconds", "served", "failed", "verdict",
                  title=f"rollout to {report.get('target') or 'the running build'} "
                        f"(version {report.get('version')})")
    for i, w in enumerate(report["waves"], 1):
        table.add_row(str(i), w["step"], ", ".join(w["cells"]), "yes" if w["healthy"] else "NO",
                      str(w["seconds"]), str(w["served"]), str(w["failed"]), w.get("verdict", ""))
    Console().print(table)
    if not report["ok"]:
        typer.echo(f"rollout {report.get('status')}: {report.get('reason') or report.get('error')}",
                   err=True)
        raise typer.Exit(1)
