"""The test session: a real OTLP receiver, two real rank servers and a real
router (tiny model), started once and shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from dprouter.v1 import generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tools.local_cluster import (
    ClusterSpec,
    LocalCluster,
    free_port,
    free_ports,
)

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama"
SMOLLM2_MODEL = ROOT / "models" / "smollm2-135m-instruct"
# Long enough that a long generation outlasts the multi-second whole-machine
# stalls seen on these 2-core machines (tests that cancel must not race it).
TINY_MAX_MODEL_LEN = 16384
# Greedy tokens that take the tiny model well over 20 s.
LONG_TOKENS = 15000
GRACE_PERIOD_S = 60
# Engine flags for every cluster of the run, after the platform's and before
# a test's own: e.g. a memory share where the suite runs on one GPU.
ENGINE_FLAGS_GIVEN = shlex.split(os.environ.get("DPROUTER_TEST_ENGINE_FLAGS", ""))


def tiny_spec(
    name: str,
    tmp_path_factory: pytest.TempPathFactory,
    ranks: int = 2,
    router_flags: Sequence[str] = (),
    engine_flags: Sequence[str] = (),
    **fields: Any,
) -> ClusterSpec:
    """A cluster of the tiny model, its logs in a folder named `name`."""
    logs = os.environ.get("DPROUTER_TEST_LOGS")
    return ClusterSpec(
        model=str(TINY_MODEL),
        ranks=ranks,
        listen=f"127.0.0.1:{free_port()}",
        rpc_port=free_ports(ranks),
        max_model_len=TINY_MAX_MODEL_LEN,
        router_flags=list(router_flags),
        engine_flags=[*ENGINE_FLAGS_GIVEN, *engine_flags],
        log_dir=Path(logs) / name if logs else tmp_path_factory.mktemp(name),
        **fields,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `last` stop the shared router, so they run after the rest."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self._spans: list[trace_pb2.Span] = []
        self._lock = threading.Lock()

    def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return list(self._spans)


def otlp_env(port: int) -> dict[str, str]:
    """A router's environment for exporting its spans to the receiver on `port`."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[tuple[OtlpReceiver, int]]:
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        receiver, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


@pytest.fixture(scope="session")
def metrics_url() -> str:
    """Where the session router serves its Prometheus metrics."""
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="session")
def cluster(
    otlp_receiver: tuple[OtlpReceiver, int],
    metrics_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalCluster]:
    _, otlp_port = otlp_receiver
    metrics_listen = metrics_url.removeprefix("http://").removesuffix("/metrics")
    spec = tiny_spec(
        "logs",
        tmp_path_factory,
        router_flags=["--grace-period", str(GRACE_PERIOD_S), "--metrics-listen", metrics_listen],
        env=otlp_env(otlp_port),
    )
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


# The default model's ranks run this many requests at once (a full context
# each fits their KV cache).
SMOLLM2_MAX_NUM_SEQS = 4
SMOLLM2_CONTEXT = 2048  # make run's --max-model-len


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two ranks of the default model of `make run`, at its context of 2,048
    tokens: a full-context prompt is one engine step of seconds here, and a
    step may hold as many as the engine runs (its token budget)."""
    spec = ClusterSpec(
        model=str(SMOLLM2_MODEL),
        listen=f"127.0.0.1:{free_port()}",
        rpc_port=free_ports(2),
        engine_flags=[
            *ENGINE_FLAGS_GIVEN,
            *("--max-num-seqs", str(SMOLLM2_MAX_NUM_SEQS)),
            *("--max-num-batched-tokens", str(SMOLLM2_MAX_NUM_SEQS * SMOLLM2_CONTEXT)),
        ],
        log_dir=Path(tmp_path_factory.mktemp("smollm2-logs")),
    )
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


@pytest.fixture
async def channel(cluster: LocalCluster) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(cluster.spec.listen) as channel:
        yield channel


@pytest.fixture
def generate(channel: grpc.aio.Channel) -> generate_pb2_grpc.GenerateServiceAsyncStub:
    return generate_pb2_grpc.GenerateServiceStub(channel)


@pytest.fixture
def ranks(channel: grpc.aio.Channel) -> ranks_pb2_grpc.RanksServiceAsyncStub:
    return ranks_pb2_grpc.RanksServiceStub(channel)


Counts = list[tuple[int, int, int]]  # per rank: (in flight, waiting, running)


async def engine_counts(ranks: ranks_pb2_grpc.RanksServiceAsyncStub) -> Counts:
    """Per rank: (router in-flight, engine waiting, engine running)."""
    reply = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
    return [(r.in_flight, r.waiting, r.running) for r in reply.ranks]


async def wait_for_counts(
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    reached: Callable[[Counts], bool],
    what: str,
    timeout: float,
) -> None:
    """Polls `engine_counts` until `reached` holds; fails naming `what`."""
    start = time.monotonic()
    while True:
        counts = await engine_counts(ranks)
        if reached(counts):
            return
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached after {timeout} s: {counts}")
        await asyncio.sleep(0.05)


def failed_ranks(cluster: LocalCluster) -> list[int]:
    """The ranks the cluster's router found unhealthy, once per failure, from its log."""
    assert cluster.spec.log_dir is not None
    lines = (cluster.spec.log_dir / "router.log").read_text(errors="replace").splitlines()
    events = [json.loads(line) for line in lines if '"rank unhealthy' in line]
    return [event["rank"] for event in events]


async def wait_for_idle_engines(
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub, timeout: float
) -> None:
    """Waits until every engine reports no waiting or running request and the
    router has none in flight. An engine reports as it steps; while its last
    report shows requests, the router's probes make it step every second."""

    def idle(counts: Counts) -> bool:
        return not any(flight + waiting + running for flight, waiting, running in counts)

    await wait_for_counts(ranks, idle, "idle engines", timeout)
