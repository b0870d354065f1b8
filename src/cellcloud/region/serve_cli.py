"""``cellcloud <component> serve ...``: run one component on its own host.

Each verb hands its arguments to that component's own server (``--listen ADDR`` and the rest),
so a region can be spread over machines with the endpoints file the control plane owns.
"""

from __future__ import annotations

import importlib

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


def mount(app: typer.Typer) -> None:
    for name, module in COMPONENTS.items():
        app.add_typer(_serve(module), name=name)
