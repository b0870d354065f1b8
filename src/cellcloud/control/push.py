"""The control plane's constant-work config push, as a pure scheduler.

Every ``push_interval_ms`` the whole current cell map goes to every router, whether or not
anything changed (the Builders' Library's "constant work": the load on the control plane, the
network and the routers is the same on a quiet day and during a mass change, so a storm of
changes cannot overload anything, and a router that missed a push is repaired by the next).

The shell owns the timer and the sockets::

    while True:
        for push in sched.on_tick(now_ms(), state.cell_map().to_wire()):
            spawn(send(push))            # call with a timeout ≤ push_timeout_ms, then
                                         # sched.on_ack(...) or sched.on_push_failed(...)
        await sleep_until(sched.next_push_ms)

Rules: a round that was missed (the shell was late) is skipped, not made up in a burst; a
router whose previous push is still in flight (younger than ``push_timeout_ms``) is skipped for
this round and counted, so a hung router never accumulates pushes. A router is *stale* when it
has not acknowledged the current map version within ``stale_after_ms`` of that version's first
push, or has acknowledged nothing at all for ``stale_after_ms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

routers_max = 1_024


@dataclass(frozen=True)
class Push:
    router_id: str
    version: int
    doc: Mapping[str, Any]  # the whole map (CellMap.to_wire()); the same object for every router


@dataclass
class _Router:
    router_id: str
    added_ms: int
    acked_version: int | None = None
    acked_ms: int | None = None
    in_flight_since_ms: int | None = None
    failures: int = 0  # consecutive
    last_error: str = ""


@dataclass(frozen=True)
class RouterStatus:
    router_id: str
    acked_version: int | None
    acked_ms: int | None
    failures: int
    stale: bool
    reason: str  # why it is stale ("" when it is not)


@dataclass
class PushStats:
    rounds: int = 0
    pushes: int = 0
    acks: int = 0
    failures: int = 0
    skipped_in_flight: int = 0
    rounds_missed: int = 0


class PushScheduler:
    def __init__(self, *, push_interval_ms: int, start_ms: int,
                 push_timeout_ms: int | None = None, stale_after_ms: int | None = None) -> None:
        if push_interval_ms <= 0:
            raise ValueError("push_interval_ms must be > 0")
        self.push_interval_ms = push_interval_ms
        self.push_timeout_ms = push_interval_ms if push_timeout_ms is None else push_timeout_ms
        self.stale_after_ms = 3 * push_interval_ms if stale_after_ms is None else stale_after_ms
        self.next_push_ms = start_ms
        self.current_version: int | None = None
        self.current_since_ms: int | None = None  # when current_version was first pushed
        self._routers: dict[str, _Router] = {}
        self.stats = PushStats()

    # -- membership -------------------------------------------------------------------------
    def add_router(self, router_id: str, now_ms: int) -> None:
        if router_id in self._routers:
            return
        if len(self._routers) >= routers_max:
            raise ValueError(f"at most routers_max={routers_max} routers")
        self._routers[router_id] = _Router(router_id, now_ms)

    def remove_router(self, router_id: str) -> None:
        self._routers.pop(router_id, None)

    @property
    def routers(self) -> tuple[str, ...]:
        return tuple(sorted(self._routers))

    # -- events -----------------------------------------------------------------------------
    def on_tick(self, now_ms: int, doc: Mapping[str, Any]) -> list[Push]:
        """Pushes due now: the whole ``doc`` to every router, once per interval."""
        version = int(doc["version"])
        if self.current_version is not None and version < self.current_version:
            raise ValueError(f"map version went back from {self.current_version} to {version}")
        if now_ms < self.next_push_ms:
            return []
        if version != self.current_version:
            self.current_version, self.current_since_ms = version, now_ms
        late_rounds = (now_ms - self.next_push_ms) // self.push_interval_ms
        self.stats.rounds_missed += late_rounds
        self.next_push_ms += (late_rounds + 1) * self.push_interval_ms
        self.stats.rounds += 1
        out: list[Push] = []
        for rid in sorted(self._routers):
            r = self._routers[rid]
            if r.in_flight_since_ms is not None and now_ms - r.in_flight_since_ms < self.push_timeout_ms:
                self.stats.skipped_in_flight += 1
                continue
            r.in_flight_since_ms = now_ms
            out.append(Push(rid, version, doc))
        self.stats.pushes += len(out)
        return out

    def on_ack(self, router_id: str, version: int, now_ms: int) -> None:
        r = self._routers.get(router_id)
        if r is None:
            return  # removed meanwhile
        r.acked_version = version if r.acked_version is None else max(r.acked_version, version)
        r.acked_ms = now_ms
        r.in_flight_since_ms = None
        r.failures = 0
        r.last_error = ""
        self.stats.acks += 1

    def on_push_failed(self, router_id: str, now_ms: int, error: str) -> None:
        r = self._routers.get(router_id)
        if r is None:
            return
        r.in_flight_since_ms = None
        r.failures += 1
        r.last_error = error[:200]
        self.stats.failures += 1

    # -- questions --------------------------------------------------------------------------
    def min_acked_version(self) -> int | None:
        """The newest version every router has acknowledged (None: some router has
        acknowledged nothing yet; with no routers, the current version)."""
        if not self._routers:
            return self.current_version
        acked = [r.acked_version for r in self._routers.values()]
        if any(v is None for v in acked):
            return None
        return min(v for v in acked if v is not None)

    def status(self, now_ms: int) -> list[RouterStatus]:
        out = []
        for rid in sorted(self._routers):
            r = self._routers[rid]
            reason = ""
            last_heard = r.acked_ms if r.acked_ms is not None else r.added_ms
            if now_ms - last_heard > self.stale_after_ms:
                reason = (f"no acknowledgement for {now_ms - last_heard} ms"
                          + (f" (last error: {r.last_error})" if r.last_error else ""))
            elif (self.current_version is not None and self.current_since_ms is not None
                  and (r.acked_version is None or r.acked_version < self.current_version)
                  and now_ms - self.current_since_ms > self.stale_after_ms):
                reason = (f"at version {r.acked_version}, version {self.current_version} was "
                          f"pushed {now_ms - self.current_since_ms} ms ago")
            out.append(RouterStatus(rid, r.acked_version, r.acked_ms, r.failures, bool(reason),
                                    reason))
        return out

    def statistics(self) -> dict[str, int]:
        s = self.stats
        return {"routers": len(self._routers), "rounds": s.rounds, "pushes": s.pushes,
                "acks": s.acks, "failures": s.failures,
                "skipped_in_flight": s.skipped_in_flight, "rounds_missed": s.rounds_missed}
