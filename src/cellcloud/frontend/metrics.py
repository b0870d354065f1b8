"""The frontend's Prometheus metrics (prometheus_client; docs/observability.md).

One CollectorRegistry per process; the ``metrics`` transport op returns its text exposition
(``generate_latest``) and the router's ``GET /metrics`` gathers it from every cell. Labels are
bounded: no request ids, at most ``metrics_functions_per_account_max`` functions of one account
and ``metrics_functions_max`` (account, function) pairs in all; the rest fold into
``function="__other__"`` of their account (so one tenant cannot crowd out the others' series,
and every account's totals stay right).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from ..metrics import process_registry

OTHER = "__other__"
_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 300.0, 900.0)
# Invoke durations: the same, and finer where handlers usually answer (0.1 s - 1 s), so that a
# quantile interpolated inside a bucket stays near the truth (a 200 ms handler's p99 lands in
# (0.2, 0.3], not anywhere in (0.1, 0.25] or (0.25, 0.5]).
_INVOKE_BUCKETS_S = tuple(sorted({*_DURATION_BUCKETS_S, 0.2, 0.3, 0.4, 0.75}))


class FrontendMetrics:
    def __init__(self, cell_id: str, functions_max: int,
                 functions_per_account_max: int | None = None) -> None:
        self.cell_id = cell_id
        self.functions_max = functions_max
        self.functions_per_account_max = (functions_max if functions_per_account_max is None
                                          else functions_per_account_max)
        self._functions: set[tuple[str, str]] = set()
        self._per_account: dict[str, int] = {}
        # process_cpu_seconds_total, _resident_memory_bytes, _open_fds; TLS handshakes
        r = self.registry = process_registry()
        fl = ["account", "function"]
        self.invocations = Counter("cellcloud_invocations", "Invokes accepted by the cell",
                                   fl, registry=r)
        self.errors = Counter("cellcloud_function_errors",
                              "Invokes whose function returned an error", fl, registry=r)
        self.throttles = Counter("cellcloud_throttles", "Invokes refused with 429", fl,
                                 registry=r)
        self.duration = Histogram("cellcloud_invocation_duration_seconds",
                                  "Invoke duration seen by the frontend", fl,
                                  buckets=_INVOKE_BUCKETS_S, registry=r)
        self.cold_starts = Counter("cellcloud_cold_starts",
                                   "Environments created for a function", fl, registry=r)
        self.init_duration = Histogram("cellcloud_init_duration_seconds",
                                       "Environment creation (init) time, successful ones", fl,
                                       buckets=_DURATION_BUCKETS_S, registry=r)
        self.concurrent = Gauge("cellcloud_concurrent_executions",
                                "Sync invokes in flight", fl, registry=r)
        self.agents_failed = Gauge("cellcloud_agents_failed", "Agents the cell holds as lost",
                                   registry=r)
        self.environments = Gauge("cellcloud_environments",
                                  "Environments by agent and state (creating, idle, busy)",
                                  ["agent", "state"], registry=r)
        self.agents = Gauge("cellcloud_agents", "Agents in the cell", registry=r)
        self.shard_size = Gauge("cellcloud_shard_size",
                                "k: agents in each function's shuffle shard", registry=r)
        self.shard_functions = Gauge("cellcloud_shard_functions",
                                     "Functions whose shuffle shard includes the agent",
                                     ["agent"], registry=r)
        self.async_depth = Gauge("cellcloud_async_queue_depth", "Async events not yet done",
                                 fl, registry=r)
        self.async_oldest = Gauge("cellcloud_async_oldest_event_age_seconds",
                                  "Age of the oldest async event not yet done", fl, registry=r)

    def labels(self, account: str, function: str) -> tuple[str, str]:
        """The bounded label pair for one function: itself while under both caps (or already
        counted), else its account's ``__other__``."""
        key = (account, function)
        if key in self._functions:
            return key
        held = self._per_account.get(account, 0)
        if (len(self._functions) < self.functions_max
                and held < self.functions_per_account_max):
            self._functions.add(key)
            self._per_account[account] = held + 1
            return key
        return (account, OTHER)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
