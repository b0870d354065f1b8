"""Checks a volume history for the failover protocol's three promises.

* **No acknowledged write lost.** Every block is a register: a read (during the run, or the
  read-back after the last failover) must return the value of a write to that block that no
  acknowledged write to it superseded before the read began (w' supersedes w when w' was called
  after w returned and w' returned before the read was called), or zeroes when no write to it
  had been acknowledged before the read. An unacknowledged write has no return: it may show up
  or not, forever. Reads are linearizable: every read, whichever client and epoch made it (a
  deposed client that has not learned it yet included), is held to every write acknowledged
  to anyone before the read was called — a read after an acknowledged write returns it or a
  newer value, never an older one ("stale read").
* **No two primaries acknowledge in the same epoch.** Every acknowledgement names its epoch and
  the client that got it; per epoch there is one.
* **A deposed writer gets nothing acknowledged.** A write sent at epoch ``e`` after the writer
  of a later epoch had fenced that epoch on all its replicas must not be acknowledged.

Written independently of ``volumes/core.py``: it sees only what clients called and got back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INF = float("inf")


@dataclass(frozen=True)
class Write:
    client: str
    block: int
    value: bytes
    call_ms: float
    return_ms: float | None  # None: never acknowledged
    epoch: int = 0
    sent_ms: float = 0.0


@dataclass(frozen=True)
class Read:
    client: str
    block: int
    value: bytes
    call_ms: float
    return_ms: float
    epoch: int = 0


@dataclass
class History:
    block_bytes: int
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    fenced_ms: dict[int, float] = field(default_factory=dict)  # epoch -> when fenced (first)


def _kind(r: Read, missed: Write) -> str:
    """A read that misses a write acknowledged at a later epoch than its own was served to a
    deposed reader ("stale read"); one that misses a write of its own epoch or an earlier one
    lost it ("lost write")."""
    return "stale read" if missed.epoch > r.epoch else "lost write"


def check(h: History) -> list[str]:
    """Violations found (empty: the history keeps all three promises)."""
    out: list[str] = []
    by_block: dict[int, list[Write]] = {}
    for w in h.writes:
        by_block.setdefault(w.block, []).append(w)
    zero = bytes(h.block_bytes)
    for r in h.reads:
        ws = by_block.get(r.block, [])
        acked_before = [w for w in ws if w.return_ms is not None and w.return_ms < r.call_ms]
        if r.value == zero and not any(w.value == zero for w in ws):
            if acked_before:
                out.append(f"{_kind(r, acked_before[-1])}: {r} read zeroes after "
                           f"{acked_before[-1]} was acked")
            continue
        src = [w for w in ws if w.value == r.value]
        if not src:
            out.append(f"read a value nobody wrote: {r}")
            continue
        w = src[0]
        w_ret = INF if w.return_ms is None else w.return_ms
        newer = [x for x in acked_before if x.call_ms > w_ret]
        if newer:
            out.append(f"{_kind(r, newer[0])}: {r} returned {w}, superseded by acked {newer[0]}")
    per_epoch: dict[int, set[str]] = {}
    for w in h.writes:
        if w.return_ms is not None:
            per_epoch.setdefault(w.epoch, set()).add(w.client)
    for epoch, clients in sorted(per_epoch.items()):
        if len(clients) > 1:
            out.append(f"two writers acknowledged in epoch {epoch}: {sorted(clients)}")
    for w in h.writes:
        if w.return_ms is None:
            continue
        later = [(e, t) for e, t in h.fenced_ms.items() if e > w.epoch and t < w.sent_ms]
        if later:
            out.append(f"deposed write acknowledged: {w} sent after epoch {later[0][0]} "
                       f"was fenced at {later[0][1]}")
    return out
