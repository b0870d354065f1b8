"""The cell's invoke path under simulated faults (frontend/sim.py), every run checked.

CI budget: 500 seeds, each with agents that die mid-invocation, freeze, lose replies and come
back empty, environments that crash, time out, are gone or reset, clients over functions with
reserved concurrency, two versions under the per-version cap and a provisioned pool, and
routers that hold leases (a claim on one warm environment, on which they run invocations
themselves) and die. A failure prints its seed; `python -m cellcloud.frontend.sim --seed N
--verbose` replays it. The planted-bug tests prove that each property can fail.
"""

import multiprocessing
from dataclasses import replace

import pytest

from cellcloud.frontend.sim import World, config_for_seed, run_seed

CI_SEEDS = 500


def _run(seed: int) -> tuple[int, bool, str, int, int]:
    out = run_seed(seed)
    return seed, out.ok, out.reason[:2000], out.requests, out.answered_ok


def test_ci_seeds_hold_every_property():
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_run, range(CI_SEEDS), chunksize=25)
    failures = [(seed, reason) for seed, ok, reason, *_ in results if not ok]
    assert not failures, "\n".join(
        f"seed {s} failed (replay: python -m cellcloud.frontend.sim --seed {s} --verbose): {r}"
        for s, r in failures[:3])
    # The runs do work: most requests get a result despite the faults.
    requests = sum(r[3] for r in results)
    assert sum(r[4] for r in results) > requests // 3 and requests > 50 * CI_SEEDS


def test_faults_are_exercised():
    totals: dict[str, int] = {}
    for seed in range(20):
        world = World(seed, config_for_seed(seed))
        assert world.run().ok
        for k, v in world.core.counters.items():
            totals[k] = totals.get(k, 0) + v
    for counter in ("throttles", "cold_starts", "envs_gone", "env_failures", "deadlines",
                    "poison_charged", "poison_spared", "leases_granted", "leases_revoked"):
        assert totals[counter] > 0, (counter, totals)


def test_same_seed_replays_exactly():
    a, b = World(7, config_for_seed(7)), World(7, config_for_seed(7))
    a.run()
    b.run()
    assert a.events == b.events and a.answers == b.answers


@pytest.mark.parametrize(("bug", "words"), [
    ("bug_retry_after_transport_lost", "ran twice"),
    ("bug_ignore_reserved", "reserved concurrency"),
    ("bug_ignore_version_cap", "per-version cap"),
    ("bug_no_deadline", "not answered by"),
    ("bug_no_reprovision", "provisioned pool"),
    ("bug_reuse_on_deadline", "while it runs"),
    # leases: the slot freed at revocation while the holder's invocation still runs
    ("bug_free_on_revoke", "while it runs"),
    ("bug_leak_slot", "slots still held"),
])
def test_planted_bug_is_caught_within_ci_budget(bug, words):
    other = []
    for seed in range(CI_SEEDS):
        cfg = config_for_seed(seed)
        out = run_seed(seed, replace(cfg, params=replace(cfg.params, **{bug: True})))
        if not out.ok:
            if words in out.reason:
                return
            other.append(out.reason)  # caught by another property: look on for this one
    pytest.fail(f"planted bug {bug} survived {CI_SEEDS} seeds as far as its property "
                f"goes ({len(other)} other failures: {other[:2]})")
