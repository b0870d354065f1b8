"""ECS services' traffic at the router (issue #17, docs/fargate.md): a request whose ``Host``
is ``<service>.<cluster>.<account>.<region>.localhost[:port]`` goes to the account's cell as
one ``ecs_http`` op; the cell proxies it to one RUNNING and healthy task of the service
(frontend/services.py).

The account is in the Host: a service's and a cluster's names are per account, and a request
without SigV4 says who it is for no other way (no region-wide registry of names to keep in
step). Whoever knows the three names reaches the service, as a public load balancer's DNS
name would be reached; nothing else of the account is reachable this way.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from .. import runtime
from ..core.errors import LambdaError
from ..transport import CallTimeout, RemoteError, TransportError

if TYPE_CHECKING:
    from .app import Receive, Router, Scope, Send

log = logging.getLogger("cellcloud.router")

_NAME = r"[a-z][a-z0-9_-]{0,254}"
_CLUSTER = r"[a-z0-9_-]{1,255}"


def host_service(host: str, region: str) -> tuple[str, str, str] | None:
    """(service, cluster, account) a ``Host`` header names, else None. Host names are
    case-insensitive: the names are matched lowercased, as DNS would."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    suffix = f".{region}.localhost".lower()
    name = name.lower()
    if not name.endswith(suffix):
        return None
    m = re.fullmatch(rf"({_NAME})\.({_CLUSTER})\.([0-9]{{12}})", name[:-len(suffix)])
    return (m[1], m[2], m[3]) if m else None


class ServiceEdge:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.counters = {"requests": 0, "refused": 0, "cell_unavailable": 0}

    def target(self, scope: Scope) -> tuple[str, str, str] | None:
        for k, v in scope["headers"]:
            if k == b"host":
                return host_service(v.decode("latin-1"), self.router.region)
        return None

    async def serve(self, scope: Scope, receive: Receive, send: Send,
                    target: tuple[str, str, str]) -> None:
        self.counters["requests"] += 1
        try:
            status, headers, body = await self._serve(scope, receive, target)
        except LambdaError as e:
            self.counters["refused"] += 1
            status, headers, body = e.status, list(e.headers().items()), e.body()
        except Exception:  # no input may produce a bare 500
            log.exception("service request %s %s failed", scope.get("method"),
                          scope.get("path"))
            err = LambdaError(500, "ServiceException", "An internal error occurred.")
            status, headers, body = err.status, list(err.headers().items()), err.body()
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers
               if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        out.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body",
                    "body": body if scope["method"] != "HEAD" else b""})

    async def _serve(self, scope: Scope, receive: Receive, target: tuple[str, str, str]
                     ) -> tuple[int, list[tuple[str, str]], bytes]:
        router = self.router
        service, cluster, account = target
        body_max = router.limits.ecs_service_http_bytes_max
        too_large = LambdaError(413, "RequestEntityTooLargeException",
                                f"A request to a service is at most {body_max} bytes "
                                "(ecs_service_http_bytes_max)")
        body = await runtime.read_asgi_body(
            receive, body_max, lambda: too_large,
            lambda: LambdaError(400, "ClientDisconnected", "the client went away"))
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode(
            "utf-8", "surrogateescape")
        query = scope["query_string"].decode("latin-1")
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        client = scope.get("client") or ("", 0)
        op: dict[str, Any] = {"a": account, "cluster": cluster,
                              "service": service, "m": scope["method"],
                              "p": raw_path + (f"?{query}" if query else ""), "h": headers,
                              "b": body, "ip": client[0]}
        cell = router.cell_map.cell_for(account)
        timeout_s = router.limits.ecs_service_http_timeout_ms / 1000 + 5.0
        try:
            out = await router.client(cell.cell_id).call("ecs_http", op, timeout_s=timeout_s)
        except RemoteError as e:
            if e.type == "ServiceNotFoundException":
                raise LambdaError(404, "ServiceNotFoundException",
                                  f"No service {service} in cluster {cluster}") from None
            raise LambdaError(502, "ServiceException", f"The service failed: {e}") from None
        except (TransportError, CallTimeout) as e:
            self.counters["cell_unavailable"] += 1
            raise LambdaError(503, "ServiceException",
                              f"Cell {cell.cell_id} is unavailable: {e}") from e
        return int(out["s"]), [(str(k), str(v)) for k, v in out["h"]], bytes(out["b"])
