"""The cell's function catalog: functions, published versions, aliases, reserved and
provisioned concurrency settings, layers, and the bundles they hold.

The catalog owns the cell's function metadata (``frontend/store.py`` underneath, with
in-memory caches over it) and applies the rules of ``core/catalog_rules.py``. It runs no
environment: what the invoke side must do when the catalog changes — retire the environments
of a record that was replaced, size a provisioned pool, tell agents to forget freed bundles — it
asks of an ``Environments`` (the cell, ``frontend/cell.py``). Time comes from an injected clock.
"""

from __future__ import annotations

import base64
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ..core import catalog_rules as rules
from ..core import cwlogs, errors, vpc
from ..core.aliases import VERSION, check_alias_name, check_routing, pick_version
from ..core.bundle import BundleInfo, inspect_zip
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.validation import check_env, check_handler, check_memory, check_name, check_timeout
from ..network import policy as net_policy
from ..registry.storage import RegistryStore
from . import deadletter, image_functions
from .store import (
    AliasRecord,
    FunctionRecord,
    FunctionStore,
    LayerVersionRecord,
    config_doc,
    function_arn,
    layer_arn,
)

log = logging.getLogger("cellcloud.frontend")

T = TypeVar("T")


@functools.cache
def supported_runtimes() -> tuple[str, ...]:
    """The runtimes this host can run (sandbox/runtimes.py probes the interpreters once)."""
    from ..sandbox import runtimes

    return runtimes.names()


class Environments(Protocol):
    """What the catalog asks of the cell's invoke side."""

    def retire_function(self, function_key: str) -> None:
        """A record was replaced or deleted: its environments go (none is reused)."""

    def set_provisioned(self, rec: FunctionRecord, count: int) -> None:
        """The provisioned pool of one version: ``count`` environments kept warm (0: none);
        the cell starts what the pool lacks, asynchronously."""

    def provisioned_ready(self, function_key: str) -> int:
        """Provisioned environments of the version that are up (not being created)."""

    def bundles_freed(self, digests: list[str]) -> None:
        """Bundles no record holds any more: the agents may forget their unpacked copies."""


class Catalog:
    def __init__(
        self,
        store: FunctionStore,
        envs: Environments,
        *,
        region: str,
        limits: Limits = DEFAULT_LIMITS,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        runtimes: Callable[[], Sequence[str]] = supported_runtimes,
        net_internal: tuple[str, ...] = (net_policy.DEFAULT_POOL,),
    ) -> None:
        self.store = store
        self.envs = envs
        self.region = region
        self.limits = limits
        self.rng = rng or random.Random()  # an alias's choice between its versions
        self.clock = clock  # Unix seconds: LastModified, CreatedDate
        self.runtimes = runtimes
        # Region-internal IPv4 ranges besides the always-denied set and this host's own
        # addresses (the environments' pool, other hosts' agents): no allow entry inside them.
        self.net_internal = net_internal
        # Whether (account, queue name) is one of the cell's SQS queues: DeadLetterConfig's
        # check (set by the server; None: no queues, the target is only checked by shape).
        self.queue_exists: Callable[[str, str], bool] | None = None
        # The cell's registry (set by the server): ImageUri of PackageType Image functions.
        self.registry: RegistryStore | None = None
        self._functions: dict[tuple[str, str], FunctionRecord] = {}
        self._versions: dict[tuple[str, str, int], FunctionRecord] = {}
        self._reserved: dict[tuple[str, str], int | None] = {}
        # (account, name, qualifier) -> (the version it keeps warm, how many, last modified)
        self.provisioned: dict[tuple[str, str, str], tuple[FunctionRecord, int, str]] = {}
        # Bundles (frontend/store.py counts their references): a digest no record holds is
        # freed at once, unless an environment is being created from it (pinned: freed when
        # the last pin goes); the environments' side is told so agents forget it too.
        self.bundle_pins: dict[str, int] = {}
        self.bundles_deferred: set[str] = set()

    def _now_iso(self) -> str:
        return rules.iso_time_ms(self.clock())

    def forget_cached(self) -> None:
        """Drop the in-memory copies of records (the store was written around the catalog,
        as a tenant migration does); they are read again when next asked for."""
        self._functions.clear()
        self._versions.clear()
        self._reserved.clear()

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
        number = rules.version_number(version)
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

    # -- bundles --------------------------------------------------------------------------------
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
            self.release_bundles([info.sha256])  # nothing happens if the record holds it

    def release_bundles(self, digests: Iterable[str]) -> None:
        """Free the bundles no function, version or layer version holds any more: the
        frontend's file now, the agents' unpacked copies within seconds."""
        freed = []
        for sha in self.store.unreferenced(digests):
            if self.bundle_pins.get(sha):
                self.bundles_deferred.add(sha)
                continue
            self.bundles_deferred.discard(sha)
            self.store.delete_bundle(sha)
            freed.append(sha)
        if not freed:
            return
        self.envs.bundles_freed(freed)
        self.restore_reserve()

    def pin_bundles(self, digests: Iterable[str]) -> None:
        """An environment is being created from these bundles: none is freed under it."""
        for sha in digests:
            self.bundle_pins[sha] = self.bundle_pins.get(sha, 0) + 1

    def unpin_bundles(self, digests: Iterable[str]) -> None:
        """The creation ended: a bundle released meanwhile is freed now."""
        digests = set(digests)
        for sha in digests:
            self.bundle_pins[sha] -= 1
            if not self.bundle_pins[sha]:
                del self.bundle_pins[sha]
        if self.bundles_deferred & digests:
            self.release_bundles(self.bundles_deferred & digests)

    def restore_reserve(self) -> None:
        try:
            self.store.restore_reserve()
        except OSError as e:
            log.warning("could not restore the state disk reserve: %s", e)

    # -- functions ------------------------------------------------------------------------------
    def _layers(self, account: str, value: object) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for arn in rules.check_layer_refs(value, self.limits):
            region, owner, layer_name, number = rules.parse_layer_version_arn(arn)
            rec = None
            if region == self.region and owner == account:
                rec = self.store.get_layer_version(account, layer_name, number)
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
        rules.check_distinct_layers([layer["layer"] for layer in out])
        return out

    def _net_internal(self) -> list[str]:
        try:
            with open("/proc/net/fib_trie") as f:
                local = vpc.local_addresses(f.read())
        except OSError:
            local = []
        return [*net_policy.ALWAYS_DENIED_V4, *self.net_internal, *local]

    def config_changes(self, account: str, doc: dict[str, Any], *, name: str = "",
                       current: FunctionRecord | None = None) -> dict[str, Any]:
        """Validated FunctionRecord fields for the configuration keys present in ``doc``
        (``current``: the record an update changes)."""
        changes: dict[str, Any] = {}
        if "LoggingConfig" in doc:
            try:
                changes["logging"] = cwlogs.logging_config(
                    doc["LoggingConfig"],
                    cwlogs.LoggingConfig.from_record(current.logging if current else None),
                    name or str(doc.get("FunctionName") or "")).to_record()
            except cwlogs.LogsError as e:
                raise errors.invalid(e.message) from None
        if "Runtime" in doc:
            changes["runtime"] = rules.check_runtime(doc["Runtime"], self.runtimes())
        if "Handler" in doc:
            changes["handler"] = check_handler(doc["Handler"])
        if "MemorySize" in doc:
            changes["memory_mb"] = check_memory(doc["MemorySize"], self.limits)
        if "Timeout" in doc:
            changes["timeout_s"] = check_timeout(doc["Timeout"], self.limits)
        if "Environment" in doc:
            changes["environment"] = check_env(
                rules.opt_dict(doc, "Environment").get("Variables"), self.limits
            )
        if "Description" in doc:
            changes["description"] = rules.check_description(doc["Description"], self.limits)
        if "Role" in doc:
            changes["role"] = rules.check_role(doc["Role"], self.limits)
        if "Layers" in doc:
            changes["layers"] = self._layers(account, doc["Layers"])
        if "EphemeralStorage" in doc:
            changes["ephemeral_mb"] = rules.check_ephemeral_mb(
                rules.opt_dict(doc, "EphemeralStorage").get("Size"), self.limits)
        if "VpcConfig" in doc:
            try:
                setting = vpc.parse(doc["VpcConfig"], self._net_internal())
            except vpc.VpcError as e:
                raise errors.invalid(str(e)) from None
            changes["network"], changes["net_allow"] = setting.mode, list(setting.allow)
        if "SnapStart" in doc:
            apply_on = rules.opt_dict(doc, "SnapStart").get("ApplyOn", "None")
            if apply_on not in ("PublishedVersions", "None"):
                raise errors.invalid(f"SnapStart.ApplyOn {apply_on!r}: PublishedVersions or None")
            changes["snapstart"] = "" if apply_on == "None" else apply_on
        if changes.get("snapstart", current.snapstart if current else ""):
            from ..sandbox.spec import ISOLATION_VARIABLE

            env = changes.get("environment", current.environment if current else {})
            if env.get(ISOLATION_VARIABLE) != "microvm":
                raise errors.invalid(
                    "SnapStart (ApplyOn PublishedVersions) restores a published version's "
                    "microVM from a snapshot taken after its init: it needs microVM isolation "
                    f"(the environment variable {ISOLATION_VARIABLE}=microvm; agents "
                    "started with --backend microvm). "
                    "A region whose agents run jails has no snapshots to restore.")
        if doc.get("DeadLetterConfig") is not None:
            changes["dead_letter_target"] = deadletter.check(
                doc["DeadLetterConfig"], self.region, account, self.queue_exists)
        rules.check_zip_only(doc)
        return changes

    def create_function(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        if doc.get("PackageType") == image_functions.IMAGE:
            return image_functions.create_function(self, account, doc)
        image_functions.refuse_for_zip(doc)
        name = check_name(doc.get("FunctionName"))
        for required in ("Runtime", "Handler"):
            if doc.get(required) is None:
                raise errors.invalid(f"{required} is required for a function of PackageType Zip")
        changes = self.config_changes(account, doc, name=name)
        code = rules.opt_dict(doc, "Code")
        if "ZipFile" not in code:
            raise errors.invalid("Code.ZipFile is required (S3 locations are not supported)")
        tags = rules.check_tags(doc.get("Tags"), self.limits)
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
        rules.check_total_size(info.unzipped_bytes, changes.get("layers", []), self.limits)
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
            last_modified=self._now_iso(),
            **fields,
        )
        if not self._with_bundle(info, data, lambda: self.store.put_new(rec)):
            raise errors.conflict(f"Function already exist: {name}")
        if publish:
            return config_doc(self.publish_record(rec, None), self.region)
        return config_doc(rec, self.region)

    def replace_record(self, old: FunctionRecord, new: FunctionRecord) -> FunctionRecord:
        if not self.store.update(new, old.revision):
            raise errors.conflict("The function was modified concurrently; retry")
        self._functions[(new.account, new.name)] = new
        self.envs.retire_function(old.key)
        return new

    def update_code(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        rules.check_revision(doc, old.revision_id)
        if "ImageUri" in doc or old.package_type == image_functions.IMAGE:
            return image_functions.update_code(self, account, name, doc)
        if "ZipFile" not in doc:
            raise errors.invalid("ZipFile is required (S3 locations are not supported)")
        if doc.get("Architectures") not in (None, ["x86_64"]):
            raise errors.invalid("Only the x86_64 architecture is supported on this host")
        data, info = self._decode_zip(doc["ZipFile"], "ZipFile")
        rules.check_total_size(info.unzipped_bytes, old.layers, self.limits)
        new = replace(
            old,
            code_sha256=info.sha256,
            code_size=len(data),
            unzipped_size=info.unzipped_bytes,
            revision=old.revision + 1,
            revision_id=str(uuid.uuid4()),
            last_modified=self._now_iso(),
        )
        if doc.get("DryRun") is True:  # validated, nothing written
            return config_doc(new, self.region)
        new = self._with_bundle(info, data, lambda: self.replace_record(old, new))
        self.release_bundles(old.bundle_digests())
        if doc.get("Publish") is True:
            return config_doc(self.publish_record(new, None), self.region)
        return config_doc(new, self.region)

    def update_configuration(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        old = self.function(account, name)
        rules.check_revision(doc, old.revision_id)
        changes = self.config_changes(account, doc, name=name, current=old)
        changes.update(image_functions.update_image_config(old, doc))
        rules.check_total_size(old.unzipped_size, changes.get("layers", old.layers), self.limits)
        new = replace(
            old,
            **changes,
            revision=old.revision + 1,
            revision_id=str(uuid.uuid4()),
            last_modified=self._now_iso(),
        )
        doc_out = config_doc(self.replace_record(old, new), self.region)
        self.release_bundles(old.bundle_digests())  # layers it no longer uses
        return doc_out

    def delete_function(self, account: str, name: str, qualifier: str | None = None) -> None:
        old = self.function(account, name)
        if qualifier is not None:
            number = rules.version_number(qualifier)
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
            self.envs.retire_function(rec.key)
            self.release_bundles(rec.bundle_digests())
            return
        versions = self.store.list_versions(account, name, 0, self.limits.versions_per_function_max)
        for key in [k for k in self.provisioned if k[:2] == (account, name)]:
            self.delete_provisioned(*key)
        self.store.delete(account, name)
        self._functions.pop((account, name), None)
        self._reserved.pop((account, name), None)
        self.envs.retire_function(old.key)
        for v in versions:
            self._versions.pop((account, name, int(v.version)), None)
            self.envs.retire_function(v.key)
        self.release_bundles(set().union(old.bundle_digests(),
                                         *(v.bundle_digests() for v in versions)))

    def _listed(self, doc: dict[str, Any], rec: FunctionRecord) -> dict[str, Any]:
        """A listed configuration with its state (an image function whose image was deleted
        is Failed: frontend/image_functions.py)."""
        return {**doc, **image_functions.state_fields(self, rec)}

    def list_functions(
        self, account: str, marker: str | None, max_items: int, all_versions: bool = False
    ) -> dict[str, Any]:
        after = rules.decode_marker(marker)
        recs = self.store.list_page(account, after, max_items + 1)
        out: dict[str, Any] = {"Functions": []}
        for r in recs[:max_items]:
            out["Functions"].append(self._listed(config_doc(r, self.region,
                                                            qualify_latest=all_versions), r))
            if all_versions:
                out["Functions"] += [
                    self._listed(config_doc(v, self.region), v)
                    for v in self.store.list_versions(account, r.name, 0,
                                                      self.limits.list_page_items_max)
                ]
        if len(recs) > max_items:
            out["NextMarker"] = rules.encode_marker(recs[max_items - 1].name)
        return out

    # -- versions --------------------------------------------------------------------------------
    def publish_record(self, latest: FunctionRecord, description: str | None) -> FunctionRecord:
        versions_max = self.limits.versions_per_function_max
        published = self.store.list_versions(latest.account, latest.name, 0, versions_max)
        if published:
            last = published[-1]
            # Nothing changed since the last version: Lambda hands that one back.
            if (last.code_sha256, last.revision) == (latest.code_sha256, latest.revision):
                return last
        if len(published) >= versions_max:
            raise LambdaError(
                400,
                "CodeStorageExceededException",
                f"A function can have at most {versions_max} versions",
            )
        snapshot = replace(
            latest,
            description=latest.description if description is None else description,
            revision_id=str(uuid.uuid4()),
        )
        return self.store.publish_version(snapshot)

    def publish_version(self, account: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        latest = self.function(account, name)
        rules.check_revision(doc, latest.revision_id)
        sha = doc.get("CodeSha256")
        if sha is not None and sha != config_doc(latest, self.region)["CodeSha256"]:
            raise errors.invalid(
                f"CodeSHA256 ({sha}) is different from current CodeSHA256 in "
                "$LATEST. Please try again with the CodeSHA256 in $LATEST."
            )
        description = (rules.check_description(doc["Description"], self.limits)
                       if doc.get("Description") else None)
        return config_doc(self.publish_record(latest, description), self.region)

    def list_versions(
        self, account: str, name: str, marker: str | None, max_items: int
    ) -> dict[str, Any]:
        latest = self.function(account, name)
        items: list[dict[str, Any]] = []
        if not rules.decode_marker(marker):
            items.append(self._listed(config_doc(latest, self.region, qualify_latest=True),
                                      latest))
        after = rules.decode_int_marker(marker, 0)
        room = max_items - len(items)
        recs = self.store.list_versions(account, name, after, room + 1)
        items += [self._listed(config_doc(r, self.region), r) for r in recs[:room]]
        out: dict[str, Any] = {"Versions": items}
        if len(recs) > room:
            out["NextMarker"] = rules.encode_marker(
                str(recs[room - 1].version) if room > 0 else "0")
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
        return self.store.list_aliases(account, name, "",
                                       self.limits.aliases_per_function_max + 1)

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
        primary = rules.check_alias_version(primary)
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
        description = rules.check_description(doc.get("Description") or "", self.limits)
        aliases_max = self.limits.aliases_per_function_max
        if len(self._all_aliases(account, name)) >= aliases_max:
            raise LambdaError(
                400,
                "AliasLimitExceededException",
                f"A function can have at most {aliases_max} aliases",
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
        rules.check_revision(doc, old.revision_id)
        primary = doc.get("FunctionVersion") or old.function_version
        routing = (
            doc["RoutingConfig"]
            if "RoutingConfig" in doc
            else ({"AdditionalVersionWeights": old.weights} if old.weights else None)
        )
        primary, weights = self._check_alias_target(account, name, primary, routing)
        description = (rules.check_description(doc["Description"], self.limits)
                       if "Description" in doc else old.description)
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
        for r in self.store.list_aliases(account, name, rules.decode_marker(marker),
                                         self.limits.aliases_per_function_max + 1):
            if (
                function_version
                and r.function_version != function_version
                and function_version not in r.weights
            ):
                continue
            if len(out["Aliases"]) == max_items:
                out["NextMarker"] = rules.encode_marker(out["Aliases"][-1]["Name"])
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
        n = rules.check_reserved_concurrency(doc.get("ReservedConcurrentExecutions"),
                                             self.store.reserved_total(account, name),
                                             self.limits)
        self.store.put_concurrency(account, name, n)
        self._reserved[(account, name)] = n
        return {"ReservedConcurrentExecutions": n}

    def delete_concurrency(self, account: str, name: str) -> None:
        self.function(account, name)
        self.store.put_concurrency(account, name, None)
        self._reserved[(account, name)] = None

    # -- provisioned concurrency ---------------------------------------------------------------
    def _provisioned_target(self, account: str, name: str, qualifier: str) -> FunctionRecord:
        rules.check_provisioned_qualifier(qualifier)
        if VERSION.match(qualifier):
            return self.version(account, name, qualifier)
        return self.version(account, name, self.alias(account, name, qualifier).function_version)

    def put_provisioned(self, account: str, name: str, qualifier: str,
                        doc: dict[str, Any]) -> dict[str, Any]:
        n = rules.check_provisioned_concurrency(doc.get("ProvisionedConcurrentExecutions"))
        rec = self._provisioned_target(account, name, qualifier)
        rules.check_provisioned_within_reserved(n, self.reserved(account, name))
        self.store.put_provisioned(account, name, qualifier, n)
        self.provisioned[(account, name, qualifier)] = (rec, n, self._now_iso())
        self.envs.set_provisioned(rec, n)
        return self.provisioned_doc(account, name, qualifier)

    def provisioned_doc(self, account: str, name: str, qualifier: str) -> dict[str, Any]:
        self.function(account, name)
        entry = self.provisioned.get((account, name, qualifier))
        if entry is None:
            raise errors.LambdaError(404, "ProvisionedConcurrencyConfigNotFoundException",
                                     f"No Provisioned Concurrency Config found for this function "
                                     f"({name}:{qualifier})")
        rec, n, modified = entry
        ready = self.envs.provisioned_ready(rec.key)
        return {"RequestedProvisionedConcurrentExecutions": n,
                "AllocatedProvisionedConcurrentExecutions": min(ready, n),
                "AvailableProvisionedConcurrentExecutions": min(ready, n),
                "Status": "READY" if ready >= n else "IN_PROGRESS",
                "LastModified": modified}

    def delete_provisioned(self, account: str, name: str, qualifier: str) -> None:
        self.provisioned_doc(account, name, qualifier)  # 404 if absent
        rec, _, _ = self.provisioned.pop((account, name, qualifier))
        self.store.put_provisioned(account, name, qualifier, None)
        self.envs.set_provisioned(rec, 0)

    def load_provisioned(self) -> None:
        """At start: the provisioned pools configured before a restart."""
        for account, name, qualifier, n in self.store.list_provisioned():
            try:
                rec = self._provisioned_target(account, name, qualifier)
            except LambdaError:
                continue
            self.provisioned[(account, name, qualifier)] = (rec, n, self._now_iso())
            self.envs.set_provisioned(rec, n)

    def provisioned_records(self) -> dict[str, FunctionRecord]:
        """The versions provisioned pools keep warm, by placement key."""
        return {rec.key: rec for rec, _, _ in self.provisioned.values()}

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
        content = rules.opt_dict(doc, "Content")
        if "ZipFile" not in content:
            raise errors.invalid("Content.ZipFile is required (S3 locations are not supported)")
        runtimes, archs, license_info = rules.check_layer_metadata(doc, self.limits)
        description = rules.check_description(doc.get("Description") or "", self.limits)
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
                runtimes,
                archs,
                license_info,
                self._now_iso(),
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
            self.release_bundles([rec.sha256])

    def list_layer_versions(
        self, account: str, name: str, marker: str | None, max_items: int, runtime: str | None
    ) -> dict[str, Any]:
        before = rules.decode_int_marker(marker, 1 << 62)
        out: dict[str, Any] = {"LayerVersions": []}
        for r in self.store.list_layer_versions(account, name, before,
                                                self.limits.layer_versions_scan_max):
            if runtime and runtime not in r.compatible_runtimes:
                continue
            if len(out["LayerVersions"]) == max_items:
                out["NextMarker"] = rules.encode_marker(str(out["LayerVersions"][-1]["Version"]))
                break
            out["LayerVersions"].append(self.layer_doc(r, content=False))
        return out

    def list_layers(
        self, account: str, marker: str | None, max_items: int, runtime: str | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"Layers": []}
        names = self.store.list_layer_names(account, rules.decode_marker(marker), max_items + 1)
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
            out["NextMarker"] = rules.encode_marker(names[max_items - 1])
        return out

    # -- tags (TagResource / UntagResource; ListTags reads function(...).tags) --------------------
    def set_tags(self, account: str, name: str, add: dict[str, str], remove: list[str]) -> None:
        """Merge ``add`` into the function's tags and drop the keys in ``remove``; the whole
        set is checked as CreateFunction's Tags are."""
        old = self.function(account, name)
        tags = {k: v for k, v in {**old.tags, **add}.items() if k not in remove}
        tags = rules.check_tags(tags, self.limits)
        self.replace_record(old, replace(old, tags=tags, revision=old.revision + 1,
                                   revision_id=str(uuid.uuid4())))

    def account_usage(self, account: str) -> tuple[int, int]:
        """GetAccountSettings' AccountUsage: (function count, bytes of zipped code of every
        function's $LATEST and published versions)."""
        count = code = 0
        after = ""
        page = self.limits.list_page_items_max
        while True:
            recs = self.store.list_page(account, after, page)
            for r in recs:
                count += 1
                code += r.code_size + sum(
                    v.code_size for v in self.store.list_versions(account, r.name, 0, 1 << 30))
            if len(recs) < page:
                return count, code
            after = recs[-1].name

    def list_provisioned_docs(self, account: str, name: str) -> list[dict[str, Any]]:
        """ListProvisionedConcurrencyConfigs: every qualifier's config, by qualifier."""
        self.function(account, name)
        return [{"FunctionArn": function_arn(self.region, account, name, qual),
                 **self.provisioned_doc(account, name, qual)}
                for (a, n, qual) in sorted(self.provisioned) if a == account and n == name]
