"""cellcloud's own registry client (``cellcloud image push|ls``): the ECR API signed with
SigV4 (service ``ecr``), ``/v2/`` with the Basic registry token. Pushes an OCI image layout
directory or an OCI archive (a tar of one) without docker; blobs go up in bounded chunks read
from disk, never whole in memory.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from ..core.limits import DEFAULT_LIMITS
from ..security import sigv4
from . import core
from .api import ECR_TARGET_PREFIX


class RegistryClientError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class RegistryClient:
    chunk_bytes = DEFAULT_LIMITS.registry_chunk_bytes_max

    def __init__(self, endpoint: str, access_key_id: str, secret_access_key: str,
                 region: str = "cc-local-1", timeout_s: float = 300.0) -> None:
        u = urlsplit(endpoint)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.endpoint = f"http://{self.host}:{self.port}"
        self.akid = access_key_id
        self.secret = secret_access_key
        self.region = region
        self.timeout_s = timeout_s
        self._password: str | None = None
        self._conn: http.client.HTTPConnection | None = None
        # Told of every blob chunk sent: (digest, bytes, blob size); the CLI's progress bars.
        self.progress: Callable[[str, int, int], None] | None = None

    # -- transport -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            self._conn.request(method, path, body=body, headers=headers or {})
            resp = self._conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        if resp.getheader("connection", "").lower() == "close":
            self._conn.close()
            self._conn = None
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def ecr(self, op: str, doc: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(doc).encode()
        hdrs = sigv4.sign("POST", self.endpoint + "/", {
            "content-type": "application/x-amz-json-1.1",
            "x-amz-target": ECR_TARGET_PREFIX + op}, body, access_key_id=self.akid,
            secret_access_key=self.secret, region=self.region, service="ecr")
        status, headers, data = self._request("POST", "/", body, hdrs)
        if status != 200:
            try:
                err = json.loads(data)
                code = err.get("__type") or headers.get("x-amzn-errortype", "Error")
                message = err.get("message") or err.get("Message") or ""
            except ValueError:
                code, message = "Error", data.decode(errors="replace")
            raise RegistryClientError(status, str(code), str(message))
        out: dict[str, Any] = json.loads(data)
        return out

    def password(self) -> str:
        if self._password is None:
            tok = self.ecr("GetAuthorizationToken", {})["authorizationData"][0]
            user, _, self._password = base64.b64decode(
                tok["authorizationToken"]).decode().partition(":")
            assert user == "AWS"
        return self._password

    def v2(self, method: str, path: str, body: Any = None,
           headers: dict[str, str] | None = None,
           ok: tuple[int, ...] = (200, 201, 202, 204)) -> tuple[int, dict[str, str], bytes]:
        basic = base64.b64encode(f"AWS:{self.password()}".encode()).decode()
        status, hdrs, data = self._request(method, path, body,
                                           {"authorization": f"Basic {basic}", **(headers or {})})
        if status not in ok:
            try:
                err = json.loads(data)["errors"][0]
                raise RegistryClientError(status, err.get("code", "UNKNOWN"),
                                          err.get("message", ""))
            except (ValueError, KeyError, IndexError, TypeError):
                raise RegistryClientError(status, "UNKNOWN",
                                          data.decode(errors="replace")[:500]) from None
        return status, hdrs, data

    # -- push ----------------------------------------------------------------------------------
    def ensure_repository(self, name: str) -> dict[str, Any]:
        try:
            repo: dict[str, Any] = self.ecr("CreateRepository",
                                            {"repositoryName": name})["repository"]
            return repo
        except RegistryClientError as e:
            if e.code != "RepositoryAlreadyExistsException":
                raise
        found: dict[str, Any] = self.ecr("DescribeRepositories",
                                         {"repositoryNames": [name]})["repositories"][0]
        return found

    def push_blob(self, name: str, path: str, digest: str) -> bool:
        """Upload one blob from a file unless the repository has it; True if it was sent.
        ``self.progress(digest, n, size)`` (if set) hears of every chunk (n = size at once
        for a blob the repository has)."""
        size = os.path.getsize(path)
        status, _, _ = self.v2("HEAD", f"/v2/{name}/blobs/{digest}", ok=(200, 404))
        if status == 200:
            if self.progress is not None:
                self.progress(digest, size, size)
            return False
        _, hdrs, _ = self.v2("POST", f"/v2/{name}/blobs/uploads/")
        location = hdrs["location"]
        offset = 0
        with open(path, "rb") as f:
            while chunk := f.read(self.chunk_bytes):
                _, hdrs, _ = self.v2("PATCH", location, chunk, {
                    "content-type": "application/octet-stream",
                    "content-range": f"{offset}-{offset + len(chunk) - 1}"})
                location = hdrs.get("location", location)
                offset += len(chunk)
                if self.progress is not None:
                    self.progress(digest, len(chunk), size)
        sep = "&" if "?" in location else "?"
        self.v2("PUT", f"{location}{sep}digest={quote(digest)}", b"")
        return True

    def push(self, source: str, name: str, tag: str) -> dict[str, Any]:
        """Push the image of an OCI layout directory or OCI archive as ``name:tag``."""
        core.check_repo_name(name)
        core.check_tag(tag)
        if os.path.isdir(source):
            return self._push_layout(source, name, tag)
        with tempfile.TemporaryDirectory(prefix="cellcloud-oci-") as tmp:
            with tarfile.open(source) as tar:
                tar.extractall(tmp, filter="data")  # refuses ../, absolute paths, devices
            return self._push_layout(tmp, name, tag)

    def _push_layout(self, layout: str, name: str, tag: str) -> dict[str, Any]:
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        descs = index.get("manifests") or []
        named = [d for d in descs
                 if (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag]
        if not named and len(descs) == 1:
            named = descs
        if not named:
            raise RegistryClientError(0, "MANIFEST_UNKNOWN",
                                      f"{layout}: no image tagged {tag!r} and not exactly one")
        repo = self.ensure_repository(name)
        sent = self._push_manifest(layout, name, named[0], tag)
        return {"repositoryUri": repo["repositoryUri"], "tag": tag,
                "digest": named[0]["digest"], "blobs_sent": sent}

    def _push_manifest(self, layout: str, name: str, desc: dict[str, Any],
                       ref: str) -> int:
        def blob(digest: str) -> str:
            return os.path.join(layout, "blobs", "sha256", core.parse_digest(digest))

        with open(blob(desc["digest"]), "rb") as f:
            body = f.read(DEFAULT_LIMITS.registry_manifest_bytes_max + 1)
        m = core.parse_manifest(body, desc.get("mediaType"))
        sent = 0
        if m.is_index:
            for child in m.manifests:
                sent += self._push_manifest(layout, name, {"digest": child.digest,
                                                           "mediaType": child.media_type},
                                            child.digest)
        for digest in m.blob_digests():
            sent += self.push_blob(name, blob(digest), digest)
        self.v2("PUT", f"/v2/{name}/manifests/{ref}", body, {"content-type": m.media_type})
        return sent

    def images(self) -> list[dict[str, Any]]:
        """Every image of every repository of the tenant (``cellcloud image ls``)."""
        out = []
        for repo in self.ecr("DescribeRepositories", {})["repositories"]:
            details = self.ecr("DescribeImages", {"repositoryName": repo["repositoryName"]})
            for d in details["imageDetails"]:
                out.append({**d, "repositoryUri": repo["repositoryUri"]})
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
