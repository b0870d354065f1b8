"""The router process: uvicorn (httptools + uvloop) serving :class:`Router`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import time
from typing import Any

import uvicorn

from .. import runtime, span_export
from ..core.cellmap import CellMap
from ..core.limits import DEFAULT_LIMITS
from ..registry.edge import RegistryKey
from ..transport import OpError, Server
from .app import OperatorToken, Router, Tenants
from .connections import ConnectionRegistry, guard_params


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


async def serve(args: argparse.Namespace) -> None:
    with open(args.cell_map) as f:
        map_doc = json.load(f)
        cell_map = CellMap.from_wire(map_doc)
    limits = DEFAULT_LIMITS
    fds = raise_fd_limit()
    # Never more connections than fds leave room for: the cap closes idle/stalled ones first.
    connections_max = max(1, min(args.connections_max or limits.http_connections_max,
                                 fds - limits.http_fds_reserved))
    params = guard_params(limits, header_timeout_ms=args.header_timeout_ms,
                          body_timeout_ms=args.body_timeout_ms,
                          body_rate_bytes_per_s_min=args.body_rate_bytes_per_s_min,
                          keepalive_idle_timeout_ms=args.keepalive_idle_timeout_ms,
                          connections_max=connections_max)
    registry = ConnectionRegistry(params, limits, sweep_interval_ms=args.sweep_interval_ms)
    operator = OperatorToken(args.operator_token_file) if args.operator_token_file else None
    router = Router(cell_map, Tenants(args.tenants), limits=limits, region=args.region,
                    operator=operator, connections=registry,
                    registry_key=RegistryKey(args.registry_key_file)
                    if args.registry_key_file else None, leases=args.leases,
                    store_colony=args.store_colony or None,
                    spans=span_export.from_config(args.otlp_endpoint, "cellcloud-router"))
    router.set_control(map_doc.get("control"))  # a restarted router: the last push's address
    router.cell_map_file = args.cell_map
    if args.listen_fd is not None:
        # The supervisor's listening socket (cellcloud up holds it): a successor router
        # starts on the same socket beside this one and the kernel spreads connections over
        # both, so a router is replaced without a refused connection.
        sock = socket.socket(fileno=args.listen_fd)
        sock.setblocking(False)
    else:
        sock = runtime.bind_tcp(args.listen)
    config = uvicorn.Config(router, loop="none", http=registry.protocol_class(), ws="none",
                            lifespan="off", log_level="warning", access_log=False,
                            log_config=None,  # uvicorn's records go through eventlog's JSON
                            server_header=False, date_header=False,
                            timeout_keep_alive=max(1, params.keepalive_idle_timeout_ms // 1000),
                            proxy_headers=False, backlog=4096,
                            # SIGTERM: stop accepting, answer what is under way (with
                            # Connection: close), close idle kept-alive connections.
                            timeout_graceful_shutdown=max(1, limits.drain_ms // 1000))
    server = uvicorn.Server(config)
    # uvicorn's own serve() offers no "listening" event; its startup()/main_loop() pair does.
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    registry.start()
    task = asyncio.ensure_future(server.main_loop())
    host, port = sock.getsockname()[:2]
    # The internal port the control plane pushes the cell map to (constant work, every round).
    async def push_cell_map(doc: dict[str, Any]) -> dict[str, Any]:
        router.set_control(doc.get("control"))
        return {"version": router.set_cell_map(CellMap.from_wire(doc))}

    async def map_status(_: Any) -> dict[str, Any]:
        return router.cell_map_status()

    # The control plane's Prometheus exposition (constant work too: every round), kept while
    # fresh and shown in the operator's GET /metrics.
    async def metrics_push(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise OpError("InvalidRequest", "metrics_push takes {component, text}")
        try:
            router.pushed_metrics.put(body.get("component"), body.get("text"),
                                      int(time.time() * 1000))
        except ValueError as e:
            raise OpError("InvalidRequest", str(e)) from e
        return {}

    async def cell_traffic(_: Any) -> dict[str, list[int]]:
        """Requests answered per cell and how many failed: a rollout's bake reads it."""
        return {c: list(t) for c, t in router.cell_traffic.items()}

    internal = Server({"cell_map": push_cell_map, "map_status": map_status,
                       "metrics_push": metrics_push, "cell_traffic": cell_traffic},
                      protocol="router")
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
        # Replaced (rollout) or stopped: this process's copy of the listener closes first (a
        # successor on the same socket takes every new connection), the requests under way
        # are answered, then the internal port closes.
        reloader.cancel()
        server.should_exit = True
        await task
        await server.shutdown(sockets=[sock])
        registry.stop()
        await internal.close()
        if router.spans is not None:
            router.spans.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud router serve")
    p.add_argument("--listen", default="127.0.0.1:9009")
    p.add_argument("--listen-fd", type=int, default=None,
                   help="an inherited listening socket to serve on instead of binding --listen "
                        "(the supervisor's: a new router starts beside the old one)")
    p.add_argument("--leases", action=argparse.BooleanOptionalAction, default=True,
                   help="run warm sync invokes router -> agent under leases from the frontend "
                        "(issue #13); --no-leases: every invoke crosses the frontend")
    p.add_argument("--otlp-endpoint", default=None,
                   help="export spans over OTLP/HTTP to this base URL (default: "
                        "$OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing spans off)")
    p.add_argument("--cell-map", required=True, help="JSON file with the cell map")
    p.add_argument("--tenants", required=True, help="JSON file with the tenant table")
    p.add_argument("--region", default="cc-local-1", help="The region name requests are signed for")
    p.add_argument("--control-listen", default="127.0.0.1:0",
                   help="internal address the control plane pushes the cell map to")
    p.add_argument("--registry-key-file", default=None,
                   help="file holding the HMAC key registry tokens are signed with")
    p.add_argument("--store-colony", default="",
                   help="a Physalia colony file whose health the web console shows")
    p.add_argument("--operator-token-file", default=None,
                   help="file holding the operator's bearer token (region-wide status)")
    # Connection limits (defaults: core/limits.py).
    p.add_argument("--header-timeout-ms", type=int, default=None,
                   help="request line + headers must arrive within this")
    p.add_argument("--body-timeout-ms", type=int, default=None,
                   help="a body's base allowance from the end of its headers")
    p.add_argument("--body-rate-bytes-per-s-min", type=int, default=None,
                   help="each body byte extends the body's allowance by 1/rate seconds")
    p.add_argument("--keepalive-idle-timeout-ms", type=int, default=None,
                   help="an idle kept-alive connection is closed after this")
    p.add_argument("--connections-max", type=int, default=None,
                   help="over it, the oldest idle (else stalled) connection is closed")
    p.add_argument("--sweep-interval-ms", type=int, default=None,
                   help="how often expired connections are closed")
    runtime.add_security_args(p)
    runtime.add_protocol_max(p)
    args = p.parse_args(argv)
    runtime.apply_protocol_max(args)
    runtime.setup_logging("router")
    runtime.setup_security(args, "router", "region", "router", args.region)
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
