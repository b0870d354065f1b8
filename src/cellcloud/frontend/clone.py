"""A tenant's functions leaving one cell and arriving in another (the I/O half of a migration).

The frontend process exposes these as transport ops (``tenant_export``, ``tenant_import``,
``tenant_inflight``, ``tenant_forget``); the control plane drives them in the order of
``control.state.MIGRATION_TRANSITIONS``. What moves: each function's ``$LATEST`` record, its
published versions (with their numbers), aliases (with their weights), reserved and
provisioned concurrency settings, every bundle they name (code and layers), and the
tenant's log groups with their newest events (within what is left of the export's budget,
at most ``log_export_bytes_max``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .store import AliasRecord, FunctionRecord

functions_per_tenant_export_max = 1_000
export_bytes_max = 64 * 1024 * 1024  # one transport frame carries the whole export
log_export_bytes_max = 8 * 1024 * 1024  # log events a migration carries (the newest first)


class CloneError(Exception):
    pass


def export_tenant(cell: Any, account: str) -> dict[str, Any]:
    tasks = getattr(cell, "tasks", None)
    running = tasks.store.active_count(account) if tasks is not None else 0
    if running:  # refused before anything moves: the migration is aborted, nothing is lost
        raise CloneError(f"the tenant has {running} ECS tasks not yet STOPPED: stop them "
                         "first (tasks do not move between cells yet)")
    services = tasks.services.active_count(account) if tasks is not None else 0
    if services:  # a service (even at desiredCount 0) lives in this cell's store
        raise CloneError(f"the tenant has {services} ECS services not yet INACTIVE: delete "
                         "them first (services do not move between cells yet)")
    store = cell.store
    limits = cell.limits
    recs: list[FunctionRecord] = store.list_page(account, "", functions_per_tenant_export_max + 1)
    if len(recs) > functions_per_tenant_export_max:
        raise CloneError(f"more than functions_per_tenant_export_max="
                         f"{functions_per_tenant_export_max} functions")
    bundles: dict[str, bytes] = {}
    size = 0
    extras: dict[str, Any] = {}
    provisioned = [p for p in store.list_provisioned() if p[0] == account]
    all_recs = list(recs)
    for rec in recs:
        versions = store.list_versions(account, rec.name, 0, limits.versions_per_function_max)
        aliases = store.list_aliases(account, rec.name, "", limits.aliases_per_function_max)
        extras[rec.name] = {
            "versions": [dataclasses.asdict(v) for v in versions],
            "version_counter": store.version_counter(account, rec.name),
            "aliases": [dataclasses.asdict(a) for a in aliases],
            "reserved": store.get_concurrency(account, rec.name),
            "provisioned": [[q, n] for (_, name, q, n) in provisioned if name == rec.name],
            # function URLs (their ids name the account, so they keep working in the new
            # cell) and the resource policies that open them
            "urls": [[q, u, d] for q, u, d in store.list_urls(account, rec.name, None,
                                                                limits.aliases_per_function_max
                                                                + 1)],
            "policies": [[q, p] for q in ["", *(a.alias for a in aliases),
                                          *(str(v.version) for v in versions)]
                         if (p := store.get_policy(account, "f", rec.name, q)) is not None],
        }
        all_recs += versions
    for rec in all_recs:
        if rec.package_type == "Image":  # its layers live in the cell's registry
            raise CloneError(f"{rec.name} is a container-image function: a tenant's registry "
                             "does not move with it yet (docs/images.md)")
        for sha in [rec.code_sha256, *(layer["sha256"] for layer in rec.layers)]:
            if sha not in bundles:
                bundles[sha] = store.get_bundle(sha)
                size += len(bundles[sha])
                if size > export_bytes_max:
                    raise CloneError(f"the export exceeds export_bytes_max={export_bytes_max}")
    out = {"account": account, "functions": [dataclasses.asdict(r) for r in recs],
           "bundles": bundles, "extras": extras}
    logstore = getattr(cell, "logstore", None)
    if logstore is not None:
        cell.flush_events()
        out["logs"] = logstore.export_account(
            account, max(0, min(log_export_bytes_max, export_bytes_max - size)))
    return out


def import_tenant(cell: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: a function already present with the same code is left alone."""
    store = cell.store
    for sha, data in doc["bundles"].items():
        store.put_bundle(sha, data)
    created = 0
    for fields in doc["functions"]:
        rec = FunctionRecord(**fields)
        have = store.get(rec.account, rec.name)
        if have is None:
            if not store.put_new(rec):
                raise CloneError(f"could not create {rec.name} in the target cell")
            created += 1
        elif have.code_sha256 != rec.code_sha256:
            raise CloneError(f"{rec.name} exists in the target cell with other code")
        extra = doc.get("extras", {}).get(rec.name, {})
        for v in extra.get("versions", []):
            store.import_version(FunctionRecord(**v), int(extra.get("version_counter", 0)))
        for a in extra.get("aliases", []):
            store.put_alias(AliasRecord(**a), new=True)  # False if already there: idempotent
        if extra.get("reserved") is not None:
            store.put_concurrency(rec.account, rec.name, int(extra["reserved"]))
        for qualifier, n in extra.get("provisioned", []):
            store.put_provisioned(rec.account, rec.name, str(qualifier), int(n))
        for qualifier, url_id, url_doc in extra.get("urls", []):
            store.put_url(rec.account, rec.name, str(qualifier), str(url_id), dict(url_doc),
                          new=True)  # False if already there: idempotent
        for qualifier, policy in extra.get("policies", []):
            store.put_policy(rec.account, "f", rec.name, str(qualifier), str(policy))
    cell.catalog.forget_cached()  # the frontend's caches (refilled from the store)
    cell.catalog.load_provisioned()  # provisioned pools start filling in the target cell
    logstore = getattr(cell, "logstore", None)
    if logstore is not None and isinstance(doc.get("logs"), dict):
        logstore.import_account(str(doc["account"]), doc["logs"])
    return {"created": created}


def tenant_inflight(cell: Any, account: str) -> int:
    """Sync invokes running for the tenant plus its async events not yet finished (queued,
    leased or waiting for a retry): a migration forgets the old cell's copy only at zero, so
    no accepted async event is left behind for a function that no longer exists there."""
    sync = cell.invokes_in_flight(account)
    intake = getattr(cell, "events", None)
    pending = intake.store.depth(account) if intake is not None else 0
    return sync + int(pending)


def forget_tenant(cell: Any, account: str) -> dict[str, Any]:
    """Drop the tenant's functions — with their versions, aliases, concurrency settings and
    environments — from the old cell (the same path as DeleteFunction)."""
    store = cell.store
    recs = store.list_page(account, "", functions_per_tenant_export_max + 1)
    for rec in recs:
        cell.catalog.delete_function(rec.account, rec.name)
    cell.catalog.forget_cached()
    logstore = getattr(cell, "logstore", None)
    if logstore is not None:
        cell.flush_events()
        logstore.forget_account(account)
    return {"deleted": len(recs)}
