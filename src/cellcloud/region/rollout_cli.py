"""``cellcloud rollout``: restart the region's cells in waves (see Supervisor.rollout)."""

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
            timeout_s: Annotated[float, typer.Option(help="Seconds to wait in all")] = 600.0
            ) -> None:
    """Restart every cell's processes, cell by cell; stop at the first unhealthy cell."""
    sd = os.path.abspath(state_dir or default_state_dir())
    with cli_progress.waiting("rolling out, cell by cell"):
        report = ask_supervisor(sd, signal.SIGUSR1, "rollout.json", timeout_s)
    table = Table("cell", "restarted", "healthy", "seconds", title="rollout")
    for c in report["cells"]:
        table.add_row(c["cell"], ", ".join(c["restarted"]), "yes" if c["healthy"] else "NO",
                      str(c["seconds"]))
    Console().print(table)
    if not report["ok"]:
        typer.echo(f"stopped at unhealthy cell {report['stopped_at']}", err=True)
        raise typer.Exit(1)
