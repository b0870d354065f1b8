"""What every cellcloud server process shares: binding, readiness, shutdown, the event loop.

Readiness is a real signal, not a guess: a process that is listening writes one JSON line to the
fd named by ``CELLCLOUD_READY_FD`` (the supervisor's pipe), then closes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_tcp(addr: str) -> socket.socket:
    host, port = parse_addr(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def announce_ready(info: dict[str, Any]) -> None:
    from . import __version__

    # The build this process runs, as the supervisor shows it (a rollout's proof of progress)
    info = {**info, "version": __version__}
    fd = os.environ.pop("CELLCLOUD_READY_FD", None)
    line = (json.dumps(info) + "\n").encode()
    if fd is None:
        sys.stdout.write(line.decode())
        sys.stdout.flush()
        return
    os.write(int(fd), line)
    os.close(int(fd))


_shutdown: asyncio.Event | None = None


async def wait_for_shutdown() -> None:
    global _shutdown
    _shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _shutdown.set)
    await _shutdown.wait()


def run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(main)


def add_security_args(p: Any) -> None:
    p.add_argument("--pki-dir", default=None,
                   help="the region state directory whose pki/ holds the region CA")
    p.add_argument("--insecure", action="store_true",
                   help="development only: plain-text internal links")


def setup_security(args: Any, role: str, cell: str, name: str, region: str) -> None:
    """Mutual TLS for every internal link of this process, unless explicitly --insecure."""
    if getattr(args, "insecure", False) or not getattr(args, "pki_dir", None):
        logging.getLogger("cellcloud.security").warning(
            "%s: internal links are PLAIN TEXT (--insecure); never do this outside development",
            name)
        return
    from . import transport
    from .security import pki

    transport.enable_mtls(pki.tls_config(args.pki_dir, region, role, cell, name), role)


def client_security(state_dir: str) -> None:
    """For CLI processes that call internal ports: a ``client`` certificate of the region,
    unless the region runs --insecure."""
    path = os.path.join(state_dir, "region.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return
    if doc.get("insecure"):
        return
    from . import transport
    from .security import pki

    transport.enable_mtls(pki.tls_config(state_dir, doc.get("region", "cc-local-1"), "client",
                                         "region", "cli"), "client")


def setup_logging(component: str, **context: Any) -> None:
    """Structured JSON logs (eventlog.py): ``component`` (``frontend/<cell>`` names the
    cell too) and the process's context (``agent=...``) on every line."""
    from . import eventlog

    name, _, cell = component.partition("/")
    eventlog.setup(name, **({"cell": cell} if cell else {}), **context)


async def read_asgi_body(receive: Callable[[], Awaitable[dict[str, Any]]], body_max: int,
                         too_large: Callable[[], Exception],
                         gone: Callable[[], Exception]) -> bytes:
    """An ASGI request body, refused (``too_large()``) the moment it passes ``body_max`` while
    it streams, so an oversize body is never held whole; ``gone()`` if the client went away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise gone()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > body_max:
            raise too_large()
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def add_protocol_max(p: Any) -> None:
    """A component's ``--protocol-max``: the internal protocol versions it may speak at most
    (core/protocols.py), as an older build would; the same as CELLCLOUD_PROTOCOL_MAX."""
    p.add_argument("--protocol-max", default=None, metavar="SPEC",
                   help="cap the internal protocol versions spoken: protocol=version,... "
                        "(e.g. agent=1) or one version for all (a build acting as an older "
                        "one; default: this build's window, or $CELLCLOUD_PROTOCOL_MAX)")


def apply_protocol_max(args: Any) -> None:
    """Apply ``--protocol-max`` (checked: a bad value stops the process at once)."""
    spec = getattr(args, "protocol_max", None)
    if spec is None:
        return
    from .core.protocols import parse_caps

    parse_caps(spec)  # ProtocolError (a ValueError) names what is wrong
    os.environ["CELLCLOUD_PROTOCOL_MAX"] = spec
