"""Shuffle sharding inside one cell (Route 53's Infima): which k of a cell's n workers serve a
function. Pure: no I/O, no clock; chance comes in as a seeded ``random.Random``.

Three sharders, one contract (``shard`` / ``assign`` answers a tuple of k distinct worker ids):

- :class:`SignatureSharder` — stateless (Infima's ``SimpleSignatureShuffleSharder``). Every
  worker gets a score ``blake2b(key=seed, data=function_key ‖ worker_id)``; the shard is the k
  best scores (rendezvous hashing, top k). With zone labels and ``one_per_zone``, the k zones
  with the best zone scores are picked first, then the best worker inside each. Guarantees:
  deterministic for the same (seed, workers, k); each k-subset equally likely (each zone
  k-subset, then each worker of a zone, equally likely); **adding** a worker changes a shard
  only if the new worker enters it, and then it replaces exactly one member (the lowest
  scoring one; with zones: the member of its own zone, or — when a new zone outranks one of
  the chosen zones — the member of the displaced zone); **removing** a worker changes only the
  shards that held it, by replacing exactly that worker.
- :class:`StatefulSharder` — Infima's "shuffle sharder with overlap guarantee": remembers every
  assigned shard and only hands out a shard that shares at most ``max_overlap_t`` workers with
  each of them; :class:`ShardExhausted` when none fits.
- :class:`PlainSharder` — the comparison baseline: the workers cut into fixed groups of k.

:func:`retry_order` makes a retry after a worker failure go to a different worker of the shard.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

Shard = tuple[str, ...]

workers_per_cell_max = 4096
shard_size_max = 64
# StatefulSharder: the candidate set is enumerated (so exhaustion is exact) when it holds at
# most this many shards; past that, this many random candidates are tried before giving up.
stateful_exhaustive_candidates_max = 20_000
stateful_random_attempts_max = 20_000


@dataclass(frozen=True)
class Worker:
    id: str
    zone: str | None = None


class ShardingError(ValueError):
    """A sharder was configured with parameters that cannot work."""


class ShardExhausted(Exception):
    """No shard of k workers satisfies the overlap bound against the shards already assigned."""

    def __init__(self, key: str, k: int, max_overlap_t: int, searched: int, exhaustive: bool,
                 assigned: int) -> None:
        how = ("every one of the" if exhaustive else "a random sample of")
        super().__init__(
            f"no shard of {k} workers for {key!r} overlaps each of the {assigned} assigned shards "
            f"in at most {max_overlap_t} workers ({how} {searched} candidate shards was checked); "
            f"add workers, raise max_overlap_t, or release shards"
        )
        self.key = key
        self.k = k
        self.max_overlap_t = max_overlap_t
        self.searched = searched
        self.exhaustive = exhaustive


def _seed_bytes(seed: bytes | int) -> bytes:
    if isinstance(seed, int):
        if seed < 0:
            raise ShardingError("an integer seed must be ≥ 0")
        seed = seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "big")
    if len(seed) > 64:  # blake2b's key is at most 64 bytes
        seed = hashlib.blake2b(seed).digest()
    return seed


def _score(seed: bytes, *parts: str) -> bytes:
    h = hashlib.blake2b(key=seed, digest_size=16)
    for p in parts:
        b = p.encode()
        h.update(len(b).to_bytes(4, "big"))  # length-prefixed: ("ab","c") != ("a","bc")
        h.update(b)
    return h.digest()


def _check_workers(workers: Sequence[Worker]) -> None:
    if len(workers) > workers_per_cell_max:
        raise ShardingError(f"more than workers_per_cell_max={workers_per_cell_max} workers")
    ids = [w.id for w in workers]
    if len(set(ids)) != len(ids):
        raise ShardingError("worker ids must be distinct")


def _use_zones(workers: Sequence[Worker], one_per_zone: bool | None) -> bool:
    labelled = [w.zone is not None for w in workers]
    if one_per_zone is None:  # auto: one per zone exactly when every worker carries a zone
        return bool(workers) and all(labelled)
    if one_per_zone and not all(labelled):
        raise ShardingError("one_per_zone needs a zone label on every worker")
    return one_per_zone


def _zones(workers: Sequence[Worker]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for w in workers:
        assert w.zone is not None
        out.setdefault(w.zone, []).append(w.id)
    return out


def _check_k(k: int, n: int, zones: int | None) -> None:
    if not 1 <= k <= shard_size_max:
        raise ShardingError(f"k must be in 1..{shard_size_max}, got {k}")
    if k > n:
        raise ShardingError(f"k={k} is more than the {n} workers")
    if zones is not None and k > zones:
        raise ShardingError(f"k={k} workers one per zone needs ≥ {k} zones, there are {zones}")


class SignatureSharder:
    """Stateless: ``shard(key)`` is a function of (seed, key, the worker set, k) only."""

    def __init__(self, workers: Sequence[Worker], k: int, seed: bytes | int,
                 *, one_per_zone: bool | None = None) -> None:
        _check_workers(workers)
        self.one_per_zone = _use_zones(workers, one_per_zone)
        self.k = k
        self._seed = _seed_bytes(seed)
        self._workers: dict[str, Worker] = {w.id: w for w in workers}
        self._check()

    def _check(self) -> None:
        zones = len(_zones(list(self._workers.values()))) if self.one_per_zone else None
        _check_k(self.k, len(self._workers), zones)

    @property
    def workers(self) -> tuple[Worker, ...]:
        return tuple(self._workers.values())

    def add_worker(self, worker: Worker) -> None:
        if worker.id in self._workers:
            raise ShardingError(f"worker {worker.id!r} is already known")
        if self.one_per_zone and worker.zone is None:
            raise ShardingError("one_per_zone needs a zone label on every worker")
        _check_workers([*self._workers.values(), worker])
        self._workers[worker.id] = worker

    def remove_worker(self, worker_id: str) -> None:
        """Take a failed worker out: only shards that held it change, by exactly that worker."""
        w = self._workers.pop(worker_id)
        try:
            self._check()
        except ShardingError:
            self._workers[worker_id] = w
            raise

    def shard(self, key: str) -> Shard:
        def best(ids: Collection[str], n: int) -> list[str]:
            return sorted(ids, key=lambda i: _score(self._seed, "w", key, i), reverse=True)[:n]

        if not self.one_per_zone:
            return tuple(best(self._workers, self.k))
        zones = _zones(list(self._workers.values()))
        chosen = sorted(zones, key=lambda z: _score(self._seed, "z", key, z), reverse=True)
        return tuple(best(zones[z], 1)[0] for z in chosen[: self.k])


class StatefulSharder:
    """Remembers shards; a new one overlaps every assigned shard in at most ``max_overlap_t``.

    The choice among fitting shards is uniform, drawn from ``rng`` (deterministic for a seeded
    ``random.Random``). With ``max_overlap_t < k`` no two keys ever share a whole shard.
    """

    def __init__(self, workers: Sequence[Worker], k: int, max_overlap_t: int,
                 rng: random.Random, *, one_per_zone: bool | None = None) -> None:
        _check_workers(workers)
        self.one_per_zone = _use_zones(workers, one_per_zone)
        self.k = k
        if not 0 <= max_overlap_t <= k:
            raise ShardingError(f"max_overlap_t must be in 0..k={k}, got {max_overlap_t}")
        self.max_overlap_t = max_overlap_t
        self._rng = rng
        self._workers: dict[str, Worker] = {w.id: w for w in workers}
        self._shards: dict[str, Shard] = {}
        self._by_worker: dict[str, set[str]] = {w.id: set() for w in workers}
        zones = len(_zones(workers)) if self.one_per_zone else None
        _check_k(k, len(workers), zones)

    # -- reading --------------------------------------------------------------------------
    @property
    def workers(self) -> tuple[Worker, ...]:
        return tuple(self._workers.values())

    def shards(self) -> dict[str, Shard]:
        return dict(self._shards)

    def shard(self, key: str) -> Shard | None:
        return self._shards.get(key)

    def keys_on(self, worker_id: str) -> frozenset[str]:
        return frozenset(self._by_worker.get(worker_id, ()))

    # -- the search --------------------------------------------------------------------------
    def _fits(self, candidate: Collection[str], ignore: str | None = None) -> bool:
        counts: dict[str, int] = {}
        for w in candidate:
            for other in self._by_worker[w]:
                if other == ignore:
                    continue
                c = counts.get(other, 0) + 1
                if c > self.max_overlap_t:
                    return False
                counts[other] = c
        return True

    def _candidate_count(self) -> int:
        if not self.one_per_zone:
            return math.comb(len(self._workers), self.k)
        sizes = [len(v) for v in _zones(list(self._workers.values())).values()]
        return sum(math.prod(c) for c in itertools.combinations(sizes, self.k))

    def _all_candidates(self) -> Iterator[Shard]:
        ids = sorted(self._workers)
        if not self.one_per_zone:
            yield from itertools.combinations(ids, self.k)
            return
        zones = _zones([self._workers[i] for i in ids])
        for zs in itertools.combinations(sorted(zones), self.k):
            yield from itertools.product(*(zones[z] for z in zs))

    def _random_candidate(self) -> Shard:
        ids = sorted(self._workers)
        if not self.one_per_zone:
            return tuple(self._rng.sample(ids, self.k))
        zones = _zones([self._workers[i] for i in ids])
        return tuple(self._rng.choice(zones[z]) for z in self._rng.sample(sorted(zones), self.k))

    def _search(self, key: str, ignore: str | None = None) -> Shard:
        total = self._candidate_count()
        if total <= stateful_exhaustive_candidates_max:
            candidates = list(self._all_candidates())
            self._rng.shuffle(candidates)
            for c in candidates:
                if self._fits(c, ignore):
                    return c
            raise ShardExhausted(key, self.k, self.max_overlap_t, total, True, len(self._shards))
        for _ in range(stateful_random_attempts_max):
            c = self._random_candidate()
            if self._fits(c, ignore):
                return c
        raise ShardExhausted(key, self.k, self.max_overlap_t, stateful_random_attempts_max,
                             False, len(self._shards))

    def _store(self, key: str, shard: Shard) -> None:
        self._forget(key)
        self._shards[key] = shard
        for w in shard:
            self._by_worker[w].add(key)

    def _forget(self, key: str) -> None:
        for w in self._shards.pop(key, ()):
            if w in self._by_worker:
                self._by_worker[w].discard(key)

    # -- operations --------------------------------------------------------------------------
    def assign(self, key: str) -> Shard:
        """The key's shard; a new one is searched for on first use (idempotent afterwards)."""
        existing = self._shards.get(key)
        if existing is not None:
            return existing
        shard = self._search(key)
        self._store(key, shard)
        return shard

    def release(self, key: str) -> None:
        self._forget(key)

    def add_worker(self, worker: Worker) -> None:
        """A new worker joins the pool; assigned shards do not move (see :meth:`repair`)."""
        if worker.id in self._workers:
            raise ShardingError(f"worker {worker.id!r} is already known")
        if self.one_per_zone and worker.zone is None:
            raise ShardingError("one_per_zone needs a zone label on every worker")
        _check_workers([*self._workers.values(), worker])
        self._workers[worker.id] = worker
        self._by_worker[worker.id] = set()

    def remove_worker(self, worker_id: str) -> WorkerRemoved:
        """A failed agent leaves every shard. Each affected key (in sorted order) first tries to
        swap only the dead worker for another one (its warm workers stay), then a whole new
        shard; a key for which nothing fits keeps its surviving workers and is reported as
        degraded (call :meth:`repair` once workers are added)."""
        if worker_id not in self._workers:
            raise ShardingError(f"unknown worker {worker_id!r}")
        dead = self._workers.pop(worker_id)
        affected = sorted(self._by_worker.pop(worker_id))
        for key in affected:  # first take the worker out of every shard
            self._shards[key] = tuple(w for w in self._shards[key] if w != worker_id)
        resharded: dict[str, Shard] = {}
        degraded: dict[str, Shard] = {}
        for key in affected:
            new = self._reshard(key, dead.zone)
            if new is None:
                degraded[key] = self._shards[key]
            else:
                resharded[key] = new
        return WorkerRemoved(worker_id, tuple(affected), resharded, degraded)

    def repair(self) -> dict[str, Shard]:
        """Give degraded keys (shards shorter than k) a full shard where one now fits."""
        out: dict[str, Shard] = {}
        for key in sorted(k for k, s in self._shards.items() if len(s) < self.k):
            new = self._reshard(key, None)
            if new is not None:
                out[key] = new
        return out

    def _reshard(self, key: str, lost_zone: str | None) -> Shard | None:
        survivors = self._shards[key]
        used_zones = {self._workers[w].zone for w in survivors}
        spares = [
            w for w in sorted(self._workers)
            if w not in survivors and (not self.one_per_zone or self._workers[w].zone not in used_zones)
        ]
        if self.k - len(survivors) == 1:
            self._rng.shuffle(spares)
            if self.one_per_zone:  # prefer the lost worker's zone (a stable sort keeps chance)
                spares.sort(key=lambda w: self._workers[w].zone != lost_zone)
            for w in spares:
                if self._fits((*survivors, w), ignore=key):
                    shard = (*survivors, w)
                    self._store(key, shard)
                    return shard
        try:
            shard = self._search(key, ignore=key)
        except ShardExhausted:
            return None
        self._store(key, shard)
        return shard


@dataclass(frozen=True)
class WorkerRemoved:
    worker_id: str
    affected: tuple[str, ...]  # keys whose shard held the worker, sorted
    resharded: dict[str, Shard] = field(default_factory=dict)  # key -> its new full shard
    degraded: dict[str, Shard] = field(default_factory=dict)  # key -> surviving workers only


class PlainSharder:
    """The baseline: workers, in the order given, cut into ``ceil(n/k)`` fixed groups of k (the
    last group holds ``n mod k`` workers when k does not divide n); a key gets one whole group,
    chosen by rendezvous hashing of (seed, key, group index), each group equally likely."""

    def __init__(self, workers: Sequence[Worker], k: int, seed: bytes | int = 0) -> None:
        _check_workers(workers)
        _check_k(k, len(workers), None)
        self.k = k
        self._seed = _seed_bytes(seed)
        ids = [w.id for w in workers]
        self.groups: tuple[Shard, ...] = tuple(
            tuple(ids[i: i + k]) for i in range(0, len(ids), k)
        )

    def shard(self, key: str) -> Shard:
        g = max(range(len(self.groups)), key=lambda i: _score(self._seed, "g", key, str(i)))
        return self.groups[g]


def retry_order(shard: Sequence[str], attempt: int, key: str,
                *, failed: Collection[str] = ()) -> Shard:
    """The shard's workers in the order attempt ``attempt`` (0 = first try) should use them.

    The base order is a per-key permutation (``blake2b(key ‖ worker)``, so different keys spread
    their first tries), rotated by ``attempt``: for attempts 0..k-1 the first choice is a
    different worker each time. Workers in ``failed`` (the ones that failed this invocation) go
    last, so ``retry_order(...)[0]`` is never a worker that already failed while the shard has
    another one.
    """
    if attempt < 0:
        raise ValueError("attempt must be ≥ 0")
    if not shard:
        return ()
    base = sorted(shard, key=lambda w: _score(b"retry", key, w))
    r = attempt % len(base)
    rotated = base[r:] + base[:r]
    bad = set(failed)
    return tuple([w for w in rotated if w not in bad] + [w for w in rotated if w in bad])
