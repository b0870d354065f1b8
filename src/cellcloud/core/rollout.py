"""A rollout's decisions, without I/O (issue #21): which cells go in which wave, whether a
wave's bake shows a regression, and where an interrupted rollout stands.

The supervisor (region/supervisor.py) is the shell: it restarts each wave's processes on the
target build, waits for their health, observes the wave for the bake time and reports to
:class:`Rollout` what it saw; the plan says what to do next. The plan is a plain document,
saved after every step, so a supervisor that crashed mid-rollout resumes it — or finishes
rolling it back — from the file, and nothing is left half-upgraded without the file saying so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["in_progress", "rolling_back", "done", "rolled_back"]


class RolloutError(ValueError):
    pass


def plan_waves(cells: list[str], *, first: int = 1, growth: int = 2) -> list[list[str]]:
    """One cell first (the canary: ``first`` cells), then waves growing ``growth`` times
    each, in the cells' order, until every cell is in one."""
    if first < 1 or growth < 1:
        raise RolloutError("the first wave and the growth must be at least 1")
    waves: list[list[str]] = []
    size, i = first, 0
    while i < len(cells):
        waves.append(cells[i:i + size])
        i += size
        size *= growth
    return waves


@dataclass(frozen=True)
class Traffic:
    """Requests the router answered for some cells in a window: all, and failed (a platform
    error, 5xx, or a throttle, 429 — what a client counts as a failed request)."""

    served: int
    failed: int

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.served - other.served, self.failed - other.failed)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.served + other.served, self.failed + other.failed)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.served if self.served else 0.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def judge(wave: Traffic, baseline: Traffic, *, tolerance: float = 0.01,
          requests_min: int = 20) -> Verdict:
    """The wave's bake against its baseline (the other cells over the same window): a
    regression is a failure rate more than ``tolerance`` above the baseline's. A wave that
    served fewer than ``requests_min`` requests is judged by any failure at all (too little
    traffic for a rate, and a new build that fails the little it serves is not healthy)."""
    if wave.served < requests_min:
        if wave.failed:
            return Verdict(False, f"{wave.failed} of {wave.served} requests failed during the "
                                  "bake")
        return Verdict(True, f"no failure in {wave.served} requests (too few for a rate)")
    base = baseline.failure_rate if baseline.served >= requests_min else 0.0
    if wave.failure_rate > base + tolerance:
        return Verdict(False, f"failure rate {wave.failure_rate:.2%} ({wave.failed} of "
                              f"{wave.served}) against {base:.2%} in the other cells")
    return Verdict(True, f"failure rate {wave.failure_rate:.2%} ({wave.failed} of "
                         f"{wave.served}); other cells {base:.2%}")


@dataclass
class WaveRecord:
    cells: list[str]
    status: Literal["pending", "upgraded", "rolled_back"] = "pending"
    seconds: float = 0.0
    served: int = 0
    failed: int = 0
    healthy: bool | None = None
    verdict: str = ""


@dataclass
class Rollout:
    """A rollout of every cell from ``previous`` to ``target`` (build paths; "" is the build
    the supervisor itself runs), wave by wave."""

    target: str
    previous: str
    waves: list[WaveRecord]
    status: Status = "in_progress"
    reason: str = ""
    history: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, cells: list[str], target: str, previous: str, *, first: int = 1,
              growth: int = 2, then: tuple[str, ...] = ()) -> Rollout:
        """``then``: region-wide components (``router``, ``control``) replaced after every
        cell, each in a wave of its own, judged and rolled back like a wave of cells."""
        if not cells and not then:
            raise RolloutError("a region without cells has nothing to roll out")
        if len(set(then)) != len(then) or set(then) & set(cells):
            raise RolloutError(f"each component is rolled out once: {', '.join(then)}")
        return cls(target, previous, [WaveRecord(list(w)) for w in
                                      plan_waves(cells, first=first, growth=growth)]
                   + [WaveRecord([c]) for c in then])

    def next_step(self) -> tuple[Literal["upgrade", "rollback", "finished"], list[str], str]:
        """What the shell does next: upgrade a wave's cells to the target, roll cells back
        to the previous build, or nothing (``finished``). Always answers the same until told
        what happened, so a resumed supervisor redoes an interrupted step (a restart on a
        build is idempotent)."""
        if self.status == "in_progress":
            for w in self.waves:
                if w.status == "pending":
                    return "upgrade", w.cells, self.target
            return "finished", [], ""
        if self.status == "rolling_back":
            # Newest first: the cells the last wave touched go back before the canary.
            for w in reversed(self.waves):
                if w.status == "upgraded":
                    return "rollback", w.cells, self.previous
            return "finished", [], ""
        return "finished", [], ""

    def upgraded(self, cells: list[str], *, healthy: bool, verdict: Verdict | None,
                 seconds: float, traffic: Traffic) -> None:
        """A wave's processes run the target build; ``healthy``: they came up and answered;
        ``verdict``: its bake (None when unhealthy: not baked)."""
        w = self._wave(cells, "pending")
        w.status = "upgraded"
        w.healthy = healthy
        w.seconds = round(seconds, 2)
        w.served, w.failed = traffic.served, traffic.failed
        w.verdict = verdict.reason if verdict is not None else "unhealthy: not baked"
        if not healthy or (verdict is not None and not verdict.ok):
            self.status = "rolling_back"
            self.reason = f"wave {self.waves.index(w) + 1} ({', '.join(cells)}): {w.verdict}"
            self.history.append(f"rollback: {self.reason}")
            return
        if all(x.status == "upgraded" for x in self.waves):
            self.status = "done"
        self.history.append(f"wave {self.waves.index(w) + 1} upgraded: {w.verdict}")

    def rolled_back(self, cells: list[str]) -> None:
        w = self._wave(cells, "upgraded")
        w.status = "rolled_back"
        if not any(x.status == "upgraded" for x in self.waves):
            self.status = "rolled_back"
        self.history.append(f"rolled back {', '.join(cells)}")

    def abandon_resume(self, reason: str) -> None:
        """A resumed rollout whose state cannot go on (the target build is gone): roll back
        what was upgraded."""
        if self.status == "in_progress":
            self.status = "rolling_back"
            self.reason = reason
            self.history.append(f"rollback: {reason}")

    def _wave(self, cells: list[str], status: str) -> WaveRecord:
        for w in self.waves:
            if w.cells == cells and w.status == status:
                return w
        raise RolloutError(f"no {status} wave of {cells}")

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Rollout:
        return cls(str(doc["target"]), str(doc["previous"]),
                   [WaveRecord(**w) for w in doc["waves"]], doc["status"],
                   str(doc.get("reason", "")), list(doc.get("history", [])))

    @property
    def active(self) -> bool:
        return self.status in ("in_progress", "rolling_back")
