"""Routing benchmarks; each prints a markdown table.

    python -m bench.routing cost      # microseconds per decision, 2/8/64 ranks
    python -m bench.routing balance   # skewed load on real engines, per policy
    python -m bench.routing prefix    # prefix-cache reuse on real engines

`balance` and `prefix` start two tiny-model ranks per system (about 40 s each)
and must run on an otherwise idle machine. The baseline "vllm balancer" is
vLLM's own data-parallel load balancer: an engine client in this process that
names no rank, joined to the same kind of rank servers.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router.engine_types import Sampling
from router.ledger import RankLoad, RankState
from router.policies import POLICIES, RouteInput, make_policy
from router.vllm_compat import (
    EngineClient,
    add_engine_args,
    engine_sampling_params,
    new_flexible_parser,
)
from server.local_cluster import ClusterSpec, LocalCluster

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama"
VLLM_BALANCER = "vllm balancer"
BLOCK = 128  # vLLM's KV block size on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- decision cost -----------------------------------------------------------


def decision_cost(policy_name: str, ranks: int, decisions: int) -> float:
    """Microseconds per decide+commit on a 512-token prompt with a varying
    load table (64 ranks are load tables only: no engines)."""
    rng = random.Random(0)
    policy = make_policy(policy_name, ranks, BLOCK, 1.25)
    systems = [[rng.randrange(1000) for _ in range(384)] for _ in range(16)]
    requests = [
        RouteInput(
            [*rng.choice(systems), *(rng.randrange(1000) for _ in range(128))],
            f"session-{rng.randrange(100)}",
        )
        for _ in range(256)
    ]
    tables = [
        [
            RankLoad(r, RankState.SERVING, rng.randrange(8), rng.randrange(2048),
                     rng.randrange(2), rng.randrange(8), rng.random(), 0, 0, 0)
            for r in range(ranks)
        ]
        for _ in range(16)
    ]  # fmt: skip
    start = time.perf_counter()
    for i in range(decisions):
        policy.decide(requests[i % len(requests)], tables[i % len(tables)]).commit()
    return (time.perf_counter() - start) / decisions * 1e6


def run_cost(_: argparse.Namespace) -> None:
    sizes = (2, 8, 64)
    rows = [
        [name, *(f"{min(decision_cost(name, n, 2000) for _ in range(3)):.1f}" for n in sizes)]
        for name in POLICIES
    ]
    print("Routing decision cost, microseconds per decision (best of 3 x 2000; "
          "512-token prompts, 16 shared system prompts)\n")  # fmt: skip
    print(table(["policy", *(f"{n} ranks" for n in sizes)], rows))


# --- workloads on real engines --------------------------------------------------


@dataclass(frozen=True)
class Job:
    at: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    session_key: str = ""


@dataclass
class Result:
    latency: float
    rank: int | None
    prompt_tokens: int
    cached_tokens: int


Submit = Callable[[Job], Awaitable[Result]]
Sample = Callable[[], Awaitable[list[int]]]  # per rank: engine waiting + running


Run = tuple[list[Result], list[list[int]], float]


async def drive(jobs: Sequence[Job], submit: Submit, sample: Sample) -> Run:
    """Sends the jobs at their times (open loop) while sampling the ranks'
    load every 50 ms; the results, the samples and the makespan."""
    samples: list[list[int]] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append(await sample())
            await asyncio.sleep(0.05)

    async def one(job: Job, start: float) -> Result:
        await asyncio.sleep(max(0.0, start + job.at - time.perf_counter()))
        return await submit(job)

    sampling = asyncio.ensure_future(sampler())
    start = time.perf_counter()
    results = await asyncio.gather(*(one(job, start) for job in jobs))
    makespan = time.perf_counter() - start
    done.set()
    await sampling
    return list(results), samples, makespan


def grpc_submit(generate: generate_pb2_grpc.GenerateServiceAsyncStub) -> Submit:
    async def submit(job: Job) -> Result:
        start = time.perf_counter()
        request = generate_pb2.GenerateRequest(
            prompt_token_ids=job.prompt,
            session_key=job.session_key,
            sampling=generate_pb2.SamplingParams(
                max_tokens=job.max_tokens, temperature=0, ignore_eos=True
            ),
        )
        rank = None
        usage = generate_pb2.Usage()
        async for response in generate.Generate(request):
            if response.HasField("data_parallel_rank"):
                rank = response.data_parallel_rank
            if response.HasField("usage"):
                usage = response.usage
        return Result(time.perf_counter() - start, rank, usage.prompt_tokens, usage.cached_tokens)

    return submit


def grpc_sample(ranks: ranks_pb2_grpc.RanksServiceAsyncStub) -> Sample:
    async def sample() -> list[int]:
        reply = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
        return [r.waiting + r.running for r in reply.ranks]

    return sample


def greedy(max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens, min_tokens=0, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
        seed=None, stop=[], stop_token_ids=[], presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, n=1, logprobs=None, ignore_eos=True, skip_special_tokens=True,
    )  # fmt: skip


def engine_submit(client: EngineClient) -> Submit:
    counter = iter(range(10**9))

    async def submit(job: Job) -> Result:
        start = time.perf_counter()
        cached = 0
        params = engine_sampling_params(greedy(job.max_tokens))
        async for delta in client.generate(f"b{next(counter)}", job.prompt, params, None, 0, None):
            cached = delta.cached_tokens
        return Result(time.perf_counter() - start, None, len(job.prompt), cached)

    return submit


def engine_sample(client: EngineClient) -> Sample:
    async def sample() -> list[int]:
        return [w + r for w, r, _ in client.engine_counts() or []]

    return sample


async def on_cluster(system: str, spec: ClusterSpec, jobs: Sequence[Job]) -> Run:
    """Runs the jobs through `system` (a dprouter policy or vLLM's balancer)."""
    if system != VLLM_BALANCER:
        spec.router_flags = ["--routing-policy", system]
        with LocalCluster(spec).serving(timeout=600):
            async with grpc.aio.insecure_channel(spec.listen) as channel:
                submit = grpc_submit(generate_pb2_grpc.GenerateServiceStub(channel))
                await submit(Job(0, [1, 2, 3], 2))  # warm up
                return await drive(
                    jobs, submit, grpc_sample(ranks_pb2_grpc.RanksServiceStub(channel))
                )
    spec.with_router = False
    parser = new_flexible_parser("bench engine client")
    add_engine_args(parser)
    engine_args = parser.parse_args(spec.shared_flags())
    with LocalCluster(spec).serving(timeout=600):
        client = await asyncio.to_thread(EngineClient.start, engine_args)
        try:
            submit = engine_submit(client)
            await submit(Job(0, [1, 2, 3], 2))
            return await drive(jobs, submit, engine_sample(client))
        finally:
            client.shutdown()


def spec_for(args: argparse.Namespace, engine_flags: Sequence[str] = ()) -> ClusterSpec:
    spec = ClusterSpec(
        model=str(args.model), ranks=2, listen=f"127.0.0.1:{free_port()}",
        rpc_port=free_port(), max_model_len=8192, log_dir=Path(args.logs),
    )  # fmt: skip
    spec.engine_flags = [*spec.engine_flags, *engine_flags]
    return spec


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def skewed_jobs(seed: int, seconds: float, rate: float) -> list[Job]:
    """Mostly short prompts, one in ten a long one (6,000 tokens)."""
    rng = random.Random(seed)
    jobs, at = [], 0.0
    while at < seconds:
        at += rng.expovariate(rate)
        length = 6000 if rng.random() < 0.1 else rng.randrange(16, 64)
        jobs.append(Job(at, [rng.randrange(3, 1000) for _ in range(length)], 32))
    return jobs


def run_balance(args: argparse.Namespace) -> None:
    jobs = skewed_jobs(seed=1, seconds=args.seconds, rate=args.rate)
    rows = []
    for system in args.systems:
        results, samples, makespan = asyncio.run(on_cluster(system, spec_for(args), jobs))
        busy = [s for s in samples if sum(s) > 0]
        spread = sum(max(s) - min(s) for s in busy) / max(1, sum(sum(s) for s in busy) / 2)
        latencies = [r.latency * 1000 for r in results]
        shares = [sum(1 for r in results if r.rank == k) for k in range(2)]
        rows.append([
            system, f"{spread:.2f}", f"{statistics.mean(max(s) for s in busy):.1f}",
            f"{percentile(latencies, 0.5):.0f}", f"{percentile(latencies, 0.99):.0f}",
            f"{makespan:.1f}", "/".join(map(str, shares)) if results[0].rank is not None else "-",
        ])  # fmt: skip
        print(rows[-1], flush=True)
    long_jobs = sum(1 for j in jobs if len(j.prompt) > 1000)
    print(f"\nBalance: {len(jobs)} requests over {args.seconds:.0f} s ({long_jobs} with "
          "6,000-token prompts, the rest 16-64), 32 greedy tokens each, 2 ranks of the tiny model. "
          "Spread: mean |rank 0 - rank 1| of the engines' waiting+running over the mean per "
          "rank (0 is perfect), sampled every 50 ms.\n")  # fmt: skip
    print(table(["system", "spread", "busiest rank (mean)", "latency p50 ms", "latency p99 ms",
                 "makespan s", "requests per rank"], rows))  # fmt: skip


def prefix_jobs(seed: int, systems: int, requests: int, rate: float) -> list[Job]:
    """Conversations over shared system prompts (4 KV blocks each)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(4 * BLOCK)] for _ in range(systems)]
    jobs, at = [], 0.0
    for _ in range(requests):
        at += rng.expovariate(rate)
        user = [rng.randrange(3, 1000) for _ in range(rng.randrange(20, 60))]
        jobs.append(Job(at, [*rng.choice(prompts), *user], 16))
    return jobs


def run_prefix(args: argparse.Namespace) -> None:
    jobs = prefix_jobs(seed=2, systems=args.system_prompts, requests=args.requests, rate=args.rate)
    # A small KV cache per rank (blocks of 128 tokens): it holds about half of
    # the system prompts, as a busy production cache would.
    flags = ["--num-gpu-blocks-override", str(args.kv_blocks)]
    rows = []
    for system in args.systems:
        results, _, makespan = asyncio.run(on_cluster(system, spec_for(args, flags), jobs))
        prompt = sum(r.prompt_tokens for r in results)
        cached = sum(r.cached_tokens for r in results)
        latencies = [r.latency * 1000 for r in results]
        rows.append([system, f"{cached / prompt:.1%}", f"{percentile(latencies, 0.5):.0f}",
                     f"{percentile(latencies, 0.99):.0f}", f"{makespan:.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
    print(f"\nPrefix reuse: {len(jobs)} requests over {args.system_prompts} system prompts of "
          f"{4 * BLOCK} tokens plus 20-60 user tokens, {args.kv_blocks} KV blocks of {BLOCK} "
          "tokens per rank, 2 ranks of the tiny model. Cached: prompt tokens vLLM served "
          "from its prefix cache.\n")  # fmt: skip
    print(
        table(["system", "cached tokens", "latency p50 ms", "latency p99 ms", "makespan s"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--logs", default="/tmp/dprouter-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cost").set_defaults(run=run_cost)
    balance = sub.add_parser("balance")
    balance.add_argument("--systems", nargs="+", default=[
        "round_robin", "least_loaded", "power_of_two", "affinity", VLLM_BALANCER])  # fmt: skip
    balance.add_argument("--seconds", type=float, default=20)
    balance.add_argument("--rate", type=float, default=12, help="requests per second")
    balance.set_defaults(run=run_balance)
    prefix = sub.add_parser("prefix")
    prefix.add_argument("--systems", nargs="+", default=["round_robin", "prefix", "affinity"])
    prefix.add_argument("--system-prompts", type=int, default=16)
    prefix.add_argument("--requests", type=int, default=240)
    prefix.add_argument("--rate", type=float, default=12)
    prefix.add_argument("--kv-blocks", type=int, default=48)
    prefix.set_defaults(run=run_prefix)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
