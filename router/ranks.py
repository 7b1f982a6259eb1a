"""The pool of data-parallel ranks: generate on a rank, abort, report load.

The rest of the router sees ranks only through `RankPool`, so a topology is a
class here. Today there is one, `CoupledRanks`: one vLLM engine client for all
ranks, the pattern of vLLM's multi-instance data-parallel example. The ranks
run in rank servers on any host and join the router over vLLM's
data-parallel RPC port.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from router.engine_types import EngineDelta
from router.validation import ModelLimits
from router.vllm_compat import EngineClient, EngineSamplingParams


class RankState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class RankLoad:
    """A snapshot of one rank: the router's own counts and the engine's report."""

    rank: int
    state: RankState
    in_flight: int
    waiting: int
    running: int
    kv_cache_usage: float
    served: int
    failed: int
    cancelled: int


class RankPool(Protocol):
    """What the router needs from the ranks, whatever the topology."""

    limits: ModelLimits

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: EngineSamplingParams,
        rank: int,
        trace_headers: Mapping[str, str] | None,
    ) -> AsyncIterator[EngineDelta]:
        """Streams the request on `rank`. Leaving the iteration early (a
        cancelled client, a deadline) aborts the engine request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def loads(self) -> list[RankLoad]: ...

    def set_state(self, state: RankState) -> None:
        """Sets every rank's state (the router drains them all on shutdown)."""
        ...

    def close(self) -> None: ...


@dataclass
class _Counts:
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    cancelled: int = 0


class CoupledRanks:
    """All ranks behind one `AsyncLLM` with data_parallel_size=N.

    vLLM routes each request to the rank we name (`data_parallel_rank`), and
    its data-parallel coordinator reports each engine's waiting and running
    counts. The whole group shares one client: if that client fails, every
    rank fails with it.
    """

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self.limits = ModelLimits(
            max_model_len=client.max_model_len,
            vocab_size=client.vocab_size,
            data_parallel_size=client.data_parallel_size,
            max_logprobs=client.max_logprobs,
        )
        self._counts = [_Counts() for _ in range(client.data_parallel_size)]
        self._state = RankState.SERVING
        self._running: dict[str, int] = {}  # engine request id -> rank

    def encode(self, text: str) -> list[int]:
        return self._client.encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._client.render_chat(messages)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: EngineSamplingParams,
        rank: int,
        trace_headers: Mapping[str, str] | None,
    ) -> AsyncIterator[EngineDelta]:
        counts = self._counts[rank]
        counts.in_flight += 1
        self._running[request_id] = rank
        finished = failed = False
        try:
            async for delta in self._client.generate(
                request_id, prompt_token_ids, params, rank, trace_headers
            ):
                finished = delta.finished
                yield delta
        except Exception:
            failed = True
            raise
        finally:
            if self._running.pop(request_id, None) is not None:  # not aborted already
                counts.in_flight -= 1
                if failed:
                    counts.failed += 1
                elif finished:
                    counts.served += 1
                else:
                    counts.cancelled += 1
            if not finished:
                # vLLM aborts a cancelled generate() itself; this also covers a
                # consumer that stops iterating without cancelling.
                await self._client.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Ends a running request in its engine and counts it as cancelled at
        once, even while its consumer is stuck (a send to a gone client)."""
        rank = self._running.pop(request_id, None)
        if rank is not None:
            self._counts[rank].in_flight -= 1
            self._counts[rank].cancelled += 1
        await self._client.abort(request_id)

    def loads(self) -> list[RankLoad]:
        engine = self._client.engine_counts() or [(0, 0, 0.0)] * len(self._counts)
        return [
            RankLoad(
                rank=rank,
                state=self._state,
                in_flight=c.in_flight,
                waiting=waiting,
                running=running,
                kv_cache_usage=kv,
                served=c.served,
                failed=c.failed,
                cancelled=c.cancelled,
            )
            for rank, (c, (waiting, running, kv)) in enumerate(
                zip(self._counts, engine, strict=True)
            )
        ]

    def set_state(self, state: RankState) -> None:
        self._state = state

    def close(self) -> None:
        self._client.shutdown()
