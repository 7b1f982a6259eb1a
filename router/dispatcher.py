"""Runs admitted requests on the ranks: routes each (`fleet.py`), counts it
in the ledger, streams its engine outputs, moves it to another rank when
its rank fails before it produced anything, enforces its deadline, and ends
its life in the ledger whatever ends it. The servicers hand it requests
that passed the front door (`intake.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router.attempt import RankAttempt, RankFailed, client_error
from router.engine_types import EngineDelta, EngineRequest
from router.errors import unavailable
from router.fleet import Fleet
from router.intake import Admitted
from router.ledger import Outcome, RankLoad
from router.metrics import Metrics
from router.policies import Decision
from router.progress import Progress
from router.ranks import RankNotJoined
from router.tracing import RequestTrace

log = logging.getLogger("dprouter")
RETRY_REASON = "retry_after_rank_failure"


@dataclass
class Job:
    """An admitted request routed to a rank. A retry on another rank (its
    first rank failed before it produced anything) changes the rank, route
    and engine id."""

    request: Admitted
    fleet: Fleet  # the ranks it runs on
    trace: RequestTrace
    progress: Progress  # its record: tokens, timings, outcome, deadline
    rank: int
    route_policy: str  # the policy that chose the rank, or "pin"
    route_reason: str
    engine_request_id: str

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids


def _engine_id(request_id: str) -> str:
    """Engine ids must be unique among running requests; client ids need not be."""
    return f"{request_id}.{uuid.uuid4().hex[:8]}"


class Dispatcher:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._fleet: Fleet | None = None  # once the first rank has joined
        self.accepting = True
        self._in_flight = 0  # routed and not yet released
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborts: set[asyncio.Future[None]] = set()
        self._attempts: dict[str, RankAttempt] = {}  # by engine id

    def attach(self, fleet: Fleet) -> None:
        """The ranks (some, at least) have joined: serve with them."""
        self._fleet = fleet

    def fleet(self) -> Fleet:
        """The ranks, for a new request; UNAVAILABLE while there are none to take it."""
        if not self.accepting:
            raise unavailable("the router is shutting down")
        if self._fleet is None:
            raise unavailable("the ranks have not joined the router yet")
        return self._fleet

    def loads(self) -> list[RankLoad]:
        """Each rank's load; none before the ranks join."""
        return self._fleet.loads() if self._fleet is not None else []

    def prompt_bytes_bound(self) -> int | None:
        """The most bytes of prompt text the ranks' context could hold (None
        before they join)."""
        return self._fleet.prompt_bytes_bound() if self._fleet is not None else None

    def prepare(self, admitted: Admitted, trace: RequestTrace, progress: Progress) -> Job:
        """Routes the request and counts it on its rank, in a span of the
        request's trace. The caller must `run` the job or `release` it."""
        fleet = self.fleet()
        progress.prompt_tokens = len(admitted.prompt_token_ids)
        trace.request(
            admitted.sampling,
            len(admitted.prompt_token_ids),
            chat=admitted.chat,
            session=admitted.session_key,
        )
        with trace.stage("route") as span:
            deadline_s = progress.seconds_left()
            rank, decision = fleet.route(admitted.route, admitted.pin, admitted.ask, deadline_s)
            self._commit(decision)
            job = Job(
                admitted, fleet, trace, progress, rank, decision.policy, decision.reason,
                _engine_id(admitted.request_id),
            )  # fmt: skip
            self._reserve(job)
            if span.is_recording():  # the rank's load with this request admitted
                trace.routed(span, decision, fleet.ledger.loads(None)[rank])
        return job

    def _commit(self, decision: Decision) -> None:
        """The request goes where `decision` says."""
        decision.commit()
        self.metrics.routed(decision.policy, decision.reason)

    def _reserve(self, job: Job) -> None:
        ask = job.request.ask
        job.fleet.ledger.reserve(job.engine_request_id, job.rank, ask.prompt_tokens, ask.budget)
        self._in_flight += 1
        self._idle.clear()

    def release(self, job: Job, outcome: Outcome) -> None:
        """The job left its rank (idempotent)."""
        if job.fleet.ledger.release(job.engine_request_id, outcome):
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def run(self, job: Job) -> AsyncGenerator[EngineDelta, None]:
        """The job's deltas; engine failures become RequestErrors. A job whose
        rank fails before it produced anything is retried on another rank; each
        attempt is a span of the job's trace, parent of the engine's own. At
        the deadline the engine request is aborted by a timer, not by the
        consumer: a handler blocked sending to a vanished client was seen to
        miss gRPC's own cancellation for the whole generation."""
        expiry = None
        progress = job.progress
        if (deadline_s := progress.seconds_left()) is not None:
            loop = asyncio.get_running_loop()
            expiry = loop.call_later(max(deadline_s, 0.0), self._abort_in_background, job)
        try:
            while True:
                attempt = self._attempt(job)
                try:
                    while (delta := await attempt.next_delta()) is not None:
                        self._output(job, attempt, delta)
                        yield delta
                        attempt.check_ended()
                    break
                except BaseException as e:
                    delivered = progress.completion_tokens
                    if not attempt.retries(e, delivered, job.request.pin is not None):
                        raise
                    self._retry_elsewhere(job)
                finally:
                    self._attempts.pop(attempt.request.request_id, None)
                    attempt.span.end(progress)
        except Exception as e:
            progress.outcome = Outcome.FAILED
            if (error := client_error(e, job.rank, progress.completion_tokens)) is e:
                raise
            raise error from e
        finally:
            if expiry is not None:
                expiry.cancel()
            self.release(job, progress.outcome)
            self.metrics.ended(job.rank, progress)
            if progress.outcome is Outcome.CANCELLED:
                # vLLM aborts a cancelled generate() itself; this also covers a
                # consumer that stops iterating without cancelling.
                await job.fleet.pool.abort(job.engine_request_id, job.rank)

    def _output(self, job: Job, attempt: RankAttempt, delta: EngineDelta) -> None:
        """Counts one engine output in the ledger, the job's record and the metrics."""
        tokens = len(delta.token_ids)
        if attempt.entry is not None:
            job.fleet.ledger.output(attempt.entry, tokens)
        job.progress.output(delta)
        self.metrics.output(attempt.rank, tokens)

    def _attempt(self, job: Job) -> RankAttempt:
        """Starts the job on its rank as it stands now."""
        task = asyncio.current_task()
        assert task is not None  # run() is iterated by a task
        engine_id, request, ids = job.engine_request_id, job.request, job.prompt_token_ids
        span = job.trace.attempt(job.rank, engine_id, request.sampling, job.progress)
        params, priority = request.params, request.priority
        engine_request = EngineRequest(engine_id, ids, params, priority, span.headers)
        deltas = job.fleet.pool.generate(engine_request, job.rank).__aiter__()
        entry = job.fleet.ledger.entry(engine_id)
        attempt = RankAttempt(engine_request, job.rank, task, entry, span, deltas)
        self._attempts[engine_id] = attempt
        return attempt

    def _retry_elsewhere(self, job: Job) -> None:
        """Moves a job that has produced nothing off its failed rank; raises
        UNAVAILABLE when no rank serves."""
        self.release(job, Outcome.FAILED)
        decision = job.fleet.reroute(job.request.route)
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

    async def fail_rank(self, fleet: Fleet, rank: int) -> int:
        """Ends the jobs on a rank found dead or hung; how many. vLLM is told
        first (its requests end with EngineDeadError); a job still waiting on
        the engine elsewhere (vLLM awaits it before registering a request) is
        interrupted."""
        on_rank = [a for a in self._attempts.values() if a.rank == rank]
        with contextlib.suppress(RankNotJoined):
            await fleet.pool.fail(rank, [a.request.request_id for a in on_rank])
        self._end(on_rank, lambda: RankFailed(f"rank {rank} failed"))
        return len(on_rank)

    def end_all(self) -> int:
        """Ends every running job with UNAVAILABLE (the grace period of a
        shutdown is over); how many. Their clients get a status that says so,
        and the logs, metrics and traces agree with it."""
        attempts = list(self._attempts.values())
        self._end(
            attempts, lambda: unavailable("the router is shutting down: its grace period is over")
        )
        return len(attempts)

    @staticmethod
    def _end(attempts: Sequence[RankAttempt], error: Callable[[], Exception]) -> None:
        for attempt in attempts:
            attempt.end(error())

    def _abort_in_background(self, job: Job) -> None:
        """At the deadline: ends the job in its engine and counts it cancelled
        at once, even while its consumer is stuck (a send to a gone client).
        A consumer waiting on the engine is interrupted too, as gRPC's own
        cancel would: an abort sent before vLLM has registered the request
        (its `add_request` awaits; seconds on a busy host) finds nothing, and
        the request would run to its end."""
        self.release(job, Outcome.CANCELLED)
        if (attempt := self._attempts.get(job.engine_request_id)) is not None:
            attempt.interrupt("deadline exceeded")
        task: asyncio.Future[Any] = asyncio.ensure_future(
            job.fleet.pool.abort(job.engine_request_id, job.rank)
        )
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
