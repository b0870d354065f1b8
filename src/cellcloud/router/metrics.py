"""The router's ``GET /metrics``: the cells' Prometheus expositions (their ``metrics`` transport
op: the frontend's own and, for the operator, its agents' and dispatcher's), the control
plane's (pushed) and the router's own, gathered, labelled with their cell and component, and
filtered to one tenant's series (SigV4) or shown whole (the operator's Bearer token). Parsed and written back by prometheus_client; no
exposition is written by hand (docs/observability.md)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Gathered(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def gather(sources: list[tuple[dict[str, str], bytes]], account: str | None) -> bytes:
    """One exposition from many: each source is (labels to add, its text exposition), e.g.
    ``({"cell": "cell-1", "component": "cell-1-agent-0"}, b"...")``. With ``account``, only
    samples labelled with that account (a tenant's view: its functions' series, never a
    process's or an agent's), else all of them."""
    families: dict[tuple[str, str], Metric] = {}
    for extra, text in sources:
        for fam in text_string_to_metric_families(text.decode("utf-8")):
            key = (fam.name, fam.type)
            out = families.get(key)
            if out is None:
                out = families[key] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                if account is not None and s.labels.get("account") != account:
                    continue
                out.samples.append(Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp,
                                          s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    kept = [f for f in families.values() if f.samples]
    registry.register(_Gathered(kept))
    return generate_latest(registry)
