"""Lambda functions of ``PackageType`` Image (docs/images.md): ``ImageUri`` resolved in the
caller's own registry namespace to a manifest digest at create/update time (as Lambda does),
the image config read once (ENTRYPOINT, CMD, WORKDIR, ENV, USER) with ``ImageConfig``
overrides, and the layers streamed to an agent that lacks them in bounded ``image_blob``
chunks (the agent never dials out: it answers ``LayerMissing`` and the frontend pushes).

The catalog (functions.py) and the invoker call in through a few hooks; everything image-specific lives here.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..core import catalog_rules as rules
from ..core import errors
from ..registry import core as reg
from ..transport import Client

if TYPE_CHECKING:
    from .cell import Cell
    from .functions import Catalog
    from .store import FunctionRecord

IMAGE = "Image"
config_blob_bytes_max = 1024 * 1024  # an image config read at create (Docker's own cap is 8 MiB)
_platform = ("linux", "amd64")
# Layer encodings an agent unpacks (tarfile: plain and gzip); zstd is refused at create.
_UNPACKABLE = frozenset(t for t in reg.LAYER_TYPES if not t.endswith("zstd"))
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def parse_image_uri(uri: Any) -> tuple[str, str]:
    """``host[:port]/repo/name:tag`` or ``…@sha256:<hex>`` -> (repository, tag or digest).
    The host part is the endpoint as the caller reached it (repositoryUri as printed); the
    repository is looked up in the caller's own namespace."""
    if not isinstance(uri, str) or not 1 <= len(uri) <= 1024:
        raise errors.invalid("ImageUri must be a string of 1 to 1024 characters")
    host, sep, rest = uri.partition("/")
    if not sep or not _HOST.match(host) or not rest:
        raise errors.invalid(f"ImageUri {uri[:300]!r} must name this region's registry: "
                             "<host:port>/<repository>:<tag> or @sha256:<digest>")
    if "@" in rest:
        repo, _, ref = rest.partition("@")
    else:
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        repo, ref = (rest[:colon], rest[colon + 1:]) if colon > slash else (rest, "latest")
    try:
        reg.check_repo_name(repo)
        reg.check_reference(ref)
    except reg.RegistryError as e:
        raise errors.invalid(f"ImageUri {uri[:300]!r}: {e.message}") from None
    return repo, ref


def _missing(uri: str) -> errors.LambdaError:
    # Lambda's answer for an image that is not there; the same for another tenant's (whose
    # repositories are not in the caller's namespace): nothing leaks.
    return errors.invalid(f"Source image {uri} does not exist. Provide a valid source image.")


def _read_blob(catalog: Catalog, account: str, digest: str, size: int) -> bytes:
    store = catalog.registry
    assert store is not None
    out = b""
    while len(out) < size:
        piece = store.blob_read(account, digest, len(out), size - len(out))
        if not piece:
            break
        out += piece
    return out


def resolve(catalog: Catalog, account: str, uri: str) -> dict[str, Any]:
    """The image a function of ``uri`` runs: {uri, repo, digest, layers, entrypoint, cmd,
    workdir, env, user, size}; refused (InvalidParameterValueException) when it does not exist
    in the caller's registry or cannot run here."""
    store = catalog.registry
    if store is None:
        raise errors.invalid("this cell has no container registry")
    repo, ref = parse_image_uri(uri)
    try:
        media_type, digest, body = store.get_manifest(account, repo, ref)
        manifest = reg.parse_manifest(body, media_type, store.limits)
        if manifest.is_index:  # a multi-platform image: this host's platform
            child = next((d for d, p in _index_platforms(body) if p == _platform), None)
            if child is None:
                raise errors.invalid(f"Image {uri} has no linux/amd64 manifest")
            media_type, digest, body = store.get_manifest(account, repo, child)
            manifest = reg.parse_manifest(body, media_type, store.limits)
    except reg.RegistryError:
        raise _missing(uri) from None
    if manifest.config is None or not manifest.layers:
        raise errors.invalid(f"Image {uri} has no layers")
    if len(manifest.layers) > catalog.limits.image_layers_max:
        raise errors.invalid(f"Image {uri} has more than {catalog.limits.image_layers_max} layers")
    for layer in manifest.layers:
        if layer.media_type not in _UNPACKABLE:
            raise errors.invalid(f"Image {uri}: layer media type {layer.media_type} is not "
                                 "supported (plain or gzip tar layers only)")
    if manifest.config.size > config_blob_bytes_max:
        raise errors.invalid(f"Image {uri}: the image config is over {config_blob_bytes_max} "
                             "bytes")
    try:
        raw = _read_blob(catalog, account, manifest.config.digest, manifest.config.size)
        config = json.loads(raw).get("config") or {}
    except (OSError, ValueError, AttributeError):
        raise _missing(uri) from None
    if not isinstance(config, dict):
        raise errors.invalid(f"Image {uri}: the image config is not an object")
    env = {}
    for item in config.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            k, _, v = item.partition("=")
            env[k] = v
    return {
        "uri": uri, "repo": repo, "digest": manifest.digest,
        "layers": [d.digest for d in manifest.layers],
        "entrypoint": _strings(config.get("Entrypoint")),
        "cmd": _strings(config.get("Cmd")),
        "workdir": str(config.get("WorkingDir") or ""),
        "env": env, "user": str(config.get("User") or ""),
        "size": manifest.size + sum(d.size for d in manifest.layers),
    }


def _index_platforms(body: bytes) -> list[tuple[str, tuple[str, str]]]:
    try:
        doc = json.loads(body)
        return [(str(m["digest"]), (str(m.get("platform", {}).get("os", "")),
                                    str(m.get("platform", {}).get("architecture", ""))))
                for m in doc.get("manifests", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def image_config(doc: Any) -> dict[str, Any]:
    """``ImageConfig`` overrides, validated: {entrypoint?, cmd?, workdir?} (absent: the
    image's own)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise errors.invalid("ImageConfig must be an object")
    out: dict[str, Any] = {}
    for key, field, most in (("EntryPoint", "entrypoint", 1500), ("Command", "cmd", 1500)):
        if key in doc:
            v = doc[key]
            if not isinstance(v, list) or len(v) > most or not all(
                    isinstance(s, str) and len(s) <= 1024 for s in v):
                raise errors.invalid(f"ImageConfig.{key} must be a list of strings")
            out[field] = list(v)
    if "WorkingDirectory" in doc:
        wd = doc["WorkingDirectory"]
        if not isinstance(wd, str) or len(wd) > 1000 or (wd and not wd.startswith("/")):
            raise errors.invalid("ImageConfig.WorkingDirectory must be an absolute path")
        out["workdir"] = wd
    return out


def agent_image(rec: FunctionRecord) -> dict[str, Any]:
    """What create_env's ``image`` carries: the image's config with the function's overrides."""
    img, over = rec.image, rec.image.get("overrides") or {}
    return {"digest": img["digest"], "layers": list(img["layers"]),
            "entrypoint": over.get("entrypoint", img["entrypoint"]),
            "cmd": over.get("cmd", img["cmd"]),
            "workdir": over.get("workdir", img["workdir"]), "env": dict(img["env"])}


def config_response(rec: FunctionRecord) -> dict[str, Any]:
    """Lambda's ``ImageConfigResponse``: the overrides the function sets."""
    over = rec.image.get("overrides") or {}
    names = {"entrypoint": "EntryPoint", "cmd": "Command", "workdir": "WorkingDirectory"}
    return {"ImageConfig": {names[k]: v for k, v in over.items()}}


def code_location(rec: FunctionRecord) -> dict[str, Any]:
    img = rec.image
    base = img["uri"].split("@")[0]
    if ":" in base.rsplit("/", 1)[-1]:
        base = base.rsplit(":", 1)[0]
    return {"RepositoryType": "ECR", "ImageUri": img["uri"],
            "ResolvedImageUri": f"{base}@{img['digest']}"}


def create_function(catalog: Catalog, account: str, doc: dict[str, Any]) -> dict[str, Any]:
    """CreateFunction with PackageType Image (Runtime, Handler and Layers do not apply)."""
    from .store import FunctionRecord, config_doc

    name = errors_check_name(doc.get("FunctionName"))
    for member in ("Runtime", "Handler", "Layers"):
        if doc.get(member):
            raise errors.invalid(f"{member} is not supported for a function of PackageType "
                                 "Image")
    code = doc.get("Code")
    if not isinstance(code, dict) or "ImageUri" not in code or "ZipFile" in code:
        raise errors.invalid("Code.ImageUri is required for a function of PackageType Image")
    image = resolve(catalog, account, code["ImageUri"])
    image["overrides"] = image_config(doc.get("ImageConfig"))
    _check_runnable(image)
    rest = {k: v for k, v in doc.items() if k not in ("PackageType", "ImageConfig")}
    changes = catalog.config_changes(account, rest, name=name)
    publish = doc.get("Publish", False)
    if not isinstance(publish, bool):
        raise errors.invalid("Publish must be a boolean")
    tags = rules.check_tags(doc.get("Tags"), catalog.limits)
    if catalog.store.get(account, name) is not None:
        raise errors.conflict(f"Function already exist: {name}")
    if catalog.store.count(account) >= catalog.limits.functions_per_tenant_max:
        raise errors.LambdaError(400, "CodeStorageExceededException",
                                 "Too many functions in this account")
    rec = FunctionRecord(
        account=account, name=name, runtime="", handler="",
        code_sha256=image["digest"].split(":")[1],
        code_size=int(image["size"]), tags=tags, revision=1, revision_id=str(uuid.uuid4()),
        last_modified=rules.iso_time_ms(catalog.clock()), package_type=IMAGE, image=image,
        **{"memory_mb": catalog.limits.memory_mb_default,
           "timeout_s": catalog.limits.timeout_s_default, **changes})
    if not catalog.store.put_new(rec):
        raise errors.conflict(f"Function already exist: {name}")
    if publish:
        return config_doc(catalog.publish_record(rec, None), catalog.region)
    return config_doc(rec, catalog.region)


def errors_check_name(name: Any) -> str:
    from ..core.validation import check_name

    return check_name(name)


def _check_runnable(image: dict[str, Any]) -> None:
    over = image.get("overrides") or {}
    if not [*over.get("entrypoint", image["entrypoint"]), *over.get("cmd", image["cmd"])]:
        raise errors.invalid(f"Image {image['uri']} has neither ENTRYPOINT nor CMD and "
                             "ImageConfig sets neither EntryPoint nor Command")


def update_code(catalog: Catalog, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """UpdateFunctionCode with ImageUri: the new image, resolved now; the overrides stay."""
    from .store import config_doc

    old = catalog.function(account, name)
    rules.check_revision(doc, old.revision_id)
    if old.package_type != IMAGE:
        raise errors.invalid("ImageUri applies to functions of PackageType Image only; this "
                             "function's PackageType is Zip (provide ZipFile)")
    if "ZipFile" in doc or "ImageUri" not in doc:
        raise errors.invalid("ZipFile applies to functions of PackageType Zip only; this "
                             "function's PackageType is Image (provide ImageUri)")
    image = resolve(catalog, account, doc["ImageUri"])
    image["overrides"] = old.image.get("overrides") or {}
    _check_runnable(image)
    new = replace(old, code_sha256=image["digest"].split(":")[1], code_size=int(image["size"]),
                  image=image, revision=old.revision + 1, revision_id=str(uuid.uuid4()),
                  last_modified=rules.iso_time_ms(catalog.clock()))
    if doc.get("DryRun") is True:
        return config_doc(new, catalog.region)
    new = catalog.replace_record(old, new)
    catalog.release_bundles(old.bundle_digests())
    if doc.get("Publish") is True:
        return config_doc(catalog.publish_record(new, None), catalog.region)
    return config_doc(new, catalog.region)


def update_image_config(old: FunctionRecord, doc: dict[str, Any]) -> dict[str, Any]:
    """UpdateFunctionConfiguration's ImageConfig: the record's new ``image`` (or {} for a
    Zip function that sends none)."""
    if old.package_type == IMAGE:
        for member in ("Runtime", "Handler", "Layers"):
            if doc.get(member):
                raise errors.invalid(f"{member} is not supported for a function of "
                                     "PackageType Image")
    if "ImageConfig" not in doc:
        return {}
    over = image_config(doc["ImageConfig"])
    if old.package_type != IMAGE:
        if over:
            raise errors.invalid("ImageConfig applies to functions of PackageType Image only")
        return {}
    image = {**old.image, "overrides": over}
    _check_runnable(image)
    return {"image": image}


def refuse_for_zip(doc: dict[str, Any]) -> None:
    """A Zip function's CreateFunction: non-empty ImageConfig is refused, never ignored."""
    if image_config(doc.get("ImageConfig")):
        raise errors.invalid("ImageConfig applies to functions of PackageType Image only")
    code = doc.get("Code")
    if isinstance(code, dict) and "ImageUri" in code:
        raise errors.invalid("Code.ImageUri needs PackageType Image")


async def push_layer(cell: Cell, client: Client, rec: FunctionRecord, digest: str,
                     timeout_s: float) -> None:
    """Stream one layer to an agent that answered LayerMissing, in chunks of at most
    ``registry_chunk_bytes_max``, each acknowledged before the next is read."""
    await push_image_layer(cell, client, rec.account, rec.image, digest, timeout_s)


async def push_image_layer(cell: Cell, client: Client, account: str, image: dict[str, Any],
                           digest: str, timeout_s: float) -> None:
    """:func:`push_layer` for any holder of a resolved image (:func:`resolve`'s dict): a
    function record's, or an ECS task's container (frontend/tasks.py)."""
    store = cell.catalog.registry
    if store is None or digest not in image.get("layers", []):
        raise errors.service(f"the agent asked for a layer the image lacks: {digest[:80]}")
    size = store.blob_size(account, image["repo"], digest)
    if size is None:
        raise errors.service(f"layer {digest} of {image['uri']} is no longer in the "
                             "registry")
    # One stream per (agent, layer) at a time: creates racing for the same new image wait
    # for the first stream, whose agent then has the layer (its first answer says so).
    key = (id(client), digest)
    lock = _streams.setdefault(key, asyncio.Lock())
    try:
        async with lock:
            await _stream(cell, client, account, digest, size, timeout_s)
    finally:
        if not lock.locked() and _streams.get(key) is lock:
            del _streams[key]


_streams: dict[tuple[int, str], asyncio.Lock] = {}


async def _stream(cell: Cell, client: Client, account: str, digest: str, size: int,
                  timeout_s: float) -> None:
    store = cell.catalog.registry
    assert store is not None
    chunk = cell.limits.registry_chunk_bytes_max
    offset = 0
    while True:
        data = store.blob_read(account, digest, offset, min(chunk, size - offset))
        last = offset + len(data) >= size
        if not data and not last:
            raise errors.service(f"layer {digest} is shorter than its size")
        reply = await cell.invoker.call_agent(client, "image_blob", {
            "digest": digest, "offset": offset, "data": data, "last": last}, timeout_s)
        offset += len(data)
        if last or (isinstance(reply, dict) and reply.get("have")):
            return  # done, or the agent had it already (another create streamed it)


# -- a deleted image (BatchDeleteImage, DeleteRepository) -------------------------------------
# As Lambda: a function whose image is no longer in the registry is in the Failed state
# (StateReasonCode ImageDeleted) and every invocation of it fails, until UpdateFunctionCode
# points it at an image that exists (or the same image is pushed again: the state is read from
# the registry, not stored). Its environments are retired when the image is deleted, so no
# warm environment or router lease keeps running the deleted image. The registry keeps the
# layers such a function names (collect's ``keep``): nothing is collected from under a
# function record, and a deleted function or an update releases them.

def image_deleted(catalog: Catalog, rec: FunctionRecord) -> bool:
    """Whether ``rec`` is an image function whose manifest is gone from its repository."""
    store = catalog.registry
    if rec.package_type != IMAGE or store is None:
        return False
    return not store.has_manifest(rec.account, str(rec.image.get("repo", "")),
                                  str(rec.image.get("digest", "")))


def state_fields(catalog: Catalog, rec: FunctionRecord) -> dict[str, str]:
    """FunctionConfiguration's State fields where they differ from Active/Successful."""
    if not image_deleted(catalog, rec):
        return {}
    return {"State": "Failed", "StateReasonCode": "ImageDeleted",
            "StateReason": f"The function's image {resolved_uri(rec)} was deleted from "
                           "the registry. Update the function code to an image that exists."}


def check_runnable(catalog: Catalog, rec: FunctionRecord) -> None:
    """An invoke (or a router's lease ask) of a Failed image function: refused, as Lambda
    refuses invocations of a function that is not Active."""
    if image_deleted(catalog, rec):
        raise errors.LambdaError(
            409, "ResourceConflictException",
            "The operation cannot be performed at this time. The function is currently in the "
            f"following state: Failed (ImageDeleted: {resolved_uri(rec)} was deleted)")


def resolved_uri(rec: FunctionRecord) -> str:
    uri = str(rec.image.get("uri", ""))
    host = uri.partition("/")[0]
    return f"{host}/{rec.image.get('repo', '')}@{rec.image.get('digest', '')}"


def image_records(catalog: Catalog, account: str) -> list[FunctionRecord]:
    """Every record ($LATEST and published versions) of the tenant's image functions."""
    out: list[FunctionRecord] = []
    page = 1000
    after = ""
    while True:
        recs = catalog.store.list_page(account, after, page)
        for rec in recs:
            if rec.package_type != IMAGE:
                continue
            out.append(rec)
            v_after = 0
            while versions := catalog.store.list_versions(account, rec.name, v_after, page):
                out += versions
                v_after = int(versions[-1].version)
        if len(recs) < page:
            return out
        after = recs[-1].name


def images_deleted(catalog: Catalog, account: str, repo: str, digests: set[str]) -> None:
    """The registry deleted these manifests of ``repo``: the functions on them are Failed now;
    their environments go (the next invoke is refused, not run on a warm environment)."""
    for rec in image_records(catalog, account):
        if rec.image.get("repo") == repo and rec.image.get("digest") in digests:
            catalog.envs.retire_function(rec.key)


def held_layers(catalog: Catalog, account: str) -> set[str]:
    """Blob digests the tenant's image function records name: kept by the registry's
    collection even when no manifest refers to them any more."""
    return {str(d) for rec in image_records(catalog, account)
            for d in rec.image.get("layers", [])}
