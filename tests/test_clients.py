"""The SDKs against the live router: the Python clients (sync and async), and
the example of every language (Python, Go, TypeScript, C++), each run for
real: it streams a completion, reads the served rank and checks Health."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter import Client
from dprouter.aio import AsyncClient
from dprouter.v1 import generate_pb2
from tests.conftest import ROOT
from tools.local_cluster import LocalCluster

PROMPT = "The capital of France is"
# What every example asks for: 8 greedy tokens, past EOS.
EXAMPLE_SAMPLING = generate_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
EXAMPLES = {
    "python": [sys.executable, "-m", "clients.python.generate"],
    "go": [str(ROOT / "build/go/generate")],
    "typescript": ["node", str(ROOT / "clients/ts/dist/generate.js")],
    "cpp": [str(ROOT / "build/cpp/generate")],
}
EXAMPLE_OUTPUT = re.compile(
    r"rank: (?P<rank>\d+) \(x-data-parallel-rank: (?P<header_rank>\d+), x-route-reason: \w+\)\n"
    r"(?P<text>.*)\n"
    r"finish: LENGTH, 8 tokens\n"
    r"health: SERVING \(rank/(?P<health_rank>\d+): SERVING\)\n",
    re.DOTALL,
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def greedy_text(cluster: LocalCluster) -> str:
    """The examples' completion, from Complete."""
    with Client(cluster.spec.listen) as client:
        response, _ = client.complete(PROMPT, sampling=EXAMPLE_SAMPLING)
    return response.choices[0].text


@pytest.mark.parametrize("language", EXAMPLES)
def test_example_streams_reads_the_rank_and_checks_health(
    cluster: LocalCluster, greedy_text: str, language: str
) -> None:
    command = EXAMPLES[language]
    assert Path(command[-1]).exists() or language == "python", "build it first: make examples"
    result = subprocess.run(
        [*command, cluster.spec.listen, PROMPT],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = EXAMPLE_OUTPUT.fullmatch(result.stdout)
    assert match, result.stdout
    assert match["rank"] == match["header_rank"] == match["health_rank"]
    assert int(match["rank"]) in (0, 1)
    assert match["text"] == greedy_text


def test_sync_client_streams_pins_and_surfaces_the_route(cluster: LocalCluster) -> None:
    with Client(cluster.spec.listen, timeout=60) as client:
        stream = client.generate(
            PROMPT, sampling=EXAMPLE_SAMPLING, rank=1, request_id="sync-1", traceparent=TRACEPARENT
        )
        responses = list(stream)
        route = stream.route()
        assert responses[0].data_parallel_rank == 1 and responses[0].request_id == "sync-1"
        assert responses[-1].usage.completion_tokens == 8
        assert (route.rank, route.policy, route.request_id) == (1, "pin", "sync-1")
        assert route.trace_id == TRACE_ID

        chat = [generate_pb2.ChatMessage(role="user", content="Hi")]
        response, route = client.complete(chat, sampling=EXAMPLE_SAMPLING, session="u1")
        assert response.data_parallel_rank == route.rank
        assert route.policy == "affinity"
        assert client.health() == "SERVING" and client.health("rank/1") == "SERVING"
        assert [r.rank for r in client.ranks()] == [0, 1]


async def test_async_client_streams_completes_and_watches(cluster: LocalCluster) -> None:
    async with AsyncClient(cluster.spec.listen, timeout=60) as client:
        stream = client.generate(PROMPT, sampling=EXAMPLE_SAMPLING, rank=0)
        texts = [response.text async for response in stream]
        route = await stream.route()
        assert route.rank == 0 and route.policy == "pin" and route.request_id
        response, complete_route = await client.complete(PROMPT, sampling=EXAMPLE_SAMPLING, rank=0)
        assert response.choices[0].text == "".join(texts)
        assert complete_route.rank == 0
        watch = client.watch_health("rank/0")
        assert await anext(watch) == "SERVING"
        await watch.aclose()
        assert [r.rank for r in await client.ranks()] == [0, 1]


async def test_a_deadline_ends_a_long_generation(cluster: LocalCluster) -> None:
    sampling = generate_pb2.SamplingParams(max_tokens=4000, ignore_eos=True)
    async with AsyncClient(cluster.spec.listen, timeout=60) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in client.generate(PROMPT, sampling=sampling, timeout=0.5):
                pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


class FlakyHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """A Health server that is UNAVAILABLE for its first `failures` calls, like a
    router whose ranks have not joined yet."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "ranks not joined yet")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def flaky_health_server(failures: int) -> Iterator[tuple[str, FlakyHealth]]:
    servicer = FlakyHealth(failures)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_sync_client_retries_unavailable() -> None:
    with flaky_health_server(failures=2) as (address, servicer), Client(address) as client:
        assert client.health() == "SERVING"
    assert servicer.calls == 3


async def test_async_client_retries_unavailable() -> None:
    with flaky_health_server(failures=2) as (address, servicer):
        async with AsyncClient(address) as client:
            assert await client.health() == "SERVING"
    assert servicer.calls == 3


def test_one_attempt_does_not_retry() -> None:
    with (
        flaky_health_server(failures=2) as (address, servicer),
        Client(address, attempts=1) as client,
        pytest.raises(grpc.RpcError) as raised,
    ):
        client.health()
    assert isinstance(raised.value, grpc.Call)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 1
