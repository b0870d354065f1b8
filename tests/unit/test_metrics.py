"""Metrics labels stay bounded; the router's gathering filters by account (issue #16)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cellcloud.frontend.metrics import OTHER, FrontendMetrics
from cellcloud.router.metrics import gather


def _invocations(text: bytes) -> dict[tuple[str, str], float]:
    return {(s.labels["account"], s.labels["function"]): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if s.name == "cellcloud_invocations_total"}


def test_function_label_folds_beyond_the_cap() -> None:
    cap = 10
    m = FrontendMetrics("c1", cap)
    for i in range(500):
        acct = "111" if i % 2 else "222"
        m.invocations.labels(*m.labels(acct, f"f{i}")).inc()
    seen = _invocations(m.exposition())
    named = [k for k in seen if k[1] != OTHER]
    assert len(named) == cap
    assert seen[("111", OTHER)] + seen[("222", OTHER)] == 500 - cap
    assert sum(seen.values()) == 500
    # A function counted before the cap was reached keeps its own series.
    m.invocations.labels(*m.labels("222", "f0")).inc()
    assert _invocations(m.exposition())[("222", "f0")] == 2


def test_gather_filters_by_account_and_labels_cells() -> None:
    c1, c2 = FrontendMetrics("c1", 100), FrontendMetrics("c2", 100)
    c1.invocations.labels(*c1.labels("111", "a")).inc(3)
    c2.invocations.labels(*c2.labels("222", "b")).inc(4)
    tenant = gather({"c1": c1.exposition(), "c2": c2.exposition()}, "222")
    assert _invocations(tenant) == {("222", "b"): 4}
    assert b"process_" not in tenant, "process metrics are the operator's"
    assert 'cell="c2"' in tenant.decode()
    whole = gather({"c1": c1.exposition(), "c2": c2.exposition()}, None)
    assert _invocations(whole) == {("111", "a"): 3, ("222", "b"): 4}
    assert b"process_" in whole
