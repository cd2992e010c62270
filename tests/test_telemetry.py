"""Tests of W3C trace-context propagation through NATS headers and gRPC metadata."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from freshet import telemetry


@pytest.fixture(scope="module")
def tracer() -> trace.Tracer:
    telemetry.setup_tracing("test")
    return telemetry.tracer(__name__)


def _remote_span_context(ctx) -> trace.SpanContext:
    return trace.get_current_span(ctx).get_span_context()


def test_setup_tracing_installs_an_sdk_provider_once(tracer):
    provider = trace.get_tracer_provider()

    telemetry.setup_tracing("other")

    assert isinstance(provider, TracerProvider)
    assert trace.get_tracer_provider() is provider


def test_nats_headers_carry_the_active_span_to_the_consumer(tracer):
    with tracer.start_as_current_span("publish_samples") as span:
        headers = telemetry.inject_headers()
    sent = span.get_span_context()

    received = _remote_span_context(telemetry.extract_headers(headers))

    assert "traceparent" in headers
    assert received.trace_id == sent.trace_id
    assert received.span_id == sent.span_id
    assert received.is_remote


def test_inject_headers_adds_to_and_returns_the_given_headers(tracer):
    headers = {"Nats-Msg-Id": "m-1"}

    with tracer.start_as_current_span("publish"):
        returned = telemetry.inject_headers(headers)

    assert returned is headers
    assert headers["Nats-Msg-Id"] == "m-1"
    assert headers["traceparent"].startswith("00-")


def test_grpc_metadata_carries_the_active_span_to_the_server(tracer):
    with tracer.start_as_current_span("pull") as span:
        metadata = telemetry.grpc_metadata()
    sent = span.get_span_context()
    # A server sees binary entries beside the text ones; they must not break extraction.
    incoming = [("user-agent", "grpc-python"), ("trace-bin", b"\x00\x01"), *metadata]

    received = _remote_span_context(telemetry.extract_grpc(incoming))

    assert all(isinstance(key, str) and isinstance(value, str) for key, value in metadata)
    assert received.trace_id == sent.trace_id
    assert received.span_id == sent.span_id


def test_span_started_from_extracted_context_joins_the_senders_trace(tracer):
    with tracer.start_as_current_span("train_batch") as parent:
        headers = telemetry.inject_headers()

    with tracer.start_as_current_span("apply_delta", context=telemetry.extract_headers(headers)) as child:
        pass

    assert child.get_span_context().trace_id == parent.get_span_context().trace_id
    assert child.parent.span_id == parent.get_span_context().span_id


def test_without_an_active_span_nothing_is_injected(tracer):
    assert telemetry.inject_headers() == {}
    assert telemetry.grpc_metadata() == []


@pytest.mark.parametrize("carrier", [None, {}, {"traceparent": "garbage"}])
def test_headers_without_valid_context_extract_to_an_invalid_span(tracer, carrier):
    assert not _remote_span_context(telemetry.extract_headers(carrier)).is_valid


def test_missing_grpc_metadata_extracts_to_an_invalid_span(tracer):
    assert not _remote_span_context(telemetry.extract_grpc(None)).is_valid
