"""The Generate servicer: decode, admit (`intake.py`), hand to the
dispatcher, encode. No routing here.

Every Generate RPC runs inside `_Rpc.observed`, which starts the request's
trace, ends it with the RPC's status, counts the RPC in the metrics and logs
its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from opentelemetry.util.types import AttributeValue

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from router import intake, responses, tracing
from router.dispatcher import Dispatcher, Job
from router.engine_types import EngineDelta
from router.errors import RequestError
from router.ledger import Outcome
from router.progress import Progress
from router.rpc import abort, metadata
from router.tracing import RequestTrace

if TYPE_CHECKING:
    from router.rpc import Context

log = logging.getLogger("dprouter.requests")
# In the headers and the trailers: the trailers reach the client even when
# the request fails before any header is sent.
TRACE_ID_METADATA_KEY = "x-trace-id"
# A cancel this close to the deadline counts as the deadline passing.
DEADLINE_SLACK_S = 0.1


def _check_headers(headers: Sequence[tuple[str, str]]) -> None:
    """gRPC fails a call whose headers hold anything but printable ASCII
    with INTERNAL on its own, after the handler has moved on, and then
    cancels the handler as a client's cancel would: the router would record
    CANCELLED. Refused here, it is a bug that the handler reports itself."""
    for key, value in headers:
        if not (value.isascii() and value.isprintable()):
            raise ValueError(f"the {key} header is not printable ASCII: {value!r}")


def _check_deadline(progress: Progress) -> None:
    """gRPC cancels a handler at its deadline, but a streaming handler was seen
    to miss that for seconds on a busy machine; checking each delta makes the
    deadline certain (leaving the loop aborts the engine request)."""
    remaining = progress.seconds_left()
    if remaining is not None and remaining <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


@dataclass
class _Outcome:
    """What the log line and the span say about a finished RPC."""

    progress: Progress  # the request's record
    job: Job | None = None
    deltas: AsyncGenerator[EngineDelta, None] | None = None  # the job's stream, once it runs
    fields: dict[str, object] = field(default_factory=dict)
    headers: asyncio.Future[None] | None = None  # the response headers, while they are sent

    async def headers_sent(self) -> None:
        """Returns once the response headers are out: every later message,
        and the status, must follow them."""
        if (headers := self.headers) is not None:
            self.headers = None
            await headers


def _span_attributes(outcome: _Outcome) -> dict[str, AttributeValue]:
    """What the server span says of the RPC's end: the usage, the finish
    reasons and, once routed, where the request went and why."""
    progress = outcome.progress
    attributes: dict[str, AttributeValue] = {
        "gen_ai.usage.input_tokens": progress.prompt_tokens,
        "gen_ai.usage.output_tokens": progress.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": progress.cached_tokens,
        "gen_ai.response.finish_reasons": progress.finish_reasons,
    }
    if (job := outcome.job) is not None:
        attributes.update(
            {
                "gen_ai.request.id": job.request_id,
                "vllm.data_parallel_rank": job.rank,
                "dprouter.route.policy": job.route_policy,
                "dprouter.route.reason": job.route_reason,
            }
        )
    return attributes


class _Rpc:
    """Trace, metrics, log line and status mapping shared by the Generate RPCs."""

    def __init__(
        self, dispatcher: Dispatcher, model: str, method: str, field_prefix: str = ""
    ) -> None:
        self.dispatcher = dispatcher
        self.model = model  # as the traces name it
        self.method = method
        self.field_prefix = field_prefix  # where the GenerateRequest sits in the RPC's request

    @asynccontextmanager
    async def observed(
        self, context: Context, client_request_id: str
    ) -> AsyncIterator[tuple[RequestTrace, _Outcome]]:
        outcome = _Outcome(Progress.starting(context.time_remaining()))
        code, message = grpc.StatusCode.OK, ""
        trace = tracing.start(self.method, metadata(context), self.model)
        if trace.trace_id is not None:
            context.set_trailing_metadata(((TRACE_ID_METADATA_KEY, trace.trace_id),))
        failure: BaseException | None = None
        try:
            yield trace, outcome
        except RequestError as e:
            code, message = e.code, self.message(e)
            outcome.fields["error"] = message
            raise
        except Exception as e:
            # A bug: the handler ends the call with INTERNAL itself (gRPC
            # would say UNKNOWN), so that the client sees the status recorded.
            failure = e
            code, message = grpc.StatusCode.INTERNAL, "internal error"
            outcome.fields["error"] = f"{type(e).__name__}: {e}"
            raise RequestError(code, message) from e
        except BaseException as e:  # cancelled, deadline, client gone
            # The client's own timer often cancels a moment before ours fires.
            remaining = outcome.progress.seconds_left()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining < DEADLINE_SLACK_S
                else grpc.StatusCode.CANCELLED
            )
            message = code.name
            outcome.fields["error"] = type(e).__name__
            raise
        finally:
            if outcome.deltas is not None:
                # Ends the job now, not when the stream is collected: its
                # release and its attempt's span come before the RPC's end.
                await outcome.deltas.aclose()
            with contextlib.suppress(Exception, asyncio.CancelledError):  # a gone client
                await outcome.headers_sent()
            self._record(context, trace, outcome, client_request_id, (code, message))
            log.log(
                logging.ERROR if failure else logging.INFO,
                "request finished",
                exc_info=failure,
                extra=self._log_fields(outcome, client_request_id, code),
            )

    def _record(
        self,
        context: Context,
        trace: RequestTrace,
        outcome: _Outcome,
        client_request_id: str,
        status: tuple[grpc.StatusCode, str],
    ) -> None:
        """The finished RPC's route trailers, span and count."""
        job = outcome.job
        if job is not None:  # the rank that served it: a retry moves it after the headers
            context.set_trailing_metadata(
                (*(context.trailing_metadata() or ()), *responses.route_metadata(job))
            )
        attributes = _span_attributes(outcome)
        if job is None and client_request_id:  # refused before it was routed
            attributes["gen_ai.request.id"] = client_request_id
        code, message = status
        trace.end(code, message, attributes)
        self.dispatcher.metrics.finished(self.method, code.name)

    def _log_fields(
        self, outcome: _Outcome, client_request_id: str, code: grpc.StatusCode
    ) -> dict[str, object]:
        """What the "request finished" log line says."""
        job, progress = outcome.job, outcome.progress
        return {
            "method": self.method,
            "request_id": job.request_id if job else client_request_id or None,
            "rank": job.rank if job else None,
            "route": f"{job.route_policy}/{job.route_reason}" if job else None,
            "status": code.name,
            "prompt_tokens": progress.prompt_tokens,
            "completion_tokens": progress.completion_tokens,
            "ms": round((time.monotonic() - progress.arrived) * 1000, 2),
            **outcome.fields,
        }

    def message(self, error: RequestError) -> str:
        return error.message(self.field_prefix)

    async def start(
        self,
        request: generate_pb2.GenerateRequest,
        context: Context,
        trace: RequestTrace,
        outcome: _Outcome,
    ) -> tuple[Job, AsyncGenerator[EngineDelta, None]]:
        """Checks and routes the request, starts sending the response headers
        and returns the engine's stream. The headers go out while the engine
        starts on the request (awaiting them first added a round trip through
        gRPC's completion queue to the time to first token); the caller
        awaits `outcome.headers_sent()` before its first response."""
        fleet = self.dispatcher.fleet()
        with fleet.turns():  # a refused client is told its own time to come back
            with trace.stage("validate"):
                admitted = await intake.admit(request, metadata(context), fleet)
            job = self.dispatcher.prepare(admitted, trace, outcome.progress)
        outcome.job = job
        headers = [*responses.route_metadata(job), ("x-request-id", job.request_id)]
        if (trace_id := trace.trace_id) is not None:
            headers.append((TRACE_ID_METADATA_KEY, trace_id))
        try:
            _check_headers(headers)
        except ValueError:
            self.dispatcher.release(job, Outcome.FAILED)  # it will not run
            raise
        outcome.headers = asyncio.ensure_future(context.send_initial_metadata(headers))
        outcome.deltas = self.dispatcher.run(job)
        return job, outcome.deltas


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, dispatcher: Dispatcher, model: str) -> None:
        self._generate = _Rpc(dispatcher, model, "dprouter.v1.GenerateService/Generate")
        self._complete = _Rpc(dispatcher, model, "dprouter.v1.GenerateService/Complete", "request.")

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            async with self._generate.observed(context, request.request_id) as (trace, outcome):
                job, deltas = await self._generate.start(request, context, trace, outcome)
                first = True
                async for delta in deltas:
                    _check_deadline(outcome.progress)
                    response = responses.generate_response(delta)
                    if first:
                        await outcome.headers_sent()
                        response.data_parallel_rank = job.rank
                        response.request_id = job.request_id
                        first = False
                    if delta.finished:
                        response.usage.CopyFrom(responses.usage(outcome.progress))
                    yield response
        except RequestError as e:
            await abort(context, e, self._generate.message(e))

    async def Complete(
        self, request: generate_pb2.CompleteRequest, context: Context
    ) -> generate_pb2.CompleteResponse:
        try:
            async with self._complete.observed(context, request.request.request_id) as (
                trace,
                outcome,
            ):
                job, deltas = await self._complete.start(request.request, context, trace, outcome)
                choices: dict[int, generate_pb2.Choice] = {}
                async for delta in deltas:
                    _check_deadline(outcome.progress)
                    responses.add_to_choice(choices, delta)
                await outcome.headers_sent()
                return responses.complete_response(choices, job, outcome.progress)
        except RequestError as e:
            await abort(context, e, self._complete.message(e))
            raise AssertionError("unreachable: abort raises") from e
