"""The standard Health service (Check, Watch; overall, per service, per rank)
and server reflection, used by the real grpcurl with no .proto files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.local_cluster import LocalCluster

SERVING = health_pb2.HealthCheckResponse.SERVING
GRPCURL = str(Path(__import__("sys").executable).parent / "grpcurl")


@pytest.mark.parametrize("service", ["", "dprouter.v1.GenerateService", "rank/0", "rank/1"])
async def test_health_check_serving(channel: grpc.aio.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == SERVING


async def test_health_check_unknown_name(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="rank/9"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_sends_the_current_status(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    call = health.Watch(health_pb2.HealthCheckRequest(service="rank/1"))
    first = await call.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == SERVING
    call.cancel()


def grpcurl(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reflection_lists_and_describes_services(cluster: LocalCluster) -> None:
    services = grpcurl(cluster, cluster.spec.listen, "list").split()
    assert {
        "dprouter.v1.GenerateService",
        "dprouter.v1.RanksService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    # Per symbol, names its description must show.
    expected = {
        "dprouter.v1.SamplingParams": ["max_tokens", "repetition_penalty"],
        "dprouter.v1.GenerateRequest": [
            "prompt_token_ids", "messages", "sampling", "data_parallel_rank", "session_key",
        ],
        "dprouter.v1.GenerateResponse": [
            "text", "token_ids", "finish_reason", "usage", "data_parallel_rank", "request_id",
        ],
        "dprouter.v1.GenerateService": [
            "rpc Generate", "returns ( stream .dprouter.v1.GenerateResponse )", "rpc Complete",
        ],
        "dprouter.v1.RanksService": [
            "rpc ListRanks", "rpc DrainRank", "rpc ResumeRank", "rpc ExplainRoute",
        ],
    }  # fmt: skip
    for symbol, names in expected.items():
        described = grpcurl(cluster, cluster.spec.listen, "describe", symbol)
        assert [name for name in names if name not in described] == [], described


def test_grpcurl_generate_and_health_without_protos(cluster: LocalCluster) -> None:
    request = json.dumps(
        {"prompt": "Hello", "sampling": {"maxTokens": 5, "temperature": 0}, "dataParallelRank": 1}
    )
    out = grpcurl(
        cluster, "-d", request, cluster.spec.listen, "dprouter.v1.GenerateService/Generate"
    )
    chunks = [json.loads(c) for c in out.replace("}\n{", "}\x00{").split("\x00")]
    assert chunks[0]["data_parallel_rank"] == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    health = grpcurl(cluster, "-d", '{"service": "rank/0"}', cluster.spec.listen,
                     "grpc.health.v1.Health/Check")  # fmt: skip
    assert json.loads(health)["status"] == "SERVING"
