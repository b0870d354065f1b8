"""``cellcloud <component> serve ...``: run one component on its own host.

Each verb hands its arguments to that component's own server (``--listen ADDR`` and the rest),
so a region can be spread over machines with the endpoints file the control plane owns.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import time
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
    from .supervisor import default_state_dir

    sd = os.path.abspath(state_dir or default_state_dir())
    try:
        with open(os.path.join(sd, "region.json")) as f:
            pid = int(json.load(f)["supervisor_pid"])
    except (OSError, ValueError, KeyError):
        typer.echo("No region is running.", err=True)
        raise typer.Exit(2) from None
    result_path = os.path.join(sd, "agent-restart-result.json")
    if os.path.exists(result_path):
        os.unlink(result_path)
    with open(os.path.join(sd, "agent-restart.json"), "w") as f:
        json.dump({"agent": name, "live": live}, f)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(result_path):  # written atomically by the supervisor when done
        if time.monotonic() > deadline:
            typer.echo("the restart did not finish in time", err=True)
            raise typer.Exit(1)
        time.sleep(0.1)
    with open(result_path) as f:
        result = json.load(f)
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
