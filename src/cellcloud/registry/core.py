"""The registry's decisions, sans-IO: digests, names, the ``/v2/`` route table, manifest and
index validation, upload sessions, garbage collection and the registry token.

Nothing here opens a file or a socket or reads a clock: the storage shell (``storage.py``) and
the API shells (``oci.py``, ``ecr.py``, ``edge.py``) call these with the time passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..core.limits import DEFAULT_LIMITS, Limits

# -- errors -----------------------------------------------------------------------------------


class RegistryError(Exception):
    """An OCI distribution error: ``{"errors": [{"code", "message", "detail"}]}``."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()

    def to_wire(self) -> dict[str, Any]:
        return {"s": self.status, "h": {"content-type": "application/json", **self.headers},
                "b": self.body()}


def name_unknown(name: str) -> RegistryError:
    # The same answer for "absent" and "another tenant's": nothing leaks.
    return RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry",
                         {"name": name})


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def manifest_unknown(ref: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown", {"reference": ref})


def manifest_invalid(message: str, status: int = 400) -> RegistryError:
    return RegistryError(status, "MANIFEST_INVALID", message)


def digest_invalid(message: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", message)


def upload_unknown(uuid: str) -> RegistryError:
    return RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry",
                         {"uuid": uuid})


def unauthorized(realm: str, message: str = "authentication required") -> RegistryError:
    return RegistryError(401, "UNAUTHORIZED", message,
                         headers={"www-authenticate": f'Basic realm="{realm}"'})


# -- digests and names ------------------------------------------------------------------------

_DIGEST = re.compile(r"^sha256:([a-f0-9]{64})$")
# ECR's repositoryName pattern (botocore ecr model), 2-256 characters.
REPO_NAME = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
repo_name_chars_min = 2
repo_name_chars_max = 256


def parse_digest(digest: str) -> str:
    """The hex of a ``sha256:<64 hex>`` digest; anything else is DIGEST_INVALID (only sha256 is
    accepted: the store names blobs by it)."""
    m = _DIGEST.fullmatch(digest)
    if m is None:
        raise digest_invalid(f"invalid digest {digest[:100]!r}: expected sha256:<64 hex digits>")
    return m.group(1)


def is_digest(ref: str) -> bool:
    return ref.startswith("sha256:") or ":" in ref


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_repo_name(name: str) -> str:
    if (not repo_name_chars_min <= len(name) <= repo_name_chars_max
            or not REPO_NAME.fullmatch(name)):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name", {"name": name[:300]})
    return name


def repo_name_valid(name: str) -> bool:
    return (repo_name_chars_min <= len(name) <= repo_name_chars_max
            and bool(REPO_NAME.fullmatch(name)))


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise RegistryError(400, "TAG_INVALID", "invalid tag", {"tag": tag[:200]})
    return tag


def check_reference(ref: str) -> str:
    """A manifest reference: a digest (checked) or a tag (checked)."""
    if ":" in ref:
        parse_digest(ref)
        return ref
    return check_tag(ref)


# -- the /v2/ route table ---------------------------------------------------------------------


@dataclass(frozen=True)
class V2Route:
    kind: str  # base | tags | manifest | blob | upload_start | upload
    name: str = ""
    ref: str = ""  # manifest reference, blob digest or upload uuid


_ROUTES = [
    (re.compile(r"^/v2/?$"), "base"),
    (re.compile(r"^/v2/(?P<name>.+)/tags/list$"), "tags"),
    (re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$"), "manifest"),
    (re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/?$"), "upload_start"),
    (re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/(?P<ref>[A-Za-z0-9-]+)$"), "upload"),
    (re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)$"), "blob"),
]
# Methods each route answers (anything else: 405 UNSUPPORTED).
ROUTE_METHODS = {
    "base": ("GET", "HEAD"),
    "tags": ("GET",),
    "manifest": ("GET", "HEAD", "PUT", "DELETE"),
    "upload_start": ("POST",),
    "upload": ("GET", "PATCH", "PUT", "DELETE"),
    "blob": ("GET", "HEAD", "DELETE"),
}


def parse_v2_path(path: str) -> V2Route:
    for pattern, kind in _ROUTES:
        m = pattern.fullmatch(path)
        if m is not None:
            groups = m.groupdict()
            name = groups.get("name") or ""
            if kind != "base":
                check_repo_name(name)
            return V2Route(kind, name, groups.get("ref") or "")
    raise RegistryError(404, "NAME_UNKNOWN", "no such registry path", {"path": path[:300]})


def route_body_bytes_max(route: V2Route, method: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """What a /v2/ request may carry: a manifest up to its cap, a blob upload up to a blob's
    (streamed in bounded chunks, never held whole), nothing else."""
    if route.kind == "manifest" and method == "PUT":
        return limits.registry_manifest_bytes_max
    if route.kind in ("upload", "upload_start") and method in ("POST", "PATCH", "PUT"):
        return limits.registry_blob_bytes_max
    return 0


# -- Basic auth and the registry token --------------------------------------------------------

TOKEN_PREFIX = "cc1"


def make_password(key: bytes, account: str, now_s: int, ttl_s: int) -> tuple[str, int]:
    """The password ``GetAuthorizationToken`` hands out: the account and an expiry, signed
    with the region's registry key. Returns (password, expires_at_s)."""
    expires = now_s + ttl_s
    payload = base64.urlsafe_b64encode(
        json.dumps({"a": account, "e": expires}, separators=(",", ":")).encode()).decode()
    mac = hmac.new(key, f"{TOKEN_PREFIX}.{payload}".encode(), hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(mac).decode()
    return f"{TOKEN_PREFIX}.{payload}.{sig}", expires


def authorization_token(password: str) -> str:
    """ECR's ``authorizationToken``: base64("AWS:" + password)."""
    return base64.b64encode(f"AWS:{password}".encode()).decode()


def verify_password(key: bytes, password: str, now_s: float) -> str | None:
    """The account a password names, or None (bad shape, bad signature, expired)."""
    parts = password.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(password) > 1024:
        return None
    mac = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        sig = base64.urlsafe_b64decode(parts[2])
        doc = json.loads(base64.urlsafe_b64decode(parts[1]))
    except (ValueError, binascii.Error):
        return None
    if not hmac.compare_digest(mac, sig):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("e"), int) or doc["e"] <= now_s:
        return None
    account = doc.get("a")
    return account if isinstance(account, str) else None


def parse_basic(auth: str) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization: Basic`` header, or None."""
    if auth[:6].lower() != "basic " or len(auth) > 4096:
        return None
    try:
        raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep else None


# -- manifests and indexes --------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = IMAGE_TYPES + INDEX_TYPES
# Layer media types an image may name (OCI and Docker, plain/gzip/zstd; non-distributable too).
LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json",
                          "application/vnd.docker.container.image.v1+json"})
# A layer may declare its uncompressed size (the image is checked against Lambda's 10 GB).
UNCOMPRESSED_SIZE_ANNOTATION = "org.cellcloud.image.layer.uncompressed-size"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    size: int
    config: Descriptor | None  # images
    layers: tuple[Descriptor, ...]  # images
    manifests: tuple[Descriptor, ...]  # indexes: the child manifests

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def blob_digests(self) -> list[str]:
        """Blobs this manifest holds a reference on (config first, then layers)."""
        out = [self.config.digest] if self.config else []
        return out + [d.digest for d in self.layers]

    def declared_bytes(self) -> int:
        """The image's size as its layers declare it: the uncompressed-size annotation where a
        layer carries one, else its (compressed) size."""
        total = 0
        for d in self.layers:
            raw = d.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
            total += int(raw) if raw is not None and raw.isdigit() else d.size
        return total


def _descriptor(doc: Any, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise manifest_invalid(f"{where}: a descriptor must be an object")
    mt, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
    if not isinstance(mt, str) or not isinstance(digest, str):
        raise manifest_invalid(f"{where}: mediaType and digest are required strings")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise manifest_invalid(f"{where}: size must be a non-negative integer")
    try:
        parse_digest(digest)
    except RegistryError as e:
        raise manifest_invalid(f"{where}: {e.message}") from None
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise manifest_invalid(f"{where}: annotations must map strings to strings")
    return Descriptor(mt, digest, size, ann)


def _descriptors(raw: list[Any], where: str, allowed: Any) -> tuple[Descriptor, ...]:
    """A list of descriptors, each of a media type in ``allowed``."""
    descs = tuple(_descriptor(x, f"{where}[{i}]") for i, x in enumerate(raw))
    for d in descs:
        if d.media_type not in allowed:
            raise manifest_invalid(f"{where}: unknown media type {d.media_type[:200]!r}")
    return descs


def parse_manifest(body: bytes, content_type: str | None,
                   limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Validate a pushed manifest or index; its digest is the sha256 of the bytes as sent."""
    if len(body) > limits.registry_manifest_bytes_max:
        raise manifest_invalid(
            f"manifest is {len(body)} bytes; at most {limits.registry_manifest_bytes_max}", 413)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise manifest_invalid(f"manifest is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise manifest_invalid("manifest must be a JSON object")
    if doc.get("schemaVersion") != 2:
        raise manifest_invalid("schemaVersion must be 2")
    declared = doc.get("mediaType")
    ctype = (content_type or "").split(";")[0].strip()
    media_type: Any
    if ctype in MANIFEST_TYPES:
        media_type = ctype
    elif ctype not in ("", "application/json"):
        media_type = ctype  # a type of its own: refused below
    elif declared is not None:
        media_type = declared
    else:  # no type anywhere: inferred from the shape
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(400, "MANIFEST_INVALID",
                            f"unsupported manifest media type {str(media_type)[:200]!r}",
                            {"supported": list(MANIFEST_TYPES)})
    if declared is not None and declared != media_type:
        raise manifest_invalid(
            f"mediaType {str(declared)[:200]!r} does not match Content-Type {media_type!r}")
    digest = sha256_digest(body)
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise manifest_invalid("an index needs a manifests list")
        descs = _descriptors(children, "manifests", MANIFEST_TYPES)
        return Manifest(media_type, digest, len(body), None, (), descs)
    config = _descriptor(doc.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise manifest_invalid(f"config: unknown media type {config.media_type[:200]!r}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise manifest_invalid("an image manifest needs a layers list")
    layers = _descriptors(raw_layers, "layers", LAYER_TYPES)
    m = Manifest(media_type, digest, len(body), config, layers, ())
    if m.declared_bytes() > limits.registry_image_bytes_max:
        raise manifest_invalid(
            f"image layers declare {m.declared_bytes()} bytes; an image may hold at most "
            f"{limits.registry_image_bytes_max} (Lambda's 10 GB)")
    return m


def missing_references(m: Manifest, have_blob: set[str], have_manifest: set[str]) -> list[str]:
    """What a manifest names that the repository lacks: blobs (image) or manifests (index)."""
    if m.is_index:
        return [d.digest for d in m.manifests if d.digest not in have_manifest]
    return [d for d in m.blob_digests() if d not in have_blob]


def check_blob_sizes(m: Manifest, sizes: dict[str, int]) -> None:
    """A descriptor's size must be the blob's: a lie about it is MANIFEST_INVALID."""
    for d in ([m.config] if m.config else []) + list(m.layers):
        if sizes.get(d.digest, d.size) != d.size:
            raise manifest_invalid(
                f"descriptor {d.digest} declares {d.size} bytes; the blob has {sizes[d.digest]}")


# -- upload sessions --------------------------------------------------------------------------


@dataclass
class UploadSession:
    """One blob upload: bytes arrive in order, each chunk at the offset the last one ended."""

    uuid: str
    account: str
    repo: str
    offset: int = 0
    touched_ms: int = 0
    state: str = "open"  # open -> committed | aborted

    def check_append(self, start: int | None, length: int, limits: Limits = DEFAULT_LIMITS) -> None:
        """A chunk of ``length`` bytes claiming to start at ``start`` (Content-Range; None: at
        the end): out of order is 416, over the blob cap is 413."""
        if self.state != "open":
            raise upload_unknown(self.uuid)
        if start is not None and start != self.offset:
            raise RegistryError(416, "BLOB_UPLOAD_INVALID",
                                f"chunk starts at {start}; the upload is at {self.offset}",
                                headers={"range": f"0-{max(self.offset - 1, 0)}"})
        if self.offset + length > limits.registry_blob_bytes_max:
            raise RegistryError(413, "SIZE_INVALID",
                                f"a blob may be at most {limits.registry_blob_bytes_max} bytes")

    def appended(self, length: int, now_ms: int) -> None:
        assert self.state == "open"
        self.offset += length
        self.touched_ms = now_ms

    def check_commit(self, expected_digest: str, actual_digest: str) -> None:
        if self.state != "open":
            raise upload_unknown(self.uuid)
        parse_digest(expected_digest)
        if expected_digest != actual_digest:
            raise digest_invalid(
                f"provided digest {expected_digest} does not match the content "
                f"({actual_digest})")

    def expired(self, now_ms: int, limits: Limits = DEFAULT_LIMITS) -> bool:
        return now_ms - self.touched_ms > limits.registry_upload_idle_ms


def parse_content_range(value: str | None) -> tuple[int, int] | None:
    """``Content-Range: <start>-<end>`` (inclusive; ``bytes=`` tolerated) of a PATCH."""
    if not value:
        return None
    v = value.strip()
    if v.startswith("bytes"):
        v = v[5:].lstrip(" =")
    start, sep, end = v.partition("-")
    if not sep or not start.isdigit() or not end.split("/")[0].isdigit():
        raise RegistryError(416, "BLOB_UPLOAD_INVALID", f"bad Content-Range {value[:100]!r}")
    s, e = int(start), int(end.split("/")[0])
    if e < s - 1:
        raise RegistryError(416, "BLOB_UPLOAD_INVALID", f"bad Content-Range {value[:100]!r}")
    return s, e


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """A GET's ``Range: bytes=a-b`` (inclusive) within a blob of ``size``: (start, end) or
    None for the whole blob; unsatisfiable is 416."""
    if not value:
        return None
    m = re.match(r"^bytes=(\d*)-(\d*)$", value.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise RegistryError(416, "BLOB_UNKNOWN", "unsupported Range",
                            headers={"content-range": f"bytes */{size}"})
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        return (max(size - n, 0), size - 1) if size else None
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise RegistryError(416, "BLOB_UNKNOWN", "range not satisfiable",
                            headers={"content-range": f"bytes */{size}"})
    return start, min(end, size - 1)


# -- garbage collection -----------------------------------------------------------------------


@dataclass(frozen=True)
class BlobState:
    digest: str
    refs: int  # manifests holding it (config or layer), across the tenant's repositories
    linked_ms: int  # last time it was uploaded or mounted


def collectable(blobs: list[BlobState], now_ms: int,
                limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Blobs to delete: no manifest refers to them and their grace period has passed (a blob
    pushed a moment ago is waiting for its manifest)."""
    return [b.digest for b in blobs
            if b.refs == 0 and now_ms - b.linked_ms >= limits.registry_upload_grace_ms]


# -- tar entries of a layer (for the later unpack step) ---------------------------------------


@dataclass(frozen=True)
class TarEntry:
    name: str
    kind: str  # file | dir | symlink | hardlink | chardev | blockdev | fifo | other
    mode: int = 0o644
    linkname: str = ""


def _normal(path: str) -> list[str] | None:
    """A path's parts relative to the root, or None when it climbs out of it."""
    parts: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(p)
    return parts


def tar_entry_problem(e: TarEntry) -> str | None:
    """Why a layer entry may not be unpacked into a root (None: it may)."""
    if "\x00" in e.name or _normal(e.name) is None or ".." in e.name.split("/"):
        return f"{e.name[:200]!r}: path leaves the root"
    if e.kind in ("chardev", "blockdev", "fifo", "other"):
        return f"{e.name[:200]!r}: {e.kind} entries are not allowed"
    if e.mode & 0o6000:
        return f"{e.name[:200]!r}: setuid/setgid bits are not allowed"
    if e.kind == "symlink":
        base = _normal(e.name) or []
        target = e.linkname if e.linkname.startswith("/") else "/".join(
            base[:-1] + [e.linkname])
        if _normal(target) is None:
            return f"{e.name[:200]!r}: symlink to {e.linkname[:200]!r} leaves the root"
    if e.kind == "hardlink" and _normal(e.linkname) is None:
        return f"{e.name[:200]!r}: hard link to {e.linkname[:200]!r} leaves the root"
    base_name = (_normal(e.name) or [""])[-1]
    if base_name.startswith(WHITEOUT_PREFIX):
        hidden = base_name[len(WHITEOUT_PREFIX):]
        if e.kind != "file":
            return f"{e.name[:200]!r}: a whiteout must be an empty regular file"
        if hidden != WHITEOUT_OPAQUE[len(WHITEOUT_PREFIX):] and (
                hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX)):
            return f"{e.name[:200]!r}: whiteout names no entry inside its directory"
    return None


# OCI whiteouts: ``dir/.wh.name`` deletes ``name`` of the layers below; ``dir/.wh..wh..opq``
# hides everything below ``dir``. On the agent they become overlayfs whiteouts.
WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"


def whiteout(name: str) -> tuple[str, str] | None:
    """``(directory, hidden name)`` for a whiteout entry (hidden name "" for an opaque
    directory); None for an ordinary entry. Call on entries ``tar_entry_problem`` passed."""
    parts = _normal(name) or []
    if not parts or not parts[-1].startswith(WHITEOUT_PREFIX):
        return None
    parent = "/".join(parts[:-1])
    if parts[-1] == WHITEOUT_OPAQUE:
        return parent, ""
    return parent, parts[-1][len(WHITEOUT_PREFIX):]
