"""Installs the OTLP exporter that the standard `OTEL_*` variables ask for.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not
true). The protocol follows `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
`OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or `http/protobuf`); the
sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), batch sizes and
resource follow the SDK's own `OTEL_*` variables. The provider is installed
before any engine client is made, so vLLM's own spans go through the same
exporter and sampler as the router's.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def _protocol() -> str:
    return os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )


def _exporter() -> SpanExporter:
    protocol = _protocol()
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
    """Installs the OTLP exporter if the environment asks for one; True if so.
    Call it before any engine client is made (vLLM installs a provider too)."""
    global _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if traces_endpoint() is None:
        return False
    os.environ.setdefault("OTEL_SERVICE_NAME", "dprouter")
    # The sampler comes from OTEL_TRACES_SAMPLER (default parentbased_always_on).
    _provider = TracerProvider(resource=Resource.create())
    _provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(_provider)
    return True


def traces_endpoint() -> str | None:
    """Where the OTLP exporter sends spans, as the OTEL_* variables say; the
    engine args need it for vLLM to trace its requests at all."""
    if endpoint := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return endpoint
    if not (base := os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    # The HTTP exporter appends the signal's path to the base endpoint itself.
    return f"{base.rstrip('/')}/v1/traces" if _protocol() == "http/protobuf" else base


def shutdown() -> None:
    """Flushes the spans still in the batch queue."""
    if _provider is not None:
        _provider.shutdown()
