"""One OpenTelemetry trace per request, exported over OTLP when the standard
`OTEL_*` variables ask for it (`otlp.py`). When tracing is off the API's
no-op tracer hands out non-recording spans, and everything here that builds
attributes checks `is_recording()` first, so a request pays for a few no-op
calls only.

The tree of one request (attributes follow the OpenTelemetry GenAI and RPC
semantic conventions where they have a name; `dprouter.*` where they do not):

    dprouter.v1.GenerateService/Generate   SERVER, continues the client's traceparent
      validate                             checks, tokenization
      route                                the policy's decision and the admission on a rank
      text_completion <model>              CLIENT, one per attempt on a rank
        llm_request                        vLLM's own span (finished requests only)

vLLM emits `llm_request` from the process that holds its engine client (the
router) through the global tracer provider.
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
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from router.engine_types import Sampling
from router.errors import RequestError
from router.ledger import Outcome, RankLoad
from router.policies import Decision
from router.progress import Progress

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("dprouter")
# vLLM's name among GenAI providers (semantic conventions: any lowercase name).
PROVIDER = "vllm"


# A traceparent with the sampled flag off: under the default parent-based
# sampler nothing is recorded for a request that carries it. The watchdog's
# probes (one a second per rank) carry it; vLLM would trace each as a new root.
UNSAMPLED_HEADERS: Mapping[str, str] = {
    "traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
}


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
    inference span); vLLM's `llm_request` span is its child. It reads the
    request's record (`progress.Progress`) when it ends: a job moves to
    another rank only before its first token, so the tokens since the
    attempt began are its own."""

    def __init__(self, span: Span, tokens_before: int) -> None:
        self.span = span
        self._tokens_before = tokens_before

    @property
    def headers(self) -> Mapping[str, str] | None:
        """`traceparent` for the engine, so vLLM's own span joins this trace."""
        if not self.span.get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def fail(self, error: BaseException) -> None:
        if self.span.is_recording():
            _error(self.span, error)

    def end(self, progress: Progress) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute(
                "gen_ai.usage.output_tokens", progress.completion_tokens - self._tokens_before
            )
            if (ttft := progress.time_to_first_token) is not None and not self._tokens_before:
                when = _epoch_ns(progress.arrived + ttft)
                span.add_event(
                    "first_token", {"gen_ai.response.time_to_first_chunk": ttft}, timestamp=when
                )
                span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
            if progress.outcome is Outcome.SERVED:
                span.set_attributes(
                    {
                        "gen_ai.response.finish_reasons": progress.finish_reasons,
                        "gen_ai.usage.cache_read.input_tokens": progress.cached_tokens,
                    }
                )
        span.end()


def _epoch_ns(monotonic: float) -> int:
    """A `time.monotonic()` reading as the wall clock's nanoseconds, as spans take them."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class RequestTrace:
    """The spans of one RPC: a SERVER span continuing the caller's W3C
    `traceparent`, and its children.

    The server span is not made the current span: a streaming handler is an
    async generator that gRPC may close from another context, where detaching
    would fail. Children name their parent explicitly instead."""

    def __init__(self, span: Span, model: str) -> None:
        self.span = span
        self.model = model
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
        self, rank: int, engine_request_id: str, sampling: Sampling, progress: Progress
    ) -> Attempt:
        """Starts the span of one run on `rank`; the caller must `end` it."""
        span = self._child(f"text_completion {self.model}", SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(self._request_attributes(sampling, False, ""))
            span.set_attributes(
                {
                    "gen_ai.response.id": engine_request_id,
                    "gen_ai.usage.input_tokens": progress.prompt_tokens,
                    "vllm.data_parallel_rank": rank,
                }
            )
        return Attempt(span, progress.completion_tokens)

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
