"""The chaos experiment. Pure: the independent count (``account``) on made-up ledgers. Short
integration runs (CI): components SIGKILLed every ~3 s under mixed load lose no accepted async
event and leave no sync request hung, per a ledger the handlers report to over their egress,
outside the region; with the planted bug (acknowledging before the durable write) the same
ledger reports losses."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from typing import Any

import pytest

from cellcloud.experiment.chaos import Chaos, account


def _rec(i: str, *phases: str) -> list[dict[str, Any]]:
    return [{"id": i, "phase": p} for p in phases]


def test_account_counts_from_the_ledger_not_from_the_dlq() -> None:
    accepted = {"ok": False, "rerun": False, "fail": True, "never": False, "gaveup": False,
                "faildrop": True, "many": True, "killed": True}
    records = (_rec("ok", "start", "ok") + _rec("rerun", "start", "start", "ok")
               + _rec("fail", "start", "fail", "start", "fail")
               + _rec("gaveup", "start")  # started, killed, then dead-lettered: not a failure
               + _rec("faildrop", "start", "fail", "start", "fail")  # never dead-lettered
               + _rec("many", *(["start", "fail"] * 3))
               + _rec("killed", "start", "start", "fail")
               + _rec("stranger", "start", "ok"))
    dlq = Counter({"fail": 1, "gaveup": 1, "many": 2, "killed": 1, "never-accepted": 1})
    r = account(accepted, records, dlq, retries_max=1)
    assert r["executed"] == 2
    # killed: one attempt killed mid-run, the other failed in the handler
    assert r["dead_lettered_after_failing_every_attempt"] == 3  # fail, many, killed
    assert r["of_which_with_an_attempt_killed_mid_run"] == 1
    assert r["lost"] == 3 and set(r["lost_ids"]) == {"never", "gaveup", "faildrop"}
    assert r["lost_never_started"] == 1
    assert r["lost_interrupted_then_dead_lettered"] == 1  # gaveup
    assert r["dlq_equals_failed_every_attempt"] is False
    assert r["dlq_unexpected"] == ["gaveup", "never-accepted"]
    assert r["dlq_missing"] == ["faildrop"]
    assert r["dlq_delivered_twice"] == 1
    assert r["runs_beyond_retry_policy"] == 1 and r["runs_beyond_retry_policy_ids"] == ["many"]
    assert r["reruns"] == 1
    assert r["unacknowledged_but_run"] == 1


def test_an_event_dead_lettered_without_running_is_lost() -> None:
    """The old oracle counted any DLQ arrival as "not lost"; the ledger says it never ran."""
    r = account({"skipped": True, "ok": False}, _rec("ok", "start", "ok"),
                Counter({"skipped": 1}))
    assert r["lost"] == 1 and r["lost_ids"] == ["skipped"] and r["lost_never_started"] == 1
    assert r["dlq_unexpected"] == ["skipped"]


def test_account_clean_run() -> None:
    accepted = {"a": False, "b": True}
    records = _rec("a", "start", "ok") + _rec("b", "start", "fail", "start", "fail")
    r = account(accepted, records, Counter({"b": 1}))
    assert r["lost"] == 0 and r["executed"] == 1
    assert r["dlq_equals_failed_every_attempt"] is True
    assert r["runs_beyond_retry_policy"] == 0


needs_net = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                               reason="needs root and ip (the ledger's network namespace)")


@pytest.mark.integration
@needs_net
def test_short_chaos_run_loses_nothing_and_hangs_nothing(tmp_path: object) -> None:
    result = Chaos(str(tmp_path), duration_s=15, fault_interval_s=3, seed=11).run()
    print(result)
    assert sum(result["faults"].values()) >= 2
    a, s = result["async"], result["sync"]
    assert a["accepted"] > 0 and a["executed"] > 0
    assert a["lost"] == 0, a
    assert a["executed"] + a["dead_lettered_after_failing_every_attempt"] == a["accepted"]
    assert a["dlq_equals_failed_every_attempt"], a
    assert a["ledger_records"] >= a["accepted"]
    assert s["hung"] == 0
    assert s["succeeded"] + s["failed_with_clear_error"] == s["sent"]
    assert "false_throttles" in s


@pytest.mark.integration
@needs_net
def test_the_planted_bug_is_caught_by_the_ledger(tmp_path: object) -> None:
    result = Chaos(str(tmp_path), duration_s=10, fault_interval_s=3, seed=12,
                   targets=("frontend",), plant_bug=True).run()
    print(result)
    assert result["faults"].get("frontend", 0) >= 1
    assert result["async"]["lost"] > 0
    assert result["async"]["lost_never_started"] > 0
