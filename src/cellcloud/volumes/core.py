"""The volume data path and its failover protocol, sans-IO (docs/volumes.md).

Pure: no I/O imports, time is passed in, randomness comes from a seeded ``random.Random``.
Two state machines and one pure placement function:

* ``ServerCore`` — a storage server's decisions for the replicas it holds: a request carries the
  volume's configuration and its epoch; an older epoch than the one the server knows is refused
  (fencing), a newer one is learned (persisted before the answer), and a server that is not a
  replica of the request's configuration refuses. The shell carries out the effects (write the
  bytes, fsync, persist the epoch; freeze a snapshot's copy) and only then answers.
* ``ClientCore`` — a volume client (the one attached writer): every write goes to EVERY
  replica of the current configuration and completes only when all answered ok (group commit:
  one round of writes in flight, the writes queued meanwhile together in the next); reads go to
  the primary, and count only once every other complete replica confirmed the reader's epoch
  (fenced reads). A failed or silent replica makes it rewire: a compare-and-set on the
  configuration (epoch + 1) with a replica set from ``choose_replicas``; it then fences the new
  configuration on its replicas and re-mirrors the new replica from the primary chunk by chunk while IO goes
  on (a write during the re-mirror goes to the new replica too; a chunk and a write that
  overlap never fly together, so a chunk never overwrites a newer write).
* ``choose_replicas`` — keep the survivors, add servers from the survivors' zone first, on
  racks the volume does not use yet.

The configuration record (``VolumeConfig``) lives in one store cell per volume; the cell is a
linearizable compare-and-set register, and the client core speaks to it through ``CfgGet`` /
``CfgCas`` actions.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cellcloud.core.limits import DEFAULT_LIMITS, Limits

OK = "ok"
STALE = "stale"  # the request's epoch is older than the server's
NOT_MEMBER = "not_member"  # the server is not a replica of the request's configuration
NOT_READY = "not_ready"  # a read from a replica still being re-mirrored
INVALID = "invalid"  # out of range, too large, malformed
UNKNOWN_VOLUME = "unknown_volume"

CONFIG_KEY = "config"


class VolumeError(Exception):
    pass


class Deposed(VolumeError):
    """Another client attached the volume (a newer epoch): this one may not write."""


class VolumeUnavailable(VolumeError):
    pass


class VolumeAttached(VolumeError):
    """Attaching without ``force`` a volume another client has attached."""


@dataclass(frozen=True)
class VolumeConfig:
    volume_id: str
    size_bytes: int
    epoch: int
    replicas: tuple[str, ...]
    primary: str
    attached_client: str = ""
    attach_epoch: int = 0
    # Replicas added by a rewire that are still being re-mirrored: they take writes, not reads,
    # and cannot become primary.
    catching_up: tuple[str, ...] = ()

    def complete(self) -> tuple[str, ...]:
        return tuple(r for r in self.replicas if r not in self.catching_up)

    def to_dict(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id, "size_bytes": self.size_bytes, "epoch": self.epoch,
            "replicas": list(self.replicas), "primary": self.primary,
            "attached_client": self.attached_client, "attach_epoch": self.attach_epoch,
            "catching_up": list(self.catching_up),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeConfig:
        fields = ("volume_id", "size_bytes", "epoch", "replicas", "primary",
                  "attached_client", "attach_epoch", "catching_up")
        if not isinstance(d, dict) or set(d) != set(fields):
            raise VolumeError(f"malformed volume configuration: {d!r}")
        cfg = cls(str(d["volume_id"]), int(d["size_bytes"]), int(d["epoch"]),
                  tuple(str(r) for r in d["replicas"]), str(d["primary"]),
                  str(d["attached_client"]), int(d["attach_epoch"]),
                  tuple(str(r) for r in d["catching_up"]))
        if cfg.primary not in cfg.complete():
            raise VolumeError(f"primary {cfg.primary!r} is not a complete replica")
        return cfg

    def encode(self) -> bytes:
        """Deterministic bytes (the store cell's value; CAS compares them whole)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> VolumeConfig:
        return cls.from_dict(json.loads(raw))


# ---- placement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    server_id: str
    labels: dict[str, str] = field(default_factory=dict)


class PlacementError(VolumeError):
    pass


def choose_replicas(
    servers: Sequence[ServerInfo],
    keep: Sequence[str],
    exclude: set[str] | frozenset[str],
    count: int,
    rng: random.Random,
    zone: str | None = None,
) -> list[str]:
    """``keep`` plus new servers up to ``count``: never one in ``exclude`` or already kept;
    servers in ``zone`` (default: the first kept server's zone) first, then racks the volume
    does not use yet, then a seeded random order."""
    by_id = {s.server_id: s for s in servers}
    chosen = list(keep)
    if zone is None and chosen and chosen[0] in by_id:
        zone = by_id[chosen[0]].labels.get("zone")
    cands = [s for s in servers if s.server_id not in exclude and s.server_id not in chosen]
    rng.shuffle(cands)
    while len(chosen) < count:
        if not cands:
            raise PlacementError(f"need {count} replicas, only {len(chosen)} servers usable")
        racks = {by_id[c].labels.get("rack") for c in chosen if c in by_id}
        cands.sort(key=lambda s: (s.labels.get("zone") != zone, s.labels.get("rack") in racks))
        chosen.append(cands.pop(0).server_id)
    return chosen


def volume_zone(servers: Sequence[ServerInfo], replicas: Sequence[str]) -> str | None:
    """The zone most of a volume's servers are in: its store cell is placed near it."""
    zones = [s.labels.get("zone") for s in servers if s.server_id in replicas]
    zones_known = [z for z in zones if z]
    return max(sorted(set(zones_known)), key=zones_known.count) if zones_known else None


# ---- storage server ----------------------------------------------------------------------


@dataclass
class ServerVolume:
    config: VolumeConfig  # the newest configuration this server has learned


@dataclass(frozen=True)
class PersistConfig:
    config: VolumeConfig


@dataclass(frozen=True)
class WriteData:
    volume_id: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class ReadData:
    """Read the range into the reply's ``data``. ``mirror``: a re-mirror read — the reply also
    carries ``next`` (the first allocated byte at or after the range's end, or the size) and
    ``hole`` (the range holds no allocated byte: ``data`` may be left empty)."""

    volume_id: str
    offset: int
    length: int
    mirror: bool = False


@dataclass(frozen=True)
class ResetData:
    """Drop the replica's bytes (all holes again): a new replica starts empty, so a re-mirror
    copies only the primary's allocated ranges."""

    volume_id: str
    size_bytes: int


@dataclass(frozen=True)
class DropData:
    """The volume was deleted: remove the replica's bytes. Its configuration (the deleter's
    epoch) stays as a tombstone, so a writer of an older epoch is still refused."""

    volume_id: str


@dataclass(frozen=True)
class FreezeData:
    """A snapshot's point in time: copy the replica's bytes, as they are now (no write in
    between), into a frozen copy named ``snapshot_id``."""

    volume_id: str
    snapshot_id: str


@dataclass(frozen=True)
class ReadFrozen:
    """Read a frozen copy (as a mirror read: the reply carries ``next`` and ``hole``)."""

    volume_id: str
    snapshot_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class DropFrozen:
    volume_id: str
    snapshot_id: str


ServerEffect = (PersistConfig | WriteData | ReadData | ResetData | DropData | FreezeData
                | ReadFrozen | DropFrozen)
SNAPSHOT_NAME = re.compile(r"^snap-[0-9a-f]{8}([0-9a-f]{9})?$")


@dataclass
class ServerCore:
    """One storage server's replica state: the newest configuration per volume. The shell
    executes the effects in order (a ``PersistConfig`` and every ``WriteData`` made durable —
    fsync — before the reply leaves) and fills a ``ReadData``'s bytes into the reply."""

    server_id: str
    limits: Limits = DEFAULT_LIMITS
    volumes: dict[str, ServerVolume] = field(default_factory=dict)
    bug_no_fencing: bool = False  # planted bug: accept any epoch

    def load(self, configs: Sequence[VolumeConfig]) -> None:
        for c in configs:
            self.volumes[c.volume_id] = ServerVolume(c)

    def on_request(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[ServerEffect]]:
        if req.get("op") in ("snapshot_read", "snapshot_drop"):
            return self._frozen(req)
        try:
            op = req["op"]
            cfg = VolumeConfig.from_dict(req["config"])
            if req["epoch"] != cfg.epoch or req["volume"] != cfg.volume_id:
                return {"status": INVALID, "message": "epoch/volume mismatch"}, []
        except (KeyError, TypeError, ValueError, VolumeError) as exc:
            return {"status": INVALID, "message": f"malformed request: {exc}"}, []
        effects: list[ServerEffect] = []
        known = self.volumes.get(cfg.volume_id)
        if known is not None and cfg.epoch < known.config.epoch and not self.bug_no_fencing:
            return {"status": STALE, "epoch": known.config.epoch}, []
        if op == "drop" and known is None:
            return {"status": OK, "epoch": cfg.epoch}, []  # never held it: nothing to drop
        if self.server_id not in cfg.replicas and op != "drop":
            # (a drop reaches every server that holds the volume, a replica the volume was
            # rewired away from included)
            return {"status": NOT_MEMBER, "epoch": known.config.epoch if known else 0}, []
        if known is None or cfg.epoch > known.config.epoch:
            self.volumes[cfg.volume_id] = ServerVolume(cfg)
            if op == "fence" and req.get("reset") and self.server_id in cfg.catching_up:
                # Joining as a new replica: start empty. Only when the epoch is learned (once
                # per epoch), so a repeated fence never wipes writes made since.
                effects.append(ResetData(cfg.volume_id, cfg.size_bytes))
            effects.append(PersistConfig(cfg))
        elif cfg != known.config and not self.bug_no_fencing:
            return {"status": INVALID, "message": "two configurations with one epoch"}, []
        if op in ("fence", "check"):
            # "check": a read's epoch check (docs/volumes.md, "Reads are fenced"): ok only
            # while this server knows no newer epoch than the reader's.
            return {"status": OK, "epoch": cfg.epoch}, effects
        if op == "drop":  # sent by the volume's deleter, whose epoch follows the last record
            effects.append(DropData(cfg.volume_id))
            return {"status": OK, "epoch": cfg.epoch}, effects
        if op == "snapshot":
            # The snapshot's point in time is this request's turn among the volume's requests
            # (they run in arrival order): a complete replica holds every write acknowledged
            # before the configuration was read (docs/volumes.md, "Snapshots").
            snap = req.get("snapshot")
            if not isinstance(snap, str) or not SNAPSHOT_NAME.match(snap):
                return {"status": INVALID, "message": "snapshot needs a snapshot id"}, effects
            if self.server_id in cfg.catching_up:
                return {"status": NOT_READY, "epoch": cfg.epoch}, effects
            return {"status": OK, "epoch": cfg.epoch}, effects + [FreezeData(cfg.volume_id,
                                                                             snap)]
        if op == "write_batch":
            writes = req.get("writes")
            if not isinstance(writes, list) or not 0 < len(writes) <= \
                    self.limits.volume_write_batch_writes_max:
                return {"status": INVALID, "message": "write_batch needs 1 to "
                        f"{self.limits.volume_write_batch_writes_max} writes"}, effects
            total = 0
            batch: list[ServerEffect] = []
            for w in writes:
                if not (isinstance(w, list | tuple) and len(w) == 2 and isinstance(w[0], int)
                        and isinstance(w[1], bytes | bytearray)):
                    return {"status": INVALID, "message": "a write is [offset, data]"}, effects
                offset, data = w
                total += len(data)
                if offset < 0 or offset + len(data) > cfg.size_bytes:
                    return {"status": INVALID, "message": "write past the end"}, effects
                batch.append(WriteData(cfg.volume_id, offset, bytes(data)))
            if total > self.limits.volume_write_bytes_max:
                return {"status": INVALID, "message": "write too large"}, effects
            return {"status": OK, "epoch": cfg.epoch}, effects + batch
        if op in ("write", "mirror_write"):
            offset, data = req.get("offset"), req.get("data")
            if not isinstance(offset, int) or not isinstance(data, bytes | bytearray):
                return {"status": INVALID, "message": "write needs offset and data"}, effects
            if len(data) > self.limits.volume_write_bytes_max:
                return {"status": INVALID, "message": "write too large"}, effects
            if offset < 0 or offset + len(data) > cfg.size_bytes:
                return {"status": INVALID, "message": "write past the end"}, effects
            effects.append(WriteData(cfg.volume_id, offset, bytes(data)))
            return {"status": OK, "epoch": cfg.epoch}, effects
        if op in ("read", "mirror_read"):
            offset, length = req.get("offset"), req.get("length")
            if not isinstance(offset, int) or not isinstance(length, int):
                return {"status": INVALID, "message": "read needs offset and length"}, effects
            if length < 0 or length > self.limits.volume_write_bytes_max:
                return {"status": INVALID, "message": "read too large"}, effects
            if offset < 0 or offset + length > cfg.size_bytes:
                return {"status": INVALID, "message": "read past the end"}, effects
            if self.server_id in cfg.catching_up:
                return {"status": NOT_READY, "epoch": cfg.epoch}, effects
            effects.append(ReadData(cfg.volume_id, offset, length, op == "mirror_read"))
            return {"status": OK, "epoch": cfg.epoch}, effects
        return {"status": INVALID, "message": f"unknown op {op!r}"}, effects


    def _frozen(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[ServerEffect]]:
        """A frozen copy's reads and its removal: not fenced (the copy does not change; the
        snapshot request that made it was)."""
        vol, snap = req.get("volume"), req.get("snapshot")
        if not isinstance(vol, str) or not isinstance(snap, str) or not SNAPSHOT_NAME.match(
                snap):
            return {"status": INVALID, "message": "needs volume and snapshot"}, []
        if req["op"] == "snapshot_drop":
            return {"status": OK}, [DropFrozen(vol, snap)]
        offset, length = req.get("offset"), req.get("length")
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 \
                or not 0 <= length <= self.limits.volume_write_bytes_max:
            return {"status": INVALID, "message": "read needs offset and length"}, []
        return {"status": OK}, [ReadFrozen(vol, snap, offset, length)]


# ---- volume client -----------------------------------------------------------------------


@dataclass(frozen=True)
class CfgGet:
    volume_id: str


@dataclass(frozen=True)
class CfgCas:
    volume_id: str
    expected: VolumeConfig
    new: VolumeConfig


@dataclass(frozen=True)
class SendServer:
    server: str
    rid: int
    request: dict[str, Any]


@dataclass(frozen=True)
class Complete:
    op_id: int
    ok: bool
    data: bytes = b""
    error: str = ""
    epoch: int = 0  # the epoch whose replicas acknowledged (writes) or answered (reads)
    sent_ms: int = 0  # when the acknowledged attempt was sent


ClientAction = CfgGet | CfgCas | SendServer | Complete


@dataclass(frozen=True)
class ClientParams:
    replicas: int = 3
    request_timeout_ms: int = 200
    cfg_timeout_ms: int = 400
    retry_backoff_ms: int = 50
    mirror_chunk_bytes: int = 64
    rewire_attempts_max: int = 50
    inflight_max: int = 1  # operations in flight at once (non-overlapping)
    # Group commit: more than 1 — at most one round of writes in flight; the writes queued
    # meanwhile go together in the next round (one request, one fsync per replica), up to this
    # many and ``batch_bytes_max`` bytes. 1: every write its own round, several in flight.
    write_batch_max: int = 1
    batch_bytes_max: int = 1 << 20
    bug_ack_majority: bool = False  # planted bug: complete a write on a majority of replicas
    bug_unfenced_reads: bool = False  # planted bug: read the primary without an epoch check
    bug_group_ack_queued: bool = False  # planted bug: a round also acks a write still queued


@dataclass
class _Op:
    op_id: int
    kind: str  # write | read | mirror
    offset: int
    data: bytes = b""
    length: int = 0


@dataclass
class _Inflight:
    op: _Op
    epoch: int
    sent_ms: int
    waiting: dict[int, str]  # rid -> server
    ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    stale: bool = False
    data: bytes = b""
    stage: str = ""  # mirror: "read" then "write"
    invalid: str = ""
    hole: bool = False  # mirror: the chunk read holds no allocated byte
    next: int = 0  # mirror: where the primary's next allocated byte is
    primary: str = ""  # read: the server whose bytes are the answer (the others check)
    more: list[_Op] = field(default_factory=list)  # write: the rest of a group-commit batch

    def ops(self) -> list[_Op]:
        return [self.op, *self.more]


class ClientCore:
    """The attached writer of one volume. Feed it events (``start``, ``submit_*``,
    ``on_cfg``, ``on_server``, ``on_tick``); it returns actions. Up to ``inflight_max``
    non-overlapping operations are in flight at once; overlapping ones (re-mirror chunks
    included) run in order."""

    def __init__(
        self,
        client_id: str,
        volume_id: str,
        servers: Sequence[ServerInfo],
        rng: random.Random,
        params: ClientParams = ClientParams(),
    ) -> None:
        self.client_id = client_id
        self.volume_id = volume_id
        self.servers = list(servers)
        self.rng = rng
        self.params = params
        self.config: VolumeConfig | None = None
        self.phase = "idle"  # idle|reading_cfg|cas|fencing|ready|waiting|deposed
        self.queue: list[_Op] = []
        # Operations in flight, by key (a caller's op id; negative for re-mirror chunks).
        self.inflight: dict[int, _Inflight] = {}
        self.rid_op: dict[int, int] = {}  # request id -> inflight key
        self.mirror_keys = 0
        # Set when an answer calls for a configuration change ("stale": re-read it, "failed":
        # rewire, "mirror_done": clear catching_up); no new operation is sent until every one
        # in flight has finished, then the change is made.
        self.draining = ""
        self.op_failed: set[str] = set()
        self.cfg_deadline = 0
        self.cfg_pending: CfgCas | CfgGet | None = None
        self.wait_until = 0
        self.failed: set[str] = set()  # servers that failed since the last rewire
        self.mirror_offset = 0
        self.rids = 0
        self.rewires = 0
        self.batches = 0  # write rounds that carried more than one write (group commit)
        self.attempts = 0  # consecutive rewire attempts without a completed operation
        self.fence_wait: dict[int, str] = {}
        self.fence_ok: set[str] = set()
        self.fence_deadline = 0
        self.fenced_epoch = 0  # the epoch this client has fenced on all its replicas
        self.last_was_user = False  # re-mirror chunks alternate with queued operations
        # Attach even if another client is attached (take over, fencing it); False: refuse
        # (phase "refused"), the EC2 rule for an attached volume.
        self.force = True
        self.detaching = False

    # ---- events --------------------------------------------------------------------------

    def start(self, now_ms: int) -> list[ClientAction]:
        """Attach: read the configuration, then take it over (epoch + 1, attached to us)."""
        return self._read_cfg(now_ms)

    def submit_write(self, op_id: int, offset: int, data: bytes, now_ms: int
                     ) -> list[ClientAction]:
        bad = self._check(offset, len(data))
        if bad:
            return [Complete(op_id, False, error=bad)]
        self.queue.append(_Op(op_id, "write", offset, bytes(data)))
        return self._pump(now_ms)

    def submit_read(self, op_id: int, offset: int, length: int, now_ms: int
                    ) -> list[ClientAction]:
        bad = self._check(offset, length)
        if bad:
            return [Complete(op_id, False, error=bad)]
        self.queue.append(_Op(op_id, "read", offset, length=length))
        return self._pump(now_ms)

    def _check(self, offset: int, length: int) -> str:
        if self.phase in ("deposed", "detached", "refused"):
            return "deposed"
        if length < 0 or length > DEFAULT_LIMITS.volume_write_bytes_max:
            return f"length {length} out of range (at most {DEFAULT_LIMITS.volume_write_bytes_max})"
        if self.config is not None and (offset < 0 or offset + length > self.config.size_bytes):
            return f"[{offset}, {offset + length}) is past the end ({self.config.size_bytes})"
        return ""

    def on_cfg(self, result: VolumeConfig | None, cas_ok: bool | None, now_ms: int
               ) -> list[ClientAction]:
        """The configuration cell answered: ``result`` is the current record (after a CAS:
        the record now in the cell), ``cas_ok`` the CAS outcome (None for a get)."""
        pending, self.cfg_pending = self.cfg_pending, None
        if pending is None or result is None:
            return []
        if isinstance(pending, CfgCas):
            # A CAS whose answer was lost and retried looks failed but applied: same record.
            if cas_ok or result == pending.new:
                return self._adopt(result, now_ms)
        if result.attached_client != self.client_id:
            if self.config is None:
                if not self.force and result.attached_client:
                    return self._refuse(now_ms)
                return self._take_over(result, now_ms)  # attaching (again, if a CAS lost)
            return self._depose(now_ms)
        if self.config is not None and result.epoch < self.config.epoch:
            return self._read_cfg(now_ms)  # a stale read (cannot happen with a linearizable cell)
        return self._adopt(result, now_ms)

    def on_server(self, rid: int, reply: dict[str, Any] | None, now_ms: int
                  ) -> list[ClientAction]:
        """A storage server answered request ``rid`` (``None``: the connection failed)."""
        if rid in self.fence_wait:
            server = self.fence_wait.pop(rid)
            status = reply.get("status") if reply else None
            if status == OK:
                self.fence_ok.add(server)
            elif status == STALE:
                self.fence_wait = {}
                return self._read_cfg(now_ms)
            else:
                self.failed.add(server)
            if not self.fence_wait:
                return self._fence_done(now_ms)
            return []
        key = self.rid_op.pop(rid, None)
        fl = self.inflight.get(key) if key is not None else None
        if key is None or fl is None or rid not in fl.waiting:
            return []
        server = fl.waiting.pop(rid)
        status = reply.get("status") if reply else None
        if status == OK:
            fl.ok.add(server)
            if (fl.op.kind == "read" and server == fl.primary) or fl.stage == "read":
                fl.data = bytes(reply.get("data", b"")) if reply else b""
                fl.hole = bool(reply.get("hole")) if reply else False
                nxt = reply.get("next") if reply else None
                fl.next = nxt if isinstance(nxt, int) else fl.op.offset + fl.op.length
        elif status == STALE:
            fl.stale = True
        elif status == INVALID:
            fl.invalid = str(reply.get("message", "invalid")) if reply else "invalid"
        else:
            fl.failed.add(server)
        return self._progress(key, now_ms)

    def on_tick(self, now_ms: int) -> list[ClientAction]:
        out: list[ClientAction] = []
        if self.cfg_pending is not None and now_ms >= self.cfg_deadline:
            # The cell did not answer: ask again what it holds (a CAS may have applied).
            self.cfg_pending = None
            out += self._read_cfg(now_ms)
        if self.fence_wait and now_ms >= self.fence_deadline:
            self.failed |= set(self.fence_wait.values())
            self.fence_wait = {}
            out += self._fence_done(now_ms)
        for key, fl in list(self.inflight.items()):
            if fl.waiting and now_ms >= fl.sent_ms + self.params.request_timeout_ms:
                fl.failed |= set(fl.waiting.values())
                fl.waiting = {}
                out += self._progress(key, now_ms)
        if self.phase == "waiting" and now_ms >= self.wait_until:
            self.phase = "fencing"
            out += self._fence(now_ms)
        return out

    # ---- configuration ---------------------------------------------------------------------

    def _read_cfg(self, now_ms: int) -> list[ClientAction]:
        if self.phase in ("deposed", "detached", "refused"):
            return []
        if self.phase in ("idle", "ready"):
            self.phase = "reading_cfg"
        self.cfg_pending = CfgGet(self.volume_id)
        self.cfg_deadline = now_ms + self.params.cfg_timeout_ms
        return [self.cfg_pending]

    def _cas(self, expected: VolumeConfig, new: VolumeConfig, now_ms: int) -> list[ClientAction]:
        self.phase = "cas"
        self.cfg_pending = CfgCas(self.volume_id, expected, new)
        self.cfg_deadline = now_ms + self.params.cfg_timeout_ms
        return [self.cfg_pending]

    def _take_over(self, cur: VolumeConfig, now_ms: int) -> list[ClientAction]:
        new = replace(cur, epoch=cur.epoch + 1, attached_client=self.client_id,
                      attach_epoch=cur.epoch + 1)
        return self._cas(cur, new, now_ms)

    def _adopt(self, cfg: VolumeConfig, now_ms: int) -> list[ClientAction]:
        if cfg.attached_client != self.client_id:
            return self._depose(now_ms)
        if self.config is None or cfg.epoch != self.config.epoch:
            self.mirror_offset = 0
        self.config = cfg
        self.phase = "fencing"
        return self._fence(now_ms)

    def detach(self, now_ms: int) -> list[ClientAction]:
        """Give the volume up: CAS ``attached_client`` to "" (epoch + 1). Ends in phase
        "detached" (or "deposed" if another client had taken it over)."""
        if self.config is None or self.phase in ("deposed", "detached", "refused"):
            return []
        self.detaching = True
        cfg = self.config
        new = replace(cfg, epoch=cfg.epoch + 1, attached_client="", attach_epoch=cfg.epoch + 1)
        return self._cas(cfg, new, now_ms)

    def gone(self, now_ms: int) -> list[ClientAction]:
        """The configuration cell holds no record: the volume was deleted (or never made)."""
        self.phase = "deposed"
        return self._drop_all("no such volume")

    def _refuse(self, now_ms: int) -> list[ClientAction]:
        out = self._depose(now_ms)
        self.phase = "refused"
        return [replace(c, error="attached") if isinstance(c, Complete) else c for c in out]

    def _depose(self, now_ms: int) -> list[ClientAction]:
        self.phase = "detached" if self.detaching else "deposed"
        return self._drop_all("deposed")

    def _drop_all(self, why: str) -> list[ClientAction]:
        ops = [op for fl in self.inflight.values() for op in fl.ops()
               if op.kind != "mirror"] + self.queue
        self.inflight = {}
        self.rid_op = {}
        self.queue = []
        self.draining = ""
        self.op_failed = set()
        return [Complete(op.op_id, False, error=why) for op in sorted(ops, key=lambda o: o.op_id)]

    # ---- fencing -----------------------------------------------------------------------------

    def _request(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.config is not None
        return {"op": op, "volume": self.volume_id, "epoch": self.config.epoch,
                "config": self.config.to_dict(), **kw}

    def _fence(self, now_ms: int) -> list[ClientAction]:
        assert self.config is not None
        self.failed = set()
        self.fence_ok = set()
        self.fence_wait = {}
        out: list[ClientAction] = []
        for s in self.config.replicas:
            self.rids += 1
            self.fence_wait[self.rids] = s
            reset = {"reset": True} if s in self.config.catching_up else {}
            out.append(SendServer(s, self.rids, self._request("fence", **reset)))
        self.fence_deadline = now_ms + self.params.request_timeout_ms
        return out

    def _fence_done(self, now_ms: int) -> list[ClientAction]:
        assert self.config is not None
        if self.phase != "fencing":
            return []
        if self.failed:
            return self._rewire(now_ms)
        self.fenced_epoch = self.config.epoch
        self.phase = "ready"
        return self._pump(now_ms)

    # ---- rewiring ----------------------------------------------------------------------------

    def _rewire(self, now_ms: int) -> list[ClientAction]:
        """Replace the failed replicas: CAS epoch + 1 with a new replica set."""
        cfg = self.config
        assert cfg is not None
        self.rewires += 1
        self.attempts += 1
        if self.attempts > self.params.rewire_attempts_max:
            return self._fail_all("rewire attempts exhausted", now_ms)
        failed = set(self.failed)
        survivors = [r for r in cfg.replicas if r not in failed]
        complete = [r for r in cfg.complete() if r not in failed]
        if not complete:
            # Every complete copy is unreachable: nothing to rewire from. Wait and fence the
            # same configuration again (the servers keep their data across restarts).
            self.phase = "waiting"
            self.wait_until = now_ms + self.params.retry_backoff_ms
            return []
        primary = cfg.primary if cfg.primary in complete else complete[0]
        keep = [primary] + [r for r in survivors if r != primary]
        try:
            replicas = choose_replicas(self.servers, keep, failed | set(cfg.replicas),
                                       self.params.replicas, self.rng)
        except PlacementError:
            self.phase = "waiting"
            self.wait_until = now_ms + self.params.retry_backoff_ms
            return []
        catching = tuple(r for r in replicas if r not in complete)
        new = replace(cfg, epoch=cfg.epoch + 1, replicas=tuple(replicas), primary=primary,
                      catching_up=catching)
        return self._cas(cfg, new, now_ms)

    def _fail_all(self, why: str, now_ms: int) -> list[ClientAction]:
        out = self._drop_all(why)
        self.attempts = 0
        self.phase = "waiting"
        self.wait_until = now_ms + self.params.retry_backoff_ms
        return out

    # ---- the data path -----------------------------------------------------------------------

    @staticmethod
    def _overlap(a: _Op, b: _Op) -> bool:
        la = len(a.data) if a.kind == "write" else a.length
        lb = len(b.data) if b.kind == "write" else b.length
        return a.offset < b.offset + lb and b.offset < a.offset + la

    def _pump(self, now_ms: int) -> list[ClientAction]:
        """Send what may go: up to ``inflight_max`` operations at once, none overlapping one in
        flight or an earlier queued one (overlapping operations run in order), one re-mirror
        chunk at a time, alternating with the caller's operations."""
        if self.phase != "ready" or self.config is None:
            return []
        if self.draining:
            return self._drain(now_ms)
        cfg = self.config
        out: list[ClientAction] = []
        busy = [op for fl in self.inflight.values() for op in fl.ops()]
        batching = self.params.write_batch_max > 1
        # group commit: one write round in flight; the writes that may go form the next one
        write_round = any(fl.op.kind == "write" for fl in self.inflight.values())
        batch: list[_Op] = []
        batch_bytes = 0
        if cfg.catching_up and not any(op.kind == "mirror" for op in busy):
            if self.mirror_offset >= cfg.size_bytes:
                self.draining = "mirror_done"  # every new replica holds a full copy
                return self._drain(now_ms)
            if self.last_was_user or not self.queue:
                n = min(self.params.mirror_chunk_bytes, cfg.size_bytes - self.mirror_offset)
                chunk = _Op(-1, "mirror", self.mirror_offset, length=n)
                if not any(self._overlap(chunk, op) for op in busy):
                    self.last_was_user = False
                    out += self._send(chunk, now_ms)
                    busy.append(chunk)
        i = 0
        while i < len(self.queue) and len(busy) < self.params.inflight_max:
            op = self.queue[i]
            if any(self._overlap(op, b) for b in busy) or any(
                    self._overlap(op, q) for q in self.queue[:i]):
                i += 1
                continue
            if batching and op.kind == "write":
                if write_round or len(batch) >= self.params.write_batch_max or (
                        batch and batch_bytes + len(op.data) > self.params.batch_bytes_max):
                    i += 1  # waits for the next round (later ones may not overtake it)
                    continue
                self.queue.pop(i)
                batch.append(op)
                batch_bytes += len(op.data)
                busy.append(op)
                continue
            self.queue.pop(i)
            self.last_was_user = True
            out += self._send(op, now_ms)
            busy.append(op)
        if batch:
            self.last_was_user = True
            out += self._send(batch[0], now_ms, batch[1:])
        return out

    def _drain(self, now_ms: int) -> list[ClientAction]:
        """Once nothing is in flight, make the configuration change ``draining`` asks for."""
        if self.inflight:
            return []
        cfg = self.config
        assert cfg is not None
        why, self.draining = self.draining, ""
        if why == "stale":
            # A server knows a newer epoch: someone else took the volume (or we are behind).
            self.op_failed = set()
            return self._read_cfg(now_ms)
        if why == "failed":
            self.failed, self.op_failed = set(self.op_failed), set()
            return self._rewire(now_ms)
        return self._cas(cfg, replace(cfg, epoch=cfg.epoch + 1, catching_up=()), now_ms)

    def _send(self, op: _Op, now_ms: int, more: Sequence[_Op] = ()) -> list[ClientAction]:
        cfg = self.config
        assert cfg is not None
        if op.kind == "mirror":
            self.mirror_keys += 1
            key = -self.mirror_keys
        else:
            key = op.op_id
        fl = self.inflight[key] = _Inflight(op, cfg.epoch, now_ms, {}, primary=cfg.primary,
                                            more=list(more))
        if more:  # one round for the batch: every replica writes all, then fsyncs once
            req = self._request("write_batch", writes=[[o.offset, o.data] for o in fl.ops()])
            targets = [(s, req) for s in cfg.replicas]
        elif op.kind == "write":
            targets = [(s, self._request("write", offset=op.offset, data=op.data))
                       for s in cfg.replicas]
        elif op.kind == "read":
            # The primary's bytes count only if every other complete replica confirms, after
            # the read was called, that the reader's epoch is still the newest it knows: a
            # deposed reader gets "stale" (docs/volumes.md, "Reads are fenced").
            targets = [(cfg.primary, self._request("read", offset=op.offset, length=op.length))]
            if not self.params.bug_unfenced_reads:
                targets += [(s, self._request("check")) for s in cfg.complete()
                            if s != cfg.primary]
        else:
            fl.stage = "read"
            targets = [(cfg.primary, self._request("mirror_read", offset=op.offset,
                                                   length=op.length))]
        return self._to(key, fl, targets)

    def _to(self, key: int, fl: _Inflight, targets: list[tuple[str, dict[str, Any]]]
            ) -> list[ClientAction]:
        out: list[ClientAction] = []
        for s, req in targets:
            self.rids += 1
            fl.waiting[self.rids] = s
            self.rid_op[self.rids] = key
            out.append(SendServer(s, self.rids, req))
        return out

    def _requeue(self, op: _Op) -> None:
        if op.kind != "mirror":  # resent (in the new epoch) before later operations
            self.queue.append(op)
            self.queue.sort(key=lambda o: o.op_id)

    def _progress(self, key: int, now_ms: int) -> list[ClientAction]:
        fl = self.inflight[key]
        cfg = self.config
        assert cfg is not None
        if fl.op.kind == "write" and self.params.bug_ack_majority and not fl.stale:
            if len(fl.ok) > len(cfg.replicas) // 2:
                for rid in fl.waiting:
                    self.rid_op.pop(rid, None)
                fl.waiting = {}
                fl.failed = set()
        if fl.waiting:
            return []
        clean = not (fl.failed or fl.stale or fl.invalid)
        if clean and fl.op.kind == "mirror" and fl.stage == "read" and not fl.hole:
            fl.stage = "write"
            fl.ok = set()
            fl.sent_ms = now_ms
            req = self._request("mirror_write", offset=fl.op.offset, data=fl.data)
            return self._to(key, fl, [(s, req) for s in cfg.catching_up])
        del self.inflight[key]
        out: list[ClientAction] = []
        if fl.invalid and fl.op.kind != "mirror":
            out += [Complete(op.op_id, False, error=fl.invalid) for op in fl.ops()]
        elif fl.stale or fl.invalid:
            self.draining = "stale"
            for op in fl.ops():
                self._requeue(op)
        elif fl.failed:
            self.op_failed |= fl.failed
            if self.draining != "stale":
                self.draining = "failed"
            for op in fl.ops():
                self._requeue(op)
        else:
            self.attempts = 0
            if fl.op.kind == "mirror":
                self.mirror_offset = max(fl.op.offset + fl.op.length, fl.next)
            else:
                self.batches += bool(fl.more)
                done = fl.ops()
                if self.params.bug_group_ack_queued and fl.op.kind == "write":
                    # the classic group-commit bug: a write that joined after the round left
                    late = [q for q in self.queue if q.kind == "write"][:1]
                    self.queue = [q for q in self.queue if q not in late]
                    done += late
                out += [Complete(op.op_id, True, data=fl.data, epoch=fl.epoch,
                                 sent_ms=fl.sent_ms) for op in done]
        return out + self._pump(now_ms)
