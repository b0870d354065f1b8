"""core/rollout.py: waves, the bake's verdict and the resumable plan (issue #21)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.rollout import Rollout, RolloutError, Traffic, judge, plan_waves


@given(st.integers(0, 40), st.integers(1, 4), st.integers(1, 4))
def test_waves_cover_every_cell_once_in_order_canary_first(n: int, first: int,
                                                           growth: int) -> None:
    cells = [f"cell-{i}" for i in range(1, n + 1)]
    waves = plan_waves(cells, first=first, growth=growth)
    assert [c for w in waves for c in w] == cells
    if waves:
        assert len(waves[0]) == min(first, n)
        for a, b in zip(waves, waves[1:-1], strict=False):
            assert len(b) == len(a) * growth  # each full wave grows


def test_plan_refuses_nonsense() -> None:
    with pytest.raises(RolloutError):
        plan_waves(["a"], first=0)
    with pytest.raises(RolloutError):
        Rollout.start([], "/new", "")


def test_judge_compares_the_wave_with_the_other_cells() -> None:
    assert judge(Traffic(1000, 5), Traffic(1000, 0)).ok  # 0.5 %: within the tolerance
    bad = judge(Traffic(1000, 30), Traffic(1000, 0))
    assert not bad.ok and "3.00%" in bad.reason
    # the other cells fail as much: not the new build's fault (e.g. a bad tenant)
    assert judge(Traffic(1000, 30), Traffic(1000, 25)).ok
    # too little traffic for a rate: any failure is a regression, none is fine
    assert not judge(Traffic(5, 1), Traffic(1000, 0)).ok
    assert judge(Traffic(0, 0), Traffic(0, 0)).ok


def _bake(ok: bool) -> tuple[Traffic, Traffic]:
    return (Traffic(100, 0 if ok else 50), Traffic(100, 0))


def test_a_good_rollout_goes_wave_by_wave_to_done() -> None:
    r = Rollout.start(["c1", "c2", "c3", "c4"], "/new", "")
    seen = []
    while True:
        step, cells, build = r.next_step()
        if step == "finished":
            break
        assert step == "upgrade" and build == "/new"
        seen.append(cells)
        w, base = _bake(True)
        r.upgraded(cells, healthy=True, verdict=judge(w, base), seconds=1.0, traffic=w)
    assert seen == [["c1"], ["c2", "c3"], ["c4"]] and r.status == "done" and not r.active


def test_a_regression_rolls_back_newest_first_and_survives_a_crash() -> None:
    r = Rollout.start(["c1", "c2", "c3"], "/new", "/old")
    w, base = _bake(True)
    r.upgraded(["c1"], healthy=True, verdict=judge(w, base), seconds=1, traffic=w)
    w, base = _bake(False)
    r.upgraded(["c2", "c3"], healthy=True, verdict=judge(w, base), seconds=1, traffic=w)
    assert r.status == "rolling_back" and "wave 2" in r.reason
    assert r.next_step() == ("rollback", ["c2", "c3"], "/old")
    # The supervisor crashes here: the saved plan says the same after a reload.
    again = Rollout.from_doc(r.to_doc())
    assert again.next_step() == ("rollback", ["c2", "c3"], "/old")
    again.rolled_back(["c2", "c3"])
    assert again.next_step() == ("rollback", ["c1"], "/old")
    again.rolled_back(["c1"])
    assert again.status == "rolled_back" and again.next_step()[0] == "finished"


def test_an_unhealthy_wave_is_not_baked_and_rolls_back() -> None:
    r = Rollout.start(["c1", "c2"], "/broken", "")
    r.upgraded(["c1"], healthy=False, verdict=None, seconds=60, traffic=Traffic(0, 0))
    assert r.status == "rolling_back" and "unhealthy" in r.reason
    assert r.next_step() == ("rollback", ["c1"], "")


def test_a_resumed_rollout_redoes_the_interrupted_wave() -> None:
    r = Rollout.start(["c1", "c2"], "/new", "")
    w, base = _bake(True)
    r.upgraded(["c1"], healthy=True, verdict=judge(w, base), seconds=1, traffic=w)
    resumed = Rollout.from_doc(r.to_doc())  # crashed while c2 was being upgraded
    assert resumed.next_step() == ("upgrade", ["c2"], "/new")
    resumed.abandon_resume("the target build is gone")
    assert resumed.next_step() == ("rollback", ["c1"], "")


def test_router_and_control_go_after_every_cell_and_roll_back_like_a_wave() -> None:
    r = Rollout.start(["c1", "c2", "c3"], "/new", "", then=("router", "control"))
    assert [w.cells for w in r.waves] == [["c1"], ["c2", "c3"], ["router"], ["control"]]
    for cells in (["c1"], ["c2", "c3"]):
        assert r.next_step() == ("upgrade", cells, "/new")
        r.upgraded(cells, healthy=True, verdict=judge(*_bake(True)), seconds=1.0,
                   traffic=Traffic(100, 0))
    assert r.next_step() == ("upgrade", ["router"], "/new")
    # the router's bake regresses: it goes back first, then every cell, newest first
    w, base = _bake(False)
    r.upgraded(["router"], healthy=True, verdict=judge(w, base), seconds=1.0, traffic=w)
    assert r.status == "rolling_back" and "router" in r.reason
    undone = []
    while (step := r.next_step())[0] == "rollback":
        undone.append(step[1])
        r.rolled_back(step[1])
    assert undone == [["router"], ["c2", "c3"], ["c1"]] and r.status == "rolled_back"
    # components only (`--components router`), each once
    assert [w.cells for w in Rollout.start([], "/new", "", then=("router",)).waves] == [
        ["router"]]
    with pytest.raises(RolloutError):
        Rollout.start(["c1"], "/new", "", then=("router", "router"))
