"""``cellcloud attest``: fetch an attestation document and check one offline."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from typing import Annotated

import typer

from .security import attestation

app = typer.Typer(help="Attestation documents: which code exactly runs a function.",
                  no_args_is_help=True)


@app.command("get")
def get(name: Annotated[str, typer.Argument(help="Function name")],
        nonce: Annotated[str | None, typer.Option(help="Your nonce (default: a random one)")] = None,
        qualifier: Annotated[str | None, typer.Option()] = None,
        state_dir: Annotated[str | None, typer.Option("--state-dir")] = None) -> None:
    """Ask a running environment of NAME for a document bound to a nonce; prints it as JSON."""
    from .sdk import CellcloudError, Client

    nonce = nonce or secrets.token_hex(16)
    try:
        doc = Client.from_region(state_dir).attestation(name, nonce, qualifier)
    except CellcloudError as e:
        typer.echo(f"{e.type}: {e.message}", err=True)
        raise typer.Exit(1) from None
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


@app.command("verify")
def verify(document: Annotated[str, typer.Argument(help="A document file (- for stdin)")],
           ca: Annotated[str | None, typer.Option(help="The region CA certificate (PEM)")] = None,
           nonce: Annotated[str | None, typer.Option(help="The nonce it must carry")] = None,
           bundle: Annotated[str | None, typer.Option(
               help="The code you expect: a .zip or a directory")] = None,
           state_dir: Annotated[str | None, typer.Option("--state-dir")] = None) -> None:
    """Check a document offline: CA chain, agent role, signature, nonce, expected code."""
    from .region.supervisor import default_state_dir

    text = sys.stdin.read() if document == "-" else open(document).read()
    ca_path = ca or os.path.join(state_dir or default_state_dir(), "pki", "ca.pem")
    with open(ca_path, "rb") as f:
        ca_pem = f.read()
    expect = {}
    if bundle:
        expect["bundle"] = _measure_expected(bundle)
    try:
        m = attestation.verify(json.loads(text), ca_pem, nonce=nonce, expect=expect)
    except (attestation.AttestationError, ValueError) as e:
        typer.echo(f"INVALID: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo("valid: signed by a region agent" + (", nonce matches" if nonce else "")
               + (", bundle matches" if bundle else ""))
    for key, value in m.items():
        typer.echo(f"  {key:8} {value}")


def _measure_expected(path: str) -> str:
    if os.path.isdir(path):
        return attestation.measure_tree(path)
    from .sandbox.unpack import extract_zip

    tmp = tempfile.mkdtemp()
    try:
        with open(path, "rb") as f:
            extract_zip(f.read(), os.path.join(tmp, "b"))
        return attestation.measure_tree(os.path.join(tmp, "b"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
