"""OpenTelemetry set-up and W3C trace-context propagation over NATS headers and gRPC metadata.

Tracing is switched on by deploy config, not code: ``FRESHET_TRACES=console`` prints spans,
anything else (the default) records them in-process only, so propagation still works. Metrics
likewise: ``FRESHET_METRICS=console`` prints every instrument each ``FRESHET_METRICS_INTERVAL_S``
(default 10); otherwise they are kept in-process for whatever reader a deployment adds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_configured = False


def setup_tracing(service: str) -> None:
    """Installs a tracer provider named after ``service`` (once per process)."""
    global _configured
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"freshet-{service}"}))
    if os.environ.get("FRESHET_TRACES", "").lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def setup_metrics(service: str) -> None:
    """Installs a meter provider named after ``service`` (once per process)."""
    readers = []
    if os.environ.get("FRESHET_METRICS", "").lower() == "console":
        interval_ms = int(float(os.environ.get("FRESHET_METRICS_INTERVAL_S", "10")) * 1000)
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=interval_ms))
    resource = Resource.create({"service.name": f"freshet-{service}"})
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def meter(name: str) -> metrics.Meter:
    """The meter for a module (pass ``__name__``)."""
    return metrics.get_meter(name)


def tracer(name: str) -> trace.Tracer:
    """The tracer for a module (pass ``__name__``)."""
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Adds the current trace context (``traceparent``) to NATS headers and returns them."""
    headers = {} if headers is None else headers
    propagate.inject(headers)
    return headers


def extract_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by NATS headers (an empty context when there is none)."""
    return propagate.extract(dict(headers or {}))


def links_from(headers_list: Iterable[Mapping[str, str] | None]) -> list[trace.Link]:
    """Span links to the traces carried by several inputs' NATS headers (a batch links to its inputs)."""
    links = []
    for headers in headers_list:
        span_context = trace.get_current_span(extract_headers(headers)).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    return links


def grpc_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata for an outgoing call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def extract_grpc(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context carried by incoming gRPC metadata."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)
