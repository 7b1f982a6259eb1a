"""One OpenTelemetry trace per request, exported over OTLP when the standard
`OTEL_*` variables ask for it.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is not
true). The protocol follows `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
`OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or `http/protobuf`); the
sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), batch sizes and
resource follow the SDK's own `OTEL_*` variables. When tracing is off the
API's no-op tracer hands out non-recording spans, and everything here that
builds attributes checks `is_recording()` first, so a request pays for a few
no-op calls only.

The tree of one request (attributes follow the OpenTelemetry GenAI and RPC
semantic conventions where they have a name; `dprouter.*` where they do not):

    dprouter.v1.GenerateService/Generate   SERVER, continues the client's traceparent
      validate                             checks, tokenization
      route                                the policy's decision and the admission on a rank
      text_completion <model>              CLIENT, one per attempt on a rank
        llm_request                        vLLM's own span (finished requests only)

vLLM emits `llm_request` from the process that holds its engine client (the
router) through the global tracer provider; ours is installed first, so
vLLM's spans go through the same exporter and sampler as the router's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from router.engine_types import EngineDelta, Sampling
from router.errors import RequestError
from router.ledger import RankLoad
from router.policies import Decision

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer = trace.get_tracer("dprouter")
# vLLM's name among GenAI providers (semantic conventions: any lowercase name).
PROVIDER = "vllm"


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


# A traceparent with the sampled flag off: under the default parent-based
# sampler nothing is recorded for a request that carries it. The watchdog's
# probes (one a second per rank) carry it; vLLM would trace each as a new root.
UNSAMPLED_HEADERS: Mapping[str, str] = {
    "traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
}


def shutdown() -> None:
    """Flushes the spans still in the batch queue."""
    if _provider is not None:
        _provider.shutdown()


def _incoming_context(metadata: Sequence[tuple[str, str | bytes]]) -> Context:
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    return _propagator.extract(carrier)


def _error(span: Span, error: BaseException) -> None:
    """Marks a span failed: the client's message for a RequestError (no
    stack: it is an answer, not a fault), the cancel, or the exception."""
    if isinstance(error, RequestError):
        span.set_status(StatusCode.ERROR, error.message())
        span.set_attribute("error.type", error.code.name)
        return
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        span.set_status(StatusCode.ERROR, "cancelled")
    else:
        span.record_exception(error)
        span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.set_attribute("error.type", type(error).__qualname__)


class Attempt:
    """The CLIENT span of one run of the request on one rank (GenAI's
    inference span); vLLM's `llm_request` span is its child."""

    def __init__(self, span: Span, started: float) -> None:
        self.span = span
        self._started = started  # the request's arrival (monotonic)
        self._tokens = 0
        self._finish_reasons: list[str] = []

    @property
    def headers(self) -> Mapping[str, str] | None:
        """`traceparent` for the engine, so vLLM's own span joins this trace."""
        if not self.span.get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def output(self, delta: EngineDelta) -> None:
        if not self.span.is_recording():
            return
        if delta.token_ids and not self._tokens:
            ttft = time.monotonic() - self._started
            self.span.add_event("first_token", {"gen_ai.response.time_to_first_chunk": ttft})
            self.span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
        self._tokens += len(delta.token_ids)
        if delta.finish_reason:
            self._finish_reasons.append(delta.finish_reason)
        if delta.finished:
            self.span.set_attributes(
                {
                    "gen_ai.response.finish_reasons": self._finish_reasons,
                    "gen_ai.usage.cache_read.input_tokens": delta.cached_tokens,
                }
            )

    def fail(self, error: BaseException) -> None:
        if self.span.is_recording():
            _error(self.span, error)

    def end(self) -> None:
        if self.span.is_recording():
            self.span.set_attribute("gen_ai.usage.output_tokens", self._tokens)
        self.span.end()


class RequestTrace:
    """The spans of one RPC: a SERVER span continuing the caller's W3C
    `traceparent`, and its children.

    The server span is not made the current span: a streaming handler is an
    async generator that gRPC may close from another context, where detaching
    would fail. Children name their parent explicitly instead."""

    def __init__(self, span: Span, model: str) -> None:
        self.span = span
        self.model = model
        self.started = time.monotonic()
        self._parent = trace.set_span_in_context(span)

    @property
    def trace_id(self) -> str | None:
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def _child(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> Span:
        return _tracer.start_span(name, context=self._parent, kind=kind)

    @contextmanager
    def stage(self, name: str) -> Iterator[Span]:
        """A child span around one step of the request; an exception leaving
        it marks it failed."""
        span = self._child(name)
        try:
            yield span
        except BaseException as e:
            if span.is_recording():
                _error(span, e)
            raise
        finally:
            span.end()

    def request(self, sampling: Sampling, prompt_tokens: int, chat: bool, session: str) -> None:
        """The GenAI request attributes, once the request is known to be valid."""
        if not self.span.is_recording():
            return
        self.span.set_attributes(self._request_attributes(sampling, chat, session))
        self.span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)

    def _request_attributes(
        self, sampling: Sampling, chat: bool, session: str
    ) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat" if chat else "text_completion",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self.model,
            "gen_ai.output.type": "text",
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "gen_ai.request.top_k": sampling.top_k,
            "gen_ai.request.presence_penalty": sampling.presence_penalty,
            "gen_ai.request.frequency_penalty": sampling.frequency_penalty,
            "gen_ai.request.choice.count": sampling.n,
        }
        if sampling.stop:
            attributes["gen_ai.request.stop_sequences"] = sampling.stop
        if sampling.seed is not None:
            attributes["gen_ai.request.seed"] = sampling.seed
        if session:
            attributes["gen_ai.conversation.id"] = session
        return attributes

    def routed(self, span: Span, decision: Decision, admitted: RankLoad) -> None:
        """What the policy weighed and chose (on the `route` span) and the
        chosen rank's load with the request admitted there."""
        candidates = decision.candidates
        span.set_attributes(
            {
                "dprouter.route.policy": decision.policy,
                "dprouter.route.reason": decision.reason,
                "dprouter.route.rank": decision.rank if decision.rank is not None else -1,
                "dprouter.route.candidate_ranks": [c.rank for c in candidates],
                "dprouter.route.candidate_scores": [c.score for c in candidates],
                "dprouter.route.candidate_prefix_match_tokens": [
                    c.prefix_match_tokens for c in candidates
                ],
                "dprouter.route.prefix_match_tokens": decision.prefix_match_tokens,
                "dprouter.rank.in_flight": admitted.in_flight,
                "dprouter.rank.queued_prompt_tokens": admitted.queued_prompt_tokens,
            }
        )
        if decision.affinity_rank is not None:
            span.set_attribute("dprouter.route.affinity_rank", decision.affinity_rank)

    def attempt(
        self, rank: int, engine_request_id: str, sampling: Sampling, prompt_tokens: int
    ) -> Attempt:
        """Starts the span of one run on `rank`; the caller must `end` it."""
        span = self._child(f"text_completion {self.model}", SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(self._request_attributes(sampling, False, ""))
            span.set_attributes(
                {
                    "gen_ai.response.id": engine_request_id,
                    "gen_ai.usage.input_tokens": prompt_tokens,
                    "vllm.data_parallel_rank": rank,
                }
            )
        return Attempt(span, self.started)

    def end(
        self, code: grpc.StatusCode, message: str, attributes: Mapping[str, AttributeValue]
    ) -> None:
        """Ends the server span with the RPC's gRPC status (any but OK fails it)."""
        span = self.span
        if span.is_recording():
            span.set_attributes(attributes)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(StatusCode.ERROR, message)
                span.set_attribute("error.type", code.name)
        span.end()


def start(name: str, metadata: Sequence[tuple[str, str | bytes]], model: str) -> RequestTrace:
    """Starts the trace of one RPC `name` of a `model`; `end` ends it."""
    span = _tracer.start_span(
        name,
        context=_incoming_context(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": name},
    )
    return RequestTrace(span, model)
