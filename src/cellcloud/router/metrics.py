"""The router's ``GET /metrics``: the cells' Prometheus expositions (their ``metrics`` transport
op), gathered, labelled with their cell and filtered to one tenant's series (SigV4) or shown
whole (the operator's Bearer token). Parsed and written back by prometheus_client; no
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


def gather(expositions: dict[str, bytes], account: str | None,
           extra: CollectorRegistry | None = None) -> bytes:
    """One exposition from each cell's (``cell`` label added); with ``account``, only samples
    labelled with that account (a tenant's view), else all of them and ``extra``'s."""
    families: dict[tuple[str, str], Metric] = {}
    for cell_id, text in sorted(expositions.items()):
        for fam in text_string_to_metric_families(text.decode("utf-8")):
            key = (fam.name, fam.type)
            out = families.get(key)
            if out is None:
                out = families[key] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                if account is not None and s.labels.get("account") != account:
                    continue
                out.samples.append(Sample(s.name, {**s.labels, "cell": cell_id}, s.value, s.timestamp,
                                          s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    kept = [f for f in families.values() if f.samples]
    registry.register(_Gathered(kept))
    body = generate_latest(registry)
    if extra is not None and account is None:
        body += generate_latest(extra)
    return body


