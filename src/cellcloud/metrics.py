"""What every cellcloud process exports to Prometheus (docs/observability.md).

Each process keeps one ``CollectorRegistry`` (:func:`process_registry`): prometheus_client's
process collector (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds``, …) and this process's TLS handshakes on internal links
(``cellcloud_tls_handshakes_total`` / ``cellcloud_tls_handshake_failures_total`` by ``side``,
counted by :mod:`cellcloud.transport`); a component registers its own series on the same
registry. Expositions travel between processes as the text ``generate_latest`` writes, inside
the mTLS transport; the router gathers them at ``GET /metrics``.

:class:`Pushed` keeps the expositions other processes push (the dispatcher to its frontend, the
control plane to the router: the direction their calls already go), each only while fresh.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .core.limits import DEFAULT_LIMITS, Limits
from .transport import Client, RemoteError, TransportError, protocol_stats, tls_stats


class _TlsCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        ok = CounterMetricFamily("cellcloud_tls_handshakes",
                                 "TLS handshakes completed on internal links", labels=["side"])
        bad = CounterMetricFamily("cellcloud_tls_handshake_failures",
                                  "TLS handshakes on internal links that failed (a missing or "
                                  "bad certificate, a protocol error)", labels=["side"])
        for side in ("server", "client"):
            ok.add_metric([side], tls_stats.handshakes[side])
            bad.add_metric([side], tls_stats.failures[side])
        return [ok, bad]


class _ProtocolCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        links = CounterMetricFamily("cellcloud_protocol_links",
                                    "Internal links opened or accepted, by protocol, side and "
                                    "the version negotiated", labels=["protocol", "side",
                                                                      "version"])
        refused = CounterMetricFamily("cellcloud_protocol_refused",
                                      "Internal peers refused for a protocol version outside "
                                      "the window", labels=["protocol", "side"])
        for name, by_side in sorted(protocol_stats.links.items()):
            for side, by_version in sorted(by_side.items()):
                for version, n in sorted(by_version.items()):
                    links.add_metric([name, side, str(version)], n)
        for name, refusals in sorted(protocol_stats.refused.items()):
            for side, count in sorted(refusals.items()):
                refused.add_metric([name, side], count)
        return [links, refused]


def process_registry() -> CollectorRegistry:
    """A registry with this process's CPU, memory, fds, TLS handshakes and internal
    protocol versions."""
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    r.register(_TlsCollector())
    r.register(_ProtocolCollector())
    return r


class Pushed:
    """Expositions pushed by other processes, by component name, each kept with the time it
    arrived (left out once older than ``metrics_pushed_stale_ms``); bounded in count and size
    (over either: :class:`ValueError`)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, names: str = r"[a-z0-9][a-z0-9-]{0,63}"
                 ) -> None:
        # Which component names a pusher may use (so that none passes for another process).
        self.names = re.compile(names)
        self.stale_after_ms = limits.metrics_pushed_stale_ms
        self.components_max = limits.metrics_pushers_max
        self.bytes_max = limits.metrics_pushed_bytes_max
        self._held: dict[str, tuple[bytes, int]] = {}

    def put(self, component: Any, text: Any, now_ms: int) -> None:
        if not isinstance(component, str) or not isinstance(text, bytes):
            raise ValueError("a push names its component and carries its exposition as bytes")
        if not self.names.fullmatch(component):
            raise ValueError(f"{component!r} is not a component that may push here")
        if len(text) > self.bytes_max:
            raise ValueError(f"exposition over metrics_pushed_bytes_max={self.bytes_max}")
        if component not in self._held and len(self._held) >= self.components_max:
            self._drop_stale(now_ms)
            if len(self._held) >= self.components_max:
                raise ValueError(f"more than metrics_pushers_max={self.components_max} "
                                 "pushing components")
        self._held[component] = (text, now_ms)

    def fresh(self, now_ms: int) -> dict[str, bytes]:
        self._drop_stale(now_ms)
        return {c: text for c, (text, _) in self._held.items()}

    def _drop_stale(self, now_ms: int) -> None:
        for c, (_, at) in list(self._held.items()):
            if now_ms - at > self.stale_after_ms:
                del self._held[c]


async def push_forever(registry: CollectorRegistry, component: str,
                       targets: Callable[[], Iterable[Client]],
                       limits: Limits = DEFAULT_LIMITS) -> None:
    """Every ``metrics_push_interval_ms``, hand this process's exposition to each target's
    ``metrics_push`` op (constant work; a target that does not answer gets the next one)."""
    interval_s = limits.metrics_push_interval_ms / 1000
    while True:
        text = generate_latest(registry)
        for client in list(targets()):
            try:
                await client.call("metrics_push", {"component": component, "text": text},
                                  timeout_s=interval_s)
            except (TransportError, RemoteError):
                pass  # its scrape shows this process missing until the next round lands
        await asyncio.sleep(interval_s)  # the push timer
