"""The volume failover protocol in the deterministic simulator (volumes/sim.py).

CI budget: 500 seeds, each a volume with 6 storage servers under loss, reordering, crashes
(30 % torn inside a write), pauses, client and store partitions, and in half the runs a paused
writer whose volume another client takes over; then a last failover and a read-back of every
block. The checker (volumes/checker.py) holds every history to: no acknowledged write lost,
every read linearizable (a deposed reader's included: no stale read), one writer acknowledged
per epoch, no write of a deposed writer acknowledged; the run must make progress. The planted-bug tests prove the checks can fail. A failure names its seed:
`python -m cellcloud.volumes.sim --seed N` replays it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from cellcloud.volumes import core
from cellcloud.volumes.sim import World, config_for_seed, run_seed, with_bug

CI_SEEDS = 500


def _failures(seeds: range, bug: str | None = None) -> list[tuple[int, str]]:
    out = []
    for seed in seeds:
        cfg = config_for_seed(seed)
        if bug:
            cfg = with_bug(cfg, bug)
        res = run_seed(seed, cfg)
        if not res.ok:
            out.append((seed, res.reason))
    return out


def test_ci_seeds_keep_every_acknowledged_write_and_fence_deposed_writers() -> None:
    acked = rewires = batches = 0
    failures = []
    takeovers = 0
    for seed in range(CI_SEEDS):
        w = World(seed, config_for_seed(seed))
        res = w.run()
        acked += res.writes_acked
        rewires += res.rewires
        batches += sum(c.core.batches for c in w.clients.values())
        takeovers += len(w.clients) > 2  # a writer was deposed by another (then the verifier)
        if not res.ok:
            failures.append((seed, res.reason[:1500]))
    assert not failures, "\n".join(
        f"seed {s} (replay: python -m cellcloud.volumes.sim --seed {s}): {r}"
        for s, r in failures[:3])
    # The mix really ran: writes were acknowledged, replicas were rewired, writers deposed.
    assert acked > 20 * CI_SEEDS
    assert rewires > 3 * CI_SEEDS
    assert takeovers > CI_SEEDS // 5
    assert batches > CI_SEEDS  # group-committed rounds of several writes


def test_same_seed_replays_exactly() -> None:
    a, b = run_seed(7), run_seed(7)
    assert (a.writes_acked, a.reads, a.rewires, a.events) == (
        b.writes_acked, b.reads, b.rewires, b.events)


@pytest.mark.parametrize("bug,expect,seeds", [
    ("ack_majority", "lost write", 60),  # a write acknowledged before every replica had it
    ("no_fencing", "deposed write acknowledged", 60),  # servers accept an older epoch
    # reads served by the primary alone: a deposed writer, partitioned with its old primary,
    # reads bytes that miss the new writer's acknowledged writes (~2.5 % of seeds)
    ("unfenced_reads", "stale read", 200),
    # group commit acknowledging a write that joined the queue after its round left
    ("group_ack_queued", "lost write", 60),
])
def test_planted_bug_is_caught(bug: str, expect: str, seeds: int) -> None:
    found = _failures(range(seeds), bug)
    assert found, f"the checker missed the planted bug {bug} in {seeds} seeds"
    assert any(expect in reason for _, reason in found), found[0][1][:500]


def test_the_core_is_pure() -> None:
    """volumes/core.py imports no I/O (time passed in, randomness seeded)."""
    tree = ast.parse(pathlib.Path(core.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom)}
    io = {"asyncio", "socket", "os", "time", "pathlib", "subprocess", "ssl", "threading"}
    assert mods & io == set()


@pytest.mark.slow
def test_soak_seeds() -> None:
    found = _failures(range(CI_SEEDS, CI_SEEDS + 5000))
    assert not found, found[:3]
