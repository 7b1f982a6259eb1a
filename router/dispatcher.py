"""Admits requests, picks their rank and runs them on the rank pool.

The servicers hand every request here after decoding it; this is where a
request becomes a `Job` (checked, tokenized, routed, counted in the ledger)
and where a job's life in the ledger ends, whatever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2

from dprouter.v1 import generate_pb2
from router import admission, validation
from router.engine_types import EngineDelta, EngineRequest, Sampling
from router.errors import RequestError, failed_precondition, invalid_argument, unavailable
from router.ledger import Entry, Ledger, Outcome, RankLoad, RankState
from router.metrics import Metrics
from router.pace import Pace
from router.policies import Candidate, Decision, Policy, RouteInput, load_score
from router.ranks import RankNotJoined, RankPool
from router.tracing import Attempt, RequestTrace
from router.vllm_compat import (
    EngineClientError,
    EngineDeadError,
    engine_sampling_params,
)


@dataclass
class Job:
    """A request ready for the engine. A retry on another rank (its first rank
    failed before it produced anything) changes the rank, route and engine id."""

    request_id: str
    engine_request_id: str
    prompt_token_ids: list[int]
    session_key: str
    pinned: bool
    params: object  # the engine's sampling parameters (`EngineRequest.params`)
    priority: int
    rank: int
    route_policy: str  # the policy that chose the rank, or "pin"
    route_reason: str
    sampling: Sampling
    arrived: float  # when the router began with it (monotonic)
    trace: RequestTrace


@dataclass(frozen=True)
class _Admitted:
    """A request that passed every check, tokenized."""

    checked: validation.CheckedRequest
    prompt_token_ids: list[int]
    sampling: Sampling
    params: object  # the engine's sampling parameters (`EngineRequest.params`)


log = logging.getLogger("dprouter")
PIN_POLICY = "pin"
RETRY_REASON = "retry_after_rank_failure"
# The policy's rank could not serve the request before its deadline; this one can.
DEADLINE_REASON = "deadline"
# How long a rank's estimated backlog serves admission before it is worked
# out again: a burst of refusals shares one.
BACKLOG_TTL_S = 0.1
# Prompts longer than this are tokenized off the event loop (in the order
# they come), which meanwhile serves everyone else.
INLINE_TOKENIZE_CHARS = 4096


def _budget(sampling: Sampling) -> int:
    """The output tokens a request may produce."""
    return sampling.max_tokens * sampling.n


def _prompt_chars(prompt: validation.Prompt) -> int:
    if prompt.text is not None:
        return len(prompt.text)
    return sum(len(m["content"]) for m in prompt.messages or ())


@dataclass
class _Streaming:
    """A job inside the engine and the task streaming it."""

    job: Job
    task: asyncio.Task[Any]
    in_engine: bool = False  # awaiting the engine's next output, not sending
    # Why the router ends it: RankFailed (its rank was found dead or hung),
    # or a RequestError (the router's grace period is over).
    ended: Exception | None = None


class RankFailed(Exception):
    """The job's rank was found dead or hung while the job ran there."""


@dataclass
class _Attempt:
    """One run of a job on one rank: its engine stream, span and books."""

    request: EngineRequest
    streaming: _Streaming
    entry: Entry | None  # the ledger's, where it counts the outputs
    span: Attempt
    deltas: AsyncIterator[EngineDelta]

    async def next_delta(self) -> EngineDelta | None:
        """The engine's next output; None at the end."""
        self.streaming.in_engine = True
        try:
            return await self.deltas.__anext__()
        except StopAsyncIteration:
            return None
        finally:
            self.streaming.in_engine = False


def _client_error(error: Exception, rank: int, delivered: int) -> RequestError:
    """What the client is told of a job that failed."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, EngineDeadError | RankNotJoined | RankFailed):
        return RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"rank {rank} failed after {delivered} tokens were delivered",
            details=[
                error_details_pb2.ErrorInfo(
                    reason="RANK_FAILED",
                    domain="dprouter",
                    metadata={"rank": str(rank), "delivered_tokens": str(delivered)},
                )
            ],
        )
    if isinstance(error, EngineClientError | ValueError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"rejected by the engine: {error}")
    return RequestError(
        grpc.StatusCode.INTERNAL, f"engine failure: {type(error).__name__}: {error}"
    )


def _engine_id(request_id: str) -> str:
    """Engine ids must be unique among running requests; client ids need not be."""
    return f"{request_id}.{uuid.uuid4().hex[:8]}"


class Dispatcher:
    def __init__(
        self,
        metrics: Metrics,
        allowed: validation.RequestLimits = validation.NO_LIMITS,
        max_queue_per_rank: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.allowed = allowed  # the router's own per-request limits
        # None: as many as a rank's engine runs at once.
        self._max_queue_per_rank = max_queue_per_rank
        self._max_in_flight = max_in_flight
        self.queue_limits = admission.QueueLimits(1, 0)  # set when the ranks join
        self.pool: RankPool | None = None
        self.policy: Policy | None = None
        self.ledger = Ledger(0, 1)
        # Per rank: (when, the ledger's version of it, its pace, its in-flight
        # requests' expected ends).
        self._backlogs: dict[int, tuple[float, int, Pace, list[float] | None]] = {}
        self._returns = admission.Returns()  # when refused clients were told to retry
        self.accepting = True
        self._in_flight = 0  # routed and not yet released
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborts: set[asyncio.Future[None]] = set()
        self._streaming: dict[str, _Streaming] = {}  # by engine id
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def attach(self, pool: RankPool, policy: Policy, ledger: Ledger) -> None:
        """The ranks (some, at least) have joined: route with `policy`."""
        self.ledger = ledger
        self.policy = policy
        self.pool = pool
        queue = self._max_queue_per_rank
        self.queue_limits = admission.QueueLimits(
            pool.capacity, pool.capacity if queue is None else queue, self._max_in_flight
        )

    def prompt_bytes_bound(self) -> int | None:
        """The most bytes of prompt text the ranks' context could hold (None
        before they join)."""
        if self.pool is None:
            return None
        return validation.max_prompt_bytes(self.pool.limits, self.allowed)

    def loads(self) -> list[RankLoad]:
        return self.ledger.loads(self.pool.engine_loads() if self.pool is not None else None)

    def _pool(self) -> RankPool:
        if not self.accepting:
            raise unavailable("the router is shutting down")
        if self.pool is None:
            raise unavailable("the ranks have not joined the router yet")
        return self.pool

    async def _admit(
        self,
        request: generate_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> _Admitted:
        pool = self._pool()
        checked = validation.check_request(request, metadata, pool.limits, self.allowed)
        # Refused at once when nothing has room: before the tokenizer's work.
        loads = admission.mark_full(self.loads(), self.queue_limits)
        self._check_room(loads, checked.rank_pin, full_only=True)
        ids = await self._tokenize(checked.prompt, pool)
        if not ids:
            raise invalid_argument(checked.prompt.field, "tokenizes to no tokens")
        sampling = validation.engine_sampling(
            checked.sampling, checked.prompt.field, len(ids), pool.limits, self.allowed
        )
        try:
            params = engine_sampling_params(sampling)
        except EngineClientError as e:  # a rule of vLLM's that ours do not repeat
            parameter = getattr(e, "parameter", None)
            raise invalid_argument(
                f"sampling.{parameter}" if parameter else "sampling", str(e)
            ) from None
        return _Admitted(checked, ids, sampling, params)

    async def _tokenize(self, prompt: validation.Prompt, pool: RankPool) -> list[int]:
        if prompt.token_ids is not None or _prompt_chars(prompt) <= INLINE_TOKENIZE_CHARS:
            return validation.tokenize(prompt, pool.encode, pool.render_chat)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizer_thread, validation.tokenize, prompt, pool.encode, pool.render_chat
        )

    def _backlog(self, rank: int) -> tuple[Pace, list[float] | None]:
        """The rank's pace and its requests' expected ends (`admission.
        completion_times`), worked out again when a request came or went, or
        after BACKLOG_TTL_S: a burst of refusals shares one."""
        now = time.monotonic()
        version = self.ledger.version(rank)
        cached = self._backlogs.get(rank)
        if cached is None or cached[1] != version or now - cached[0] >= BACKLOG_TTL_S:
            steps = self.pool.step_times(rank) if self.pool is not None else ()
            backlog = self.ledger.backlog(rank, steps)
            ends = admission.completion_times(backlog, self.queue_limits.capacity)
            cached = self._backlogs[rank] = (now, version, backlog.pace, ends)
        at, _, pace, ends = cached
        if ends is not None and now > at:
            ends = [max(end - (now - at), 0.0) for end in ends]
        return pace, ends

    def _ends(self, rank: int) -> list[float] | None:
        return self._backlog(rank)[1]

    def _check_room(
        self, loads: Sequence[RankLoad], pin: validation.Pin | None, full_only: bool = False
    ) -> None:
        """Refuses the request when the router, or its pinned rank, or every
        serving rank, is full; unless `full_only`, also when its pinned rank
        does not serve or no rank does."""
        limits = self.queue_limits
        admission.check_router_bound(loads, limits, self._ends)
        if pin is not None:
            state = loads[pin.rank].state
            if state is RankState.SERVING:
                admission.check_rank_room(loads[pin.rank], limits, self._ends)
            elif full_only:
                pass
            elif state is RankState.DRAINING:
                raise failed_precondition(pin.field, f"rank {pin.rank} is draining")
            else:
                raise unavailable(f"rank {pin.rank} is unhealthy")
            return
        serving = [load for load in loads if load.state is RankState.SERVING]
        if not serving and not full_only:
            raise unavailable("no rank is serving")
        if serving and all(load.full for load in serving):
            raise admission.all_full(loads, limits, self._ends)

    def _route(self, admitted: _Admitted, deadline_s: float | None) -> Decision:
        """The policy's decision, or the pin's; nothing is committed yet.
        Refuses the request when no rank has room for it, or it cannot be
        served before its deadline."""
        self._pool()
        limits = self.queue_limits
        loads = admission.mark_full(self.loads(), limits)
        pin = admitted.checked.rank_pin
        self._check_room(loads, pin)
        if pin is None:
            assert self.policy is not None  # attached with the pool
            route = RouteInput(admitted.prompt_token_ids, admitted.checked.session_key)
            decision = self.policy.decide(route, loads)
            if decision.rank is None:  # every rank with room is draining
                raise admission.all_full(loads, limits, self._ends)
            rank = decision.rank
        else:
            candidates = [Candidate(load.rank, load_score(load)) for load in loads]
            decision = Decision(pin.rank, PIN_POLICY, pin.field, candidates)
            rank = pin.rank
        if deadline_s is not None:
            ask = admission.Ask(len(admitted.prompt_token_ids), _budget(admitted.sampling))
            refused = self._deadline_refusal(loads[rank], ask, deadline_s)
            if refused is not None:
                if pin is not None or refused.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise refused
                decision = self._in_time_elsewhere(loads, decision, ask, deadline_s, refused)
        return decision

    def _deadline_refusal(
        self, load: RankLoad, ask: admission.Ask, deadline_s: float
    ) -> RequestError | None:
        pace, ends = self._backlog(load.rank)
        return admission.deadline_refusal(load, self.queue_limits, pace, ends, ask, deadline_s)

    def _in_time_elsewhere(
        self,
        loads: Sequence[RankLoad],
        decision: Decision,
        ask: admission.Ask,
        deadline_s: float,
        refused: RequestError,
    ) -> Decision:
        """Another rank that can serve the request before its deadline, when
        the policy's choice would queue it too long; else the refusal of the
        rank that could take it soonest."""
        refusals = [refused]
        others = sorted(
            (ld for ld in loads if ld.state is RankState.SERVING and not ld.full
             and ld.rank != decision.rank),
            key=load_score,
        )  # fmt: skip
        for load in others:
            other = self._deadline_refusal(load, ask, deadline_s)
            if other is None:
                return Decision(load.rank, decision.policy, DEADLINE_REASON, decision.candidates)
            refusals.append(other)
        raise min(refusals, key=admission.retry_delay_of)

    async def explain(
        self,
        request: generate_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> tuple[Decision, int]:
        """Where the request would go now, and its prompt's length; a dry run."""
        admitted = await self._admit(request, metadata)
        return self._route(admitted, None), len(admitted.prompt_token_ids)

    async def prepare(
        self,
        request: generate_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str | bytes]],
        trace: RequestTrace,
        deadline_s: float | None = None,
    ) -> Job:
        """Checks, routes and counts the request on its rank, each step in a
        span of the request's trace. The caller must `run` the job or
        `release` it. `deadline_s`: the seconds left to the request's
        deadline, if it has one."""
        try:
            return await self._prepare(request, metadata, trace, deadline_s)
        except admission.Refusal as refusal:
            raise self._in_turn(refusal) from None

    def _in_turn(self, refusal: admission.Refusal) -> admission.Refusal:
        """The refusal, with its client's own turn to come back (`admission.Returns`)."""
        serving = [load.rank for load in self.loads() if load.state is RankState.SERVING]
        interval = admission.slot_interval([self._ends(rank) for rank in serving])
        return refusal.later(self._returns.assign(time.monotonic(), refusal.delay_s, interval))

    async def _prepare(
        self,
        request: generate_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str | bytes]],
        trace: RequestTrace,
        deadline_s: float | None,
    ) -> Job:
        arrived = time.monotonic()
        with trace.stage("validate"):
            admitted = await self._admit(request, metadata)
        checked = admitted.checked
        trace.request(
            admitted.sampling,
            len(admitted.prompt_token_ids),
            chat=checked.prompt.messages is not None,
            session=checked.session_key,
        )
        with trace.stage("route") as span:
            decision = self._route(admitted, deadline_s)
            assert decision.rank is not None
            self._commit(decision)
            job = Job(
                request_id=checked.request_id,
                engine_request_id=_engine_id(checked.request_id),
                prompt_token_ids=admitted.prompt_token_ids,
                session_key=checked.session_key,
                pinned=checked.rank_pin is not None,
                params=admitted.params,
                priority=checked.priority,
                rank=decision.rank,
                route_policy=decision.policy,
                route_reason=decision.reason,
                sampling=admitted.sampling,
                arrived=arrived,
                trace=trace,
            )
            self._reserve(job)
            if span.is_recording():  # the rank's load with this request admitted
                trace.routed(span, decision, self.ledger.loads(None)[job.rank])
        return job

    def _commit(self, decision: Decision) -> None:
        """The request goes where `decision` says."""
        decision.commit()
        self.metrics.routed(decision.policy, decision.reason)

    def _reserve(self, job: Job) -> None:
        self.ledger.reserve(
            job.engine_request_id, job.rank, len(job.prompt_token_ids), _budget(job.sampling)
        )
        self._in_flight += 1
        self._idle.clear()

    def release(self, job: Job, outcome: Outcome) -> None:
        """The job left its rank (idempotent)."""
        if self.ledger.release(job.engine_request_id, outcome):
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def set_drained(self, rank: int, drained: bool) -> RankLoad:
        """Drains or resumes one rank; its load after the change."""
        ranks = self._pool().limits.data_parallel_size
        if not 0 <= rank < ranks:
            raise invalid_argument("rank", f"rank {rank} is outside [0, {ranks})")
        self.ledger.set_drained(rank, drained)
        return self.loads()[rank]

    async def run(self, job: Job, deadline_s: float | None) -> AsyncGenerator[EngineDelta, None]:
        """The job's deltas; engine failures become RequestErrors. A job whose
        rank fails before it produced anything is retried on another rank; each
        attempt is a span of the job's trace, parent of the engine's own. At
        the deadline the engine request is aborted by a timer, not by the
        consumer: a handler blocked sending to a vanished client was seen to
        miss gRPC's own cancellation for the whole generation."""
        pool = self.pool
        assert pool is not None
        expiry = None
        if deadline_s is not None:
            loop = asyncio.get_running_loop()
            expiry = loop.call_later(max(deadline_s, 0.0), self._abort_in_background, job)
        outcome = Outcome.CANCELLED
        delivered = 0  # tokens handed to the client
        task = asyncio.current_task()
        assert task is not None
        timer = self.metrics.stream(job.arrived)
        try:
            while True:
                attempt = self._attempt(job, pool, task)
                try:
                    while (delta := await attempt.next_delta()) is not None:
                        if attempt.entry is not None:
                            self.ledger.output(attempt.entry, len(delta.token_ids))
                        attempt.span.output(delta)
                        timer.output(job.rank, delta)
                        if delta.finished:
                            outcome = Outcome.SERVED
                        delivered += len(delta.token_ids)
                        yield delta
                        if (ended := attempt.streaming.ended) is not None:
                            raise ended  # found out while the client was sent this
                    break
                except asyncio.CancelledError as e:
                    ended = attempt.streaming.ended
                    if ended is None:
                        attempt.span.fail(e)
                        raise  # the client's cancel
                    task.uncancel()
                    attempt.span.fail(ended)
                    if isinstance(ended, RequestError) or delivered or job.pinned:
                        raise ended from None
                    self._retry_elsewhere(job)
                except (EngineDeadError, RankNotJoined) as e:
                    attempt.span.fail(e)
                    if delivered or job.pinned:
                        raise
                    self._retry_elsewhere(job)
                except BaseException as e:
                    attempt.span.fail(e)
                    raise
                finally:
                    self._streaming.pop(attempt.request.request_id, None)
                    attempt.span.end()
        except Exception as e:
            outcome = Outcome.FAILED
            if (error := _client_error(e, job.rank, delivered)) is e:
                raise
            raise error from e
        finally:
            if expiry is not None:
                expiry.cancel()
            self.release(job, outcome)
            if outcome is Outcome.CANCELLED:
                # vLLM aborts a cancelled generate() itself; this also covers a
                # consumer that stops iterating without cancelling.
                await pool.abort(job.engine_request_id, job.rank)

    def _attempt(self, job: Job, pool: RankPool, task: asyncio.Task[Any]) -> _Attempt:
        """Starts the job on its rank as it stands now."""
        engine_id = job.engine_request_id
        streaming = self._streaming[engine_id] = _Streaming(job, task)
        span = job.trace.attempt(job.rank, engine_id, job.sampling, len(job.prompt_token_ids))
        request = EngineRequest(
            engine_id, job.prompt_token_ids, job.params, job.priority, span.headers
        )
        deltas = pool.generate(request, job.rank).__aiter__()
        return _Attempt(request, streaming, self.ledger.entry(engine_id), span, deltas)

    async def fail_rank(self, rank: int) -> int:
        """Ends the jobs on a rank found dead or hung; how many. vLLM is told
        first (its requests end with EngineDeadError); a job still waiting on
        the engine elsewhere (vLLM awaits it before registering a request) is
        interrupted."""
        assert self.pool is not None
        on_rank = [st for st in self._streaming.values() if st.job.rank == rank]
        with contextlib.suppress(RankNotJoined):
            await self.pool.fail(rank, [st.job.engine_request_id for st in on_rank])
        self._end(on_rank, lambda: RankFailed(f"rank {rank} failed"))
        return len(on_rank)

    def end_all(self) -> int:
        """Ends every running job with UNAVAILABLE (the grace period of a
        shutdown is over); how many. Their clients get a status that says so,
        and the logs, metrics and traces agree with it."""
        streams = list(self._streaming.values())
        self._end(
            streams, lambda: unavailable("the router is shutting down: its grace period is over")
        )
        return len(streams)

    @staticmethod
    def _end(streams: Sequence[_Streaming], error: Callable[[], Exception]) -> None:
        """Ends these jobs' streams with `error()`, at their next output, or at
        once where they wait on the engine."""
        for streaming in streams:
            streaming.ended = error()
            # Interrupt only a wait on the engine: cancelled anywhere else (a
            # send to the client), the handler would end without a status.
            if streaming.in_engine:
                streaming.task.cancel("ended by the router")

    def _retry_elsewhere(self, job: Job) -> None:
        """Moves a job that has produced nothing off its failed rank; raises
        UNAVAILABLE when no rank serves."""
        self.release(job, Outcome.FAILED)
        assert self.policy is not None
        route = RouteInput(job.prompt_token_ids, job.session_key)
        decision = self.policy.decide(route, admission.mark_full(self.loads(), self.queue_limits))
        if decision.rank is None:
            raise unavailable(f"rank {job.rank} failed and no other rank has room")
        self._commit(decision)
        log.info(
            "retrying on another rank",
            extra={"request_id": job.request_id, "failed_rank": job.rank, "rank": decision.rank},
        )
        job.engine_request_id = _engine_id(job.request_id)
        job.rank, job.route_policy, job.route_reason = decision.rank, decision.policy, RETRY_REASON
        self._reserve(job)

    def _abort_in_background(self, job: Job) -> None:
        """At the deadline: ends the job in its engine and counts it cancelled
        at once, even while its consumer is stuck (a send to a gone client).
        A consumer waiting on the engine is interrupted too, as gRPC's own
        cancel would: an abort sent before vLLM has registered the request
        (its `add_request` awaits; seconds on a busy host) finds nothing, and
        the request would run to its end."""
        assert self.pool is not None
        self.release(job, Outcome.CANCELLED)
        streaming = self._streaming.get(job.engine_request_id)
        if streaming is not None and streaming.in_engine:
            streaming.task.cancel("deadline exceeded")
        task = asyncio.ensure_future(self.pool.abort(job.engine_request_id, job.rank))
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)

    async def drain(self, grace_period: float) -> bool:
        """Refuses new requests and waits for the routed ones; True if all finished."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), grace_period)
        except TimeoutError:
            return False
        return True
