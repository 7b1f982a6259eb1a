"""The pool of data-parallel ranks, engine side: generate on a rank, abort,
report what the engines say about their load.

The rest of the router sees ranks only through `RankPool`, so a topology is a
class here. Today there is one, `CoupledRanks`: one vLLM engine client for all
ranks, the pattern of vLLM's multi-instance data-parallel example. The ranks
run in rank servers on any host and join the router over vLLM's
data-parallel RPC port. The router's own per-rank counts live in `ledger.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from router.engine_types import EngineDelta
from router.ledger import EngineLoad
from router.validation import ModelLimits
from router.vllm_compat import EngineClient, EngineSamplingParams


class RankPool(Protocol):
    """What the router needs from the ranks, whatever the topology."""

    limits: ModelLimits
    block_size: int  # tokens per KV block, the unit of vLLM's prefix cache

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: EngineSamplingParams,
        rank: int,
        priority: int,
        trace_headers: Mapping[str, str] | None,
    ) -> AsyncIterator[EngineDelta]:
        """Streams the request on `rank`; cancelling the iteration aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def engine_loads(self) -> list[EngineLoad] | None:
        """Each rank's load as its engine reports it; None if they report none."""
        ...

    def close(self) -> None: ...


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
        self.block_size = client.block_size

    def encode(self, text: str) -> list[int]:
        return self._client.encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._client.render_chat(messages)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: EngineSamplingParams,
        rank: int,
        priority: int,
        trace_headers: Mapping[str, str] | None,
    ) -> AsyncIterator[EngineDelta]:
        return self._client.generate(
            request_id, prompt_token_ids, params, rank, priority, trace_headers
        )

    async def abort(self, request_id: str) -> None:
        await self._client.abort(request_id)

    def engine_loads(self) -> list[EngineLoad] | None:
        counts = self._client.engine_counts()
        if counts is None:
            return None
        return [EngineLoad(w, r, kv) for w, r, kv in counts]

    def close(self) -> None:
        self._client.shutdown()
