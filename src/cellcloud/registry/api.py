"""The registry's operations in a cell (the frontend serves them over the transport): the OCI
Distribution API's small requests, the bounded chunks of blob uploads and reads, and the ECR
JSON API. The router (``edge.py``) authenticates, streams bodies and calls these.

Every op names the tenant (``a``, from the router's verified token or signature); a repository
is looked up within that tenant only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from ..core.jsondepth import check_json_depth
from ..core.limits import DEFAULT_LIMITS, Limits
from . import core
from .core import RegistryError
from .storage import RegistryStore, RepositoryExists, RepositoryNotEmpty, now_ms

Reply = dict[str, Any]
ECR_TARGET_PREFIX = "AmazonEC2ContainerRegistry_V20150921."


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    return {"s": status, "h": {"content-type": "application/json", **(headers or {})},
            "b": b"" if doc is None else json.dumps(doc).encode()}


def _empty(status: int, headers: dict[str, str]) -> Reply:
    return {"s": status, "h": headers, "b": b""}


class RegistryApi:
    def __init__(self, store: RegistryStore, region: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.region = region
        self.limits = limits
        self.counters = {"pushes": 0, "blob_commits": 0, "digest_mismatches": 0}
        # Told (account, repository, manifest digests) after manifests are deleted: the
        # frontend fails the image functions on them (frontend/image_functions.py).
        self.on_deleted: Callable[[str, str, set[str]], None] | None = None

    def deleted(self, account: str, repo: str, digests: set[str]) -> None:
        if digests and self.on_deleted is not None:
            self.on_deleted(account, repo, digests)

    def ops(self) -> dict[str, Any]:
        """The transport ops this adds to the frontend's table."""
        return {"registry": self.handle, "registry_append": self.append,
                "registry_commit": self.commit, "registry_read": self.read, "ecr": self.ecr,
                "registry_status": self.status}

    async def status(self, _: Any) -> dict[str, Any]:
        return {**self.store.statistics(), **self.counters}

    # -- OCI: one small request ----------------------------------------------------------------
    async def handle(self, req: dict[str, Any]) -> Reply:
        try:
            return self._handle(req)
        except RegistryError as e:
            return e.to_wire()

    def _handle(self, req: dict[str, Any]) -> Reply:
        a, method, kind = str(req["a"]), str(req["m"]), str(req["k"])
        name, ref = str(req.get("n") or ""), str(req.get("r") or "")
        q: dict[str, str] = req.get("q") or {}
        h: dict[str, str] = req.get("h") or {}
        st = self.store
        if kind == "manifest":
            if method == "PUT":
                m = st.put_manifest(a, name, ref, req.get("b") or b"", h.get("content-type"))
                self.counters["pushes"] += 1
                return _empty(201, {"location": f"/v2/{name}/manifests/{m.digest}",
                                    "docker-content-digest": m.digest})
            if method == "DELETE":
                core.parse_digest(ref)
                st.delete_manifest(a, name, ref)
                self.deleted(a, name, {ref})
                return _empty(202, {})
            media_type, digest, body = st.get_manifest(a, name, ref)
            return {"s": 200, "h": {"content-type": media_type, "docker-content-digest": digest,
                                    "content-length": str(len(body))},
                    "b": b"" if method == "HEAD" else body}
        if kind == "tags":
            n_raw = q.get("n")
            if n_raw is not None and not n_raw.isdigit():
                raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a number")
            n = int(n_raw) if n_raw is not None else None
            tags = st.tags(a, name, n, q.get("last"))
            headers = {}
            if tags and n is not None and len(tags) == min(n, self.limits.registry_tags_page_max):
                headers["link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
            return _json(200, {"name": name, "tags": tags}, headers)
        if kind == "blob":
            st.require_repo(a, name)
            size = st.blob_size(a, name, ref)
            if size is None:
                raise core.blob_unknown(ref)
            if method == "DELETE":
                st.blob_delete(a, name, ref)
                return _empty(202, {})
            st.touch(a, ref, now_ms())
            return {"s": 200, "h": {"docker-content-digest": ref,
                                    "content-type": "application/octet-stream"},
                    "b": b"", "size": size}
        if kind == "upload_start":
            st.require_repo(a, name)
            if "mount" in q:
                digest = q["mount"]
                core.parse_digest(digest)
                src = q.get("from", "")
                if core.repo_name_valid(src) and st.repo(a, src) is not None \
                        and st.mount(a, name, src, digest, now_ms()) is not None:
                    return _empty(201, {"location": f"/v2/{name}/blobs/{digest}",
                                        "docker-content-digest": digest})
                # Not ours to mount (absent, or not this tenant's): a plain upload, as the
                # spec says, and the same answer whatever the reason.
            s = st.upload_start(a, name, now_ms())
            return _empty(202, self._upload_headers(name, s))
        if kind == "upload":
            s = st.upload(a, name, ref)
            if method == "DELETE":
                st.upload_cancel(s)
                return _empty(204, {})
            return _empty(204, self._upload_headers(name, s))
        raise RegistryError(405, "UNSUPPORTED", f"{method} is not supported here")

    @staticmethod
    def _upload_headers(name: str, s: core.UploadSession) -> dict[str, str]:
        return {"location": f"/v2/{name}/blobs/uploads/{s.uuid}",
                "docker-upload-uuid": s.uuid, "range": f"0-{max(s.offset - 1, 0)}"}

    # -- OCI: blob bodies in bounded chunks ----------------------------------------------------
    async def append(self, req: dict[str, Any]) -> Reply:
        """Append one chunk (at most ``registry_chunk_bytes_max``) to an upload session."""
        try:
            data = req["d"]
            if len(data) > self.limits.registry_chunk_bytes_max:
                raise RegistryError(413, "SIZE_INVALID", "chunk over the internal chunk cap")
            s = self.store.upload(str(req["a"]), str(req["n"]), str(req["u"]))
            start = req.get("o")
            self.store.upload_append(s, data, None if start is None else int(start), now_ms())
            return {"s": 202, "h": self._upload_headers(str(req["n"]), s), "b": b"",
                    "offset": s.offset}
        except RegistryError as e:
            return e.to_wire()

    async def commit(self, req: dict[str, Any]) -> Reply:
        a, name, uuid, digest = str(req["a"]), str(req["n"]), str(req["u"]), str(req["digest"])
        try:
            s = self.store.upload(a, name, uuid)
            try:
                core.parse_digest(digest)
            except RegistryError:
                self.store.upload_cancel(s)
                raise
            # Hashing a layer read back from disk may take a while: not on the event loop.
            actual = await asyncio.to_thread(self.store.upload_digest, s)
            if actual != digest:
                self.counters["digest_mismatches"] += 1
            self.store.upload_commit(s, digest, actual, now_ms())
            self.counters["blob_commits"] += 1
            return _empty(201, {"location": f"/v2/{name}/blobs/{digest}",
                                "docker-content-digest": digest})
        except RegistryError as e:
            return e.to_wire()

    async def read(self, req: dict[str, Any]) -> Any:
        """A bounded piece of a blob the tenant's repository holds."""
        a, name, digest = str(req["a"]), str(req["n"]), str(req["d"])
        try:
            if self.store.blob_size(a, name, digest) is None:
                raise core.blob_unknown(digest)
            data = self.store.blob_read(a, digest, int(req["o"]),
                                        min(int(req["l"]), self.limits.registry_chunk_bytes_max))
        except RegistryError as e:
            return e.to_wire()
        return {"s": 200, "d": data}

    # -- the ECR JSON API ----------------------------------------------------------------------
    async def ecr(self, req: dict[str, Any]) -> Reply:
        op = str(req["target"])[len(ECR_TARGET_PREFIX):]
        account, host = str(req["a"]), str(req.get("host") or "")
        try:
            body = req.get("b") or b"{}"
            check_json_depth(body, self.limits.json_depth_max)
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise EcrError("SerializationException", f"body is not JSON: {e}") from None
            if not isinstance(doc, dict):
                raise EcrError("SerializationException", "body must be a JSON object")
            handler = _ECR_OPS.get(op)
            if handler is None:
                raise EcrError("UnknownOperationException", f"unknown operation {op[:100]!r}")
            registry_id = doc.get("registryId")
            if registry_id is not None and registry_id != account:
                # Another account's registry is out of reach; its existence is not revealed.
                raise EcrError("RepositoryNotFoundException" if op != "CreateRepository"
                               else "InvalidParameterException",
                               f"registryId {str(registry_id)[:20]!r} is not this account's")
            return _json(200, handler(self, account, host, doc))
        except EcrError as e:
            return e.to_wire()
        except RegistryError as e:
            if e.code == "NAME_UNKNOWN":
                return EcrError("RepositoryNotFoundException", _not_found_message(
                    account, str((e.detail or {}).get("name", "")))).to_wire()
            if e.code == "DENIED":
                return EcrError("LimitExceededException", e.message).to_wire()
            return EcrError("InvalidParameterException", e.message).to_wire()

    def repo_doc(self, account: str, host: str, name: str, created_s: float) -> dict[str, Any]:
        return {"repositoryArn": f"arn:aws:ecr:{self.region}:{account}:repository/{name}",
                "registryId": account, "repositoryName": name,
                "repositoryUri": f"{host}/{name}", "createdAt": created_s,
                "imageTagMutability": "MUTABLE",
                "imageScanningConfiguration": {"scanOnPush": False},
                "encryptionConfiguration": {"encryptionType": "AES256"}}


class EcrError(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message

    def to_wire(self) -> Reply:
        return _json(400, {"__type": self.type, "message": self.message},
                     {"x-amzn-errortype": self.type, "content-type": "application/x-amz-json-1.1"})


def _not_found_message(account: str, name: str) -> str:
    return (f"The repository with name '{name}' does not exist in the registry with id "
            f"'{account}'")


def _name(doc: dict[str, Any]) -> str:
    name = doc.get("repositoryName")
    if not isinstance(name, str) or not core.repo_name_valid(name):
        raise EcrError("InvalidParameterException",
                       f"Invalid parameter at 'repositoryName' failed to satisfy constraint: "
                       f"'must satisfy regular expression '{core.REPO_NAME.pattern}'' "
                       f"(got {str(name)[:300]!r})")
    return name


def _refuse_unhonoured(doc: dict[str, Any], allowed: set[str], op: str) -> None:
    """A parameter the registry does not honour is refused by name, never ignored."""
    for key in doc:
        if key not in allowed:
            raise EcrError("InvalidParameterException",
                           f"{op}: parameter {key!r} is not supported by this registry")


def _page(items: list[Any], doc: dict[str, Any], key: str, limit_max: int = 1000) -> dict[str, Any]:
    token = doc.get("nextToken")
    start = 0
    if token is not None:
        if not isinstance(token, str) or not token.isdigit():
            raise EcrError("InvalidParameterException", "invalid nextToken")
        start = int(token)
    n = doc.get("maxResults", limit_max)
    if not isinstance(n, int) or not 1 <= n <= limit_max:
        raise EcrError("InvalidParameterException",
                       f"maxResults must be between 1 and {limit_max}")
    out: dict[str, Any] = {key: items[start:start + n]}
    if start + n < len(items):
        out["nextToken"] = str(start + n)
    return out


def _create_repository(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"repositoryName", "registryId", "imageTagMutability", "tags",
                             "imageScanningConfiguration"}, "CreateRepository")
    if doc.get("imageTagMutability", "MUTABLE") != "MUTABLE":
        raise EcrError("InvalidParameterException",
                       "imageTagMutability: only MUTABLE is supported by this registry")
    if (doc.get("imageScanningConfiguration") or {}).get("scanOnPush"):
        raise EcrError("InvalidParameterException",
                       "imageScanningConfiguration.scanOnPush is not supported by this registry")
    if doc.get("tags"):
        raise EcrError("InvalidParameterException", "tags are not supported by this registry")
    name = _name(doc)
    try:
        row = api.store.create_repo(a, name)
    except RepositoryExists:
        raise EcrError("RepositoryAlreadyExistsException",
                       f"The repository with name '{name}' already exists in the registry "
                       f"with id '{a}'") from None
    return {"repository": api.repo_doc(a, host, name, row["created_s"])}


def _describe_repositories(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryNames", "nextToken", "maxResults"},
                       "DescribeRepositories")
    names = doc.get("repositoryNames")
    if names is not None:
        if not isinstance(names, list) or not 1 <= len(names) <= 100:
            raise EcrError("InvalidParameterException", "repositoryNames: 1 to 100 names")
        rows = []
        for n in names:
            r = api.store.repo(a, _name({"repositoryName": n}))
            if r is None:
                raise EcrError("RepositoryNotFoundException", _not_found_message(a, n))
            rows.append(r)
    else:
        rows = api.store.repos(a)
    docs = [api.repo_doc(a, host, r["name"], r["created_s"]) for r in rows]
    return _page(docs, doc, "repositories")


def _image_ids(api: RegistryApi, doc: dict[str, Any]) -> list[dict[str, str]]:
    ids = doc.get("imageIds")
    if not isinstance(ids, list) or not 1 <= len(ids) <= api.limits.registry_batch_ids_max:
        raise EcrError("InvalidParameterException",
                       f"imageIds: 1 to {api.limits.registry_batch_ids_max} image ids")
    for i in ids:
        if not isinstance(i, dict) or not (i.get("imageDigest") or i.get("imageTag")):
            raise EcrError("InvalidParameterException",
                           "each imageId needs an imageDigest or an imageTag")
    return ids


def _lookup(api: RegistryApi, a: str, name: str,
            image_id: dict[str, str]) -> tuple[str | None, dict[str, Any] | None]:
    """(manifest digest, None) or (None, failure) for one imageId."""
    digest, tag = image_id.get("imageDigest"), image_id.get("imageTag")
    try:
        if digest is not None:
            core.parse_digest(digest)
        if tag is not None:
            core.check_tag(tag)
    except RegistryError:
        code = "InvalidImageDigest" if digest is not None and not str(digest).startswith(
            "sha256:") or (digest and len(digest) != 71) else "InvalidImageTag"
        return None, {"imageId": image_id, "failureCode": code,
                      "failureReason": "Invalid image digest or tag"}
    found = api.store.resolve(a, name, tag) if tag is not None else None
    if tag is not None and digest is not None and found is not None and found != digest:
        return None, {"imageId": image_id, "failureCode": "ImageTagDoesNotMatchDigest",
                      "failureReason": "Tag does not match the digest"}
    if tag is None and digest is not None:
        found = api.store.resolve(a, name, digest)
    if found is None:
        return None, {"imageId": image_id, "failureCode": "ImageNotFound",
                      "failureReason": "Requested image not found"}
    return found, None


def _image_detail(api: RegistryApi, a: str, name: str, row: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"registryId": a, "repositoryName": name, "imageDigest": row.digest,
                         "imageSizeInBytes": row.image_bytes, "imagePushedAt": row.pushed_s,
                         "imageManifestMediaType": row.media_type}
    if row.tags:
        d["imageTags"] = row.tags
    return d


def _describe_images(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryName", "imageIds", "nextToken",
                             "maxResults", "filter"}, "DescribeImages")
    name = _name(doc)
    rows = api.store.images(a, name)
    flt = (doc.get("filter") or {}).get("tagStatus", "ANY")
    if flt == "TAGGED":
        rows = [r for r in rows if r.tags]
    elif flt == "UNTAGGED":
        rows = [r for r in rows if not r.tags]
    if doc.get("imageIds") is not None:
        by_digest = {r.digest: r for r in rows}
        picked = []
        for image_id in _image_ids(api, doc):
            digest, failure = _lookup(api, a, name, image_id)
            if failure is not None or digest not in by_digest:
                raise EcrError("ImageNotFoundException",
                               f"The image with imageId {json.dumps(image_id)} does not exist "
                               f"within the repository with name '{name}' in the registry "
                               f"with id '{a}'")
            picked.append(by_digest[str(digest)])
        rows = picked
    return _page([_image_detail(api, a, name, r) for r in rows], doc, "imageDetails")


def _list_images(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryName", "nextToken", "maxResults",
                             "filter"}, "ListImages")
    name = _name(doc)
    flt = (doc.get("filter") or {}).get("tagStatus", "ANY")
    ids: list[dict[str, str]] = []
    for r in api.store.images(a, name):
        if r.tags and flt != "UNTAGGED":
            ids += [{"imageDigest": r.digest, "imageTag": t} for t in r.tags]
        elif not r.tags and flt != "TAGGED":
            ids.append({"imageDigest": r.digest})
    return _page(ids, doc, "imageIds")


def _batch_get_image(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryName", "imageIds", "acceptedMediaTypes"},
                       "BatchGetImage")
    name = _name(doc)
    api.store.require_repo(a, name)
    accepted = doc.get("acceptedMediaTypes")
    images, failures = [], []
    for image_id in _image_ids(api, doc):
        digest, failure = _lookup(api, a, name, image_id)
        if failure is not None:
            failures.append(failure)
            continue
        media_type, digest, body = api.store.get_manifest(a, name, str(digest))
        if accepted and media_type not in accepted:
            failures.append({"imageId": image_id, "failureCode": "UnsupportedImageType",
                             "failureReason": f"manifest is {media_type}"})
            continue
        iid = {"imageDigest": digest}
        if image_id.get("imageTag"):
            iid["imageTag"] = image_id["imageTag"]
        images.append({"registryId": a, "repositoryName": name, "imageId": iid,
                       "imageManifest": body.decode(), "imageManifestMediaType": media_type})
    return {"images": images, "failures": failures}


def _batch_delete_image(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryName", "imageIds"}, "BatchDeleteImage")
    name = _name(doc)
    api.store.require_repo(a, name)
    deleted, failures = [], []
    gone: set[str] = set()
    for image_id in _image_ids(api, doc):
        digest, failure = _lookup(api, a, name, image_id)
        if failure is not None:
            failures.append(failure)
            continue
        tag = image_id.get("imageTag")
        if tag is not None and image_id.get("imageDigest") is None:
            # As ECR: removing a tag; the image goes with its last tag.
            api.store.untag(a, name, tag)
            if any(r.digest == digest and r.tags for r in api.store.images(a, name)):
                deleted.append({"imageDigest": str(digest), "imageTag": tag})
                continue
            api.store.delete_manifest(a, name, str(digest))
            gone.add(str(digest))
            deleted.append({"imageDigest": str(digest), "imageTag": tag})
            continue
        tags = api.store.delete_manifest(a, name, str(digest))
        gone.add(str(digest))
        deleted += ([{"imageDigest": str(digest), "imageTag": t} for t in tags]
                    or [{"imageDigest": str(digest)}])
    api.deleted(a, name, gone)
    return {"imageIds": deleted, "failures": failures}


def _delete_repository(api: RegistryApi, a: str, host: str, doc: dict[str, Any]) -> Any:
    _refuse_unhonoured(doc, {"registryId", "repositoryName", "force"}, "DeleteRepository")
    name = _name(doc)
    api.store.require_repo(a, name)
    gone = api.store.manifest_digests(a, name)
    try:
        row = api.store.delete_repo(a, name, bool(doc.get("force")))
    except RepositoryNotEmpty:
        raise EcrError("RepositoryNotEmptyException",
                       f"The repository with name '{name}' in registry with id '{a}' cannot "
                       "be deleted because it still contains images") from None
    api.deleted(a, name, gone)
    return {"repository": api.repo_doc(a, host, name, row["created_s"])}


_ECR_OPS = {
    "CreateRepository": _create_repository,
    "DescribeRepositories": _describe_repositories,
    "DescribeImages": _describe_images,
    "ListImages": _list_images,
    "BatchGetImage": _batch_get_image,
    "BatchDeleteImage": _batch_delete_image,
    "DeleteRepository": _delete_repository,
}
