"""``cellcloud <component> serve ...``: run one component on its own host.

Each verb hands its arguments to that component's own server (``--listen ADDR`` and the rest),
so a region can be spread over machines with the endpoints file the control plane owns.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
from typing import Annotated

import typer

COMPONENTS = {
    "router": "cellcloud.router.server",
    "frontend": "cellcloud.frontend.server",
    "agent": "cellcloud.agent.server",
    "control": "cellcloud.control.server",
    "dispatcher": "cellcloud.frontend.dispatcher",
}


def _serve(module: str) -> typer.Typer:
    app = typer.Typer(help=f"Run the {module.split('.')[1]} component.", no_args_is_help=True)

    @app.command("serve", context_settings={"allow_extra_args": True,
                                            "ignore_unknown_options": True,
                                            "help_option_names": []})
    def serve(ctx: typer.Context) -> None:
        """Serve this component; arguments are the component's own (try --help)."""
        importlib.import_module(module).main(list(ctx.args))

    return app


def agent_restart(
    name: Annotated[str, typer.Argument(help="Agent name, e.g. cell-1-agent-0")],
    live: Annotated[bool, typer.Option("--live", help="Keep its environments running: the "
                                       "new process adopts them and in-flight invocations "
                                       "complete")] = False,
    state_dir: Annotated[str | None, typer.Option("--state-dir")] = None,
    timeout_s: Annotated[float, typer.Option(help="Seconds to wait")] = 120.0,
) -> None:
    """Restart one agent of the running region (live: without losing an environment)."""
    from .ask import ask_supervisor
    from .supervisor import default_state_dir

    sd = os.path.abspath(state_dir or default_state_dir())
    from .. import cli_progress

    with cli_progress.waiting(f"restarting {name}" + (" (live)" if live else "")):
        result = ask_supervisor(sd, signal.SIGUSR2, "agent-restart-result.json", timeout_s,
                                ("agent-restart.json", {"agent": name, "live": live}))
    if "error" in result:
        typer.echo(result["error"], err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(result))


def mount(app: typer.Typer) -> None:
    for name, module in COMPONENTS.items():
        sub = _serve(module)
        if name == "agent":
            sub.command("restart")(agent_restart)
        app.add_typer(sub, name=name)
