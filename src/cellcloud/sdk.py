"""cellcloud's Python SDK: a small client for a region's HTTP endpoint.

boto3 and the AWS CLI work too (``eval "$(cellcloud env)"``); this client adds cellcloud's own
calls (logs, status). Like them it signs every request with AWS Signature Version 4 (botocore's
signer), with a tenant's access key pair.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .region.supervisor import default_state_dir
from .security import sigv4

SendProgress = Callable[[int, int], None]  # (bytes just sent, bytes in all)
send_chunk_bytes = 256 * 1024


def _chunks(body: bytes, progress: SendProgress) -> Iterator[bytes]:
    view = memoryview(body)
    for i in range(0, len(body), send_chunk_bytes):
        chunk = view[i:i + send_chunk_bytes]
        yield bytes(chunk)
        progress(len(chunk), len(body))

API = "/2015-03-31/functions"
logs_pages_max = 1_000  # FilterLogEvents pages one filter_log_events reads


class CellcloudError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(f"{type_} ({status}): {message}")
        self.status = status
        self.type = type_
        self.message = message


@dataclass
class InvokeResponse:
    status: int
    payload: bytes
    function_error: str | None
    log_tail: str
    request_id: str
    executed_version: str

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


def zip_directory(path: str) -> bytes:
    """Zip a directory the way `zip -r` from inside it would (paths relative to it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                full = os.path.join(root, name)
                zf.write(full, os.path.relpath(full, path))
    return buf.getvalue()


class Client:
    """``credentials`` is ``"ACCESS_KEY_ID:SECRET_ACCESS_KEY"`` or an (id, secret) pair."""

    def __init__(self, endpoint: str, credentials: str | tuple[str, str], *,
                 timeout_s: float = 930.0, region: str = "cc-local-1",
                 operator_token: str | None = None) -> None:
        u = urlsplit(endpoint)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.endpoint = f"http://{self.host}:{self.port}"
        if isinstance(credentials, str):
            akid, _, secret = credentials.partition(":")
        else:
            akid, secret = credentials
        self.access_key_id = akid
        self.secret_access_key = secret
        self.region = region
        self.timeout_s = timeout_s
        # The operator's bearer token: status() then shows the whole region, not one tenant.
        self.operator_token = operator_token
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def from_region(cls, state_dir: str | None = None) -> Client:
        endpoint = os.environ.get("CELLCLOUD_ENDPOINT")
        creds = os.environ.get("CELLCLOUD_API_KEY")
        if endpoint and creds:
            return cls(endpoint, creds, operator_token=os.environ.get("CELLCLOUD_OPERATOR_TOKEN"))
        path = os.path.join(state_dir or default_state_dir(), "region.json")
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise CellcloudError(0, "RegionNotRunning",
                                 f"no region is running ({path} not found); start one with "
                                 "`cellcloud up`") from None
        token = None
        token_file = doc.get("operator_token_file")
        if token_file:  # readable only by whoever runs the region (mode 0600)
            try:
                with open(token_file) as f:
                    token = str(json.load(f)["token"]) or None
            except (OSError, ValueError, KeyError, TypeError):
                token = None
        return cls(doc["endpoint"], (doc["access_key_id"], doc["secret_access_key"]),
                   region=doc.get("region", "cc-local-1"), operator_token=token)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                query: dict[str, str] | None = None,
                sign: bool = True, service: str = sigv4.SERVICE,
                progress: SendProgress | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        """One request; ``progress(n, total)`` (if given) is told of every n body bytes sent."""
        if query:
            path += "?" + urlencode(query)
        hdrs = dict(headers or {})
        if sign:
            hdrs = sigv4.sign(method, self.endpoint + path, hdrs, body or b"",
                              access_key_id=self.access_key_id,
                              secret_access_key=self.secret_access_key, region=self.region,
                              service=service)
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                if progress is not None and body:
                    hdrs["content-length"] = str(len(body))
                    self._conn.request(method, path, body=_chunks(body, progress),
                                       headers=hdrs)
                else:
                    self._conn.request(method, path, body=body, headers=hdrs)
                resp = self._conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                # A kept-alive connection the server closed: reconnect once. Not a retry of
                # the request itself, which never reached the server.
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, doc: Any = None,
              query: dict[str, str] | None = None,
              progress: SendProgress | None = None) -> Any:
        body = json.dumps(doc).encode() if doc is not None else None
        status, headers, data = self.request(method, path, body,
                                             {"content-type": "application/json"}, query,
                                             progress=progress)
        if status >= 400:
            raise _error(status, headers, data)
        return json.loads(data) if data else None

    # -- Lambda operations --------------------------------------------------------------------
    def create_function(self, name: str, zip_bytes: bytes, handler: str, *,
                        runtime: str = "python3.11", memory_mb: int = 128, timeout_s: int = 3,
                        environment: dict[str, str] | None = None,
                        description: str = "",
                        vpc_config: dict[str, Any] | None = None,
                        progress: SendProgress | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"FunctionName": name, "Runtime": runtime, "Handler": handler,
               "MemorySize": memory_mb, "Timeout": timeout_s, "Description": description,
               "Code": {"ZipFile": base64.b64encode(zip_bytes).decode()},
               "Environment": {"Variables": environment or {}}}
        if vpc_config is not None:
            doc["VpcConfig"] = vpc_config
        result: dict[str, Any] = self._json("POST", API, doc, progress=progress)
        return result

    def update_function_code(self, name: str, zip_bytes: bytes, *,
                             progress: SendProgress | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._json(
            "PUT", f"{API}/{quote(name)}/code",
            {"ZipFile": base64.b64encode(zip_bytes).decode()}, progress=progress)
        return result

    def update_function_configuration(self, name: str, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._json("PUT", f"{API}/{quote(name)}/configuration", changes)
        return result

    def get_function(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"{API}/{quote(name)}")
        return result

    def list_functions(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        marker = ""
        while True:
            page = self._json("GET", API + "/", query={"Marker": marker} if marker else None)
            out += page["Functions"]
            marker = page.get("NextMarker", "")
            if not marker:
                return out

    def delete_function(self, name: str) -> None:
        self._json("DELETE", f"{API}/{quote(name)}")

    def invoke(self, name: str, payload: Any = None, *, log_tail: bool = False,
               raw: bytes | None = None) -> InvokeResponse:
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        headers = {"content-type": "application/json"}
        if log_tail:
            headers["x-amz-log-type"] = "Tail"
        status, h, data = self.request("POST", f"{API}/{quote(name)}/invocations", body, headers)
        if status >= 400:
            raise _error(status, h, data)
        tail = base64.b64decode(h["x-amz-log-result"]).decode(errors="replace") \
            if "x-amz-log-result" in h else ""
        return InvokeResponse(status, data, h.get("x-amz-function-error"), tail,
                              h.get("x-amzn-requestid", ""), h.get("x-amz-executed-version", ""))

    # -- CloudWatch Logs (the subset the region serves: docs/observability.md) ----------------
    def logs_call(self, operation: str, doc: dict[str, Any]) -> dict[str, Any]:
        """One CloudWatch Logs API call (JSON 1.1, SigV4 service ``logs``), as boto3 makes it."""
        status, h, data = self.request(
            "POST", "/", json.dumps(doc).encode(),
            {"content-type": "application/x-amz-json-1.1",
             "x-amz-target": f"Logs_20140328.{operation}"}, service="logs")
        if status >= 400:
            try:
                err = json.loads(data)
                raise CellcloudError(status, str(err.get("__type") or "Error"),
                                     str(err.get("message") or ""))
            except ValueError:
                raise _error(status, h, data) from None
        result: dict[str, Any] = json.loads(data)
        return result

    def filter_log_events(self, group: str, **params: Any) -> list[dict[str, Any]]:
        """Every page of FilterLogEvents (bounded by ``logs_pages_max``)."""
        events: list[dict[str, Any]] = []
        doc: dict[str, Any] = {"logGroupName": group, **params}
        for _ in range(logs_pages_max):
            res = self.logs_call("FilterLogEvents", doc)
            events += res.get("events", [])
            if not res.get("nextToken"):
                break
            doc["nextToken"] = res["nextToken"]
        return events

    # -- cellcloud's own -----------------------------------------------------------------------
    def logs(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        doc = self._json("GET", f"/cellcloud/v1/functions/{quote(name)}/logs",
                         query={"limit": str(limit)})
        events: list[dict[str, Any]] = doc["events"]
        return events

    def attestation(self, name: str, nonce: str, qualifier: str | None = None) -> dict[str, Any]:
        query = {"nonce": nonce, **({"Qualifier": qualifier} if qualifier else {})}
        doc: dict[str, Any] = self._json("GET", f"/cellcloud/v1/functions/{quote(name)}/attestation",
                                         query=query)
        return doc

    def status(self) -> dict[str, Any]:
        """The region's status: all of it with the operator token, else (signed) the
        caller's own functions and environments."""
        if self.operator_token is None:
            result: dict[str, Any] = self._json("GET", "/cellcloud/v1/status")
            return result
        status, headers, data = self.request(
            "GET", "/cellcloud/v1/status",
            headers={"authorization": f"Bearer {self.operator_token}"}, sign=False)
        if status >= 400:
            raise _error(status, headers, data)
        doc: dict[str, Any] = json.loads(data)
        return doc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _error(status: int, headers: dict[str, str], data: bytes) -> CellcloudError:
    try:
        doc = json.loads(data)
        message = doc.get("message") or doc.get("Message") or ""
    except ValueError:
        message = data.decode(errors="replace")
    return CellcloudError(status, headers.get("x-amzn-errortype", "Error"), message)
