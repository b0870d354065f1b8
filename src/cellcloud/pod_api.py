"""``cellcloud pod api``: enough of the Kubernetes API for kubectl to run Pods (``kubectl
apply -f``, ``get pods``, ``logs``, ``delete pod``), served on the user's machine as ``kubectl
proxy`` is, over the same mapping as ``cellcloud pod`` (core/pod.py, pod_cli.PodClient) and so
over the region's public ECS and Logs APIs with the tenant's keys (docs/fargate.md, "kubectl").

Served: ``/version``, discovery (``/api``, ``/api/v1``, ``/apis``), and in ``/api/v1``:
``namespaces/{ns}/pods`` (list, create), ``pods`` (list, every namespace),
``namespaces/{ns}/pods/{name}`` (get, delete) and ``…/{name}/log`` (``container``,
``tailLines``, ``timestamps``, ``limitBytes``, ``sinceSeconds``/``sinceTime``; ``follow``
refused: not served yet). A list
asked for as a ``Table`` (what ``kubectl get`` asks for) is answered as one. Anything else is a
Kubernetes ``Status`` 404 (or 405 for a verb a Pod does not have here: a Pod's spec does not
change in place). Create honours ``fieldValidation``: ``Strict`` (kubectl's default) refuses
fields the mapping does not understand, ``Warn`` runs without them and says so in ``Warning``
headers (kubectl prints them), ``Ignore`` runs without them. kubectl's own bookkeeping
annotation (``kubectl.kubernetes.io/last-applied-configuration``) is not part of the Pod.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import typer

from .core import pod as pods
from .pod_cli import PodClient, PodCliError, StateDir, Tenant, connect, run_cli

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
request_bytes_max = 1024 * 1024 + 64 * 1024  # a manifest (pod_manifest_bytes_max) and JSON's cost
STATUS_CODES = {"BadRequest": 400, "NotFound": 404, "MethodNotAllowed": 405,
                "AlreadyExists": 409, "Invalid": 422, "ServiceUnavailable": 503,
                "RequestEntityTooLarge": 413}

LOG_OPTIONS = {"container", "follow", "previous", "stream", "tailLines", "limitBytes",
               "sinceSeconds", "sinceTime", "timestamps", "timeout", "pretty",
               "insecureSkipTLSVerifyBackend"}  # the last three: nothing to act on here
Reply = tuple[int, str, bytes, list[str]]  # status, content type, body, Warning headers


def _json(status: int, doc: Any, warnings: list[str] | None = None) -> Reply:
    return status, "application/json", json.dumps(doc).encode(), warnings or []


def status_reply(reason: str, message: str, name: str = "") -> Reply:
    code = STATUS_CODES.get(reason, 500)
    doc: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Failure", "message": message, "reason": reason,
                           "code": code}
    if name:
        doc["details"] = {"name": name, "kind": "pods"}
    return _json(code, doc)


DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "get", "list"], "shortNames": ["po"],
         "categories": ["all"]},
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod",
         "verbs": ["get"]}]},
    # OpenAPI v3, just enough for kubectl to see that Pod requests take fieldValidation (it
    # looks at a PATCH operation for the kind): then it leaves validation to the server, here.
    "/openapi/v3": {"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"}}},
    "/openapi/v3/api/v1": {
        "openapi": "3.0.0", "info": {"title": "cellcloud Pods", "version": "v1"},
        "paths": {f"/api/v1/namespaces/{{namespace}}/pods{tail}": {verb: {
            "operationId": op, "x-kubernetes-action": verb,
            "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": "Pod"},
            "parameters": [{"name": "fieldValidation", "in": "query",
                            "schema": {"type": "string"}}],
            "responses": {}}}
            for tail, verb, op in (("", "post", "createCoreV1NamespacedPod"),
                                   ("/{name}", "patch", "patchCoreV1NamespacedPod"))}},
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-cellcloud",
                 "platform": "linux/amd64"},
}

_COLUMNS = [("Name", "string", "name"), ("Ready", "string", ""), ("Status", "string", ""),
            ("Restarts", "string", ""), ("Age", "string", ""), ("IP", "string", ""),
            ("Task", "string", "")]


def _age(created_ms: int | None, now_ms: int) -> str:
    if created_ms is None:
        return "<unknown>"
    s = max(0, (now_ms - created_ms) // 1000)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _table(views: list[pods.PodView], now_ms: int) -> dict[str, Any]:
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": ""},
            "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n,
                                   "priority": 0 if i < 5 else 1}
                                  for i, (n, t, f) in enumerate(_COLUMNS)],
            "rows": [{"cells": [v.name, v.ready, v.status, "-", _age(v.created_ms, now_ms),
                                v.ip or "<none>", v.task_id or "<none>"],
                      "object": {"kind": "PartialObjectMetadata",
                                 "apiVersion": "meta.k8s.io/v1",
                                 "metadata": pods.pod_object(v)["metadata"]}}
                     for v in views]}


class KubeApi:
    """The requests kubectl sends, answered over one tenant's :class:`PodClient`."""

    def __init__(self, client: PodClient, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        try:
            return self._route(method, path, query, headers, body)
        except PodCliError as e:
            return status_reply(e.reason, str(e))
        except pods.PodError as e:
            hint = " (remove them, or give kubectl --validate=warn or --validate=false to " \
                "run the Pod without them)" if e.unknown else ""
            return status_reply("Invalid", f"Pod is invalid: {e}{hint}")

    def _route(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> Reply:
        if path in DISCOVERY:
            if method != "GET":
                return status_reply("MethodNotAllowed", f"{method} {path} is not served")
            return _json(200, DISCOVERY[path])
        parts = path.split("/")[3:] if path.startswith("/api/v1/") else None
        if parts == ["pods"] and method == "GET":
            return self._list(None, headers)
        if parts is None or len(parts) < 3 or parts[0] != "namespaces" or parts[2] != "pods":
            return status_reply("NotFound", f"the server could not find the requested "
                                            f"resource ({method} {path[:200]})")
        ns, rest = parts[1], parts[3:]
        if not rest:
            if method == "GET":
                return self._list(ns, headers)
            if method == "POST":
                return self._create(ns, query, body)
        elif len(rest) == 1:
            if method == "GET":
                return _json(200, pods.pod_object(self.client.get(rest[0], ns)[0]))
            if method == "DELETE":
                obj = pods.pod_object(self.client.get(rest[0], ns)[0])
                self.client.delete(rest[0], ns)
                return _json(200, obj)
            if method in ("PUT", "PATCH"):
                return status_reply("MethodNotAllowed", f"pod/{rest[0]}: a Pod's spec does not "
                                    "change in place here; delete it and create it again")
        elif len(rest) == 2 and rest[1] == "log" and method == "GET":
            return self._log(rest[0], ns, query)
        return status_reply("MethodNotAllowed", f"{method} {path[:200]} is not served")

    def _log(self, name: str, ns: str, query: dict[str, str]) -> Reply:
        """``pods/{name}/log``: ``container``, ``tailLines``, ``timestamps``, ``limitBytes``,
        ``sinceSeconds``, ``sinceTime``; ``follow`` and ``previous`` are refused by name (not
        served yet), as is any other option."""
        for key in ("follow", "previous"):
            if query.get(key, "false") not in ("false", "0", ""):
                return status_reply("BadRequest", f"log option {key} is not supported here")
        if query.get("stream", "All") != "All":
            return status_reply("BadRequest", "log option stream: only All (the container's "
                                              "stdout and stderr, interleaved)")
        other = set(query) - LOG_OPTIONS
        if other:
            return status_reply("BadRequest", f"log options not supported: "
                                              f"{', '.join(sorted(other))}")
        try:
            tail = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            start = None
            if "sinceSeconds" in query:
                start = int(self.clock() * 1000) - int(query["sinceSeconds"]) * 1000
            if "sinceTime" in query:
                since = datetime.datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00"))
                start = int(since.timestamp() * 1000)
        except ValueError as e:
            return status_reply("BadRequest", f"a log option is malformed: {e}")
        stamps = query.get("timestamps", "false") in ("true", "1")
        events = self.client.log_events(name, ns, query.get("container") or None, start)
        lines: collections.deque[str] = collections.deque(
            maxlen=max(0, tail) if tail is not None else None)
        for ts, line in events:
            if stamps:
                iso = datetime.datetime.fromtimestamp(ts / 1000, datetime.UTC).isoformat()
                line = f"{iso.replace('+00:00', 'Z')} {line}"
            lines.append(line)
        data = "".join(line + "\n" for line in lines).encode()
        if limit is not None:
            data = data[:max(0, limit)]
        return 200, "text/plain", data, []

    def _list(self, ns: str | None, headers: dict[str, str]) -> Reply:
        views = self.client.get(None, ns or "default", all_namespaces=ns is None)
        if "as=Table" in headers.get("accept", ""):
            return _json(200, _table(views, int(self.clock() * 1000)))
        return _json(200, {"kind": "PodList", "apiVersion": "v1",
                           "metadata": {"resourceVersion": ""},
                           "items": [pods.pod_object(v) for v in views]})

    def _create(self, ns: str, query: dict[str, str], body: bytes) -> Reply:
        if len(body) > request_bytes_max:
            return status_reply("RequestEntityTooLarge", "the Pod is too large")
        try:
            doc = json.loads(body)
        except ValueError as e:
            return status_reply("BadRequest", f"the body is not JSON: {e}")
        if not isinstance(doc, dict):
            return status_reply("BadRequest", "the body must be a Pod object")
        meta = doc.get("metadata")
        if isinstance(meta, dict):
            given_ns = meta.get("namespace", ns)
            if given_ns != ns:
                return status_reply("BadRequest", f"the namespace of the object ({given_ns}) "
                                                  f"does not match the request's ({ns})")
            meta["namespace"] = ns
            notes = meta.get("annotations")
            if isinstance(notes, dict):
                notes.pop(LAST_APPLIED, None)
                if not notes:
                    del meta["annotations"]
            for key in ("creationTimestamp", "resourceVersion", "uid"):  # server-set fields
                if meta.get(key) is None:
                    meta.pop(key, None)
        if doc.get("status") in ({}, None):
            doc.pop("status", None)
        validation = query.get("fieldValidation", "Strict")
        plan = pods.plan(doc, region=self.client.region,
                         ignore_unknown=validation in ("Warn", "Ignore"))
        name = plan.name
        if self.client.exists(plan):
            return status_reply("AlreadyExists", f'pods "{name}" already exists', name)
        self.client.apply(plan)
        warnings = [f"unknown field \"{u}\": not run" for u in plan.unknown] \
            if validation == "Warn" else []
        warnings += list(plan.notes)
        return _json(201, pods.pod_object(self.client.get(name, ns)[0]), warnings)


def serve(api: KubeApi, host: str, port: int,
          ready: Callable[[int], None] | None = None) -> ThreadingHTTPServer:
    """Serve until the returned server is shut down (in a thread of its own); ``ready`` is
    told the port."""
    lock = threading.Lock()  # one request at a time: botocore clients are shared

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            if size > request_bytes_max:
                status, ctype, body, warns = status_reply("RequestEntityTooLarge",
                                                          "the request is too large")
                self.close_connection = True
            else:
                data = self.rfile.read(size) if size else b""
                with lock:
                    status, ctype, body, warns = api.handle(
                        self.command, self.path,
                        {k.lower(): v for k, v in self.headers.items()}, data)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for w in warns:
                self.send_header("Warning", f'299 - "{w}"')
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    if ready is not None:
        ready(server.server_address[1])
    return server


def api_cmd(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port)")] = 8001,
    address: Annotated[str, typer.Option(help="Address to listen on (an IP address; keep it "
                                         "loopback: the API acts as the tenant)")] = "127.0.0.1",
    state_dir: StateDir = None, tenant: Tenant = None,
) -> None:
    """Serve enough of the Kubernetes API for kubectl (apply -f, get pods, logs, delete pod)
    on this machine, as `kubectl proxy` does: kubectl --server http://127.0.0.1:8001 …"""
    def go() -> None:
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            raise PodCliError(f"--address {address!r}: an IP address, such as 127.0.0.1") \
                from None
        client = connect(state_dir, tenant)
        if not loopback:
            sys.stderr.write(f"WARNING: {address} is not a loopback address; the API has no "
                             "authentication of its own, so whoever reaches it acts as this "
                             "tenant\n")

        def ready(bound: int) -> None:
            sys.stdout.write(f"Serving the Kubernetes API for Pods on http://{address}:{bound}"
                             f" (kubectl --server http://{address}:{bound} …)\n")
            sys.stdout.flush()

        server = serve(KubeApi(client), address, port, ready)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    run_cli(go)
