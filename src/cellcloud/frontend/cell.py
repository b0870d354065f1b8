"""The cell frontend's logic over its I/O: function CRUD, the invoke path, logs, status.

Requests arrive from the router as plain dicts (method, path, query, headers, body, account) and
leave as (status, headers, body); the Lambda REST API's paths and shapes are handled in api.py.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from ..core import errors, vpc
from ..core.aliases import VERSION, check_alias_name, check_routing, pick_version
from ..core.bundle import BundleInfo, inspect_zip
from ..core.errors import LambdaError
from ..core.jsondepth import check_json_depth
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.placement import Create, Placement, Throttle, Use
from ..core.poison import PoisonDetector, PoisonParams
from ..core.sharding import PlainSharder, SignatureSharder, Worker, retry_order
from ..core.validation import check_env, check_handler, check_memory, check_name, check_timeout
from ..network import policy as net_policy
from ..registry.storage import RegistryStore
from ..transport import Client, RemoteError, TransportError
from . import image_functions
from .events import RESERVED_ZERO_HEADER, Intake
from .store import (
    AliasRecord,
    FunctionRecord,
    FunctionStore,
    LayerVersionRecord,
    StateDiskFull,
    config_doc,
    function_arn,
    layer_arn,
)

log = logging.getLogger("cellcloud.frontend")

LAYER_VERSION_ARN = re.compile(
    r"^arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):layer:"
    r"(?P<name>[a-zA-Z0-9-_]{1,140}):(?P<version>[0-9]{1,12})$"
)
versions_per_function_max = 10_000
shards_cached_max = 100_000
layer_versions_scan_max = 10_000


T = TypeVar("T")

agent_draining_retries_max = 40  # ~20 s of backoff: an agent handover takes well under that

def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}+0000"


#: Runtimes the frontend accepts beyond the host's Pythons (their runtime lives in the bundle).
aliases_per_function_max = 250
layers_per_function_max = 5
tags_per_function_max = 50
account_concurrency_max = 1000
unreserved_concurrency_min = 100
description_chars_max = 256
ephemeral_mb_min = 512
ephemeral_mb_max = 10_240
page_items_max = 50


@functools.cache
def supported_runtimes() -> tuple[str, ...]:
    """The runtimes this host can run (sandbox/runtimes.py probes the interpreters once)."""
    from ..sandbox import runtimes

    return runtimes.names()


def check_runtime(runtime: object) -> str:
    allowed = supported_runtimes()
    if not isinstance(runtime, str) or runtime not in allowed:
        message = (f"Value {runtime} at 'runtime' failed to satisfy constraint: Member must "
                   f"satisfy enum value set: {list(allowed)} (runtimes found on this host)")
        if isinstance(runtime, str) and runtime.startswith("nodejs"):
            node = [r for r in allowed if r.startswith("nodejs")]
            message += (f"; Node.js runtimes on this host: {node}" if node else
                        "; no Node.js runtime is installed on this host (scripts/setup.sh "
                        "installs nodejs20.x, nodejs22.x and nodejs24.x)")
        raise errors.invalid(message)
    return runtime


def _validation(message: str) -> LambdaError:
    return LambdaError(400, "ValidationException", f"1 validation error detected: {message}")


def _description(value: object) -> str:
    if not isinstance(value, str):
        raise errors.invalid("Description must be a string")
    if len(value) > description_chars_max:
        raise _validation(
            f"Value at 'description' failed to satisfy constraint: Member must "
            f"have length less than or equal to {description_chars_max}"
        )
    return value


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid("Tags must be a map of string to string")
    if len(value) > tags_per_function_max:
        raise errors.invalid(f"A function can have at most {tags_per_function_max} tags")
    for k, v in value.items():
        if not isinstance(k, str) or not 1 <= len(k) <= 128 or k.startswith("aws:"):
            raise errors.invalid(f"Invalid tag key {k!r}: 1-128 characters, not 'aws:'")
        if not isinstance(v, str) or len(v) > 256:
            raise errors.invalid(f"Invalid value for tag {k!r}: a string of at most 256 characters")
    return dict(value)


def _opt_dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid(f"{key} must be an object")
    return value


def page_size(raw: str | None) -> int:
    """MaxItems: 1-10,000 as Lambda's model allows; a page holds at most ``page_items_max``."""
    if raw is None or raw == "":
        return page_items_max
    try:
        n = int(raw)
    except ValueError:
        raise errors.invalid("MaxItems must be an integer") from None
    if not 1 <= n <= 10_000:
        raise _validation(
            f"Value '{n}' at 'maxItems' failed to satisfy constraint: Member must "
            "have value between 1 and 10000"
        )
    return min(n, page_items_max)


def _marker(marker: str | None) -> str:
    if not marker:
        return ""
    try:
        return base64.urlsafe_b64decode(marker.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid("Invalid Marker") from None


def _next_marker(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def _version_number(version: str) -> int | None:
    return int(version) if VERSION.match(version) else None


class InvokeResult:
    __slots__ = ("status", "payload", "function_error", "logs", "request_id", "executed_version")

    def __init__(
        self,
        payload: bytes,
        function_error: str | None,
        logs: bytes,
        request_id: str,
        executed_version: str = "$LATEST",
    ) -> None:
        self.status = 200
        self.payload = payload
        self.function_error = function_error
        self.logs = logs
        self.request_id = request_id
        self.executed_version = executed_version


class Cell:
    def __init__(
        self,
        cell_id: str,
        store: FunctionStore,
        agents: dict[str, tuple[str, int]],
        *,
        region: str = "cc-local-1",
        limits: Limits = DEFAULT_LIMITS,
        envs_per_agent_max: int = DEFAULT_LIMITS.envs_per_agent_max,
        rng: random.Random | None = None,
        invokes_inflight_max: int = 1000,
        sharding: str = "signature",
        shard_size: int = 2,
        poison: PoisonParams | None = None,
        net_internal: tuple[str, ...] = (net_policy.DEFAULT_POOL,),
    ) -> None:
        self.cell_id = cell_id
        # Region-internal IPv4 ranges besides the always-denied set and this host's own
        # addresses (the environments' pool, other hosts' agents): no allow entry inside them.
        self.net_internal = net_internal
        self.store = store
        self.region = region
        self.limits = limits
        self.rng = rng or random.Random()
        self.placement = Placement(
            env_id_prefix=f"{cell_id}-{os.urandom(4).hex()}",
            idle_timeout_ms=limits.env_idle_timeout_ms,
        )
        self.agents = {aid: Client(h, p, expect_role="agent") for aid, (h, p) in agents.items()}
        # Shuffle sharding: a function is placed only on its shard of k agents. Shards are
        # fixed (never re-drawn when an agent fails: a poison function could otherwise walk
        # across the cell); a failed agent leaves every shard's eligible set until it is back.
        workers = [Worker(a) for a in sorted(agents)]
        self.shard_size = max(1, min(shard_size, len(workers)))
        self.sharding = sharding
        self.sharder: PlainSharder | SignatureSharder | None = None
        if workers:
            self.sharder = (PlainSharder(workers, self.shard_size) if sharding == "plain" else
                            SignatureSharder(workers, self.shard_size, seed=cell_id.encode(),
                                             one_per_zone=False))
        self.shards: dict[str, tuple[str, ...]] = {}
        self.failed_agents: dict[str, dict[str, Any]] = {}  # reported in status
        self.poison = PoisonDetector(poison or PoisonParams.for_shard(self.shard_size))
        for aid in agents:
            self.placement.add_agent(aid, envs_per_agent_max)
        self._pending_logs: list[tuple[str, str, int, str, bytes]] = []
        self._functions: dict[tuple[str, str], FunctionRecord] = {}
        self._versions: dict[tuple[str, str, int], FunctionRecord] = {}
        self._reserved: dict[tuple[str, str], int | None] = {}
        # (account, name, qualifier) -> (the version it keeps warm, how many, last modified)
        self._provisioned: dict[tuple[str, str, str], tuple[FunctionRecord, int, str]] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        # Bundles (frontend/store.py counts their references): a digest no record holds is
        # freed at once, unless an environment is being created from it (pinned: freed when
        # the create ends); agents are told to forget it too (retried at each agent poll).
        self._bundle_pins: dict[str, int] = {}
        self._bundles_deferred: set[str] = set()
        self._forget_pending: dict[str, set[str]] = {}
        self._forgetting = False
        # The durable async intake (frontend/events.py), set by the server; None: no async path.
        self.events: Intake | None = None
        self.registry: RegistryStore | None = None  # the cell's registry (image functions)
        # Sync invokes in flight in the whole cell; over this, 429 with Retry-After (shedding
        # before the hosts' queues collapse).
        self.invokes_inflight_max = invokes_inflight_max
        self._inflight_total = 0
        self.counters = {
            "invocations": 0,
            "function_errors": 0,
            "throttles": 0,
            "cold_starts": 0,
            "agent_failures": 0,
        }

    # -- function metadata ----------------------------------------------------------------------
    def function(self, account: str, name: str) -> FunctionRecord:
        key = (account, name)
        rec = self._functions.get(key)
        if rec is None:
            rec = self.store.get(account, name)
            if rec is None:
                raise errors.not_found(
                    f"Function not found: {function_arn(self.region, account, name)}"
                )
            self._functions[key] = rec
        return rec

    def version(self, account: str, name: str, version: str) -> FunctionRecord:
        """$LATEST or a published version of a function (ResourceNotFound otherwise)."""
        latest = self.function(account, name)
        if version == "$LATEST":
            return latest
        number = _version_number(version)
        rec = self._versions.get((account, name, number)) if number is not None else None
        if rec is None and number is not None:
            rec = self.store.get_version(account, name, number)
            if rec is not None:
                self._versions[(account, name, number)] = rec
        if rec is None:
            raise errors.not_found(
                f"Function not found: {function_arn(self.region, account, name, version)}"
            )
        return rec

    def resolve(self, account: str, name: str, qualifier: str | None) -> tuple[FunctionRecord, str]:
        """The record an invoke runs and the ARN it was invoked as: $LATEST, a version, or an
        alias (which picks one of its two versions by weight)."""
        arn = function_arn(self.region, account, name, qualifier)
        if qualifier is None or qualifier == "$LATEST" or VERSION.match(qualifier):
            return self.version(account, name, qualifier or "$LATEST"), arn
        alias = self.alias(account, name, qualifier)
        chosen = pick_version(alias.function_version, alias.weights, self.rng)
        return self.version(account, name, chosen), arn

    def _decode_zip(
        self, b64: object, field_name: str = "Code.ZipFile"
    ) -> tuple[bytes, BundleInfo]:
        if not isinstance(b64, str):
            raise errors.invalid(f"{field_name} must be a base64-encoded zip file")
        b64_max = (self.limits.zip_bytes_max + 2) // 3 * 4
        if len(b64) > b64_max:
            raise LambdaError(
                413,
                "RequestEntityTooLargeException",
                f"Request must be smaller than {b64_max} bytes of base64 for {field_name}",
            )
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError as e:
            raise errors.invalid(f"{field_name} is not valid base64") from e
        return data, inspect_zip(data, self.limits)

    def _with_bundle(self, info: BundleInfo, data: bytes, write: Callable[[], T]) -> T:
        """The bundle durably first, then the record that names it; if the record is not
        written (any error, a conflict), the bundle is given back."""
        self.store.put_bundle(info.sha256, data)
        try:
            return write()
        finally:
            self._release_bundles([info.sha256])  # nothing happens if the record holds it

    def _release_bundles(self, digests: Iterable[str]) -> None:
        """Free the bundles no function, version or layer version holds any more: the
        frontend's file now, the agents' unpacked copies within seconds."""
        freed = []
        for sha in self.store.unreferenced(digests):
            if self._bundle_pins.get(sha):
                self._bundles_deferred.add(sha)
                continue
            self._bundles_deferred.discard(sha)
            self.store.delete_bundle(sha)
            freed.append(sha)
        if not freed:
            return
        for agent_id in self.agents:
            self._forget_pending.setdefault(agent_id, set()).update(freed)
        self._forget_soon()
        self._restore_reserve()

    def _forget_soon(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test): the next agent poll sends them
        if not self._forgetting:
            self._forgetting = True
            asyncio.ensure_future(self._send_forgets())

    async def _send_forgets(self) -> None:
        """Tell each agent which digests it may drop (a digest wanted again meanwhile is not
        sent); what could not be delivered stays pending for the next agent poll."""
        self._forgetting = True
        try:
            for agent_id in list(self._forget_pending):
                pending = self._forget_pending[agent_id]
                pending.intersection_update(self.store.unreferenced(pending))
                batch = sorted(pending)[: self.limits.forget_bundles_digests_max]
                if not batch or not self.placement.agents[agent_id].up:
                    continue
                try:
                    await self.agents[agent_id].call(
                        "forget_bundles", {"sha256": batch},
                        timeout_s=self.limits.agent_call_timeout_ms / 1000)
                except (TransportError, RemoteError) as e:
                    log.warning("agent %s could not forget %d bundles yet: %s", agent_id,
                                len(batch), e)
                    continue
                pending.difference_update(batch)
        finally:
            self._forgetting = False
        if any(self._forget_pending.values()):
            log.debug("bundles still to forget: %d", sum(map(len, self._forget_pending.values())))

    def _restore_reserve(self) -> None:
        try:
            self.store.restore_reserve()
        except OSError as e:
            log.warning("could not restore the state disk reserve: %s", e)

    def _layers(self, account: str, value: object) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise errors.invalid("Layers must be a list of layer version ARNs")
        if len(value) > layers_per_function_max:
            raise errors.invalid(f"Cannot reference more than {layers_per_function_max} layers.")
        out = []
        for arn in value:
            m = LAYER_VERSION_ARN.match(arn)
            if m is None:
                raise _validation(
                    f"Value '{arn}' at 'layers' failed to satisfy constraint: "
                    "Member must satisfy regular expression pattern: "
                    "arn:aws:lambda:REGION:ACCOUNT:layer:NAME:VERSION"
                )
            rec = None
            if m.group("region") == self.region and m.group("account") == account:
                rec = self.store.get_layer_version(
                    account, m.group("name"), int(m.group("version"))
                )
            if rec is None:
                raise errors.invalid(f"Layer version {arn} does not exist.")
            out.append(
                {
                    "arn": arn,
                    "sha256": rec.sha256,
                    "code_size": rec.code_size,
                    "unzipped": rec.unzipped_size,
                    "layer": rec.name,
                }
            )
        if len({layer["layer"] for layer in out}) != len(out):
            raise errors.invalid("Two different versions of the same layer are not allowed.")
        return out

    def _check_total_size(self, unzipped: int, layers: list[dict[str, Any]]) -> None:
        total = unzipped + sum(int(layer["unzipped"]) for layer in layers)
        if total > self.limits.unzipped_bytes_max:
            raise errors.invalid(
                f"Function code combined with layers exceeds the maximum allowed size of "
                f"{self.limits.unzipped_bytes_max} bytes. The actual size is {total} bytes."
            )

    def _net_internal(self) -> list[str]:
        try:
            with open("/proc/net/fib_trie") as f:
                local = vpc.local_addresses(f.read())
        except OSError:
            local = []
        return [*net_policy.ALWAYS_DENIED_V4, *self.net_internal, *local]

    def _config_changes(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Validated FunctionRecord fields for the configuration keys present in ``doc``."""
        changes: dict[str, Any] = {}
        if "Runtime" in doc:
            changes["runtime"] = check_runtime(doc["Runtime"])
        if "Handler" in doc:
            changes["handler"] = check_handler(doc["Handler"])
        if "MemorySize" in doc:
            changes["memory_mb"] = check_memory(doc["MemorySize"], self.limits)
        if "Timeout" in doc:
            changes["timeout_s"] = check_timeout(doc["Timeout"], self.limits)
        if "Environment" in doc:
            changes["environment"] = check_env(
                _opt_dict(doc, "Environment").get("Variables"), self.limits
            )
        if "Description" in doc:
            changes["description"] = _description(doc["Description"])
        if "Role" in doc:
            if not isinstance(doc["Role"], str) or len(doc["Role"]) > 10_000:
                raise errors.invalid("Role must be an IAM role ARN")
            changes["role"] = doc["Role"]
        if "Layers" in doc:
            changes["layers"] = self._layers(account, doc["Layers"])
        if "EphemeralStorage" in doc:
            size = _opt_dict(doc, "EphemeralStorage").get("Size")
            if (
                isinstance(size, bool)
                or not isinstance(size, int)
                or not ephemeral_mb_min <= size <= ephemeral_mb_max
            ):
                raise errors.invalid(
                    f"EphemeralStorage.Size must be between {ephemeral_mb_min} "
                    f"and {ephemeral_mb_max} MB"
                )
            changes["ephemeral_mb"] = size
        if "VpcConfig" in doc:
            try:
                setting = vpc.parse(doc["VpcConfig"], self._net_internal())
            except vpc.VpcError as e:
                raise errors.invalid(str(e)) from None
            changes["network"], changes["net_allow"] = setting.mode, list(setting.allow)
        if "Architectures" in doc and doc["Architectures"] not in (None, ["x86_64"]):
            raise errors.invalid("Only the x86_64 architecture is supported on this host")
        if doc.get("PackageType") not in (None, "Zip"):
            raise errors.invalid("Only PackageType Zip is supported")
        return changes

    def create_function(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        if doc.get("PackageType") == image_functions.IMAGE:
            return image_functions.create_function(self, account, doc)
        image_functions.refuse_for_zip(doc)
        name = check_name(doc.get("FunctionName"))
        for required in ("Runtime", "Handler"):
            if doc.get(required) is None:
                raise errors.invalid(f"{required} is required for a function of PackageType Zip")
        changes = self._config_changes(account, doc)
        code = _opt_dict(doc, "Code")
        if "ZipFile" not in code:
            raise errors.invalid("Code.ZipFile is required (S3 locations are not supported)")
        tags = _tags(doc.get("Tags"))
        publish = doc.get("Publish", False)
        if not isinstance(publish, bool):
            raise errors.invalid("Publish must be a boolean")
        if self.store.get(account, name) is not None:
            raise errors.conflict(f"Function already exist: {name}")
        if self.store.count(account) >= self.limits.functions_per_tenant_max:
            raise errors.LambdaError(
                400, "CodeStorageExceededException", "Too many functions in this account"
            )
        data, info = self._decode_zip(code["ZipFile"])
        self._check_total_size(info.unzipped_bytes, changes.get("layers", []))
        fields: dict[str, Any] = {
            "memory_mb": self.limits.memory_mb_default,
            "timeout_s": self.limits.timeout_s_default,
            **changes,
        }
        rec = FunctionRecord(
            account=account,
            name=name,
            code_sha256=info.sha256,
            code_size=len(data),
            unzipped_size=info.unzipped_bytes,
            tags=tags,
            revision=1,
            revision_id=str(uuid.uuid4()),
            last_modified=_now_iso(),
            **fields,
        )
        if not self._with_bundle(info, data, lambda: self.store.put_new(rec)):
            raise errors.conflict(f"Function already exist: {name}")
        if publish:
            return config_doc(self._publish(rec, None), self.region)
        return config_doc(rec, self.region)

    def _replace(self, old: FunctionRecord, new: FunctionRecord) -> FunctionRecord:
        if not self.store.update(new, old.revision):
            raise errors.conflict("The function was modified concurrently; retry")
        self._functions[(new.account, new.name)] = new
        self._retire(old.key)
        return new

    @staticmethod
    def _check_revision(doc: dict[str, Any], current: str) -> None:
        rid = doc.get("RevisionId")
        if rid is not None and rid != current:
            raise LambdaError(
                412,
                "PreconditionFailedException",
                "The Revision Id provided does not match the latest Revision Id. "
                "Call the GetFunction/GetAlias API to retrieve the latest "
                "Revision Id",
            )

    def update_code(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        self._check_revision(doc, old.revision_id)
        if "ImageUri" in doc or old.package_type == image_functions.IMAGE:
            return image_functions.update_code(self, account, name, doc)
        if "ZipFile" not in doc:
            raise errors.invalid("ZipFile is required (S3 locations and images are not supported)")
        if doc.get("Architectures") not in (None, ["x86_64"]):
            raise errors.invalid("Only the x86_64 architecture is supported on this host")
        data, info = self._decode_zip(doc["ZipFile"], "ZipFile")
        self._check_total_size(info.unzipped_bytes, old.layers)
        new = replace(
            old,
            code_sha256=info.sha256,
            code_size=len(data),
            unzipped_size=info.unzipped_bytes,
            revision=old.revision + 1,
            revision_id=str(uuid.uuid4()),
            last_modified=_now_iso(),
        )
        if doc.get("DryRun") is True:  # validated, nothing written
            return config_doc(new, self.region)
        new = self._with_bundle(info, data, lambda: self._replace(old, new))
        self._release_bundles(_digests(old))
        if doc.get("Publish") is True:
            return config_doc(self._publish(new, None), self.region)
        return config_doc(new, self.region)

    def update_configuration(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        self._check_revision(doc, old.revision_id)
        changes = self._config_changes(account, doc)
        changes.update(image_functions.update_image_config(old, doc))
        self._check_total_size(old.unzipped_size, changes.get("layers", old.layers))
        new = replace(
            old,
            **changes,
            revision=old.revision + 1,
            revision_id=str(uuid.uuid4()),
            last_modified=_now_iso(),
        )
        doc_out = config_doc(self._replace(old, new), self.region)
        self._release_bundles(_digests(old))  # layers it no longer uses
        return doc_out

    def delete_function(self, account: str, name: str, qualifier: str | None = None) -> None:
        old = self.function(account, name)
        if qualifier is not None:
            number = _version_number(qualifier)
            if number is None:
                raise errors.invalid(
                    f"Deletion of {qualifier} is not supported; delete the "
                    "function, or one of its published versions"
                )
            rec = self.version(account, name, qualifier)
            users = [
                a.alias
                for a in self._all_aliases(account, name)
                if a.function_version == qualifier or qualifier in a.weights
            ]
            if users:
                raise errors.conflict(
                    f"Unable to delete version because the following aliases reference it: {users}"
                )
            self.store.delete_version(account, name, number)
            self._versions.pop((account, name, number), None)
            self._retire(rec.key)
            self._release_bundles(_digests(rec))
            return
        versions = self.store.list_versions(account, name, 0, versions_per_function_max)
        for key in [k for k in self._provisioned if k[:2] == (account, name)]:
            self.delete_provisioned(*key)
        self.store.delete(account, name)
        self._functions.pop((account, name), None)
        self._reserved.pop((account, name), None)
        self._retire(old.key)
        for v in versions:
            self._versions.pop((account, name, int(v.version)), None)
            self._retire(v.key)
        self._release_bundles(set().union(_digests(old), *map(_digests, versions)))

    def list_functions(
        self, account: str, marker: str | None, max_items: int, all_versions: bool = False
    ) -> dict[str, Any]:
        after = _marker(marker)
        recs = self.store.list_page(account, after, max_items + 1)
        out: dict[str, Any] = {"Functions": []}
        for r in recs[:max_items]:
            out["Functions"].append(config_doc(r, self.region, qualify_latest=all_versions))
            if all_versions:
                out["Functions"] += [
                    config_doc(v, self.region)
                    for v in self.store.list_versions(account, r.name, 0, page_items_max)
                ]
        if len(recs) > max_items:
            out["NextMarker"] = _next_marker(recs[max_items - 1].name)
        return out

    # -- versions --------------------------------------------------------------------------------
    def _publish(self, latest: FunctionRecord, description: str | None) -> FunctionRecord:
        published = self.store.list_versions(
            latest.account, latest.name, 0, versions_per_function_max
        )
        if published:
            last = published[-1]
            # Nothing changed since the last version: Lambda hands that one back.
            if (last.code_sha256, last.revision) == (latest.code_sha256, latest.revision):
                return last
        if len(published) >= versions_per_function_max:
            raise LambdaError(
                400,
                "CodeStorageExceededException",
                f"A function can have at most {versions_per_function_max} versions",
            )
        snapshot = replace(
            latest,
            description=latest.description if description is None else description,
            revision_id=str(uuid.uuid4()),
        )
        return self.store.publish_version(snapshot)

    def publish_version(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        latest = self.function(account, name)
        self._check_revision(doc, latest.revision_id)
        sha = doc.get("CodeSha256")
        if sha is not None and sha != config_doc(latest, self.region)["CodeSha256"]:
            raise errors.invalid(
                f"CodeSHA256 ({sha}) is different from current CodeSHA256 in "
                "$LATEST. Please try again with the CodeSHA256 in $LATEST."
            )
        description = _description(doc["Description"]) if doc.get("Description") else None
        return config_doc(self._publish(latest, description), self.region)

    def list_versions(
        self, account: str, name: str, marker: str | None, max_items: int
    ) -> dict[str, Any]:
        latest = self.function(account, name)
        after_raw = _marker(marker)
        items: list[dict[str, Any]] = []
        if not after_raw:
            items.append(config_doc(latest, self.region, qualify_latest=True))
            after = 0
        else:
            try:
                after = int(after_raw)
            except ValueError:
                raise errors.invalid("Invalid Marker") from None
        room = max_items - len(items)
        recs = self.store.list_versions(account, name, after, room + 1)
        items += [config_doc(r, self.region) for r in recs[:room]]
        out: dict[str, Any] = {"Versions": items}
        if len(recs) > room:
            out["NextMarker"] = _next_marker(str(recs[room - 1].version) if room > 0 else "0")
        return out

    # -- aliases ---------------------------------------------------------------------------------
    def alias(self, account: str, name: str, alias: str) -> AliasRecord:
        self.function(account, name)
        rec = self.store.get_alias(account, name, alias)
        if rec is None:
            raise errors.not_found(
                f"Alias not found: {function_arn(self.region, account, name, alias)}"
            )
        return rec

    def _all_aliases(self, account: str, name: str) -> list[AliasRecord]:
        return self.store.list_aliases(account, name, "", aliases_per_function_max + 1)

    def alias_doc(self, rec: AliasRecord) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "AliasArn": function_arn(self.region, rec.account, rec.name, rec.alias),
            "Name": rec.alias,
            "FunctionVersion": rec.function_version,
            "Description": rec.description,
            "RevisionId": rec.revision_id,
        }
        if rec.weights:
            doc["RoutingConfig"] = {"AdditionalVersionWeights": dict(rec.weights)}
        return doc

    def _check_alias_target(
        self, account: str, name: str, primary: object, routing: object
    ) -> tuple[str, dict[str, float]]:
        if not isinstance(primary, str) or not (primary == "$LATEST" or VERSION.match(primary)):
            raise _validation(
                f"Value '{primary}' at 'functionVersion' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: "
                "(\\$LATEST|[0-9]+)"
            )
        self.version(account, name, primary)
        weights = check_routing(primary, routing)
        for v in weights:
            self.version(account, name, v)
        return primary, weights

    def create_alias(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        self.function(account, name)
        alias = check_alias_name(doc.get("Name"))
        primary, weights = self._check_alias_target(
            account, name, doc.get("FunctionVersion"), doc.get("RoutingConfig")
        )
        description = _description(doc.get("Description") or "")
        if len(self._all_aliases(account, name)) >= aliases_per_function_max:
            raise LambdaError(
                400,
                "AliasLimitExceededException",
                f"A function can have at most {aliases_per_function_max} aliases",
            )
        rec = AliasRecord(account, name, alias, primary, description, weights, str(uuid.uuid4()))
        if not self.store.put_alias(rec, new=True):
            raise errors.conflict(
                f"Alias already exists: {function_arn(self.region, account, name, alias)}"
            )
        return self.alias_doc(rec)

    def update_alias(
        self, account: str, name: str, alias: str, doc: dict[str, Any]
    ) -> dict[str, Any]:
        old = self.alias(account, name, alias)
        self._check_revision(doc, old.revision_id)
        primary = doc.get("FunctionVersion") or old.function_version
        routing = (
            doc["RoutingConfig"]
            if "RoutingConfig" in doc
            else ({"AdditionalVersionWeights": old.weights} if old.weights else None)
        )
        primary, weights = self._check_alias_target(account, name, primary, routing)
        description = _description(doc["Description"]) if "Description" in doc else old.description
        new = replace(
            old,
            function_version=primary,
            weights=weights,
            description=description,
            revision_id=str(uuid.uuid4()),
        )
        if not self.store.put_alias(new, new=False):
            raise errors.conflict("The alias was modified concurrently; retry")
        return self.alias_doc(new)

    def delete_alias(self, account: str, name: str, alias: str) -> None:
        self.function(account, name)
        self.store.delete_alias(account, name, alias)  # idempotent, as Lambda's

    def list_aliases(
        self,
        account: str,
        name: str,
        marker: str | None,
        max_items: int,
        function_version: str | None,
    ) -> dict[str, Any]:
        self.function(account, name)
        out: dict[str, Any] = {"Aliases": []}
        for r in self.store.list_aliases(
            account, name, _marker(marker), aliases_per_function_max + 1
        ):
            if (
                function_version
                and r.function_version != function_version
                and function_version not in r.weights
            ):
                continue
            if len(out["Aliases"]) == max_items:
                out["NextMarker"] = _next_marker(out["Aliases"][-1]["Name"])
                break
            out["Aliases"].append(self.alias_doc(r))
        return out

    # -- reserved concurrency --------------------------------------------------------------------
    def reserved(self, account: str, name: str) -> int | None:
        key = (account, name)
        if key not in self._reserved:
            self._reserved[key] = self.store.get_concurrency(account, name)
        return self._reserved[key]

    def put_concurrency(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        self.function(account, name)
        n = doc.get("ReservedConcurrentExecutions")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise errors.invalid("ReservedConcurrentExecutions must be an integer >= 0")
        others = self.store.reserved_total(account, name)
        if others + n > account_concurrency_max - unreserved_concurrency_min:
            raise errors.invalid(
                f"Specified ReservedConcurrentExecutions for function decreases account's "
                f"UnreservedConcurrentExecution below its minimum value of "
                f"[{unreserved_concurrency_min}]."
            )
        self.store.put_concurrency(account, name, n)
        self._reserved[(account, name)] = n
        return {"ReservedConcurrentExecutions": n}

    # -- provisioned concurrency ---------------------------------------------------------------
    def _provisioned_target(self, account: str, name: str, qualifier: str) -> FunctionRecord:
        if not qualifier or qualifier == "$LATEST":
            raise errors.invalid("Provisioned concurrency needs a published version or an alias "
                                 "as Qualifier ($LATEST cannot be provisioned)")
        if VERSION.match(qualifier):
            return self.version(account, name, qualifier)
        return self.version(account, name, self.alias(account, name, qualifier).function_version)

    def put_provisioned(self, account: str, name: str, qualifier: str,
                        doc: dict[str, Any]) -> dict[str, Any]:
        n = doc.get("ProvisionedConcurrentExecutions")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise errors.invalid("ProvisionedConcurrentExecutions must be an integer >= 1")
        rec = self._provisioned_target(account, name, qualifier)
        reserved = self.reserved(account, name)
        if reserved is not None and n > reserved:
            raise errors.invalid(f"Requested Provisioned Concurrency ({n}) should not be greater "
                                 f"than the reservedConcurrentExecution for function ({reserved})")
        self.store.put_provisioned(account, name, qualifier, n)
        self._provisioned[(account, name, qualifier)] = (rec, n, _now_iso())
        self.placement.set_provisioned(rec.key, n)
        self._provision_soon()
        return self.provisioned_doc(account, name, qualifier)

    def provisioned_doc(self, account: str, name: str, qualifier: str) -> dict[str, Any]:
        self.function(account, name)
        entry = self._provisioned.get((account, name, qualifier))
        if entry is None:
            raise errors.LambdaError(404, "ProvisionedConcurrencyConfigNotFoundException",
                                     f"No Provisioned Concurrency Config found for this function "
                                     f"({name}:{qualifier})")
        rec, n, modified = entry
        ready = sum(1 for e in self.placement.envs.values()
                    if e.function_key == rec.key and e.provisioned and e.state != "creating")
        return {"RequestedProvisionedConcurrentExecutions": n,
                "AllocatedProvisionedConcurrentExecutions": min(ready, n),
                "AvailableProvisionedConcurrentExecutions": min(ready, n),
                "Status": "READY" if ready >= n else "IN_PROGRESS",
                "LastModified": modified}

    def delete_provisioned(self, account: str, name: str, qualifier: str) -> None:
        self.provisioned_doc(account, name, qualifier)  # 404 if absent
        rec, _, _ = self._provisioned.pop((account, name, qualifier))
        self.store.put_provisioned(account, name, qualifier, None)
        self.placement.set_provisioned(rec.key, 0)

    def load_provisioned(self) -> None:
        """At start: the provisioned pools configured before a restart."""
        for account, name, qualifier, n in self.store.list_provisioned():
            try:
                rec = self._provisioned_target(account, name, qualifier)
            except LambdaError:
                continue
            self._provisioned[(account, name, qualifier)] = (rec, n, _now_iso())
            self.placement.set_provisioned(rec.key, n)

    def _provision_soon(self) -> None:
        recs = {rec.key: rec for rec, _, _ in self._provisioned.values()}
        for create in self.placement.provision(int(time.time() * 1000)):
            rec = recs.get(self.placement.envs[create.env_id].function_key)
            if rec is not None:
                asyncio.ensure_future(self._prewarm(rec, create))

    async def _prewarm(self, rec: FunctionRecord, create: Create) -> None:
        try:
            await self._create_env(rec, create, prewarm=True)
        except _AgentUnavailable:
            log.warning("could not provision an environment for %s", rec.key)

    def delete_concurrency(self, account: str, name: str) -> None:
        self.function(account, name)
        self.store.put_concurrency(account, name, None)
        self._reserved[(account, name)] = None

    # -- layers ----------------------------------------------------------------------------------
    def layer_doc(self, rec: LayerVersionRecord, *, content: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "LayerVersionArn": layer_arn(self.region, rec.account, rec.name, rec.version),
            "Version": rec.version,
            "Description": rec.description,
            "CreatedDate": rec.created_date,
            "CompatibleRuntimes": rec.compatible_runtimes,
            "CompatibleArchitectures": rec.compatible_architectures,
            "LicenseInfo": rec.license_info,
        }
        if content:
            doc["LayerArn"] = layer_arn(self.region, rec.account, rec.name)
            doc["Content"] = {
                "Location": f"/cellcloud/v1/bundles/{rec.sha256}",
                "CodeSha256": base64.b64encode(bytes.fromhex(rec.sha256)).decode(),
                "CodeSize": rec.code_size,
            }
        return doc

    def publish_layer_version(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        content = _opt_dict(doc, "Content")
        if "ZipFile" not in content:
            raise errors.invalid("Content.ZipFile is required (S3 locations are not supported)")
        runtimes = doc.get("CompatibleRuntimes") or []
        archs = doc.get("CompatibleArchitectures") or []
        if (
            not isinstance(runtimes, list)
            or len(runtimes) > 15
            or not all(isinstance(r, str) and 0 < len(r) <= 64 for r in runtimes)
        ):
            raise errors.invalid("CompatibleRuntimes must be a list of at most 15 runtimes")
        if (
            not isinstance(archs, list)
            or len(archs) > 2
            or not all(a in ("x86_64", "arm64") for a in archs)
        ):
            raise errors.invalid("CompatibleArchitectures must be a list of x86_64 and arm64")
        license_info = doc.get("LicenseInfo") or ""
        if not isinstance(license_info, str) or len(license_info) > 512:
            raise errors.invalid("LicenseInfo must be a string of at most 512 characters")
        description = _description(doc.get("Description") or "")
        data, info = self._decode_zip(content["ZipFile"], "Content.ZipFile")
        rec = self._with_bundle(info, data, lambda: self.store.publish_layer_version(
            LayerVersionRecord(
                account,
                name,
                0,
                info.sha256,
                len(data),
                info.unzipped_bytes,
                description,
                list(runtimes),
                list(archs),
                license_info,
                _now_iso(),
            )
        ))
        return self.layer_doc(rec, content=True)

    def layer_version(self, account: str, name: str, version: int) -> LayerVersionRecord:
        rec = self.store.get_layer_version(account, name, version)
        if rec is None:
            raise errors.not_found(
                f"Layer version {layer_arn(self.region, account, name, version)} does not exist."
            )
        return rec

    def delete_layer_version(self, account: str, name: str, version: int) -> None:
        # Idempotent, as Lambda's; functions that use it keep their copy (bundles are by digest,
        # and a function's record holds its layers' digests).
        rec = self.store.get_layer_version(account, name, version)
        self.store.delete_layer_version(account, name, version)
        if rec is not None:
            self._release_bundles([rec.sha256])

    def list_layer_versions(
        self, account: str, name: str, marker: str | None, max_items: int, runtime: str | None
    ) -> dict[str, Any]:
        raw = _marker(marker)
        try:
            before = int(raw) if raw else 1 << 62
        except ValueError:
            raise errors.invalid("Invalid Marker") from None
        out: dict[str, Any] = {"LayerVersions": []}
        for r in self.store.list_layer_versions(account, name, before, layer_versions_scan_max):
            if runtime and runtime not in r.compatible_runtimes:
                continue
            if len(out["LayerVersions"]) == max_items:
                out["NextMarker"] = _next_marker(str(out["LayerVersions"][-1]["Version"]))
                break
            out["LayerVersions"].append(self.layer_doc(r, content=False))
        return out

    def list_layers(
        self, account: str, marker: str | None, max_items: int, runtime: str | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"Layers": []}
        names = self.store.list_layer_names(account, _marker(marker), max_items + 1)
        for layer_name in names[:max_items]:
            newest = self.list_layer_versions(account, layer_name, None, 1, runtime)
            if newest["LayerVersions"]:
                out["Layers"].append(
                    {
                        "LayerName": layer_name,
                        "LayerArn": layer_arn(self.region, account, layer_name),
                        "LatestMatchingVersion": newest["LayerVersions"][0],
                    }
                )
        if len(names) > max_items:
            out["NextMarker"] = _next_marker(names[max_items - 1])
        return out

    def _retire(self, function_key: str) -> None:
        self.placement.set_provisioned(function_key, 0)
        for d in self.placement.retire_function(function_key):
            self._destroy_soon(d.env_id, d.agent_id)

    # -- the invoke path ---------------------------------------------------------------------
    async def invoke(
        self,
        account: str,
        name: str,
        payload: bytes,
        *,
        log_tail: bool,
        qualifier: str | None = None,
        request_id: str | None = None,
    ) -> InvokeResult:
        rec, invoked_arn = self.resolve(account, name, qualifier)
        if len(payload) > self.limits.invoke_payload_bytes_max:
            raise LambdaError(
                413,
                "RequestEntityTooLargeException",
                f"{len(payload)} byte payload is too large for the RequestResponse invocation "
                f"type (limit {self.limits.invoke_payload_bytes_max} bytes)",
            )
        if payload:
            check_json_depth(payload, self.limits.json_depth_max)
            try:
                json.loads(payload)
            except (ValueError, UnicodeDecodeError) as e:
                raise LambdaError(
                    400,
                    "InvalidRequestContentException",
                    f"Could not parse request body into json: {e}",
                ) from e
        # Reserved concurrency is the function's, over all its versions: count in-flight
        # invokes here (the placement's own limit is per version).
        reserved = self.reserved(account, name)
        fkey = (account, name)
        if reserved is not None and self._inflight.get(fkey, 0) >= reserved:
            self.counters["throttles"] += 1
            err = errors.too_many(
                f"Rate Exceeded. Reserved concurrency of {reserved} reached for {name}.",
                "ReservedFunctionConcurrentInvocationLimitExceeded",
            )
            if reserved == 0:  # async events of this function go to on-failure at once
                err.http_headers[RESERVED_ZERO_HEADER] = "0"
            raise err
        if self._inflight_total >= self.invokes_inflight_max:
            self.counters["throttles"] += 1
            raise errors.too_many("Rate Exceeded. The cell is over capacity.",
                                  "CellConcurrencyLimitExceeded")
        self._inflight[fkey] = self._inflight.get(fkey, 0) + 1
        self._inflight_total += 1
        try:
            return await self._invoke_placed(rec, invoked_arn, payload, log_tail, reserved,
                                             request_id)
        finally:
            self._inflight_total -= 1
            self._inflight[fkey] -= 1
            if not self._inflight[fkey]:
                del self._inflight[fkey]

    async def _invoke_placed(
        self,
        rec: FunctionRecord,
        invoked_arn: str,
        payload: bytes,
        log_tail: bool,
        reserved: int | None,
        request_id: str | None = None,
    ) -> InvokeResult:
        request_id = request_id or str(uuid.uuid4())
        self.counters["invocations"] += 1
        # Retries here and only here, only when the failure happened before the handler could
        # have run (an agent that could not be reached or could not start the env), each on a
        # different agent of the function's shard; the poison detector is asked every time.
        skey = f"{rec.account}/{rec.name}"
        shard = self.shard_of(skey)
        failed: list[str] = []
        attempts = max(2, len(shard))
        gone = 0  # environments found dead (EnvGone): placed again, no handler code ran
        attempt = 0
        while attempt < attempts:
            now_ms = int(time.time() * 1000)
            verdict = self.poison.allowed(skey, now_ms)
            if verdict is not True:
                assert not isinstance(verdict, bool)
                self.counters["throttles"] += 1
                raise errors.too_many(
                    f"Rate Exceeded. Invocations of {rec.name} keep killing workers; retry after "
                    f"{verdict.retry_after_ms} ms.", "FunctionKillsWorkers")
            eligible = [a for a in retry_order(shard, attempt, skey, failed=failed)
                        if a not in failed]
            decision = self.placement.acquire(
                rec.key,
                reserved or self.limits.function_concurrency_default,
                now_ms,
                eligible_agents=eligible if shard else None,
            )
            if isinstance(decision, Throttle):
                self.counters["throttles"] += 1
                raise errors.too_many(decision.message, decision.reason)
            if isinstance(decision, Create):
                self.counters["cold_starts"] += 1
                try:
                    await self._create_env(rec, decision)
                except _AgentUnavailable as e:
                    failed.append(decision.agent_id)
                    attempt += 1
                    if attempt < attempts:
                        continue
                    if e.full:  # every agent tried is at its environment or memory cap
                        self.counters["throttles"] += 1
                        raise errors.too_many(
                            "Rate Exceeded. The cell's hosts are at capacity.",
                            "ConcurrentInvocationLimitExceeded",
                        ) from None
                    raise errors.service("No agent could start an execution environment") from None
            try:
                return await self._invoke_on(rec, decision, request_id, payload, log_tail,
                                             invoked_arn)
            except (_EnvGone, _EnvReset) as e:
                # No handler code ran in it: the environment died idle (EnvGone), or the agent
                # reset it because its extensions overran the previous invocation (EnvReset).
                # As Lambda: another environment, a bounded number of times.
                gone += 1
                if gone > self.limits.env_gone_retries_max:
                    raise errors.service(f"The execution environment failed: {e}") from None
        raise AssertionError("unreachable")

    async def _create_env(self, rec: FunctionRecord, decision: Create,
                          prewarm: bool = False) -> None:
        """Pins the function's bundles for the duration: they may be pushed to the agent."""
        digests = _digests(rec)
        for sha in digests:
            self._bundle_pins[sha] = self._bundle_pins.get(sha, 0) + 1
        try:
            await self._create_env_pinned(rec, decision, prewarm)
        finally:
            for sha in digests:
                self._bundle_pins[sha] -= 1
                if not self._bundle_pins[sha]:
                    del self._bundle_pins[sha]
            if self._bundles_deferred & digests:
                self._release_bundles(self._bundles_deferred & digests)

    async def _create_env_pinned(self, rec: FunctionRecord, decision: Create,
                                 prewarm: bool) -> None:
        client = self.agents[decision.agent_id]
        body: dict[str, Any] = {
            "env_id": decision.env_id,
            "function_key": rec.key,
            "bundle_sha256": rec.code_sha256,
            "create_timeout_ms": self.limits.env_create_timeout_ms,
            "function": {
                "name": rec.name,
                "arn": function_arn(self.region, rec.account, rec.name),
                "handler": rec.handler,
                "runtime": rec.runtime,
                "memory_mb": rec.memory_mb,
                "timeout_s": rec.timeout_s,
                "environment": rec.environment,
                "ephemeral_mb": rec.ephemeral_mb,
                "version": rec.version,
                "network": rec.network,
                "net_allow": list(rec.net_allow),
                "layers": [layer["sha256"] for layer in rec.layers],
            },
        }
        timeout_s = self.limits.env_create_timeout_ms / 1000 + 5
        pushed: dict[str, bytes] = {}
        body["bundles"] = pushed
        layers_pushed: set[str] = set()
        if rec.package_type == image_functions.IMAGE:
            body["image"] = image_functions.agent_image(rec)
        try:
            # The agent keeps bundles by digest; push only the ones it says it lacks (the code,
            # then each layer), at most once each. Image layers are streamed in chunks.
            for _ in range(2 + len(body["function"].get("layers", []))
                           + len(rec.image.get("layers", []))):
                try:
                    await self._call_agent(client, "create_env", body, timeout_s)
                    break
                except RemoteError as e:
                    if e.type == "LayerMissing" and e.data.get("digest") not in layers_pushed:
                        layers_pushed.add(str(e.data.get("digest")))  # once each
                        await image_functions.push_layer(self, client, rec,
                                                         str(e.data.get("digest")), timeout_s)
                        continue
                    sha = str(e.data.get("sha256", ""))
                    if e.type != "BundleMissing" or not sha or sha in pushed:
                        raise
                    pushed[sha] = self.store.get_bundle(sha)
            else:
                raise RemoteError("BundleMissing", "the agent kept asking for bundles")
        except TransportError as e:
            self._agent_failed(decision.agent_id, e)
            raise _AgentUnavailable() from e
        except RemoteError as e:
            self.placement.discard(decision.env_id)
            log.warning("agent %s could not create env: %s", decision.agent_id, e)
            raise _AgentUnavailable(full=e.type in ("AgentFull", "HostMemoryExhausted")) from e
        if prewarm:
            self.placement.prewarmed(decision.env_id, int(time.time() * 1000))
        else:
            self.placement.created(decision.env_id, int(time.time() * 1000))

    async def _call_agent(self, client: Client, op: str, body: dict[str, Any],
                          timeout_s: float) -> Any:
        """One agent call; an agent being replaced in place (live update) answers
        AgentDraining before it ran anything, so the call is repeated — on a fresh connection,
        which its successor accepts — with capped exponential backoff and full jitter."""
        for attempt in range(agent_draining_retries_max):
            try:
                return await client.call(op, body, timeout_s=timeout_s)
            except RemoteError as e:
                if e.type != "AgentDraining" or attempt == agent_draining_retries_max - 1:
                    raise
            await client.close()
            await asyncio.sleep(self.rng.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
        raise AssertionError("unreachable")

    async def _invoke_on(
        self,
        rec: FunctionRecord,
        decision: Use | Create,
        request_id: str,
        payload: bytes,
        log_tail: bool,
        invoked_arn: str,
    ) -> InvokeResult:
        client = self.agents[decision.agent_id]
        timeout_ms = rec.timeout_s * 1000
        try:
            res = await self._call_agent(client, "invoke", {
                "env_id": decision.env_id,
                "request_id": request_id,
                "payload": payload,
                "timeout_ms": timeout_ms,
                "arn": invoked_arn,
            }, timeout_ms / 1000 + self.limits.agent_call_timeout_ms / 1000)
        except TransportError as e:
            # The handler may have run: no retry (sync invokes run at most once on our side).
            self.poison.on_env_crash(f"{rec.account}/{rec.name}", decision.agent_id,
                                     int(time.time() * 1000))
            self._agent_failed(decision.agent_id, e)
            raise errors.service(
                f"The execution environment's host failed during the invocation ({e})"
            ) from e
        except RemoteError as e:
            if e.type in ("EnvGone", "EnvNotFound"):
                # The agent placed nothing: the environment had died (or its agent restarted
                # without it). No handler code ran, so the caller places the invoke again.
                self.counters["envs_gone"] = self.counters.get("envs_gone", 0) + 1
                self.placement.discard(decision.env_id)
                raise _EnvGone(str(e)) from e
            self._discard(decision.env_id)
            if e.type == "EnvReset":
                self._file_logs(rec.key, e.data.get("logs"))
                raise _EnvReset(str(e)) from e
            raise errors.service(f"The execution environment failed: {e}") from e
        now_ms = int(time.time() * 1000)
        self._file_logs(rec.key, res.get("previous_logs"))
        if res.get("env_alive", True):
            self.poison.on_success(f"{rec.account}/{rec.name}", decision.agent_id, now_ms)
            for d in self.placement.release(decision.env_id, now_ms):
                self._destroy_soon(d.env_id, d.agent_id)
        else:
            # The environment crashed or timed out but its host survived: the jail contained
            # it, so it is counted (status) but does not throttle the function — an OOM or a
            # timeout is an ordinary Lambda error. Only a host that dies under an invocation
            # (the TransportError path above) counts as a killed worker.
            self.counters["env_failures"] = self.counters.get("env_failures", 0) + 1
            self.placement.discard(decision.env_id)  # the agent already removed it
        logs: bytes = res.get("logs") or b""
        if logs:
            self._pending_logs.append((rec.account, rec.name, now_ms, request_id, logs))
        if res["function_error"]:
            self.counters["function_errors"] += 1
        return InvokeResult(
            res["payload"],
            res["function_error"],
            logs[-self.limits.log_tail_bytes :] if log_tail else b"",
            request_id,
            rec.version,
        )

    def _discard(self, env_id: str) -> None:
        d = self.placement.discard(env_id)
        if d is not None:
            self._destroy_soon(d.env_id, d.agent_id)

    def shard_of(self, key: str) -> tuple[str, ...]:
        shard = self.shards.get(key)
        if shard is None:
            shard = self.sharder.shard(key) if self.sharder is not None else ()
            if len(self.shards) < shards_cached_max:
                self.shards[key] = shard
        return shard

    def _agent_failed(self, agent_id: str, exc: Exception) -> None:
        self.counters["agent_failures"] += 1
        self.failed_agents.setdefault(agent_id, {"since": _now_iso(), "error": str(exc)[:200]})
        lost = self.placement.agent_down(agent_id)
        log.warning("agent %s unreachable (%s); %d environments lost", agent_id, exc, len(lost))

    def _destroy_soon(self, env_id: str, agent_id: str) -> None:
        asyncio.ensure_future(self._destroy(env_id, agent_id))

    async def _destroy(self, env_id: str, agent_id: str) -> None:
        try:
            res = await self.agents[agent_id].call(
                "destroy", {"env_id": env_id}, timeout_s=self.limits.agent_call_timeout_ms / 1000
            )
        except (TransportError, RemoteError) as e:
            log.info("destroy %s on %s: %s", env_id, agent_id, e)
            return
        # What the environment wrote during its SHUTDOWN phase (its extensions' last words)
        # belongs to the function's logs, as on Lambda.
        if isinstance(res, dict):
            self._file_logs(str(res.get("function_key") or ""), res.get("logs"))

    def _file_logs(self, function_key: str, logs: Any) -> None:
        """Logs of an environment outside any invocation's reply (the end of an Invoke phase
        that went on after its response, a SHUTDOWN phase), filed with the function's."""
        if isinstance(logs, bytes) and logs and function_key.count("/") >= 1:
            account, name = function_key.split("/")[:2]
            self._pending_logs.append((account, name, int(time.time() * 1000), "", logs))

    # -- housekeeping ----------------------------------------------------------------------------
    async def sync_agents(self, *, first: bool = False) -> None:
        """Poll every agent (passive: we call them). Down agents come back up; on the first
        poll, environments left by a previous frontend process are destroyed."""
        for agent_id, client in self.agents.items():
            try:
                st = await client.call(
                    "status", {"light": True},
                    timeout_s=self.limits.agent_call_timeout_ms / 1000
                )
            except (TransportError, RemoteError) as e:
                if self.placement.agents[agent_id].up:
                    self._agent_failed(agent_id, e)
                continue
            if not self.placement.agents[agent_id].up:
                log.info("agent %s is back", agent_id)
                self.placement.agent_up(agent_id)
                self.failed_agents.pop(agent_id, None)
            known = self.placement.agents[agent_id].envs
            for env in st["envs"]:
                if env["env_id"] not in known and (
                    first or not env["env_id"].startswith(self.placement_prefix)
                ):
                    await self._destroy(env["env_id"], agent_id)
        if any(self._forget_pending.values()) and not self._forgetting:
            await self._send_forgets()

    @property
    def placement_prefix(self) -> str:
        return self.placement._prefix

    def tick(self) -> None:
        for d in self.placement.on_tick(int(time.time() * 1000)):
            self._destroy_soon(d.env_id, d.agent_id)
        if self._provisioned:
            self._provision_soon()  # replaces provisioned environments that were lost
        self.flush_logs()
        self._restore_reserve()  # after a delete on a full disk, once there is room again

    def flush_logs(self) -> None:
        if self._pending_logs:
            rows, self._pending_logs = self._pending_logs, []
            try:
                self.store.append_logs(rows)
            except StateDiskFull:
                # Logs are acknowledged to no one: on a full disk they are dropped, counted.
                self.counters["logs_dropped"] = self.counters.get("logs_dropped", 0) + len(rows)
                log.warning("state disk full: dropped %d log batches", len(rows))

    async def attest(self, account: str, name: str, qualifier: str | None,
                     nonce: str) -> dict[str, Any]:
        """A fresh attestation document, bound to ``nonce``, from a running environment of the
        function (the agent that runs it signs; the caller verifies offline)."""
        rec, _ = self.resolve(account, name, qualifier)
        envs = [e for e in self.placement.envs.values()
                if e.function_key == rec.key and e.state != "creating"]
        if not envs:
            raise errors.not_found(f"No execution environment of {name} is running; invoke it "
                                   "first (or give it provisioned concurrency)")
        env = max(envs, key=lambda e: e.last_used_ms)
        try:
            doc: dict[str, Any] = await self.agents[env.agent_id].call(
                "attest", {"env_id": env.env_id, "nonce": nonce},
                timeout_s=self.limits.agent_call_timeout_ms / 1000)
        except RemoteError as e:
            raise errors.invalid(e.message) if e.type == "InvalidNonce" else errors.service(
                str(e)) from e
        except TransportError as e:
            raise errors.service(str(e)) from e
        return doc

    def logs(self, account: str, name: str, limit: int) -> list[dict[str, Any]]:
        self.function(account, name)
        self.flush_logs()
        return [
            {"timestamp": ts, "requestId": rid, "message": text.decode(errors="replace")}
            for ts, rid, text in self.store.read_logs(account, name, limit)
        ]

    async def status(self) -> dict[str, Any]:
        agents = {}
        for agent_id, client in self.agents.items():
            try:
                agents[agent_id] = await client.call("status", None, timeout_s=2)
            except (TransportError, RemoteError) as e:
                agents[agent_id] = {"agent_id": agent_id, "error": str(e)}
        return {
            "cell_id": self.cell_id,
            "pid": os.getpid(),
            "counters": dict(self.counters),
            "placement": self.placement.statistics(),
            # per function: queued async events, in flight, age of the oldest (fairness metric)
            "async": self.events.statistics() if self.events is not None else None,
            "shards": {"sharding": self.sharding, "k": self.shard_size,
                       "functions": {k: list(v) for k, v in self.shards.items()},
                       "failed_agents": dict(self.failed_agents)},
            "poison": self.poison.statistics(),
            "agents": agents,
            "disk": self.store.disk_space().doc(),
            "bundles_to_forget": sum(map(len, self._forget_pending.values())),
        }


def _digests(rec: FunctionRecord) -> set[str]:
    """The bundles a function record holds: its code and its layers."""
    return {rec.code_sha256, *(str(layer["sha256"]) for layer in rec.layers)}


class _EnvReset(Exception):
    """The agent reset the environment before the invocation ran: take another one."""


class _EnvGone(Exception):
    """The agent answered that the environment was dead before the invoke reached it."""


class _AgentUnavailable(Exception):
    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.full = full
