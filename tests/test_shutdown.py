"""SIGTERM drains the router: Health turns NOT_SERVING, new requests get
UNAVAILABLE, the in-flight stream finishes, then the process exits cleanly.
It stops the shared router, so it runs last."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from server.local_cluster import LocalCluster
from tests.conftest import GRACE_PERIOD_S

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Long enough to be running at SIGTERM even after a machine stall; short enough
# to finish within the grace period.
DRAIN_TOKENS = 6000


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
