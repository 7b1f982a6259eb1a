"""Full-context prompts on a serving cluster of GPU ranks: each is served and
no rank is failed (the CPU suite's tests/test_busy.py, for a model and
context given; on a GPU no prefill of a small model outlasts the probes).

    python -m bench.gpu.long_prefill ADDRESS --context 16384 --vocab-size 1000 --ranks 2

Exits 1, saying why, if a prompt was not served or a rank was failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc


def full_context(
    n: int, context: int, vocab: int, rank: int | None
) -> generate_pb2.GenerateRequest:
    """Fills the context but for one token, unlike any other prompt (no prefix cache)."""
    ids = [3 + (n * 7919 + i * 31) % (vocab - 3) for i in range(context - 1)]
    return generate_pb2.GenerateRequest(
        prompt_token_ids=ids,
        data_parallel_rank=rank,
        sampling=generate_pb2.SamplingParams(max_tokens=1, temperature=0),
    )


async def served(
    stub: generate_pb2_grpc.GenerateServiceAsyncStub, request: generate_pb2.GenerateRequest
) -> float:
    start = time.monotonic()
    tokens = 0
    async for response in stub.Generate(request, timeout=600):
        tokens += len(response.token_ids)
    if tokens != 1:
        raise AssertionError(f"{tokens} tokens, not 1")
    return time.monotonic() - start


async def run(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        prompts = iter(range(10**6))
        pinned = await served(stub, full_context(next(prompts), args.context, args.vocab_size, 0))
        unpinned = await served(
            stub, full_context(next(prompts), args.context, args.vocab_size, None)
        )
        batch = [full_context(next(prompts), args.context, args.vocab_size, i % args.ranks)
                 for i in range(args.at_once)]  # fmt: skip
        together = await asyncio.gather(*(served(stub, r) for r in batch))
        print(f"{args.context}-token prompts: pinned {pinned:.3f} s, unpinned {unpinned:.3f} s, "
              f"{len(batch)} at once: last {max(together):.3f} s")  # fmt: skip
        ranks = await ranks_pb2_grpc.RanksServiceStub(channel).ListRanks(
            ranks_pb2.ListRanksRequest()
        )
    states = [(r.rank, ranks_pb2.RankState.Name(r.state), r.failed) for r in ranks.ranks]
    print(f"ranks (rank, state, requests failed): {states}")
    if any(state != "RANK_STATE_SERVING" or failed for _, state, failed in states):
        print("a rank was failed", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address")
    parser.add_argument("--context", type=int, required=True, help="the ranks' --max-model-len")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--at-once", type=int, default=16, help="full-context prompts together")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
