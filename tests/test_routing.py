"""Routing on the real engines with the default (affinity) policy: session
stickiness, prefix-cache hits confirmed by vLLM, spill under load, pins,
drain and resume, and ExplainRoute agreeing with what Generate does."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router.policies import SessionAffinity
from tests.conftest import LONG_TOKENS, wait_for_idle_engines

# vLLM's KV block size on CPU: its prefix cache reuses whole blocks of this many tokens.
BLOCK = 128
Metadata = Sequence[tuple[str, str]]


def token_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(length)]


def request(
    prompt: list[int] | str, max_tokens: int = 4, **fields: object
) -> generate_pb2.GenerateRequest:
    sampling = generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if isinstance(prompt, str):
        return generate_pb2.GenerateRequest(prompt=prompt, sampling=sampling, **fields)  # type: ignore[arg-type]
    return generate_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling, **fields)  # type: ignore[arg-type]


async def routed(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    req: generate_pb2.GenerateRequest,
    metadata: Metadata = (),
) -> tuple[list[generate_pb2.GenerateResponse], dict[str, str]]:
    """The whole stream and the response metadata that says where it went and why."""
    responses, initial, _ = await routed_and_served(generate, req, metadata)
    return responses, initial


async def routed_and_served(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    req: generate_pb2.GenerateRequest,
    metadata: Metadata = (),
) -> tuple[list[generate_pb2.GenerateResponse], dict[str, str], dict[str, str]]:
    """As `routed`, and the trailers: they name the rank that served the
    request, which a retry after a rank failure makes another."""
    call = generate.Generate(req, metadata=metadata)
    responses = [r async for r in call]
    initial = await call.initial_metadata()
    trailers = await call.trailing_metadata()
    return responses, {k: str(v) for k, v in initial}, {k: str(v) for k, v in trailers}


def route_of(metadata: dict[str, str]) -> tuple[int, str, str]:
    return (
        int(metadata["x-data-parallel-rank"]),
        metadata["x-route-policy"],
        metadata["x-route-reason"],
    )


async def explain(
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    req: generate_pb2.GenerateRequest,
    metadata: Metadata = (),
) -> ranks_pb2.ExplainRouteResponse:
    reply: ranks_pb2.ExplainRouteResponse = await ranks.ExplainRoute(
        ranks_pb2.ExplainRouteRequest(request=req), metadata=metadata
    )
    return reply


async def test_a_session_key_keeps_its_requests_on_one_rank(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    homes: dict[str, int] = {}
    for i in range(12):
        key = f"conversation-{i}"
        seen = set()
        for turn in range(3):
            _, metadata = await routed(generate, request(f"turn {turn} of {key}", session_key=key))
            rank, policy, reason = route_of(metadata)
            assert (policy, reason) == ("affinity", "session_home")
            seen.add(rank)
        assert len(seen) == 1, (key, seen)
        homes[key] = seen.pop()
    assert set(homes.values()) == {0, 1}, homes


def keys_homed_on(rank: int, count: int) -> list[str]:
    """Session keys whose ring home is `rank` (as the router's own policy computes it)."""
    ring = SessionAffinity(2)
    keys = (f"key-{i}" for i in range(1000))
    return [k for k in keys if next(ring.ring_walk(k)) == rank][:count]


async def test_a_shared_prefix_goes_to_the_rank_that_cached_it(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    for system in range(4):
        # The first request of a conversation carries a session key homed on
        # rank system % 2; the rest carry none and follow the cached prefix.
        home = system % 2
        key = keys_homed_on(home, 4)[system]
        prefix = token_prompt(1000 + system, 3 * BLOCK)
        first = request([*prefix, *token_prompt(system, 9)], session_key=key)
        _, metadata = await routed(generate, first)
        assert route_of(metadata) == (home, "affinity", "session_home")
        for turn in range(2):
            follow_up = request([*prefix, *token_prompt(100 * system + turn, 20)])
            responses, metadata = await routed(generate, follow_up)
            assert route_of(metadata) == (home, "affinity", "prefix_hit")
            # vLLM itself reports the prefix as served from its cache.
            assert responses[-1].usage.cached_tokens == 3 * BLOCK
        # The other rank never saw the prefix: pinned there, nothing is cached.
        pinned = request([*prefix, 5], data_parallel_rank=1 - home)
        responses, metadata = await routed(generate, pinned)
        assert route_of(metadata) == (1 - home, "pin", "data_parallel_rank")
        assert responses[-1].usage.cached_tokens == 0
    # With no key and no cached prefix, a request is a miss.
    _, metadata = await routed(generate, request(token_prompt(99, 2 * BLOCK)))
    assert route_of(metadata)[1:] == ("affinity", "prefix_miss")


@pytest.fixture
async def long_streams(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> AsyncIterator[list[grpc.aio.UnaryStreamCall]]:  # type: ignore[type-arg]
    """Streams that the test starts and this fixture cancels, whatever happens."""
    calls: list[grpc.aio.UnaryStreamCall] = []  # type: ignore[type-arg]
    yield calls
    for call in calls:
        call.cancel()
    await wait_for_idle_engines(ranks, timeout=60)


async def test_a_hot_session_spills_to_the_other_rank_past_the_load_bound(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    long_streams: list[grpc.aio.UnaryStreamCall],  # type: ignore[type-arg]
) -> None:
    await wait_for_idle_engines(ranks, timeout=60)
    routes = []
    for i in range(4):
        call = generate.Generate(request(f"hot {i}", max_tokens=LONG_TOKENS, session_key="hot"))
        long_streams.append(call)
        # The headers come once the request is routed. (Not the first token: a
        # stream's messages were once all delivered at its end on this machine.)
        routes.append(route_of({k: str(v) for k, v in await call.initial_metadata()}))
    home = routes[0][0]
    # The bound is ceil(1.25 * (in flight + 1) / 2): the third concurrent
    # request of the session would put 3 on its home rank, over the bound of 2.
    assert [(rank, reason) for rank, _, reason in routes] == [
        (home, "session_home"),
        (home, "session_home"),
        (1 - home, "session_spill"),
        (home, "session_home"),
    ]
    in_flight = [r.in_flight for r in (await ranks.ListRanks(ranks_pb2.ListRanksRequest())).ranks]
    assert in_flight[home] == 3 and in_flight[1 - home] == 1
    # Explain sees the same bound: a fifth request would fit at home (3 + 1 <= 4).
    explained = await explain(ranks, request("hot 5", session_key="hot"))
    assert (explained.rank, explained.reason, explained.affinity_rank) == (
        home, "session_home", home,
    )  # fmt: skip
    assert [s.within_load_bound for s in explained.scores] == [True, True]


async def test_list_ranks_shows_what_each_engine_reports(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    """The engine's own running count (sent with its outputs), not only the
    router's in-flight count, reaches the loads the policies score."""
    streams = [
        generate.Generate(request(f"counted {i}", max_tokens=2000, data_parallel_rank=1))
        for i in range(2)
    ]
    try:
        for stream in streams:
            assert isinstance(await stream.read(), generate_pb2.GenerateResponse)
        await streams[0].read()  # a step after both have started
        listed = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
        busy = listed.ranks[1]
        assert (busy.in_flight, busy.running, busy.waiting) == (2, 2, 0)
        assert busy.kv_cache_usage > 0
    finally:
        for stream in streams:
            stream.cancel()
    await wait_for_idle_engines(ranks, timeout=30)
    idle = (await ranks.ListRanks(ranks_pb2.ListRanksRequest())).ranks[1]
    assert (idle.in_flight, idle.running, idle.waiting) == (0, 0, 0)


async def test_drain_and_resume_a_rank(
    channel: grpc.aio.Channel,
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="rank/1"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    # Long enough (5-10 s here) to be running still when the drain is done:
    # 300 tokens had all streamed before the drain on a fast run.
    running = generate.Generate(request("drain me", max_tokens=2000, data_parallel_rank=1))
    first = await running.read()
    assert isinstance(first, generate_pb2.GenerateResponse)
    try:
        drained = await ranks.DrainRank(ranks_pb2.DrainRankRequest(rank=1))
        assert drained.status.state == ranks_pb2.RANK_STATE_DRAINING
        assert drained.status.in_flight == 1
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING

        for i in range(6):  # new requests, keyed or not, all go to rank 0
            key = f"s{i}" if i % 2 else ""
            _, metadata = await routed(generate, request(f"while draining {i}", session_key=key))
            assert route_of(metadata)[0] == 0
        pins: list[tuple[generate_pb2.GenerateRequest, Metadata, str]] = [
            (request("x", data_parallel_rank=1), (), "data_parallel_rank"),
            (request("x"), (("x-data-parallel-rank", "1"),), "x-data-parallel-rank"),
        ]
        for pinned, pin_metadata, field in pins:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await routed(generate, pinned, pin_metadata)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == f"{field}: rank 1 is draining"

        # The stream that was running when the drain began finishes.
        rest = []
        while (response := await running.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            assert isinstance(response, generate_pb2.GenerateResponse)
            rest.append(response)
        assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 2000
        listed = (await ranks.ListRanks(ranks_pb2.ListRanksRequest())).ranks[1]
        assert (listed.state, listed.in_flight) == (ranks_pb2.RANK_STATE_DRAINING, 0)
    finally:
        resumed = await ranks.ResumeRank(ranks_pb2.ResumeRankRequest(rank=1))
    assert resumed.status.state == ranks_pb2.RANK_STATE_SERVING
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    _, metadata = await routed(generate, request("back", data_parallel_rank=1))
    assert route_of(metadata)[0] == 1

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await ranks.DrainRank(ranks_pb2.DrainRankRequest(rank=2))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details() == "rank: rank 2 is outside [0, 2)"


async def test_explain_route_agrees_with_the_rank_generate_chooses(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    shared = token_prompt(77, 2 * BLOCK)
    # Each request, its metadata, and whether it goes to its affinity home.
    cases: list[tuple[generate_pb2.GenerateRequest, Metadata, bool]] = [
        (request("plain one"), (), False),  # no whole block, no key
        (request("plain two"), (), False),
        (request("keyed", session_key="explain-a"), (), True),  # the ring fixes its home
        (request("keyed again", session_key="explain-a"), (), True),
        (request([*shared, 1]), (), False),  # a fresh prefix
        (request([*shared, 2]), (), True),  # a prefix hit
        (request("pinned"), (("x-data-parallel-rank", "1"),), False),
        (request("pinned", data_parallel_rank=0), (), False),
    ]
    reasons = set()
    for req, metadata, affinity_hit in cases:
        # Idle engines: the loads (and so the choice) hold still between the calls.
        await wait_for_idle_engines(ranks, timeout=60)
        explained = await explain(ranks, req, metadata)
        again = await explain(ranks, req, metadata)
        assert again == explained  # a dry run changes nothing
        _, served = await routed(generate, req, metadata)
        assert route_of(served) == (explained.rank, explained.policy, explained.reason)
        assert explained.prompt_tokens > 0 and len(explained.scores) == 2
        assert explained.affinity_hit is affinity_hit, (req, explained)
        reasons.add(explained.reason)
    assert {"session_home", "prefix_hit", "data_parallel_rank", "x-data-parallel-rank"} <= reasons
    hit = await explain(ranks, request([*shared, 3]))
    assert hit.affinity_hit and hit.prefix_match_tokens == 2 * BLOCK
    assert {s.rank: s.prefix_match_tokens for s in hit.scores}[hit.rank] == 2 * BLOCK


async def test_explain_route_rejects_bad_requests_like_generate(
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    bad = generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(top_p=0))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await explain(ranks, bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(raised.value.details()).startswith("request.sampling.top_p: ")
