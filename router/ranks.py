"""The pool of data-parallel ranks, engine side: generate on a rank, abort,
probe, report what the engines say about their load.

The rest of the router sees ranks only through `RankPool`; a topology is a
class here:
- `IndependentRanks` (the default): one vLLM engine client per rank, each rank
  a data-parallel group of one on its own port. A dead rank cannot stall the
  others, and it can be replaced alone.
- `CoupledRanks`: one engine client for all ranks (`data_parallel_size=N`),
  vLLM's multi-instance data-parallel pattern, needed where the ranks must
  step together (MoE / expert parallel). A dead rank cannot be replaced:
  the group is restarted as one.
Ranks run in rank servers on any host and join the router over vLLM's
data-parallel RPC. The router's own per-rank counts live in `ledger.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from router.engine_types import EngineDelta, EngineRequest
from router.ledger import EngineLoad
from router.limits import ModelLimits
from router.vllm_compat import EngineClient


class RankPool(Protocol):
    """What the router needs from the ranks, whatever the topology."""

    limits: ModelLimits
    block_size: int  # tokens per KV block, the unit of vLLM's prefix cache
    kv_blocks: int  # KV cache blocks per rank: what its prefix cache can hold
    capacity: int  # requests one rank's engine runs at once (max_num_seqs)
    # True where the ranks' engines share one connection to the router, so
    # that a drop does not say whose engine it was (the coupled topology).
    shared_connection: bool

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(self, request: EngineRequest, rank: int) -> AsyncIterator[EngineDelta]:
        """Streams the request on `rank`; cancelling the iteration aborts it."""
        ...

    async def abort(self, request_id: str, rank: int) -> None: ...

    async def probe(self, rank: int, step: bool) -> None:
        """Returns once the rank's engine has answered (with `step`, run one
        token and reported its counts); hangs if it cannot."""
        ...

    def last_heard(self, rank: int) -> float:
        """When the rank's engine last sent outputs (`time.monotonic()`; 0.0
        if never): proof of progress while it has work."""
        ...

    def step_times(self, rank: int) -> tuple[tuple[float, float], ...]:
        """The rank's engine's recent step times by batch size (`Pace.steps`)."""
        ...

    def dropped_at(self, rank: int) -> float:
        """When the rank's engine (with the coupled topology: any rank's)
        last dropped its connection (`time.monotonic()`; 0.0 if never)."""
        ...

    async def fail(self, rank: int, request_ids: Sequence[str]) -> None:
        """Ends these requests of a failed rank with EngineDeadError. With
        the coupled topology the other ranks go on if they can: vLLM's
        dense-model ranks do; ranks that must step together stop answering
        too, and the watchdog fails them on their own evidence."""
        ...

    def engine_loads(self) -> list[EngineLoad]:
        """Each rank's load as its engine last reported it."""
        ...

    def close(self) -> None: ...


def _limits(client: EngineClient, ranks: int) -> ModelLimits:
    return ModelLimits(
        max_model_len=client.max_model_len,
        vocab_size=client.vocab_size,
        data_parallel_size=ranks,
        max_logprobs=client.max_logprobs,
        max_token_bytes=client.max_token_bytes,
    )


class CoupledRanks:
    """All ranks behind one `AsyncLLM` with data_parallel_size=N; vLLM sends
    each request to the rank we name (`data_parallel_rank`)."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self.limits = _limits(client, client.data_parallel_size)
        self.block_size = client.block_size
        self.kv_blocks = client.kv_blocks
        self.capacity = client.max_num_seqs
        self.shared_connection = True

    def encode(self, text: str) -> list[int]:
        return self._client.encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._client.render_chat(messages)

    def generate(self, request: EngineRequest, rank: int) -> AsyncIterator[EngineDelta]:
        return self._client.generate(request, rank)

    async def abort(self, request_id: str, rank: int) -> None:
        await self._client.abort(request_id)

    async def probe(self, rank: int, step: bool) -> None:
        await self._client.probe(rank, step)

    def last_heard(self, rank: int) -> float:
        return self._client.last_heard()[rank]

    def step_times(self, rank: int) -> tuple[tuple[float, float], ...]:
        return self._client.step_times()[rank]

    def dropped_at(self, rank: int) -> float:
        return self._client.dropped_at()

    async def fail(self, rank: int, request_ids: Sequence[str]) -> None:
        await self._client.fail(request_ids)

    def engine_loads(self) -> list[EngineLoad]:
        return [EngineLoad(w, r, kv) for w, r, kv in self._client.engine_counts()]

    def close(self) -> None:
        self._client.shutdown()


class RankNotJoined(Exception):
    """The rank has no engine client (not joined yet, or being replaced)."""


class IndependentRanks:
    """One `AsyncLLM` per rank (data_parallel_size=1 each). Ranks join one by
    one (`join`) and can be replaced alone (`leave`, then `join` again)."""

    def __init__(self, ranks: int, rank: int, client: EngineClient) -> None:
        self._clients: list[EngineClient | None] = [None] * ranks
        self._clients[rank] = client
        self.limits = _limits(client, ranks)
        self.block_size = client.block_size
        self.kv_blocks = client.kv_blocks
        self.capacity = client.max_num_seqs
        self.shared_connection = False

    def join(self, rank: int, client: EngineClient) -> None:
        """Adds a rank's client. Its model limits are the router's own (every
        client is built from the router's flags): vLLM's handshake does not
        say which model a rank serves, so a rank started with another model
        is not detected here."""
        self._clients[rank] = client

    def leave(self, rank: int) -> EngineClient | None:
        """Forgets a rank's client (to shut it down and replace it)."""
        client, self._clients[rank] = self._clients[rank], None
        return client

    def _any(self) -> EngineClient:
        return next(c for c in self._clients if c is not None)

    def _client(self, rank: int) -> EngineClient:
        client = self._clients[rank]
        if client is None:
            raise RankNotJoined(f"rank {rank} has not joined")
        return client

    def encode(self, text: str) -> list[int]:
        return self._any().encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._any().render_chat(messages)

    def generate(self, request: EngineRequest, rank: int) -> AsyncIterator[EngineDelta]:
        return self._client(rank).generate(request, None)

    async def abort(self, request_id: str, rank: int) -> None:
        client = self._clients[rank]
        if client is not None:
            await client.abort(request_id)

    async def probe(self, rank: int, step: bool) -> None:
        await self._client(rank).probe(None, step)

    def last_heard(self, rank: int) -> float:
        client = self._clients[rank]
        return client.last_heard()[0] if client is not None else 0.0

    def step_times(self, rank: int) -> tuple[tuple[float, float], ...]:
        client = self._clients[rank]
        return client.step_times()[0] if client is not None else ()

    def dropped_at(self, rank: int) -> float:
        client = self._clients[rank]
        return client.dropped_at() if client is not None else 0.0

    async def fail(self, rank: int, request_ids: Sequence[str]) -> None:
        await self._client(rank).fail(request_ids)

    def engine_loads(self) -> list[EngineLoad]:
        return [
            EngineLoad(*client.engine_counts()[0]) if client is not None else EngineLoad()
            for client in self._clients
        ]

    def close(self) -> None:
        for rank in range(len(self._clients)):
            if (client := self.leave(rank)) is not None:
                client.shutdown()
