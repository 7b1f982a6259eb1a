"""One OpenTelemetry span per request, exported over OTLP when the standard
`OTEL_*` variables ask for it.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not
true). The protocol follows `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
`OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or `http/protobuf`); the
sampler, batch sizes and resource follow the SDK's own `OTEL_*` variables.
When tracing is off the API's no-op tracer costs next to nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def _exporter() -> SpanExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")


def setup() -> bool:
    """Installs the OTLP exporter if the environment asks for one; True if so."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return False
    os.environ.setdefault("OTEL_SERVICE_NAME", "dprouter")
    _provider = TracerProvider(resource=Resource.create())
    _provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(_provider)
    return True


def shutdown() -> None:
    """Flushes the spans still in the batch queue."""
    if _provider is not None:
        _provider.shutdown()


def _incoming_context(metadata: Sequence[tuple[str, str | bytes]]) -> Context:
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    return _propagator.extract(carrier)


@contextmanager
def request_span(name: str, metadata: Sequence[tuple[str, str | bytes]]) -> Iterator[Span]:
    """A SERVER span for one RPC, continuing the caller's W3C `traceparent`.

    It is not made the current span: a streaming handler is an async generator
    that gRPC may close from another context, where detaching would fail. The
    span reaches the engine through `outgoing_headers` instead."""
    span = trace.get_tracer("dprouter").start_span(
        name, context=_incoming_context(metadata), kind=SpanKind.SERVER
    )
    try:
        yield span
    finally:
        span.end()


def outgoing_headers(span: Span) -> Mapping[str, str] | None:
    """`traceparent` for the engine, so vLLM's own span joins this trace."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def trace_id(span: Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
