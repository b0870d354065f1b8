"""The web console on the region's public endpoint (issue #16): static pages under
``/console/`` and their JSON reads under ``/console/api/``, for the region's operator only.

**Who may look.** The operator credential, as ``GET /metrics`` takes it: either the header
``Authorization: Bearer <operator token>`` on any console request, or the session cookie the
login page (``/console/login``, a form that takes the token) sets: ``cellcloud_console``, an
HMAC-SHA256 of a fixed label under the operator token (never the token itself), marked
``HttpOnly; SameSite=Strict; Path=/console`` (and ``Secure`` behind https). A new token
(``operator.json`` rewritten) ends every session. Without either, a page is redirected to the
login page (303) and an API read is refused (403, Lambda-shaped); only the login page and the
stylesheet are served to anyone. Every answer carries a Content-Security-Policy that allows
only the console's own files (no inline script, no CDN).

**Where the data comes from.** Only the region's public and internal reads, through the small
:class:`RegionReads` interface the router implements: the region's status (the document
``cellcloud status --json`` shows), the operator's ``/metrics`` exposition, the Lambda REST API
of a tenant's cell (the ``http`` op), the cells' ``async_status`` and ``sqs`` ops, and — when
the router is told of one — the configuration store's colony through its own client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import mimetypes
import pathlib
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .. import runtime
from ..core.errors import LambdaError, invalid
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.messages import HttpRequest
from . import logs as console_logs
from . import views

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Reply = tuple[int, dict[str, str], bytes]

PREFIX = "/console"
COOKIE = "cellcloud_console"
STATIC_DIR = pathlib.Path(__file__).parent / "static"
#: pages served to anyone (the login form needs its stylesheet)
PUBLIC_FILES = frozenset({"login.html", "console.css"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
call_timeout_s = 30.0


class RegionReads(Protocol):
    """What the console reads of the region (the router implements it)."""

    def operator_matches(self, token: str) -> bool: ...
    def operator_session(self, label: bytes) -> str | None: ...
    def cell_ids(self) -> list[str]: ...
    def accounts(self) -> list[str]: ...
    async def status(self, account: str | None = None) -> dict[str, Any]: ...
    async def metrics(self, account: str | None) -> Reply: ...
    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any: ...
    async def call_cell_id(self, cell_id: str, op: str, body: Any,
                           timeout_s: float) -> Any: ...


class Console:
    SESSION_LABEL = b"cellcloud-console-session-v1"

    def __init__(self, region: RegionReads, limits: Limits = DEFAULT_LIMITS,
                 store_colony: str | None = None) -> None:
        self.region = region
        self.limits = limits
        self.store_colony = store_colony
        self._store_client: Any = None
        self._store_loop: asyncio.AbstractEventLoop | None = None
        self.counters = {"requests": 0, "refused": 0, "logins": 0, "logins_refused": 0}

    # -- the ASGI side ---------------------------------------------------------------------------
    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.counters["requests"] += 1
        try:
            status, headers, body = await self._route(scope, receive)
        except LambdaError as e:
            status, headers, body = e.status, e.headers(), e.body()
        headers = {**headers, "content-security-policy": CSP,
                   "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                   "x-frame-options": "DENY"}
        headers.setdefault("cache-control", "no-store")
        out = [(k.encode(), v.encode()) for k, v in headers.items()]
        out.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    def _session_value(self) -> str | None:
        return self.region.operator_session(self.SESSION_LABEL)

    def authorised(self, headers: list[tuple[str, str]]) -> bool:
        """The operator's bearer token, or a session cookie derived from it."""
        for k, v in headers:
            if k == "authorization" and v[:7].lower() == "bearer ":
                return self.region.operator_matches(v[7:].strip())
        want = self._session_value()
        if not want:
            return False
        for k, v in headers:
            if k != "cookie":
                continue
            for part in v.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and hmac.compare_digest(value.encode(), want.encode()):
                    return True
        return False

    async def _route(self, scope: Scope, receive: Receive) -> Reply:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                   for k, v in scope["headers"]]
        rest = path[len(PREFIX):].lstrip("/")
        if rest == "login":
            if method == "POST":
                return await self._login(scope, receive, headers)
            _only_get(method, path)
            return _file("login.html")
        if rest in PUBLIC_FILES and method == "GET":
            return _file(rest)
        if not self.authorised(headers):
            self.counters["refused"] += 1
            if rest.startswith("api/") or method != "GET":
                raise LambdaError(403, "AccessDeniedException",
                                  "The console needs the operator credential (log in at "
                                  f"{PREFIX}/login, or send Authorization: Bearer <token>).")
            return 303, {"location": f"{PREFIX}/login", "content-type": "text/plain"}, b""
        if rest == "logout" and method == "POST":
            return 303, {"location": f"{PREFIX}/login", "set-cookie": self._cookie(scope, "")}, b""
        _only_get(method, path)
        if rest.startswith("api/"):
            query = dict(urllib.parse.parse_qsl(scope["query_string"].decode("latin-1")))
            doc = await self.api(rest[4:].rstrip("/"), query)
            return 200, {"content-type": "application/json"}, json.dumps(doc).encode()
        if rest in ("", "index.html"):
            return _file("index.html")
        if "/" not in rest and (STATIC_DIR / rest).is_file():
            return _file(rest)
        raise LambdaError(404, "ResourceNotFoundException", f"No console page {path}")

    def _cookie(self, scope: Scope, value: str) -> str:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        expire = "" if value else "; Max-Age=0"
        return f"{COOKIE}={value}; Path={PREFIX}; HttpOnly; SameSite=Strict{secure}{expire}"

    async def _login(self, scope: Scope, receive: Receive,
                     headers: list[tuple[str, str]]) -> Reply:
        cap = self.limits.console_login_body_bytes_max
        body = await runtime.read_asgi_body(
            receive, cap,
            lambda: LambdaError(413, "RequestEntityTooLargeException",
                                f"The login form must be smaller than {cap} bytes"),
            lambda: LambdaError(400, "ClientDisconnected", "the client went away"))
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        token = form.get("token", "").strip()
        session = self._session_value()
        if not token or session is None or not self.region.operator_matches(token):
            self.counters["logins_refused"] += 1
            page = _read_static("login.html").replace(
                b'<p id="login-error" class="error" hidden></p>',
                b'<p id="login-error" class="error" role="alert">That is not the operator '
                b'token of this region.</p>')
            return 403, {"content-type": "text/html; charset=utf-8"}, page
        self.counters["logins"] += 1
        return 303, {"location": f"{PREFIX}/", "set-cookie": self._cookie(scope, session),
                     "content-type": "text/plain"}, b""

    # -- the JSON reads --------------------------------------------------------------------------
    async def api(self, what: str, query: dict[str, str]) -> Any:
        if what == "region":
            return views.region_map(await self.region.status())
        if what == "metrics":
            status, _, body = await self.region.metrics(None)
            return views.metrics_summary(body.decode())
        if what == "functions":
            return {"functions": await self.functions()}
        if what == "function":
            return await self.function(_account(query), _function(query))
        if what == "queues":
            return await self.queues()
        if what == "store":
            return await self.store(query.get("cell") or None)
        raise LambdaError(404, "ResourceNotFoundException", f"No console read {what!r}")

    async def _lambda(self, account: str, path: str, query: str = "") -> tuple[int, Any]:
        """A Lambda REST API read in ``account``'s cell, as the tenant would make it."""
        resp = await self.region.call_cell(account, "http", HttpRequest(
            method="GET", path=path, query=query, account=account).to_wire(),
            timeout_s=call_timeout_s)
        try:
            doc = json.loads(resp["b"]) if resp["b"] else {}
        except ValueError:
            doc = {"raw": bytes(resp["b"]).decode(errors="replace")}
        return int(resp["s"]), doc

    async def functions(self) -> list[dict[str, Any]]:
        """Every account's functions (the first page of ``ListFunctions`` of each of the
        first ``console_accounts_max`` accounts)."""
        out: list[dict[str, Any]] = []
        for account in self.region.accounts()[: self.limits.console_accounts_max]:
            status, doc = await self._lambda(account, "/2015-03-31/functions/",
                                             f"MaxItems={self.limits.list_page_items_max}")
            if status != 200:
                continue
            for f in doc.get("Functions", []):
                out.append({"account": account, "name": f.get("FunctionName"),
                            "runtime": f.get("Runtime"), "memory_mb": f.get("MemorySize"),
                            "package_type": f.get("PackageType"),
                            "last_modified": f.get("LastModified"),
                            "dead_letter_target": (f.get("DeadLetterConfig") or {}).get(
                                "TargetArn")})
        return out

    async def function(self, account: str, name: str) -> dict[str, Any]:
        base = f"/2015-03-31/functions/{name}"
        status, config = await self._lambda(account, base)
        if status != 200:
            raise LambdaError(status, "ResourceNotFoundException",
                              str(config.get("message") or config.get("Message")
                                  or f"Function not found: {account}/{name}"))
        page = f"MaxItems={self.limits.list_page_items_max}"

        async def logs() -> tuple[list[dict[str, Any]], str | None]:
            try:
                return await console_logs.read_function_logs(
                    self.region, account, name, self.limits.console_log_events_max), None
            except console_logs.LogsUnavailable as e:
                return [], str(e)

        # The reads are independent: ask them at once (the region's status waits on agents).
        (_, versions), (_, aliases), (events, logs_error), status, (_, _, text) = \
            await asyncio.gather(self._lambda(account, f"{base}/versions", page),
                                 self._lambda(account, f"{base}/aliases", page), logs(),
                                 self.region.status(), self.region.metrics(None))
        region = views.region_map(status)
        summary = views.metrics_summary(text.decode())
        counts = next((f for f in summary["functions"]
                       if f["account"] == account and f["function"] == name), None)
        return {"account": account, "name": name,
                "configuration": config.get("Configuration", config),
                "versions": [{"version": v.get("Version"), "description": v.get("Description"),
                              "code_sha256": v.get("CodeSha256"),
                              "last_modified": v.get("LastModified")}
                             for v in versions.get("Versions", [])],
                "aliases": [{"name": a.get("Name"), "version": a.get("FunctionVersion"),
                             "weights": (a.get("RoutingConfig") or {}).get(
                                 "AdditionalVersionWeights")}
                            for a in aliases.get("Aliases", [])],
                "metrics": counts,
                "invocations": views.invocations(events), "logs_error": logs_error,
                "shard": views.shard_of(region, account, name), "region": region}

    async def queues(self) -> dict[str, Any]:
        """Each cell's async intake (its backlog per function) and each account's SQS queues,
        dead-letter queues marked."""
        cells = []
        for cell_id in self.region.cell_ids():
            try:
                doc = await self.region.call_cell_id(cell_id, "async_status", None, 5.0)
                cells.append({"cell_id": cell_id, "accepted": doc.get("accepted", 0),
                              "shed": doc.get("shed", 0), "backlog": doc.get("backlog", [])})
            except Exception as e:  # an unreachable cell shows as such
                cells.append({"cell_id": cell_id, "error": str(e), "backlog": []})
        queues: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for account in self.region.accounts()[: self.limits.console_accounts_max]:
            try:
                # (the cell's ListQueues is not paginated: it refuses MaxResults by name)
                listed = await self._sqs(account, "ListQueues", {})
                for url in listed.get("QueueUrls", [])[
                        : self.limits.console_queues_per_account_max]:
                    got = await self._sqs(account, "GetQueueAttributes",
                                          {"QueueUrl": url, "AttributeNames": ["All"]})
                    row = views.queue_row(url, got.get("Attributes", {}))
                    queues.append({"account": account, **row})
            except SqsRefused as e:
                errors.append({"account": account, "error": str(e)})
        functions = await self.functions()
        views.mark_dead_letter_queues(queues, functions)
        return {"cells": cells, "queues": queues, "errors": errors,
                "dead_letter_configs": [{"account": f["account"], "function": f["name"],
                                         "target": f["dead_letter_target"]}
                                        for f in functions if f["dead_letter_target"]]}

    async def _sqs(self, account: str, op: str, doc: dict[str, Any]) -> dict[str, Any]:
        """One SQS JSON-protocol call in ``account``'s cell; an error answer raises
        :class:`SqsRefused` (shown on the page, never taken for an empty answer)."""
        resp = await self.region.call_cell(account, "sqs", {
            "target": f"AmazonSQS.{op}", "b": json.dumps(doc).encode(), "a": account,
            "host": "cellcloud.internal"}, timeout_s=call_timeout_s)
        out: dict[str, Any] = json.loads(resp["b"]) if resp["b"] else {}
        if resp["s"] != 200:
            raise SqsRefused(f"{op}: {resp['s']} {out.get('__type', '')} "
                             f"{out.get('message', '')}".strip())
        return out

    async def store(self, cell: str | None) -> dict[str, Any]:
        """The configuration store's colony (``--store-colony``): each node's health and
        counters, and on request one store cell's replicas."""
        if not self.store_colony:
            return {"configured": False}
        from ..store.client import StoreClient
        from ..store.colony import Colony

        colony = Colony.load(self.store_colony)
        loop = asyncio.get_running_loop()
        if self._store_client is None or self._store_loop is not loop:
            self._store_client = StoreClient(colony)
            self._store_loop = loop
        client = self._store_client
        nodes = []
        stats = await asyncio.gather(*(client.node_stats(n) for n in colony.node_ids()))
        for node_id, st in zip(colony.node_ids(), stats, strict=True):
            host, port = colony.address(node_id)
            spec = colony.nodes[node_id]
            row: dict[str, Any] = {"node": node_id, "address": f"{host}:{port}",
                                   "labels": dict(spec.labels), "up": st is not None}
            if st is not None:
                row.update({"cells": st.get("cells"), "loaded": st.get("replicas_loaded_now"),
                            "inbox": st.get("inbox"),
                            "requests": (st.get("counters") or {}).get("requests"),
                            "fsync_batches": (st.get("counters") or {}).get("fsync_batches"),
                            "bad_hmac": (st.get("counters") or {}).get(
                                "frames_unauthenticated")})
            nodes.append(row)
        out: dict[str, Any] = {"configured": True, "nodes": nodes}
        if cell is not None:
            if not views.STORE_CELL_RE.match(cell):
                raise invalid("A store cell's name is 1-128 letters, digits, '-', '_', '.'")
            try:
                replicas = await client.cell_status(cell)
            except Exception as e:  # the store's own errors: the cell is unknown or out of reach
                out["cell"] = {"name": cell, "error": str(e)}
            else:
                out["cell"] = {"name": cell, "replicas": [
                    {"node": n, "up": st is not None,
                     **({"role": st.get("role"), "ballot": st.get("ballot"),
                         "commit_index": st.get("commit_index"),
                         "members": st.get("members")} if st else {})}
                    for n, st in sorted(replicas.items())]}
        return out


class SqsRefused(Exception):
    """A cell answered an SQS read with an error."""


def _account(query: dict[str, str]) -> str:
    account = query.get("account", "")
    if not views.ACCOUNT_RE.match(account):
        raise invalid("account must be a 12-digit account id")
    return account


def _function(query: dict[str, str]) -> str:
    name = query.get("name", "")
    if not views.FUNCTION_RE.match(name):
        raise invalid("name must be a function name (1-64 letters, digits, '-', '_')")
    return name


def _only_get(method: str, path: str) -> None:
    if method != "GET":
        raise LambdaError(405, "MethodNotAllowedException", f"{method} is not allowed on {path}",
                          http_headers={"allow": "GET"})


_static_cache: dict[str, bytes] = {}


def _read_static(name: str) -> bytes:
    if name not in _static_cache:
        _static_cache[name] = (STATIC_DIR / name).read_bytes()
    return _static_cache[name]


def _file(name: str) -> Reply:
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    return 200, {"content-type": ctype, "cache-control": "no-cache"}, _read_static(name)


def session_value(token: bytes, label: bytes) -> str:
    """The session cookie's value for an operator token (the router derives it)."""
    return hmac.new(token, label, hashlib.sha256).hexdigest()
