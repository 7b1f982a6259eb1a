"""Overload: three times the router's admission bound, against the same stack
at exactly its capacity, in one run.

    python -m bench.overload            # make run's stack: the default model, 2 ranks
    python -m bench.overload --quick    # smoke test: the tiny model, short requests

Two phases on one cluster, each a closed loop of clients that send one
request each and, told RESOURCE_EXHAUSTED, wait the `RetryInfo` delay and
send it again, until it is served or ends otherwise:
- capacity: as many clients as the engines run at once (ranks x
  --max-num-seqs), so nothing queues;
- overload: 3 x the router's default bound (a rank holds --max-num-seqs
  running plus as many queued).
Printed per phase: calls OK / refusals / other endings, the refusals'
latency (and, apart, that of those after the phase's opening burst), how
their retry delays compare with the real wait (from a refusal until that
client's call was admitted: its response headers came), and
goodput (output tokens per second of completed calls); overload's goodput
as a share of capacity's (which also shows capacity that retry delays too
long would leave idle).
Then the floor of the opening burst's refusals: the same burst against a
bare grpc.aio server that refuses every call at once (bench/refuser.py), on
the same machine with the cluster still up.
Appends the table to bench/results/<date>-overload.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.clients import retry_delay
from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tools.local_cluster import ClusterSpec, LocalCluster, free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny": ROOT / "models" / "tiny-llama",
    "smollm2": ROOT / "models" / "smollm2-135m-instruct",
}
LOGS = ROOT / "build" / "bench-overload"
# vLLM's default --max-num-seqs on CPU (api server): what `make run` runs.
CPU_MAX_NUM_SEQS = 128


@dataclass
class Phase:
    name: str
    clients: int
    started: float = 0.0
    completed: list[tuple[float, int]] = field(default_factory=list)  # (end, tokens)
    # (when it came back, its latency, the delay it carried)
    refusals: list[tuple[float, float, float]] = field(default_factory=list)
    # Each refusal's retry delay over its real wait (to its client's admission).
    delay_errors: list[float] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return max(end for end, _ in self.completed) - self.started

    @property
    def goodput(self) -> float:
        return sum(tokens for _, tokens in self.completed) / self.wall_s


async def client(
    stub: generate_pb2_grpc.GenerateServiceAsyncStub,
    phase: Phase,
    request: generate_pb2.GenerateRequest,
    deadline_s: float,
) -> None:
    refused: list[tuple[float, float]] = []  # (when, the delay it carried)
    while True:
        sent = time.monotonic()
        tokens = 0
        call = stub.Generate(request, timeout=deadline_s)
        try:
            if await call.initial_metadata():  # a refusal has none
                admitted = time.monotonic()
                phase.delay_errors += [d / max(admitted - at, 1e-3) for at, d in refused]
                refused.clear()
            async for response in call:
                tokens += len(response.token_ids)
        except grpc.aio.AioRpcError as e:
            now = time.monotonic()
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                phase.other.append(e.code().name)
                return
            delay = retry_delay(e)
            phase.refusals.append((now, now - sent, delay))
            refused.append((now, delay))
            await asyncio.sleep(delay)
            continue
        phase.completed.append((time.monotonic(), tokens))
        return


async def run_phase(address: str, name: str, clients: int, tokens: int, deadline_s: float) -> Phase:
    phase = Phase(name, clients)
    request = generate_pb2.GenerateRequest(
        prompt="Tell me a story about the sea.",
        sampling=generate_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        phase.started = time.monotonic()
        await asyncio.gather(*(client(stub, phase, request, deadline_s) for _ in range(clients)))
    return phase


async def refusal_floor(calls: int) -> list[float]:
    """Milliseconds to each refusal of `calls` sent at once to a bare
    grpc.aio server that refuses them all (`bench.refuser`)."""
    address = f"127.0.0.1:{free_port()}"
    refuser = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.refuser", "--listen", address
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            request = generate_pb2.GenerateRequest(prompt="Tell me a story about the sea.")

            async def one() -> float:
                sent = time.monotonic()
                code = await stub.Generate(request).code()
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
                return (time.monotonic() - sent) * 1000

            return list(await asyncio.gather(*(one() for _ in range(calls))))
    finally:
        refuser.terminate()
        await refuser.wait()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def router_refusal_ms(log: Path) -> list[float]:
    """How long the router's handler took over each RESOURCE_EXHAUSTED, from
    its log: the client's latency less the queueing before the handler ran."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if '"RESOURCE_EXHAUSTED"' in line and '"request finished"' in line:
            times.append(float(json.loads(line)["ms"]))
    return times


# The calls of a phase all start at once: a burst that one load process
# sends and the router answers one by one. Refusals after it are timed apart.
BURST_S = 10.0


def after_burst(phase: Phase) -> str:
    """The refusals after the phase's first BURST_S: count and latency."""
    later = [lat * 1000 for at, lat, _ in phase.refusals if at - phase.started > BURST_S]
    if not later:
        return f"no refusal after the first {BURST_S:.0f} s"
    return (
        f"{len(later)} refusals after the first {BURST_S:.0f} s took "
        f"{percentile(later, 0.5):.1f} / {percentile(later, 0.99):.1f} ms (p50 / p99)"
    )


def table(phases: list[Phase], capacity: Phase) -> str:
    rows = [
        "| phase | clients | OK | refusals | other | refusal p50 / p99 ms "
        "| retry delay / wait to admission p50 (within 2x) | goodput tok/s | of capacity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in phases:
        latencies = [latency * 1000 for _, latency, _ in phase.refusals]
        errors = phase.delay_errors
        within = sum(0.5 <= e <= 2.0 for e in errors)
        rows.append(
            f"| {phase.name} | {phase.clients} | {len(phase.completed)} | {len(phase.refusals)} "
            f"| {len(phase.other)} {sorted(set(phase.other)) if phase.other else ''} "
            + (
                f"| {percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f} "
                if latencies
                else "| n/a "
            )
            + (
                f"| {statistics.median(errors):.2f} ({within}/{len(errors)}) "
                if errors
                else "| n/a "
            )
            + f"| {phase.goodput:,.0f} | {phase.goodput / capacity.goodput:.0%} |"
        )
    return "\n".join(rows)


def _commit() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, cwd=ROOT,
    ).stdout.strip()  # fmt: skip
    return f"{commit} with uncommitted changes" if dirty else commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=CPU_MAX_NUM_SEQS)
    parser.add_argument("--tokens", type=int, default=200, help="output tokens per request")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds, per call")
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 seqs, 64 tokens")
    args = parser.parse_args()
    if args.quick:
        args.model, args.max_num_seqs, args.tokens, args.deadline = "tiny", 16, 64, 60.0
    spec = ClusterSpec(
        model=str(MODELS[args.model]),
        ranks=args.ranks,
        listen=f"127.0.0.1:{free_port()}",
        rpc_port=free_ports(args.ranks),
        engine_flags=["--max-num-seqs", str(args.max_num_seqs)],
        log_dir=LOGS,
    )
    capacity_clients = args.ranks * args.max_num_seqs
    bound = 2 * capacity_clients  # --max-queue-per-rank defaults to --max-num-seqs
    with LocalCluster(spec).serving(timeout=600):
        capacity = asyncio.run(
            run_phase(spec.listen, "capacity", capacity_clients, args.tokens, args.deadline)
        )
        overload = asyncio.run(
            run_phase(spec.listen, "3x overload", 3 * bound, args.tokens, args.deadline)
        )
        floor = asyncio.run(refusal_floor(overload.clients))
        with spec.channel() as channel:
            ranks = ranks_pb2_grpc.RanksServiceStub(channel).ListRanks(ranks_pb2.ListRanksRequest())
    failed = sum(rank.failed for rank in ranks.ranks)
    handled = router_refusal_ms(LOGS / "router.log") or [float("nan")]
    now = datetime.datetime.now(datetime.UTC)
    text = (
        f"## Overload, {now:%Y-%m-%d %H:%M} UTC, commit {_commit()}, {platform.node()} "
        f"({len(os.sched_getaffinity(0))} cores)\n\n"
        f"{args.model}, {args.ranks} ranks, --max-num-seqs {args.max_num_seqs} "
        f"(admission bound {bound}), {args.tokens} output tokens a call, "
        f"{args.deadline:.0f} s deadlines; requests the ranks failed: {failed}; the router's "
        f"handler took {percentile(handled, 0.5):.2f} / {percentile(handled, 0.99):.2f} ms "
        f"(p50 / p99) over a refusal; in overload, {after_burst(overload)}; a bare grpc.aio "
        f"server refusing all {overload.clients} calls of the same burst answered them in "
        f"{percentile(floor, 0.5):.1f} / {percentile(floor, 0.99):.1f} ms (p50 / p99)\n\n"
        f"{table([capacity, overload], capacity)}\n"
    )
    print(text)
    out = ROOT / "bench" / "results" / f"{now:%Y-%m-%d}-overload.md"
    with out.open("a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
