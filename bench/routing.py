"""Routing benchmarks; each prints a markdown table.

    python -m bench.routing cost      # microseconds per decision, 2/8/64 ranks
    python -m bench.routing balance   # skewed load on real engines, per policy
    python -m bench.routing prefix    # prefix-cache reuse on real engines

`balance` and `prefix` start two tiny-model rank servers once and hold the
engine client in this process, with the router's own dispatcher (checks,
policy, ledger) in front of it but no gRPC, so every system has the same
front end and only the placement differs. The baseline "vllm balancer" is
vLLM's own data-parallel load balancer: the same client naming no rank. The
systems take turns, twice each; run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.report import percentile, table
from dprouter.v1 import generate_pb2
from router import intake, tracing
from router.dispatcher import Dispatcher
from router.engine_types import EngineRequest, Sampling
from router.fleet import build as build_fleet
from router.ledger import RankLoad, RankState
from router.membership import in_daemon_thread
from router.metrics import Metrics
from router.policies import POLICIES, RouteInput, make_policy
from router.progress import Progress
from router.ranks import CoupledRanks
from router.vllm_compat import (
    EngineClient,
    add_engine_args,
    engine_sampling_params,
    new_flexible_parser,
)
from tools.local_cluster import ClusterSpec, LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama"
VLLM_BALANCER = "vllm balancer"
BLOCK = 128  # vLLM's KV block size on CPU


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


def cost_table() -> str:
    sizes = (2, 8, 64)
    rows = [
        [name, *(f"{min(decision_cost(name, n, 2000) for _ in range(3)):.1f}" for n in sizes)]
        for name in POLICIES
    ]
    return (
        "Routing decision cost, microseconds per decision (best of 3 x 2000; "
        "512-token prompts, 16 shared system prompts)\n\n"
        + table(["policy", *(f"{n} ranks" for n in sizes)], rows)
    )


def run_cost(_: argparse.Namespace) -> None:
    print(cost_table())


# --- workloads on real engines --------------------------------------------------


@dataclass(frozen=True)
class Job:
    at: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    session_key: str = ""


@dataclass
class Result:
    job: Job
    latency: float
    cached_tokens: int


Submit = Callable[[Job], Awaitable[Result]]


async def drive(jobs: Sequence[Job], submit: Submit, client: EngineClient) -> tuple[
    list[Result], list[list[int]]
]:  # fmt: skip
    """Sends the jobs at their times (open loop) while sampling the engines'
    waiting + running per rank every 50 ms."""
    samples: list[list[int]] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append([w + r for w, r, _ in client.engine_counts() or []])
            await asyncio.sleep(0.05)

    async def one(job: Job, start: float) -> Result:
        await asyncio.sleep(max(0.0, start + job.at - time.perf_counter()))
        return await submit(job)

    sampling = asyncio.ensure_future(sampler())
    start = time.perf_counter()
    results = await asyncio.gather(*(one(job, start) for job in jobs))
    done.set()
    await sampling
    return list(results), samples


def submitter(system: str, client: EngineClient) -> Submit:
    """Runs a job through the router's dispatcher with `system`'s policy, or
    straight to the engine client with no rank for vLLM's balancer."""
    counter = iter(range(10**9))
    pool = CoupledRanks(client)
    dispatcher = Dispatcher(Metrics())
    if system != VLLM_BALANCER:
        dispatcher.attach(build_fleet(pool, system))

    async def submit(job: Job) -> Result:
        start = time.perf_counter()
        cached = 0
        if system == VLLM_BALANCER:
            params = engine_sampling_params(Sampling.greedy(job.max_tokens))
            deltas = client.generate(EngineRequest(f"b{next(counter)}", job.prompt, params), None)
        else:
            request = generate_pb2.GenerateRequest(
                prompt_token_ids=job.prompt,
                session_key=job.session_key,
                sampling=generate_pb2.SamplingParams(
                    max_tokens=job.max_tokens, temperature=0, ignore_eos=True
                ),
            )
            trace = tracing.start("bench", (), "bench")  # not recording: no provider
            admitted = await intake.admit(request, (), dispatcher.fleet())
            deltas = dispatcher.run(dispatcher.prepare(admitted, trace, Progress.starting(None)))
        async for delta in deltas:
            cached = delta.cached_tokens
        return Result(job, time.perf_counter() - start, cached)

    return submit


async def compare(
    args: argparse.Namespace,
    jobs: Sequence[Job],
    max_model_len: int,
    engine_flags: Sequence[str] = (),
) -> dict[str, list[tuple[list[Result], list[list[int]]]]]:
    """Every system's runs of the jobs, in turns, on one pair of ranks."""
    spec = ClusterSpec(
        model=str(args.model), ranks=2, listen="", rpc_port=free_port(),
        max_model_len=max_model_len, log_dir=Path(args.logs), with_router=False,
        topology="coupled",
    )  # fmt: skip
    spec.engine_flags = [*spec.engine_flags, *engine_flags]
    parser = new_flexible_parser("bench engine client")
    add_engine_args(parser)
    engine_args = parser.parse_args(spec.router_engine_flags())
    runs: dict[str, list[tuple[list[Result], list[list[int]]]]] = {s: [] for s in args.systems}
    with LocalCluster(spec).serving(timeout=600) as cluster:
        joining = in_daemon_thread(lambda: EngineClient.start(engine_args))
        while not joining.done():  # a rank that dies would leave the join waiting forever
            cluster.check_alive()
            await asyncio.wait([joining], timeout=1)
        client = joining.result()
        try:
            for round_ in range(args.rounds):
                for system in args.systems:
                    await client.reset_prefix_cache()
                    submit = submitter(system, client)
                    await submit(Job(0, [1, 2, 3], 2))  # warm up
                    runs[system].append(await drive(jobs, submit, client))
                    print(f"round {round_ + 1}: {system} done", flush=True)
                    await asyncio.sleep(1)
        finally:
            client.shutdown()
    return runs


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
    for system, runs in asyncio.run(compare(args, jobs, 8192)).items():
        results = [r for run, _ in runs for r in run]
        busy = [s for _, samples in runs for s in samples if sum(s) > 0]
        spread = statistics.mean(max(s) - min(s) for s in busy) / statistics.mean(
            sum(s) / 2 for s in busy
        )
        short = [r.latency * 1000 for r in results if len(r.job.prompt) < 1000]
        long = [r.latency * 1000 for r in results if len(r.job.prompt) >= 1000]
        rows.append([
            system, f"{spread:.2f}", f"{percentile(short, 0.5):.0f}",
            f"{percentile(short, 0.9):.0f}", f"{percentile(short, 0.99):.0f}",
            f"{percentile(long, 0.5):.0f}",
        ])  # fmt: skip
    long_jobs = sum(1 for j in jobs if len(j.prompt) >= 1000)
    print(f"\nBalance: {len(jobs)} requests arriving over {args.seconds:.0f} s ({long_jobs} "
          "with 6,000-token prompts, the rest 16-64 tokens), 32 greedy tokens each, 2 ranks "
          f"of the tiny model, {args.rounds} rounds per system. Spread: mean |rank 0 - rank 1| "
          "of the engines' waiting + running over the mean per rank, sampled every 50 ms "
          "(0 is even).\n")  # fmt: skip
    print(table(["system", "spread", "short p50 ms", "short p90 ms", "short p99 ms",
                 "long p50 ms"], rows))  # fmt: skip


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
    # A small KV cache per rank: it holds fewer system prompts than there
    # are, as a busy production cache would.
    flags = ["--num-gpu-blocks-override", str(args.kv_blocks)]
    rows = []
    for system, runs in asyncio.run(compare(args, jobs, 2048, flags)).items():
        results = [r for run, _ in runs for r in run]
        prompt = sum(len(r.job.prompt) for r in results)
        cached = sum(r.cached_tokens for r in results)
        latencies = [r.latency * 1000 for r in results]
        rows.append([system, f"{cached / prompt:.1%}", f"{percentile(latencies, 0.5):.0f}",
                     f"{percentile(latencies, 0.99):.0f}"])  # fmt: skip
    print(f"\nPrefix reuse: {len(jobs)} requests over {args.system_prompts} system prompts of "
          f"{4 * BLOCK} tokens plus 20-60 user tokens, 16 greedy tokens each; {args.kv_blocks} "
          f"KV blocks of {BLOCK} tokens per rank; 2 ranks of the tiny model, {args.rounds} "
          "rounds per system. Cached: prompt tokens vLLM served from its prefix "
          "cache.\n")  # fmt: skip
    print(table(["system", "cached tokens", "latency p50 ms", "latency p99 ms"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINY_MODEL))
    parser.add_argument("--logs", default="/tmp/dprouter-bench")
    parser.add_argument("--rounds", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cost").set_defaults(run=run_cost)
    balance = sub.add_parser("balance")
    # Every policy. The workload has no session keys or shared prefixes, so
    # session and prefix route by their fallback (least loaded) throughout.
    balance.add_argument("--systems", nargs="+", default=[*POLICIES, VLLM_BALANCER])
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
