"""Busy is not dead: engine steps of several seconds are normal work.

The default model at its full context of 2,048 tokens: prefilling several
such prompts on one rank is one engine step of several seconds on these
CPUs, longer than the watchdog's probe timeout, and no probe can be answered
meanwhile. The router must serve them and fail no rank (its log names every
failure)."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router.liveness import DEFAULT_TIMEOUTS
from tests.conftest import SMOLLM2_CONTEXT, SMOLLM2_MAX_NUM_SEQS, failed_ranks
from tools.local_cluster import LocalCluster

CONTEXT = SMOLLM2_CONTEXT
_prompts = 0


def full_context(rank: int | None = None, **sampling: object) -> generate_pb2.GenerateRequest:
    """A prompt that fills the context but for one token, unlike any other
    (the prefix cache must not shorten its prefill)."""
    global _prompts
    _prompts += 1
    ids = [100 + (_prompts * 7919 + i * 31) % 40000 for i in range(CONTEXT - 1)]
    return generate_pb2.GenerateRequest(
        prompt_token_ids=ids,
        data_parallel_rank=rank,
        sampling=generate_pb2.SamplingParams(max_tokens=1, temperature=0, **sampling),  # type: ignore[arg-type]
    )


async def served(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, request: generate_pb2.GenerateRequest
) -> float:
    """Seconds to the first token of a request that must complete."""
    start = time.monotonic()
    first = None
    tokens = 0
    async for response in generate.Generate(request, timeout=600):
        first = first or time.monotonic()
        tokens += len(response.token_ids)
    assert tokens == request.sampling.max_tokens
    assert first is not None
    return first - start


async def no_rank_failed(smollm2: LocalCluster, channel: grpc.aio.Channel) -> None:
    ranks = await ranks_pb2_grpc.RanksServiceStub(channel).ListRanks(ranks_pb2.ListRanksRequest())
    assert [(r.state, r.failed) for r in ranks.ranks] == [(ranks_pb2.RANK_STATE_SERVING, 0)] * 2
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("rank/0", "rank/1"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    assert failed_ranks(smollm2) == []


async def test_a_full_context_prompt_is_served_pinned_and_unpinned(smollm2: LocalCluster) -> None:
    async with grpc.aio.insecure_channel(smollm2.spec.listen) as channel:
        generate = generate_pb2_grpc.GenerateServiceStub(channel)
        # As many as it runs at once on rank 0: steps of several prompts,
        # whose end no probe could see.
        pinned = await asyncio.gather(
            *(served(generate, full_context(rank=0)) for _ in range(SMOLLM2_MAX_NUM_SEQS))
        )
        unpinned = await served(generate, full_context())
        firsts = sorted(pinned)
        silent = max(b - a for a, b in zip([0.0, *firsts], firsts, strict=False))
        print(f"full-context prefills: first tokens {firsts} s pinned, {unpinned:.1f} s unpinned")
        # The point of the test: rank 0 went without an output for longer than
        # the probe timeout.
        assert silent > DEFAULT_TIMEOUTS.timeout_s
        await no_rank_failed(smollm2, channel)


async def test_as_many_full_context_prompts_as_the_engines_run(smollm2: LocalCluster) -> None:
    async with grpc.aio.insecure_channel(smollm2.spec.listen) as channel:
        generate = generate_pb2_grpc.GenerateServiceStub(channel)
        requests = [full_context(rank=i % 2) for i in range(2 * SMOLLM2_MAX_NUM_SEQS)]
        firsts = await asyncio.gather(*(served(generate, r) for r in requests))
        print(f"{len(firsts)} full-context prompts: last first token after {max(firsts):.1f} s")
        await no_rank_failed(smollm2, channel)


async def test_a_slow_reader_with_logprobs_beside_a_long_prefill(smollm2: LocalCluster) -> None:
    """A client that reads slowly, asking for 20 logprobs a token, on the rank
    that is busy with a full-context prefill: every token arrives."""
    tokens = 200
    async with grpc.aio.insecure_channel(smollm2.spec.listen) as channel:
        generate = generate_pb2_grpc.GenerateServiceStub(channel)
        slow = generate.Generate(
            generate_pb2.GenerateRequest(
                prompt="Tell me a long story about the sea.",
                data_parallel_rank=0,
                sampling=generate_pb2.SamplingParams(
                    max_tokens=tokens, temperature=1.0, ignore_eos=True, logprobs=20
                ),
            ),
            timeout=600,
        )
        prefill = asyncio.ensure_future(served(generate, full_context(rank=0)))
        received: list[generate_pb2.TokenLogprob] = []
        async for response in slow:
            received.extend(response.logprobs)
            await asyncio.sleep(0.05)
        await prefill
        assert len(received) == tokens
        # The top 20, and the sampled token where it is not among them.
        assert all(len(logprob.top_logprobs) in (20, 21) for logprob in received)
        await no_rank_failed(smollm2, channel)
