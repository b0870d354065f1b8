"""The router process: uvicorn (httptools + uvloop) serving :class:`Router`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import uvicorn

from .. import runtime
from ..core.cellmap import CellMap
from ..transport import Server
from .app import Router, Tenants


async def serve(args: argparse.Namespace) -> None:
    with open(args.cell_map) as f:
        cell_map = CellMap.from_wire(json.load(f))
    router = Router(cell_map, Tenants(args.tenants), region=args.region)
    sock = runtime.bind_tcp(args.listen)
    config = uvicorn.Config(router, loop="none", http="httptools", lifespan="off",
                            log_level="warning", access_log=False, server_header=False,
                            date_header=False, timeout_keep_alive=75, proxy_headers=False)
    server = uvicorn.Server(config)
    # uvicorn's own serve() offers no "listening" event; its startup()/main_loop() pair does.
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    task = asyncio.ensure_future(server.main_loop())
    host, port = sock.getsockname()[:2]
    # The internal port the control plane pushes the cell map to (constant work, every round).
    async def push_cell_map(doc: dict[str, Any]) -> dict[str, Any]:
        return {"version": router.set_cell_map(CellMap.from_wire(doc))}

    async def map_status(_: Any) -> dict[str, Any]:
        return router.cell_map_status()

    internal = Server({"cell_map": push_cell_map, "map_status": map_status})
    chost, cport = await internal.listen_tcp("", 0, sock=runtime.bind_tcp(args.control_listen))
    runtime.announce_ready({"component": "router", "host": host, "port": port,
                            "control_host": chost, "control_port": cport,
                            "pid": os.getpid()})

    async def reload_tenants() -> None:
        while True:
            await asyncio.sleep(1.0)  # a periodic timer: new tenants appear within a second
            router.tenants.reload()

    reloader = asyncio.ensure_future(reload_tenants())
    try:
        await runtime.wait_for_shutdown()
    finally:
        reloader.cancel()
        await internal.close()
        server.should_exit = True
        await task
        await server.shutdown(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud router serve")
    p.add_argument("--listen", default="127.0.0.1:9009")
    p.add_argument("--cell-map", required=True, help="JSON file with the cell map")
    p.add_argument("--tenants", required=True, help="JSON file with the tenant table")
    p.add_argument("--region", default="cc-local-1", help="The region name requests are signed for")
    p.add_argument("--control-listen", default="127.0.0.1:0",
                   help="internal address the control plane pushes the cell map to")
    runtime.add_security_args(p)
    args = p.parse_args(argv)
    runtime.setup_logging("router")
    runtime.setup_security(args, "router", "region", "router", args.region)
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
