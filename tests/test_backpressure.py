"""Bounded queues and deadline admission, on a cluster of their own whose
engines run two requests at once and whose ranks hold two more (a bound of
four requests per rank, eight in all), so the bounds are reached with a few
requests. Its engines run vLLM's priority scheduling, so that a request's
priority can be seen to reach them. The cluster runs the coupled topology
(one engine client for both ranks), so that the module's last test can kill
one of its engines: the coupled group must then fail fast instead of hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import grpc
import psutil
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tests.conftest import (
    LONG_TOKENS,
    engine_counts,
    failed_ranks,
    tiny_spec,
    wait_for_counts,
    wait_for_idle_engines,
)
from tests.test_failover import CUT_BOUND_S
from tools.local_cluster import LocalCluster

RUNNING, QUEUED = 2, 2
PRIORITY_SCHEDULING = ["--scheduling-policy", "priority"]
BOUND = RUNNING + QUEUED


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = tiny_spec(
        "backpressure",
        tmp_path_factory,
        engine_flags=["--max-num-seqs", str(RUNNING), *PRIORITY_SCHEDULING],
        router_flags=["--grace-period", "5", "--max-queue-per-rank", str(QUEUED)],
        topology="coupled",
    )
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


if TYPE_CHECKING:  # the async stub types exist only in the type stubs
    Stubs = tuple[
        generate_pb2_grpc.GenerateServiceAsyncStub,
        ranks_pb2_grpc.RanksServiceAsyncStub,
        health_pb2_grpc.HealthStub,
    ]


@pytest.fixture
async def stubs(small_cluster: LocalCluster) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(small_cluster.spec.listen) as channel:
        yield (
            generate_pb2_grpc.GenerateServiceStub(channel),
            ranks_pb2_grpc.RanksServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )
        await wait_for_idle_engines(ranks_pb2_grpc.RanksServiceStub(channel), timeout=30)


def request(
    tokens: int, rank: int | None = None, priority: int = 0
) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt="Count the sheep",
        data_parallel_rank=rank,
        priority=priority,
        sampling=generate_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
    )


def detail(error: grpc.aio.AioRpcError, kind: type[Message]) -> Message:
    """The error detail of type `kind` in the rich status trailer."""
    trailers: dict[str, bytes] = dict(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    found = kind()
    assert any(any_detail.Unpack(found) for any_detail in status.details), status
    return found


async def outcome(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError | int:  # type: ignore[type-arg]
    """The tokens a call streamed, or its error."""
    tokens = 0
    try:
        async for response in call:
            tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as e:
        return e
    return tokens


async def fill(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    rank: int,
    count: int = BOUND,
) -> list[grpc.aio.UnaryStreamCall]:  # type: ignore[type-arg]
    """`count` long requests pinned to `rank`, all counted on it."""
    calls = [generate.Generate(request(LONG_TOKENS, rank)) for _ in range(count)]
    await wait_for_counts(
        ranks, lambda counts: counts[rank][0] == count, f"rank {rank} holding {count}", 10.0
    )
    return calls


async def test_full_ranks_refuse_with_a_retry_delay(stubs: Stubs) -> None:
    generate, ranks, health = stubs
    held = await fill(generate, ranks, 0)
    try:
        refused = await outcome(generate.Generate(request(4, rank=0)))
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert f"rank 0 holds its limit of {BOUND} requests" in (refused.details() or "")
        retry = detail(refused, error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
        reason = detail(refused, error_details_pb2.ErrorInfo)
        assert isinstance(reason, error_details_pb2.ErrorInfo)
        assert reason.reason == "RANK_QUEUE_FULL"

        # A request free to go anywhere goes to the rank with room.
        call = generate.Generate(request(4))
        assert await outcome(call) == 4
        assert dict(await call.initial_metadata())["x-data-parallel-rank"] == "1"

        held += await fill(generate, ranks, 1)
        refused = await outcome(generate.Generate(request(4)))
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "every serving rank holds its limit" in (refused.details() or "")
        # Full is busy, not broken.
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert [flight for flight, _, _ in await engine_counts(ranks)] == [BOUND, BOUND]
    finally:
        for call in held:
            call.cancel()
    await wait_for_idle_engines(ranks, timeout=30)
    assert await outcome(generate.Generate(request(4))) == 4


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(stubs: Stubs) -> None:
    generate, ranks, _ = stubs
    # History for the estimate: the pace of a request on rank 0.
    for _ in range(2):
        assert await outcome(generate.Generate(request(2000, rank=0))) == 2000
    # Room for one more, behind two: the engine runs two at a time.
    held = await fill(generate, ranks, 0, count=BOUND - 1)
    try:
        before = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
        start = time.monotonic()
        refused = await outcome(generate.Generate(request(4, rank=0), timeout=0.5))
        elapsed = time.monotonic() - start
        assert isinstance(refused, grpc.aio.AioRpcError)
        # Load, not the request, fails it: told to come back when it could start.
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "ends before the request could finish on rank 0" in (refused.details() or "")
        reason = detail(refused, error_details_pb2.ErrorInfo)
        assert isinstance(reason, error_details_pb2.ErrorInfo)
        assert reason.reason == "DEADLINE_BEYOND_QUEUE"
        retry = detail(refused, error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        # Two requests of 15,000 tokens must end first: far more than the deadline.
        assert retry.retry_delay.ToTimedelta().total_seconds() > 5
        assert elapsed < 0.5
        after = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
        assert after.ranks[0].in_flight == BOUND - 1  # never counted on the rank
        assert after.ranks[0].cancelled == before.ranks[0].cancelled
        # The same deadline on a rank with room: a short request is served.
        assert await outcome(generate.Generate(request(4, rank=1), timeout=0.5)) == 4
    finally:
        for call in held:
            call.cancel()


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def test_load_at_eight_times_the_bound_loses_nothing(
    small_cluster: LocalCluster, stubs: Stubs
) -> None:
    """64 clients at once against room for 8: each is served or told to come
    back later, and told when; retrying as told, every one is served."""
    generate, ranks, _ = stubs
    router = small_cluster.router
    assert router is not None
    refusals: list[float] = []

    async def client(i: int) -> int:
        for _ in range(200):
            result = await outcome(generate.Generate(request(16)))
            if isinstance(result, int):
                return result
            assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result
            retry = detail(result, error_details_pb2.RetryInfo)
            assert isinstance(retry, error_details_pb2.RetryInfo)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
            refusals.append(delay)
            await asyncio.sleep(delay)
        raise AssertionError(f"client {i} was never served")

    sizes = []
    for _ in range(2):  # the second round: memory does not grow with the load
        async with asyncio.timeout(180):
            assert await asyncio.gather(*(client(i) for i in range(64))) == [16] * 64
        await wait_for_idle_engines(ranks, timeout=30)
        sizes.append(rss_mb(router.pid))
    assert refusals, "the load never reached the bound"
    assert all(0 < delay <= 30 for delay in refusals)
    assert sizes[1] - sizes[0] < 50, sizes


# Long enough (a few seconds) that reading a stream a little late says nothing of the wait.
OVERLOAD_TOKENS = 1000


async def timed_outcome(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
) -> tuple[grpc.aio.AioRpcError | int, float]:
    """The call's outcome and when it ended (monotonic)."""
    result = await outcome(call)
    return result, time.monotonic()


async def test_three_times_the_bound_sheds_at_once_and_every_admitted_call_completes(
    small_cluster: LocalCluster, stubs: Stubs
) -> None:
    """24 calls at once, each with a deadline, against room for 8: each ends OK
    or RESOURCE_EXHAUSTED (none cancelled, none past its deadline, no rank
    failed), every refusal comes at once with a retry delay close to the
    real wait for its turn at a slot, and every admitted call completes."""
    generate, ranks, _ = stubs
    bound = 2 * BOUND
    # The ranks' pace, at the concurrency they run under load.
    warm = [generate.Generate(request(OVERLOAD_TOKENS), timeout=60) for _ in range(bound)]
    assert await asyncio.gather(*map(outcome, warm)) == [OVERLOAD_TOKENS] * bound
    await wait_for_idle_engines(ranks, timeout=30)
    start = time.monotonic()
    calls = [generate.Generate(request(OVERLOAD_TOKENS), timeout=60) for _ in range(3 * bound)]
    ended = await asyncio.gather(*map(timed_outcome, calls))
    served = [end for result, end in ended if result == OVERLOAD_TOKENS]
    refusals = [(result, end) for result, end in ended if isinstance(result, grpc.aio.AioRpcError)]
    assert len(served) + len(refusals) == len(calls), [r for r, _ in ended]
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r, _ in refusals), refusals
    assert len(served) >= bound
    latencies = sorted(end - start for _, end in refusals)
    # The real wait: refused clients get successive turns, so the k-th
    # refused waits for the k-th slot to free (an admitted call to end).
    refusals.sort(key=lambda refusal: refusal[1])
    turns = sorted(done for done in served if done > refusals[-1][1])
    errors = []
    for (refused, end), turn in zip(refusals, turns, strict=False):
        retry = detail(refused, error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        errors.append(delay / (turn - end))
    errors.sort()
    print(f"refusals: {len(refusals)}, latency max {latencies[-1] * 1000:.0f} ms; "
          f"retry delay / real wait: min {errors[0]:.2f} median {errors[len(errors) // 2]:.2f} "
          f"max {errors[-1]:.2f}")  # fmt: skip
    assert latencies[-1] < 1.0, latencies
    assert 0.5 <= errors[len(errors) // 2] <= 2.0, errors
    failed = [rank.failed for rank in (await ranks.ListRanks(ranks_pb2.ListRanksRequest())).ranks]
    assert failed == [0, 0]


async def wait_for_rank_0(
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub, waiting: int, running: int
) -> None:
    """Until rank 0's engine reports these counts."""
    await wait_for_counts(
        ranks,
        lambda counts: counts[0][1:] == (waiting, running),
        f"rank 0 with {waiting} waiting and {running} running",
        10.0,
    )


async def test_a_request_of_higher_priority_starts_before_an_earlier_one(stubs: Stubs) -> None:
    """Both slots busy, a request of priority 5 waits, then one of priority -5
    (lower runs first). The first slot to free goes to the second: first
    come, first served, as when the priority is lost, would give it to the first."""
    generate, ranks, _ = stubs
    busy = [generate.Generate(request(tokens, rank=0)) for tokens in (300, 1500)]
    await wait_for_rank_0(ranks, waiting=0, running=2)
    low = generate.Generate(request(8, rank=0, priority=5))
    await wait_for_rank_0(ranks, waiting=1, running=2)
    high = generate.Generate(request(8, rank=0, priority=-5))
    await wait_for_rank_0(ranks, waiting=2, running=2)
    started: dict[str, float] = {}

    async def first_token(
        name: str,
        call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    ) -> None:
        async for response in call:
            if response.token_ids:
                started.setdefault(name, time.monotonic())

    async with asyncio.timeout(60):
        await asyncio.gather(
            first_token("low", low), first_token("high", high), *map(outcome, busy)
        )
    assert started["high"] < started["low"], started


async def test_a_killed_engine_of_the_coupled_group_fails_fast(
    small_cluster: LocalCluster,
) -> None:
    """Last: it breaks the cluster. vLLM's coupled client hangs the requests
    of a killed engine; the router ends them at once, and the other rank
    (dense-model ranks do not step together) serves on."""
    async with grpc.aio.insecure_channel(small_cluster.spec.listen) as channel:
        generate = generate_pb2_grpc.GenerateServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        doomed = [generate.Generate(request(LONG_TOKENS, rank=1)) for _ in range(2)]
        spared = [generate.Generate(request(300, rank=0)) for _ in range(2)]
        for call in [*doomed, *spared]:
            assert isinstance(await call.read(), generate_pb2.GenerateResponse)
        small_cluster.engine_process(1).kill()  # kill -9
        killed = time.monotonic()
        for call in doomed:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(CUT_BOUND_S):
                    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                        pass
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        ended_after = time.monotonic() - killed
        for call in spared:
            async with asyncio.timeout(60):
                while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass
            assert await call.code() == grpc.StatusCode.OK
        check = health.Check
        assert (await check(health_pb2.HealthCheckRequest(service="rank/1"))).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert (await check(health_pb2.HealthCheckRequest(service=""))).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        call = generate.Generate(request(4))
        assert await outcome(call) == 4
        assert dict(await call.initial_metadata())["x-data-parallel-rank"] == "0"
    print(f"coupled group: the killed rank's streams ended {ended_after:.2f} s after the kill")
    # Its engine's vitals kept rank 0, whose connection was shared with the dead one, serving.
    assert failed_ranks(small_cluster) == [1]
