"""The EC2 API's volume subset in the control plane (issue #19, docs/volumes.md): volumes per
tenant in the region's configuration store. boto3's ``ec2`` client and ``aws ec2`` reach it
through the router (EC2's query protocol: a form ``Action=…&Version=2016-11-15``, SigV4
service ``ec2``), which forwards the body and the caller's account here (op ``ec2``,
pki.OPS_ALLOWED).

The protocol is ``core/ec2_query.py``'s, the rules ``core/ec2_volumes.py``'s; this is the shell:
the store, compare-and-set on a volume's record for every change (an attachment is exclusive:
one record names the one writer and its ``attach_epoch``), idempotent creates by
``ClientToken``. A volume's bytes are served to its attachment by the host side
(volumes/attach.py) from a ``BlockStore``. In a region with storage servers (``volumes``, a
``RegionVolumes``) a new volume is replicated there: its config cell and replicas are made
before its record (``storage: replicated``) and dropped on delete; a snapshot of it (attached
or not) is a copy a complete replica freezes during ``CreateSnapshot`` (``RegionVolumes.freeze``),
copied into the snapshot file afterwards; a volume made from a snapshot is replicated too, the
snapshot's bytes written into it through a volume client (creating → available). Otherwise its
bytes are a FileBlockStore file under the region's ``data_dir`` (``<state>/volumes``), which this
module copies for a snapshot (``CreateSnapshot``: pending → completed) and from one
(``CreateVolume`` with ``SnapshotId``: creating → available), in a worker thread, and removes
with the volume or snapshot. Snapshot files are under ``data_dir`` in both cases. Without a
``data_dir`` snapshots are ``UnsupportedOperation``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from ..core import ec2_volumes as vols
from ..core.ec2_query import XML, Ec2Error, error_xml, invalid_value, parse_request, response_xml
from ..core.limits import DEFAULT_LIMITS, Limits
from ..store.client import StoreError
from ..volumes.blockdev import (
    StoreBusy,
    copy_extents,
    open_source,
    snapshot_file,
    volume_file,
)
from ..volumes.client import RegionVolumes
from ..volumes.core import VolumeError
from .configstore import ConfigStore, ConfigStoreError, ConfigStoreUnavailable

log = logging.getLogger("cellcloud.control.ec2")

VOLUMES = "cellcloud/ec2/volumes/"  # <account>/<volume id> -> the volume's record
TOKENS = "cellcloud/ec2/client-tokens/"  # <account>/<ClientToken> -> {"volume", "request"}
SNAPSHOTS = "cellcloud/ec2/snapshots/"  # <account>/<snapshot id> -> the snapshot's record
GiB = 1024 ** 3


def new_volume_id() -> str:
    return "vol-" + secrets.token_hex(9)[:17]


def form_pairs(body: bytes, query: str, params_max: int) -> list[tuple[str, str]]:
    """The request's form (its body; a GET's query string) as decoded (name, value) pairs."""
    try:
        text = body.decode("utf-8") if body else query
        return parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                         max_num_fields=params_max)
    except (UnicodeDecodeError, ValueError):
        raise invalid_value(f"The request is not a UTF-8 form of at most {params_max} "
                            "parameters (ec2_request_params_max)") from None


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(9)[:17]


def _busy() -> Ec2Error:
    return Ec2Error("Unavailable", "The volume kept changing under this request; try again",
                    503)


class Ec2:
    """The ``ec2`` op of one control plane."""

    def __init__(self, store: ConfigStore, region: str,
                 clock: Callable[[], int] | None = None, limits: Limits = DEFAULT_LIMITS,
                 new_id: Callable[[], str] = new_volume_id, data_dir: str | None = None,
                 volumes: RegionVolumes | None = None) -> None:
        self.store = store
        self.region = region
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.limits = limits
        self.new_id = new_id
        self.data_dir = data_dir
        #: the region's storage servers (``cellcloud up --storage-servers N``): a new volume
        #: (not one made from a snapshot) is replicated there, its config cell in the store
        #: colony; None: every volume is a FileBlockStore file under ``data_dir``
        self.volumes = volumes
        #: copies running in this process (a snapshot, a restore), by the id they make; one
        #: found pending with none running (a restarted control plane) is started again
        self._copies: dict[str, asyncio.Task[None]] = {}
        self.counters = {"requests": 0, "errors": 0, "unsupported": 0, "cas_lost": 0}
        self._ops: dict[str, Callable[[str, dict[str, Any]], Any]] = {
            "CreateVolume": self.create_volume, "DescribeVolumes": self.describe_volumes,
            "DeleteVolume": self.delete_volume, "CreateTags": self.create_tags,
            "DeleteTags": self.delete_tags, "DescribeTags": self.describe_tags,
            "DescribeAvailabilityZones": self.describe_availability_zones,
            "CreateSnapshot": self.create_snapshot, "DescribeSnapshots": self.describe_snapshots,
            "DeleteSnapshot": self.delete_snapshot,
        }

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    # -- the op --------------------------------------------------------------------------------
    async def op(self, req: dict[str, Any]) -> dict[str, Any]:
        self.counters["requests"] += 1
        request_id = str(uuid.uuid4())
        try:
            body = bytes(req.get("b") or b"")
            if len(body) > self.limits.ec2_request_bytes_max:
                raise invalid_value(f"The request is larger than ec2_request_bytes_max="
                                    f"{self.limits.ec2_request_bytes_max} bytes")
            parsed = parse_request(form_pairs(body, str(req.get("q") or ""),
                                              self.limits.ec2_request_params_max),
                                   list_items_max=self.limits.ec2_list_items_max)
            handler = self._ops[parsed.action]
            result: dict[str, Any] = await handler(str(req["a"]), parsed.params)
        except Ec2Error as e:
            self.counters["errors"] += 1
            self.counters["unsupported"] += e.code == "UnsupportedOperation"
            return {"s": e.status, "h": {"content-type": XML},
                    "b": error_xml(e.code, e.message, request_id)}
        except ConfigStoreUnavailable as e:
            log.warning("config store: %s", e)
            return {"s": 503, "h": {"content-type": XML},
                    "b": error_xml("Unavailable", "The volume store is unavailable; try again",
                                   request_id)}
        except ConfigStoreError as e:
            return {"s": 400, "h": {"content-type": XML},
                    "b": error_xml("InvalidParameterValue", "The request does not fit the "
                                   f"region's configuration store: {e}", request_id)}
        return {"s": 200, "h": {"content-type": XML},
                "b": response_xml(parsed.action, request_id, result)}

    @staticmethod
    def _dry_run(params: dict[str, Any]) -> None:
        if params.get("DryRun"):
            raise Ec2Error("DryRunOperation", "Request would have succeeded, but DryRun flag "
                           "is set.", 412)

    def _key(self, account: str, volume_id: str) -> str:
        return f"{VOLUMES}{account}/{volume_id}"

    async def _get(self, account: str, volume_id: str) -> tuple[dict[str, Any], int]:
        """A volume of ``account`` (another account's id is not found: ids are per tenant)."""
        vols.check_volume_id(volume_id)
        e = await self.store.get(self._key(account, volume_id))
        if e is None:
            raise vols.volume_not_found(volume_id)
        rec: dict[str, Any] = json.loads(e.value)
        return rec, e.revision

    async def _cas_record(self, key: str,
                          change: Callable[[dict[str, Any]], dict[str, Any] | None],
                          missing: Callable[[], Exception] | None) -> dict[str, Any] | None:
        """Apply ``change`` to the JSON record at ``key`` by compare-and-set, read again and
        retried on a lost race (``ec2_cas_attempts_max`` tries, then ``Unavailable``);
        ``change`` returns the new record, or None for no write (the record is returned
        either way). No record: ``missing()`` is raised, or None is returned without it."""
        for _ in range(self.limits.ec2_cas_attempts_max):
            e = await self.store.get(key)
            if e is None:
                if missing is None:
                    return None
                raise missing()
            rec: dict[str, Any] = json.loads(e.value)
            new = change(rec)
            if new is None:
                return rec
            if await self.store.cas(key, e.revision, json.dumps(new).encode()) is not None:
                return new
            self.counters["cas_lost"] += 1
        raise _busy()

    async def _change(self, account: str, volume_id: str,
                      change: Callable[[dict[str, Any]], dict[str, Any] | None]
                      ) -> dict[str, Any]:
        """Apply ``change`` to a volume's record by compare-and-set (retried on a lost race);
        ``change`` returns the new record, or None for no write."""
        vols.check_volume_id(volume_id)
        rec = await self._cas_record(self._key(account, volume_id), change,
                                     lambda: vols.volume_not_found(volume_id))
        assert rec is not None  # (a missing record raised)
        return rec

    # -- volumes -------------------------------------------------------------------------------
    async def create_volume(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        snap: dict[str, Any] | None = None
        if params.get("SnapshotId") is not None:
            snap = await self._snapshot_of_volume(account, str(params["SnapshotId"]))
        spec = vols.validate_create(params, self.region, self.limits,
                                    snap["size_gib"] if snap is not None else None)
        self._dry_run(params)
        request = {k: v for k, v in params.items() if k not in ("ClientToken", "DryRun")}
        volume_id: str | None = None
        token_key = f"{TOKENS}{account}/{spec.client_token}" if spec.client_token else None
        if token_key is not None:
            e = await self.store.get(token_key)
            if e is not None:
                held = json.loads(e.value)
                if held["request"] != request:
                    raise Ec2Error("IdempotentParameterMismatch", "The ClientToken was used "
                                   "before with other parameters")
                volume_id = str(held["volume"])
                found = await self.store.get(self._key(account, volume_id))
                if found is not None:  # the first request's volume
                    return vols.volume_doc(json.loads(found.value), account, self.region)
                # the first request stopped between its token and its volume: finish it
        if len(await self.store.list(f"{VOLUMES}{account}/")) \
                >= self.limits.ec2_volumes_per_tenant_max:
            raise Ec2Error("VolumeLimitExceeded", f"An account has at most "
                           f"{self.limits.ec2_volumes_per_tenant_max} volumes "
                           "(ec2_volumes_per_tenant_max)")
        if volume_id is None:
            volume_id = self.new_id()
            if token_key is not None and await self.store.cas(
                    token_key, 0, json.dumps({"volume": volume_id,
                                              "request": request}).encode()) is None:
                raise _busy()  # another request with this token is creating it right now
        rec = {"id": volume_id, "size_gib": spec.size_gib, "type": spec.volume_type,
               "zone": spec.zone, "state": "available" if snap is None else "creating",
               "created_ms": self.clock(), "tags": spec.tags, "attachment": None,
               "attach_epoch": 0}
        if spec.client_token:  # its token goes with it (tokens never outnumber volumes)
            rec["client_token"] = spec.client_token
        fd: int | None = None
        if snap is not None:
            rec["snapshot_id"] = snap["id"]
            try:  # opened now: a DeleteSnapshot after this answer takes nothing from it
                fd = await asyncio.to_thread(open_source, snapshot_file(
                    self._data_dir(), account, snap["id"]), False)
            except (OSError, StoreBusy) as e:
                raise Ec2Error("IncorrectState", f"Snapshot {snap['id']}'s bytes cannot be "
                               f"read: {e}") from None
        if self.volumes is not None:
            # Its replicas and config cell first: a record never names a volume without them
            # (a retried create finds them made and goes on). One from a snapshot is
            # replicated too: the snapshot's bytes are written into it (creating → available).
            try:
                await self.volumes.create(volume_id, spec.size_gib * GiB)
            except (VolumeError, StoreError) as e:
                if fd is not None:
                    os.close(fd)
                raise Ec2Error("InsufficientVolumeCapacity", f"The volume's replicas could "
                               f"not be placed: {e}", 503) from None
            rec["storage"] = "replicated"
        try:
            if await self.store.cas(self._key(account, volume_id), 0,
                                    json.dumps(rec).encode()) is None:
                raise Ec2Error("InternalError", "A volume id was used twice; try again", 500)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if snap is not None:
            self._start_restore(account, rec, fd, True)
        return vols.volume_doc(rec, account, self.region)

    async def describe_volumes(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        ids: list[str] = params.get("VolumeId", [])
        n = vols.max_results(params, vols.DESCRIBE_VOLUMES_RESULTS)
        if ids and (n is not None or params.get("NextToken")):
            raise Ec2Error("InvalidParameterCombination", "The parameter volumeIdSet cannot "
                           "be used with the parameter maxResults")
        filters = vols.parse_filters(params, vols.VOLUME_FILTERS, self.limits)
        self._dry_run(params)
        if ids:
            records = [(await self._get(account, i))[0] for i in ids]
        else:
            records = [json.loads(e.value)
                       for e in await self.store.list(f"{VOLUMES}{account}/")]
        for r in records:
            if r["state"] == "creating":
                self._start_restore(account, r, None, False)  # a copy a restart lost
        chosen = {r["id"]: r for r in records
                  if vols.matches(filters, lambda name, r=r: vols.volume_fields(r, name))}
        keys, token = vols.page(sorted(chosen), params, n)
        out: dict[str, Any] = {
            "volumeSet": [vols.volume_doc(chosen[k], account, self.region) for k in keys]}
        if token:
            out["nextToken"] = token
        return out

    async def delete_volume(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        volume_id = params.get("VolumeId")
        if not volume_id:
            raise Ec2Error("MissingParameter", "The request must contain the parameter "
                           "VolumeId")
        self._dry_run(params)

        def deleting(rec: dict[str, Any]) -> dict[str, Any] | None:
            if rec.get("attachment"):
                raise Ec2Error("VolumeInUse", f"Volume {volume_id} is currently attached to "
                               f"{rec['attachment']['target']}")
            if rec["state"] == "creating":
                raise Ec2Error("IncorrectState", f"Volume {volume_id} is being created from "
                               "its snapshot")
            return None if rec["state"] == "deleting" else {**rec, "state": "deleting"}

        # First the record says "deleting" (by compare-and-set: an attach can no longer win),
        # then it goes, and its bytes with it.
        rec = await self._change(account, volume_id, deleting)
        if rec.get("client_token"):  # first: a token left alone would name a volume gone
            await self.store.delete(f"{TOKENS}{account}/{rec['client_token']}")
        if rec.get("storage") == "replicated":
            if self.volumes is None:
                raise Ec2Error("InternalError", f"Volume {volume_id} is replicated and this "
                               "region has no storage servers now", 500)
            try:  # before the record goes: a failure here leaves it "deleting", retried
                await self.volumes.delete(volume_id)
            except StoreError as e:
                raise Ec2Error("Unavailable", f"The volume's configuration cannot be "
                               f"reached: {e}", 503) from None
        await self.store.delete(self._key(account, volume_id))
        if self.data_dir is not None and rec.get("storage") != "replicated":
            await asyncio.to_thread(_remove, volume_file(self.data_dir, account, volume_id))
        return {"return": True}

    # -- attachment (the host side's; one writer at a time) --------------------------------------
    async def attach(self, account: str, volume_id: str, target: str,
                     device: str = "/dev/sdf") -> dict[str, Any]:
        """Make ``target`` the volume's one writer: answers the record with the new
        ``attach_epoch`` (every write of the attachment carries it; an older epoch is fenced)."""

        def attaching(rec: dict[str, Any]) -> dict[str, Any]:
            if rec["state"] != "available" and not rec.get("attachment"):
                raise Ec2Error("IncorrectState", f"Volume {volume_id} is {rec['state']}, not "
                               "available")
            if rec.get("attachment"):
                raise Ec2Error("VolumeInUse", f"{volume_id} is already attached to "
                               f"{rec['attachment']['target']}")
            epoch = int(rec.get("attach_epoch", 0)) + 1
            return {**rec, "state": "in-use", "attach_epoch": epoch,
                    "attachment": {"target": target, "device": device, "attach_epoch": epoch,
                                   "attached_ms": self.clock()}}

        return await self._change(account, volume_id, attaching)

    async def detach(self, account: str, volume_id: str, attach_epoch: int) -> dict[str, Any]:
        """End the attachment of epoch ``attach_epoch`` (a stale epoch changes nothing)."""

        def detaching(rec: dict[str, Any]) -> dict[str, Any] | None:
            att = rec.get("attachment")
            if not att:
                raise Ec2Error("IncorrectState", f"Volume {volume_id} is not attached")
            if att["attach_epoch"] != attach_epoch:
                raise Ec2Error("IncorrectState", f"Volume {volume_id} is attached under epoch "
                               f"{att['attach_epoch']}, not {attach_epoch}")
            return {**rec, "state": "available", "attachment": None}

        return await self._change(account, volume_id, detaching)

    async def op_attachment(self, body: Any) -> dict[str, Any]:
        """The control plane's ``volume_attachment`` op (an operator's ``cellcloud volume
        attach``; not a router's: pki.OPS_ALLOWED): ``{"account", "volume_id", "action":
        "attach", "target"}`` or ``{..., "action": "detach", "attach_epoch"}``; answers the
        record. An EC2 error comes back typed with its code."""
        from ..transport import OpError

        if not isinstance(body, dict) or not all(
                isinstance(body.get(k), str) for k in ("account", "volume_id", "action")):
            raise OpError("InvalidParameterValue", "account, volume_id and action are strings")
        try:
            if body["action"] == "attach" and isinstance(body.get("target"), str):
                return await self.attach(body["account"], body["volume_id"], body["target"])
            if body["action"] == "detach" and isinstance(body.get("attach_epoch"), int):
                return await self.detach(body["account"], body["volume_id"],
                                         body["attach_epoch"])
        except Ec2Error as e:
            raise OpError(e.code, e.message) from None
        raise OpError("InvalidParameterValue", "action: attach (with target) or detach (with "
                      "attach_epoch)")

    # -- tags ----------------------------------------------------------------------------------
    def _resources(self, params: dict[str, Any]) -> list[str]:
        ids: list[str] = params.get("ResourceId", [])
        if not ids:
            raise Ec2Error("MissingParameter", "The request must contain the parameter "
                           "resourceIdSet")
        for i in ids:
            if i.startswith("vol-"):
                vols.check_volume_id(i)
            elif i.startswith("snap-"):
                vols.check_snapshot_id(i)
            else:
                raise Ec2Error("InvalidID", f"The ID '{i[:80]}' is not valid: cellcloud tags "
                               "volumes and snapshots only")
        return ids

    async def _exists(self, account: str, ident: str) -> None:
        if ident.startswith("snap-"):
            await self._get_snapshot(account, ident)
        else:
            await self._get(account, ident)

    async def _retag(self, account: str, ident: str,
                     change: Callable[[list[dict[str, str]]], list[dict[str, str]]]) -> None:
        if not ident.startswith("snap-"):
            await self._change(account, ident, lambda rec: {**rec, "tags": change(rec["tags"])})
            return
        vols.check_snapshot_id(ident)
        await self._cas_record(self._snap_key(account, ident),
                               lambda rec: {**rec, "tags": change(rec["tags"])},
                               lambda: vols.snapshot_not_found(ident))

    async def create_tags(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        ids = self._resources(params)
        if not params.get("Tag"):
            raise Ec2Error("MissingParameter", "The request must contain the parameter Tag")
        new = vols.check_tags(params["Tag"], "Tag", self.limits)
        self._dry_run(params)
        for i in ids:
            await self._exists(account, i)  # every id exists before any is changed
        keys = {t["Key"] for t in new}
        for i in ids:
            await self._retag(account, i, lambda tags: vols.check_tags(
                [t for t in tags if t["Key"] not in keys] + new, "Tag", self.limits))
        return {"return": True}

    async def delete_tags(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        ids = self._resources(params)
        gone: list[dict[str, Any]] = params.get("Tag", [])
        for t in gone:
            if not t.get("Key"):
                raise Ec2Error("MissingParameter", "A tag to delete needs its Key")
        self._dry_run(params)

        def keep(t: dict[str, str]) -> bool:
            if not gone:  # no Tag member: every tag goes (EC2)
                return False
            return not any(g["Key"] == t["Key"] and ("Value" not in g or g["Value"] == t["Value"])
                           for g in gone)

        for i in ids:
            await self._exists(account, i)
        for i in ids:
            await self._retag(account, i, lambda tags: [t for t in tags if keep(t)])
        return {"return": True}

    async def describe_tags(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        n = vols.max_results(params, vols.DESCRIBE_TAGS_RESULTS)
        filters = vols.parse_filters(params, vols.TAG_FILTERS, self.limits)
        self._dry_run(params)
        items: dict[str, dict[str, str]] = {}
        for prefix, kind in ((VOLUMES, "volume"), (SNAPSHOTS, "snapshot")):
            for e in await self.store.list(f"{prefix}{account}/"):
                rec = json.loads(e.value)
                for t in rec["tags"]:
                    item = {"resourceId": rec["id"], "resourceType": kind, "key": t["Key"],
                            "value": t["Value"]}
                    fields = {"resource-id": [rec["id"]], "resource-type": [kind],
                              "key": [t["Key"]], "value": [t["Value"]]}
                    if vols.matches(filters, fields.__getitem__):
                        items[f"{rec['id']}\x00{t['Key']}"] = item
        keys, token = vols.page(sorted(items), params, n)
        out: dict[str, Any] = {"tagSet": [items[k] for k in keys]}
        if token:
            out["nextToken"] = token
        return out

    async def describe_availability_zones(self, account: str, params: dict[str, Any]
                                          ) -> dict[str, Any]:
        filters = vols.parse_filters(params, ("zone-name", "zone-id", "state", "region-name"),
                                     self.limits)
        self._dry_run(params)
        known = vols.zones(self.region)
        for name in params.get("ZoneName", []):
            if name not in {z.name for z in known}:
                raise invalid_value(f"The zone '{name[:60]}' does not exist.")
        for zid in params.get("ZoneId", []):
            if zid not in {z.zone_id for z in known}:
                raise invalid_value(f"The zone ID '{zid[:60]}' does not exist.")
        out = []
        for z in known:
            if params.get("ZoneName") and z.name not in params["ZoneName"]:
                continue
            if params.get("ZoneId") and z.zone_id not in params["ZoneId"]:
                continue
            fields = {"zone-name": [z.name], "zone-id": [z.zone_id], "state": ["available"],
                      "region-name": [self.region]}
            if vols.matches(filters, fields.__getitem__):
                out.append({"zoneName": z.name, "zoneId": z.zone_id, "zoneState": "available",
                            "regionName": self.region, "zoneType": "availability-zone",
                            "optInStatus": "opt-in-not-required", "groupName": self.region,
                            "networkBorderGroup": self.region, "messageSet": None})
        return {"availabilityZoneInfo": out}

    # -- snapshots (a copy of a volume's bytes at a point) ---------------------------------------
    def _snap_key(self, account: str, snapshot_id: str) -> str:
        return f"{SNAPSHOTS}{account}/{snapshot_id}"

    def _data_dir(self) -> str:
        if self.data_dir is None:
            raise Ec2Error("UnsupportedOperation", "Snapshots need the volumes' bytes, which "
                           "this control plane has no data directory for")
        return self.data_dir

    async def _get_snapshot(self, account: str, snapshot_id: str
                            ) -> tuple[dict[str, Any], int]:
        vols.check_snapshot_id(snapshot_id)
        e = await self.store.get(self._snap_key(account, snapshot_id))
        if e is None:
            raise vols.snapshot_not_found(snapshot_id)
        rec: dict[str, Any] = json.loads(e.value)
        return rec, e.revision

    async def _snapshot_of_volume(self, account: str, snapshot_id: str) -> dict[str, Any]:
        self._data_dir()
        rec, _ = await self._get_snapshot(account, snapshot_id)
        if rec["state"] != "completed":
            raise Ec2Error("IncorrectState", f"Snapshot {snapshot_id} is {rec['state']}, not "
                           "completed")
        return rec

    def _spawn_copy(self, ident: str, work: Callable[[], Any]) -> bool:
        """Start ``work`` unless a copy making ``ident`` runs already (False)."""
        if ident in self._copies:
            return False
        task = asyncio.get_running_loop().create_task(work())
        self._copies[ident] = task
        task.add_done_callback(lambda _: self._copies.pop(ident, None))
        return True

    async def wait_copies(self) -> None:
        """Until every copy this process runs has ended (tests; a clean stop)."""
        while self._copies:
            await asyncio.gather(*list(self._copies.values()), return_exceptions=True)

    async def _finish(self, key: str, ident: str, state: str, extra: dict[str, Any]) -> None:
        try:  # no record: deleted meanwhile, nothing to record
            await self._cas_record(key, lambda rec: {**rec, "state": state, **extra}, None)
        except Ec2Error:
            log.warning("%s: could not record its copy's end (%s)", ident, state)

    def _start_snapshot(self, account: str, snap: dict[str, Any], fd: int | None,
                        opened: bool) -> None:
        """Copy the volume's bytes (``fd``, opened and locked when the snapshot was taken;
        ``opened`` False: a copy a restarted process resumes, which opens them now)."""
        data_dir = self._data_dir()

        async def copy() -> None:
            try:
                if snap.get("storage") == "replicated":
                    # the frozen copy a storage server made at the snapshot's point in time
                    if self.volumes is None:
                        raise VolumeError("this region has no storage servers now")
                    await self.volumes.copy_frozen(
                        snap["volume_id"], snap["id"], snap["frozen_on"],
                        snapshot_file(data_dir, account, snap["id"]), snap["size_gib"] * GiB)
                else:
                    source = fd
                    if not opened:  # the volume's record says whether no file means zeros
                        exists = await self.store.get(self._key(account, snap["volume_id"]))
                        source = await asyncio.to_thread(
                            open_source, volume_file(data_dir, account, snap["volume_id"]),
                            exists is not None)
                    await asyncio.to_thread(
                        copy_extents, source, snapshot_file(data_dir, account, snap["id"]),
                        snap["size_gib"] * GiB)
            except (OSError, StoreBusy, VolumeError, StoreError) as e:
                log.warning("snapshot %s failed: %s", snap["id"], e)
                await self._finish(self._snap_key(account, snap["id"]), snap["id"], "error",
                                   {"message": f"The copy failed: {e}"})
                return
            await self._finish(self._snap_key(account, snap["id"]), snap["id"], "completed",
                               {"completed_ms": self.clock()})

        if not self._spawn_copy(snap["id"], copy) and fd is not None:
            os.close(fd)

    def _start_restore(self, account: str, rec: dict[str, Any], fd: int | None,
                       opened: bool) -> None:
        data_dir = self._data_dir()

        async def copy() -> None:
            try:
                source = fd if opened else await asyncio.to_thread(
                    open_source, snapshot_file(data_dir, account, rec["snapshot_id"]), False)
                if rec.get("storage") == "replicated":
                    if self.volumes is None:
                        raise VolumeError("this region has no storage servers now")
                    # through a volume client of its own (taking the volume over: a restore a
                    # restarted control plane runs again fences the one it lost)
                    await self.volumes.restore(rec["id"], source, f"control/restore@{rec['id']}")
                else:
                    await asyncio.to_thread(
                        copy_extents, source, volume_file(data_dir, account, rec["id"]),
                        rec["size_gib"] * GiB)
            except (OSError, StoreBusy, VolumeError, StoreError, TimeoutError) as e:
                log.warning("volume %s from %s failed: %s", rec["id"], rec["snapshot_id"], e)
                await self._finish(self._key(account, rec["id"]), rec["id"], "error", {})
                return
            await self._finish(self._key(account, rec["id"]), rec["id"], "available", {})

        if not self._spawn_copy(rec["id"], copy) and fd is not None:
            os.close(fd)

    async def create_snapshot(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        self._data_dir()
        volume_id = params.get("VolumeId")
        if not volume_id:
            raise Ec2Error("MissingParameter", "The request must contain the parameter "
                           "VolumeId")
        description = params.get("Description", "")
        if len(description) > vols.DESCRIPTION_CHARS_MAX or vols.NOT_XML.search(description):
            raise invalid_value(f"Description is at most {vols.DESCRIPTION_CHARS_MAX} "
                                "characters, none of them a control character")
        tags = vols.tag_specifications(params, "snapshot", self.limits)
        vol, _ = await self._get(account, volume_id)
        replicated = vol.get("storage") == "replicated"
        if vol.get("attachment") and not replicated:
            # A point-in-time copy of a volume being written needs a point the writer's
            # writes are ordered by: a replicated volume's storage servers give one (below);
            # a local file's writer does not, so only a detached one is copied.
            raise Ec2Error("IncorrectState", f"Volume {volume_id} is attached to "
                           f"{vol['attachment']['target']}: cellcloud snapshots detached "
                           "volumes only, unless replicated (docs/volumes.md)")
        if vol["state"] != "available" and not (replicated and vol["state"] == "in-use"):
            raise Ec2Error("IncorrectState", f"Volume {volume_id} is {vol['state']}")
        if replicated and self.volumes is None:
            raise Ec2Error("InternalError", f"Volume {volume_id} is replicated and this "
                           "region has no storage servers now", 500)
        self._dry_run(params)
        if len(await self.store.list(f"{SNAPSHOTS}{account}/")) \
                >= self.limits.ec2_snapshots_per_tenant_max:
            raise Ec2Error("SnapshotLimitExceeded", f"An account has at most "
                           f"{self.limits.ec2_snapshots_per_tenant_max} snapshots "
                           "(ec2_snapshots_per_tenant_max)")
        snap = {"id": new_snapshot_id(), "volume_id": volume_id, "size_gib": vol["size_gib"],
                "state": "pending", "started_ms": self.clock(), "description": description,
                "tags": tags}
        fd: int | None = None
        if replicated:
            # The point of the snapshot: a complete replica freezes a copy of its bytes now,
            # between two of the volume's requests (the writer's, if attached: every write
            # acknowledged before this call is in it). The copy to the snapshot file follows.
            assert self.volumes is not None
            try:
                snap["frozen_on"] = await self.volumes.freeze(volume_id, snap["id"])
            except (VolumeError, StoreError) as e:
                raise Ec2Error("Unavailable", f"Volume {volume_id}'s storage servers took no "
                               f"snapshot: {e}", 503) from None
            snap["storage"] = "replicated"
        else:
            # The point of the snapshot: its bytes are opened and locked now (no file: never
            # attached, all zeros), so a delete or an attach after this answer changes
            # nothing.
            try:
                fd = await asyncio.to_thread(open_source, volume_file(
                    self._data_dir(), account, volume_id), True)
            except StoreBusy:
                raise Ec2Error("IncorrectState", f"Volume {volume_id}'s bytes are held by a "
                               "writer (an attachment in progress)") from None
        try:
            if await self.store.cas(self._snap_key(account, snap["id"]), 0,
                                    json.dumps(snap).encode()) is None:
                raise Ec2Error("InternalError", "A snapshot id was used twice; try again",
                               500)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._start_snapshot(account, snap, fd, True)
        return vols.snapshot_doc(snap, account)

    async def describe_snapshots(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        ids: list[str] = params.get("SnapshotId", [])
        n = vols.max_results(params, vols.DESCRIBE_SNAPSHOTS_RESULTS)
        if ids and (n is not None or params.get("NextToken")):
            raise Ec2Error("InvalidParameterCombination", "The parameter snapshotIdSet "
                           "cannot be used with the parameter maxResults")
        filters = vols.parse_filters(params, vols.SNAPSHOT_FILTERS, self.limits)
        self._dry_run(params)
        owners = params.get("Owner", [])
        if owners and not {"self", account} & set(owners):
            return {"snapshotSet": []}  # nobody shares snapshots with another account
        if ids:
            records = [(await self._get_snapshot(account, i))[0] for i in ids]
        else:
            records = [json.loads(e.value)
                       for e in await self.store.list(f"{SNAPSHOTS}{account}/")]
        for r in records:
            if r["state"] == "pending" and self.data_dir is not None:
                self._start_snapshot(account, r, None, False)  # a copy a restart lost
        chosen = {r["id"]: r for r in records if vols.matches(
            filters, lambda name, r=r: vols.snapshot_fields(r, name, account))}
        keys, token = vols.page(sorted(chosen), params, n)
        out: dict[str, Any] = {"snapshotSet": [vols.snapshot_doc(chosen[k], account)
                                               for k in keys]}
        if token:
            out["nextToken"] = token
        return out

    async def delete_snapshot(self, account: str, params: dict[str, Any]) -> dict[str, Any]:
        snapshot_id = params.get("SnapshotId")
        if not snapshot_id:
            raise Ec2Error("MissingParameter", "The request must contain the parameter "
                           "SnapshotId")
        rec, rev = await self._get_snapshot(account, snapshot_id)
        if rec["state"] == "pending":
            raise Ec2Error("IncorrectState", f"Snapshot {snapshot_id} is still pending")
        self._dry_run(params)
        await self.store.delete(self._snap_key(account, snapshot_id))
        if self.data_dir is not None:
            await asyncio.to_thread(_remove, snapshot_file(self.data_dir, account,
                                                           snapshot_id))
        return {"return": True}


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
