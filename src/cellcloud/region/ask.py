"""Asking the running supervisor to do something (rollout, an agent restart): the request and
the answer are files in the state directory, the nudge a signal. The supervisor writes the
answer atomically (rename), so its appearance is the completion."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import typer


def ask_supervisor(state_dir: str, sig: signal.Signals, answer: str, timeout_s: float,
                   request: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir, "region.json")) as f:
            pid = int(json.load(f)["supervisor_pid"])
    except (OSError, ValueError, KeyError):
        typer.echo("No region is running.", err=True)
        raise typer.Exit(2) from None
    answer_path = os.path.join(state_dir, answer)
    if os.path.exists(answer_path):
        os.unlink(answer_path)
    if request is not None:
        with open(os.path.join(state_dir, request[0]), "w") as f:
            json.dump(request[1], f)
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(answer_path):
        if time.monotonic() > deadline:
            typer.echo("the supervisor did not answer in time", err=True)
            raise typer.Exit(1)
        time.sleep(0.1)  # polling for the answer file, bounded by the deadline
    with open(answer_path) as f:
        doc: dict[str, Any] = json.load(f)
    return doc
