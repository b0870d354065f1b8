"""Exporting an invocation's spans through OpenTelemetry's SDK (OTLP over HTTP).

Off unless an endpoint is configured (``cellcloud up --otlp-endpoint URL`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``): :func:`from_config` then returns None, and the SDK is never
imported, so a region without tracing pays nothing for it.

Ids are not the SDK's to choose: every span's trace id and span id come from the invocation's
X-Ray trace header (``core/tracing.py``), so the router's, the frontend's, the agent's and the
environment's spans join one trace across processes. The agent and the environment export
nothing themselves (an agent opens no connection at all; an environment reaches only the
outside world): their spans come back in the invoke reply and the caller exports them, under
their own service names.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from .core.messages import Span
from .core.tracing import TraceHeader

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
schedule_delay_ms = 1000  # how long a finished span may wait for its batch
queue_spans_max = 2048  # spans waiting to be exported; beyond, the SDK drops (and counts) them


def endpoint_from(arg: str | None) -> str | None:
    """The OTLP/HTTP base URL: the option, else the environment's, else None (off)."""
    return (arg or os.environ.get(ENV_ENDPOINT) or "").strip() or None


def traces_url(base: str) -> str:
    """OTLP/HTTP's signal path under a base URL (as the SDK does with the environment's)."""
    return base.rstrip("/") + "/v1/traces"


class SpanExporter:
    """One process's exporter: a batch processor over the SDK's OTLP/HTTP exporter."""

    def __init__(self, endpoint: str, service: str) -> None:
        # Imported here, only when tracing is on.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

        self._ReadableSpan = ReadableSpan
        self._SpanContext = SpanContext
        self._TraceFlags = TraceFlags
        self._SpanKind = SpanKind
        self._Resource = Resource
        self._resources: dict[str, Any] = {}
        self.service = service
        self._scope = InstrumentationScope("cellcloud")
        self.processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=traces_url(endpoint)), max_queue_size=queue_spans_max,
            schedule_delay_millis=schedule_delay_ms)
        self.exported = 0

    def _resource(self, service: str) -> Any:
        found = self._resources.get(service)
        if found is None:
            found = self._resources[service] = self._Resource.create({"service.name": service})
        return found

    def export(self, trace: TraceHeader, name: str, span_id: str, parent_id: str | None,
               start_ns: int, end_ns: int, *, service: str | None = None,
               server: bool = False, attributes: dict[str, Any] | None = None) -> None:
        """One finished span of ``trace`` (nothing when the trace is not sampled)."""
        if not trace.sampled:
            return
        flags = self._TraceFlags(self._TraceFlags.SAMPLED)
        tid = trace.otel_trace_id
        ctx = self._SpanContext(tid, int(span_id, 16), is_remote=False, trace_flags=flags)
        parent = (self._SpanContext(tid, int(parent_id, 16), is_remote=True, trace_flags=flags)
                  if parent_id else None)
        attrs = {"aws.xray.trace_id": trace.root, **(attributes or {})}
        span = self._ReadableSpan(
            name, context=ctx, parent=parent, resource=self._resource(service or self.service),
            attributes=attrs,
            kind=self._SpanKind.SERVER if server else self._SpanKind.INTERNAL,
            start_time=start_ns, end_time=max(start_ns, end_ns),
            instrumentation_scope=self._scope)
        self.processor.on_end(span)
        self.exported += 1

    def export_later(self, trace: TraceHeader, name: str, span_id: str, parent_id: str | None,
                     start_ns: int, end_ns: int, **kwargs: Any) -> None:
        """:meth:`export`, once the event loop is next free: after the answer being built
        has gone out (an ASGI send or a transport reply does not yield before it is written),
        so the span costs the request nothing."""
        call = functools.partial(self.export, trace, name, span_id, parent_id, start_ns, end_ns,
                                 **kwargs)
        try:
            asyncio.get_running_loop().call_soon(call)
        except RuntimeError:  # no loop: now
            call()

    def export_remote_later(self, trace: TraceHeader, spans: tuple[Span, ...],
                            attributes: dict[str, Any] | None = None) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.export_remote, trace, spans, attributes)
        except RuntimeError:
            self.export_remote(trace, spans, attributes)

    def export_remote(self, trace: TraceHeader, spans: tuple[Span, ...],
                      attributes: dict[str, Any] | None = None) -> None:
        """Spans an agent sent back (its own and its environment's)."""
        for sp in spans:
            service = "cellcloud-environment" if sp.name.startswith("env") else "cellcloud-agent"
            try:
                self.export(trace, sp.name, sp.span_id, sp.parent_id or None, sp.start_ns,
                            sp.end_ns, service=service, attributes=attributes)
            except ValueError:  # an id that is not hex: the agent's bug, not the caller's
                continue

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the processor's export timeout) and stop."""
        self.processor.shutdown()


def from_config(arg: str | None, service: str) -> SpanExporter | None:
    endpoint = endpoint_from(arg)
    return SpanExporter(endpoint, service) if endpoint else None
