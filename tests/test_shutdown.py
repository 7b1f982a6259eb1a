"""SIGTERM drains the router: Health turns NOT_SERVING, new requests get
UNAVAILABLE, the in-flight stream finishes (or is cut off at the end of the
grace period), then the process exits cleanly. The first test stops the shared
router, so it runs last; the second needs a router with a short grace period,
so it starts a cluster of its own (one rank: ~40 s)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from tests.conftest import GRACE_PERIOD_S, LONG_TOKENS, tiny_spec
from tools.local_cluster import LocalCluster

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Long enough to be running at SIGTERM even after a machine stall; short enough
# to finish within the grace period.
DRAIN_TOKENS = 6000
# Far shorter than a LONG_TOKENS generation (over 20 s).
SHORT_GRACE_S = 5.0


@pytest.mark.last
async def test_sigterm_drains_in_flight_streams(
    cluster: LocalCluster,
    channel: grpc.aio.Channel,
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    assert cluster.router is not None
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    long = generate.Generate(
        generate_pb2.GenerateRequest(
            prompt="a long answer",
            sampling=generate_pb2.SamplingParams(
                max_tokens=DRAIN_TOKENS, temperature=0, ignore_eos=True
            ),
        )
    )
    first = await long.read()
    assert isinstance(first, generate_pb2.GenerateResponse)
    cluster.router.send_signal(signal.SIGTERM)
    assert (await watch.read()).status == NOT_SERVING
    assert (
        await health.Check(health_pb2.HealthCheckRequest(service="rank/0"))
    ).status == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in generate.Generate(generate_pb2.GenerateRequest(prompt="late")):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    responses = [first]
    while (response := await long.read()) != grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(response, generate_pb2.GenerateResponse)
        responses.append(response)
    assert responses[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == DRAIN_TOKENS
    code = await asyncio.to_thread(cluster.router.wait, GRACE_PERIOD_S + 30)
    assert code == 0


@pytest.fixture
def short_grace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One rank behind a router that drains for SHORT_GRACE_S."""
    spec = tiny_spec(
        "short-grace", tmp_path_factory, ranks=1,
        router_flags=["--grace-period", str(SHORT_GRACE_S)],
    )  # fmt: skip
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


async def test_sigterm_cuts_off_a_stream_that_outlasts_the_grace_period(
    short_grace: LocalCluster,
) -> None:
    router = short_grace.router
    assert router is not None
    async with grpc.aio.insecure_channel(short_grace.spec.listen) as channel:
        long = generate_pb2_grpc.GenerateServiceStub(channel).Generate(
            generate_pb2.GenerateRequest(
                prompt="a long answer",
                sampling=generate_pb2.SamplingParams(
                    max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True
                ),
            )
        )
        assert isinstance(await long.read(), generate_pb2.GenerateResponse)
        router.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        tokens = 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while (response := await long.read()) != grpc.aio.EOF:  # type: ignore[attr-defined]
                assert isinstance(response, generate_pb2.GenerateResponse)
                assert not response.finish_reason
                tokens += len(response.token_ids)
        cut_after = time.monotonic() - signalled
    print(f"\ncut off {cut_after:.1f} s after SIGTERM with {raised.value.code()}"
          f" ({raised.value.details()}), {tokens} tokens after it")  # fmt: skip
    # gRPC's own status for the calls a stopping server cancels.
    # The router's own status, not gRPC's "Cancelling all calls" at its stop.
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert "grace period is over" in str(raised.value.details()), raised.value
    # Drained for the grace period, then stopped within its own 1 s grace.
    assert SHORT_GRACE_S <= cut_after < SHORT_GRACE_S + 10
    assert await asyncio.to_thread(router.wait, 30) == 0
