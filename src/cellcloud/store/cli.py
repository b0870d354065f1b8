"""``cellcloud store ...``: run a colony, create cells, read and write, look at health.

Mounted by the main CLI as ``cellcloud store``; also ``python -m cellcloud.store``.
Values on the command line: ``int:5``, ``bool:true``, ``hex:00ff``, anything else is UTF-8
bytes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cellcloud.store.colony import Colony, spawn_node, wait_ready

app = typer.Typer(help="Physalia-style configuration store: a colony of tiny Paxos cells.")
console = Console()

ColonyOpt = Annotated[str, typer.Option("--colony", "-c", help="colony file (JSON)")]


def parse_value(text: str) -> Any:
    if text.startswith("int:"):
        return int(text[4:])
    if text.startswith("bool:"):
        v = text[5:].lower()
        if v not in ("true", "false"):
            raise typer.BadParameter("bool:true or bool:false")
        return v == "true"
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    if text == "none":
        return None
    return text.encode()


def show_value(v: Any) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return "hex:" + v.hex()
    return repr(v)


def _client(colony: str) -> Any:
    from cellcloud.store.client import StoreClient

    return StoreClient.from_file(colony)


async def _with_client(colony: str, fn: Any) -> Any:
    client = _client(colony)
    try:
        return await fn(client)
    finally:
        await client.close()


@app.command()
def node(
    colony: ColonyOpt,
    node: Annotated[str, typer.Option(help="node id in the colony file")],
    data_dir: Annotated[str, typer.Option(help="directory for the node's SQLite file")] = ".",
) -> None:
    """Run one store node in the foreground (prints READY when it accepts connections)."""
    from cellcloud.store.node import main

    main(colony, node, data_dir, bug_skip_fsync=os.environ.get("CELLCLOUD_BUG_SKIP_FSYNC") == "1")


@app.command()
def up(
    data_dir: Annotated[str, typer.Option(help="where the colony file and databases go")],
    nodes: Annotated[int, typer.Option(help="number of store nodes")] = 7,
    base_port: Annotated[int, typer.Option(help="first TCP port on loopback")] = 7400,
) -> None:
    """Start a colony of store nodes on loopback and wait (Ctrl-C stops them)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "colony.json")
    if os.path.exists(path):
        col = Colony.load(path)
    else:
        col = Colony.local(nodes, base_port)
        col.save(path)
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in col.node_ids():
            p = spawn_node(path, n, data_dir)
            procs.append(p)
            console.print(wait_ready(p))
        console.print(f"colony up: {len(procs)} nodes; colony file {path}")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


@app.command("create-cell")
def create_cell(
    colony: ColonyOpt,
    cell: str,
    replicas: Annotated[int, typer.Option(help="odd number of replicas")] = 7,
    near: Annotated[str | None, typer.Option(help="client zone to place near")] = None,
) -> None:
    """Create a cell, placed near a client zone with no majority in one rack/power domain."""
    from cellcloud.store.placement import PlacementError

    try:
        members = asyncio.run(
            _with_client(colony, lambda c: c.create_cell(cell, near_zone=near, replicas=replicas))
        )
    except PlacementError as exc:
        console.print(f"[red]placement failed:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"{cell}: {' '.join(members)}")


@app.command()
def get(colony: ColonyOpt, cell: str, key: str) -> None:
    """Read a key (linearizable)."""
    v = asyncio.run(_with_client(colony, lambda c: c.get(cell, key)))
    console.print(show_value(v) if v is not None else "(absent)")


@app.command()
def put(colony: ColonyOpt, cell: str, key: str, value: str) -> None:
    """Write a key."""
    asyncio.run(_with_client(colony, lambda c: c.put(cell, key, parse_value(value))))
    console.print("ok")


@app.command()
def cas(colony: ColonyOpt, cell: str, key: str, expected: str, value: str) -> None:
    """Compare-and-set (``none`` as expected means absent; as value, delete)."""
    ok = asyncio.run(
        _with_client(colony, lambda c: c.cas(cell, key, parse_value(expected), parse_value(value)))
    )
    console.print("ok" if ok else "[yellow]compare failed[/yellow]")
    if not ok:
        raise typer.Exit(1)


@app.command()
def members(colony: ColonyOpt, cell: str) -> None:
    """Show a cell's members and each replica's role and progress."""

    async def go(c: Any) -> dict[str, Any]:
        return dict(await c.cell_status(cell))

    status = asyncio.run(_with_client(colony, go))
    table = Table("node", "role", "ballot", "commit", "members")
    for node_id, st in sorted(status.items()):
        if st is None:
            table.add_row(node_id, "[red]unreachable[/red]", "", "", "")
        else:
            table.add_row(
                node_id,
                st["role"],
                str(st["ballot"]),
                str(st["commit_index"]),
                " ".join(st["members"]),
            )
    console.print(table)


@app.command()
def replace(colony: ColonyOpt, cell: str, remove: str, add: str) -> None:
    """Replace one replica of a cell (drained or dead node) with a new one."""
    ok = asyncio.run(_with_client(colony, lambda c: c.add_replica(cell, remove, add)))
    console.print("ok" if ok else "[red]refused[/red] (another change in progress?)")


@app.command()
def health(colony: ColonyOpt) -> None:
    """Ping every node and show its counters."""
    col = Colony.load(colony)

    async def go(c: Any) -> dict[str, Any]:
        return {n: await c.node_stats(n) for n in col.node_ids()}

    stats = asyncio.run(_with_client(colony, go))
    table = Table("node", "up", "cells", "loaded", "requests", "fsync batches", "bad hmac")
    for n, s in stats.items():
        if s is None:
            table.add_row(n, "[red]no[/red]", "", "", "", "", "")
            continue
        k = s["counters"]
        table.add_row(
            n,
            "yes",
            str(s["cells"]),
            str(s["replicas_loaded_now"]),
            str(k["requests"]),
            str(k["fsync_batches"]),
            str(k["frames_unauthenticated"]),
        )
    console.print(table)


@app.command()
def sim(
    seeds: Annotated[int, typer.Option(help="number of seeds")] = 500,
    start: Annotated[int, typer.Option(help="first seed")] = 0,
) -> None:
    """Run the deterministic simulator over many seeds (soak)."""
    from cellcloud.store.sim import main as sim_main

    raise typer.Exit(sim_main(["--seeds", str(seeds), "--start", str(start)]))
