"""The chaos experiment, short (CI): components SIGKILLed every ~3 s under mixed load lose no
accepted async event and leave no sync request hung; with the planted bug (acknowledging
before the durable write) the same independent ledger reports losses."""

from __future__ import annotations

import pytest

from cellcloud.experiment.chaos import Chaos

pytestmark = pytest.mark.integration


def test_short_chaos_run_loses_nothing_and_hangs_nothing(tmp_path: object) -> None:
    result = Chaos(str(tmp_path), duration_s=15, fault_interval_s=3, seed=11).run()
    print(result)
    assert sum(result["faults"].values()) >= 2
    a, s = result["async"], result["sync"]
    assert a["accepted"] > 0 and a["executed"] > 0
    assert a["lost"] == 0, a["lost_ids"]
    assert a["executed"] + a["sent_to_dlq"] == a["accepted"]
    assert s["hung"] == 0
    assert s["succeeded"] + s["failed_with_clear_error"] == s["sent"]


def test_the_planted_bug_is_caught_by_the_ledger(tmp_path: object) -> None:
    result = Chaos(str(tmp_path), duration_s=10, fault_interval_s=3, seed=12,
                   targets=("frontend",), plant_bug=True).run()
    print(result)
    assert result["faults"].get("frontend", 0) >= 1
    assert result["async"]["lost"] > 0
