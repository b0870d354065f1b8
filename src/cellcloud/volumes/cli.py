"""``cellcloud storage ...``: run a storage server (volume replicas; docs/volumes.md).

Also ``python -m cellcloud.volumes serve ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated

import typer

app = typer.Typer(help="Storage servers: replicas of block volumes (docs/volumes.md).")


@app.callback()
def _group() -> None:
    """Storage servers: replicas of block volumes."""


@app.command("serve")
def serve_cmd(
    server_id: Annotated[str, typer.Option("--id", help="this server's id (in servers files)")],
    state_dir: Annotated[str, typer.Option("--state-dir", help="replicas and epochs live here")],
    listen: Annotated[str, typer.Option(help="host:port (port 0: any)")] = "127.0.0.1:0",
    pki_dir: Annotated[str, typer.Option(
        help="the region's PKI directory: speak mutual TLS as role 'storage' (accepting "
             "only 'volume' and 'control' peers)")] = "",
    region: Annotated[str, typer.Option(help="region name in the certificates")] = "cc-local-1",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="development only: plain-text links (the supervisor's flag; the "
        "same as no --pki-dir)")] = False,
) -> None:
    """Serve volume replicas: answers reads, writes and fences; never calls anyone. Prints
    ``READY host port`` on stdout once it listens (under the region's supervisor: its ready
    line on ``CELLCLOUD_READY_FD`` instead)."""
    import os

    from cellcloud import runtime, transport
    from cellcloud.security import pki
    from cellcloud.volumes.server import serve

    if pki_dir and not insecure:
        transport.enable_mtls(pki.tls_config(pki_dir, region, "storage", "storage", server_id),
                              "storage")

    host, _, port = listen.rpartition(":")

    def ready(h: str, p: int) -> None:
        if "CELLCLOUD_READY_FD" in os.environ:
            runtime.announce_ready({"host": h, "port": p, "server": server_id})
        else:
            print(f"READY {h} {p}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(server_id, state_dir, host or "127.0.0.1", int(port), ready))
    sys.exit(0)

