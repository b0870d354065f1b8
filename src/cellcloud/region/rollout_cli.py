"""``cellcloud rollout``: restart the region's cells in waves (see Supervisor.rollout)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .supervisor import default_state_dir


def rollout(state_dir: Annotated[str | None, typer.Option("--state-dir")] = None,
            timeout_s: Annotated[float, typer.Option(help="Seconds to wait in all")] = 600.0
            ) -> None:
    """Restart every cell's processes, cell by cell; stop at the first unhealthy cell."""
    sd = os.path.abspath(state_dir or default_state_dir())
    try:
        with open(os.path.join(sd, "region.json")) as f:
            pid = int(json.load(f)["supervisor_pid"])
    except (OSError, ValueError, KeyError):
        typer.echo("No region is running.", err=True)
        raise typer.Exit(2) from None
    out = os.path.join(sd, "rollout.json")
    if os.path.exists(out):
        os.unlink(out)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(out):  # the supervisor writes it atomically when done
        if time.monotonic() > deadline:
            typer.echo("the rollout did not finish in time", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)
    with open(out) as f:
        report = json.load(f)
    table = Table("cell", "restarted", "healthy", "seconds", title="rollout")
    for c in report["cells"]:
        table.add_row(c["cell"], ", ".join(c["restarted"]), "yes" if c["healthy"] else "NO",
                      str(c["seconds"]))
    Console().print(table)
    if not report["ok"]:
        typer.echo(f"stopped at unhealthy cell {report['stopped_at']}", err=True)
        raise typer.Exit(1)
