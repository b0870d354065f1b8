"""Simulated colonies with faults, every history checked for linearizability.

CI budget: 500 seeds with faults (partitions, crashes that lose unsynced writes, loss,
duplication, reordering, clock skew), each with 3 concurrent clients per cell on overlapping
keys. A failure prints its seed; `python -m cellcloud.store.sim --seed N --verbose` replays it.
The planted-bug tests prove the simulator and checker can fail.
"""

import multiprocessing
from dataclasses import replace

import pytest

from cellcloud.store.sim import SimConfig, World, config_for_seed, run_seed

CI_SEEDS = 500


def _run(seed: int):
    out = run_seed(seed)
    return seed, out.ok, out.reason[:2000], out.ops


def test_ci_seeds_with_faults_are_linearizable_and_make_progress():
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_run, range(CI_SEEDS), chunksize=10)
    failures = [(seed, reason) for seed, ok, reason, _ in results if not ok]
    assert sum(ops for *_, ops in results) > 50 * CI_SEEDS
    assert not failures, "\n".join(
        f"seed {s} failed (replay: python -m cellcloud.store.sim --seed {s} --verbose): {r}"
        for s, r in failures[:3]
    )


def test_same_seed_replays_exactly():
    a, b = World(42, config_for_seed(42)), World(42, config_for_seed(42))
    a.run()
    b.run()
    assert a.history == b.history and a.events == b.events and a.chosen == b.chosen


def _first_failure(bug: str, checker_only: bool) -> tuple[int, str] | None:
    for seed in range(CI_SEEDS):
        cfg = config_for_seed(seed, check_agreement=not checker_only)
        if bug == "skip_fsync":
            cfg = replace(cfg, bug_skip_fsync=True)
        else:
            cfg = replace(cfg, params=replace(cfg.params, **{f"bug_{bug}": True}))
        out = run_seed(seed, cfg)
        if not out.ok:
            return seed, out.reason
    return None


@pytest.mark.parametrize("bug", ["skip_fsync", "accept_lower_ballot", "stale_reads"])
def test_planted_bug_is_caught_by_the_checker_within_ci_budget(bug):
    # The cross-replica agreement check is off: what catches the bug is the linearizability
    # checker (or an invariant assertion inside a replica, which the simulator reports too).
    found = _first_failure(bug, checker_only=True)
    assert found is not None, f"planted bug {bug} survived {CI_SEEDS} seeds"
    assert any(w in found[1] for w in ("not linearizable", "no progress", "assertion"))


def test_sim_config_defaults_meet_the_brief():
    cfg = SimConfig()
    assert cfg.clients_per_cell >= 3 and cfg.replicas_per_cell % 2 == 1
