"""Admits requests, picks their rank and runs them on the rank pool.

The servicers hand every request here after decoding it; this is where a
request becomes a `Job` (checked, tokenized, routed) and where the count of
requests in flight lives, which graceful shutdown waits on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from dprouter.v1 import generate_pb2
from router import validation
from router.engine_types import EngineDelta
from router.errors import RequestError, invalid_argument, unavailable
from router.policies import RoundRobin
from router.ranks import RankLoad, RankPool
from router.vllm_compat import (
    EngineClientError,
    EngineDeadError,
    EngineSamplingParams,
    engine_sampling_params,
)


@dataclass(frozen=True)
class Job:
    """A request ready for the engine."""

    request_id: str
    engine_request_id: str
    prompt_token_ids: list[int]
    params: EngineSamplingParams
    rank: int
    route_reason: str  # "pinned", or the policy that chose the rank


class Dispatcher:
    def __init__(self, policy: RoundRobin) -> None:
        self.policy = policy
        self.pool: RankPool | None = None
        self.accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborts: set[asyncio.Future[None]] = set()

    def loads(self) -> list[RankLoad]:
        return self.pool.loads() if self.pool is not None else []

    def prepare(
        self,
        request: generate_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> Job:
        pool = self.pool
        if not self.accepting:
            raise unavailable("the router is shutting down")
        if pool is None:
            raise unavailable("the ranks have not joined the router yet")
        checked = validation.check_request(request, metadata, pool.limits)
        ids = validation.tokenize(checked.prompt, pool.encode, pool.render_chat)
        if not ids:
            raise invalid_argument(checked.prompt.field, "tokenizes to no tokens")
        sampling = validation.engine_sampling(
            checked.sampling, checked.prompt.field, len(ids), pool.limits
        )
        try:
            params = engine_sampling_params(sampling)
        except EngineClientError as e:  # a rule of vLLM's that ours do not repeat
            parameter = getattr(e, "parameter", None)
            raise invalid_argument(
                f"sampling.{parameter}" if parameter else "sampling", str(e)
            ) from None
        if checked.rank_pin is not None:
            rank, reason = checked.rank_pin, "pinned"
        else:
            chosen = self.policy.choose(pool.loads())
            if chosen is None:
                raise unavailable("no rank is serving")
            rank, reason = chosen, self.policy.name
        return Job(
            request_id=checked.request_id,
            # Engine ids must be unique among running requests; client ids need not be.
            engine_request_id=f"{checked.request_id}.{uuid.uuid4().hex[:8]}",
            prompt_token_ids=ids,
            params=params,
            rank=rank,
            route_reason=reason,
        )

    async def run(
        self, job: Job, trace_headers: Mapping[str, str] | None, deadline_s: float | None
    ) -> AsyncIterator[EngineDelta]:
        """The job's deltas; engine failures become RequestErrors. At the
        deadline the engine request is aborted by a timer, not by the consumer:
        a handler blocked sending to a vanished client was seen to miss gRPC's
        own cancellation for the whole generation."""
        pool = self.pool
        assert pool is not None
        self._in_flight += 1
        self._idle.clear()
        expiry = None
        if deadline_s is not None:
            loop = asyncio.get_running_loop()
            expiry = loop.call_later(
                max(deadline_s, 0.0), self._start_abort, pool, job.engine_request_id
            )
        try:
            async for delta in pool.generate(
                job.engine_request_id, job.prompt_token_ids, job.params, job.rank, trace_headers
            ):
                yield delta
        except EngineDeadError:
            raise unavailable(f"the engine serving rank {job.rank} is dead") from None
        except (EngineClientError, ValueError) as e:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"rejected by the engine: {e}"
            ) from e
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"engine failure: {type(e).__name__}: {e}"
            ) from e
        finally:
            if expiry is not None:
                expiry.cancel()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _start_abort(self, pool: RankPool, engine_request_id: str) -> None:
        task = asyncio.ensure_future(pool.abort(engine_request_id))
        self._aborts.add(task)  # keep a reference until it is done
        task.add_done_callback(self._aborts.discard)

    async def drain(self, grace_period: float) -> bool:
        """Refuses new requests and waits for the running ones; True if all finished."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), grace_period)
        except TimeoutError:
            return False
        return True
