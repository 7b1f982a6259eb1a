"""A rank that hangs, dies or is cut off: detection within 5 s, failover,
re-admission.

These tests break ranks on purpose, so they run on a cluster of their own
(independent topology, tiny model), started for this module only. Its rank 1
runs in a network namespace of its own, joined to this one by a veth pair,
as if on another host: cutting that link is a network partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tests.conftest import LONG_TOKENS, OtlpReceiver, failed_ranks, otlp_env, tiny_spec
from tests.test_routing import keys_homed_on, request, route_of, routed, routed_and_served
from tests.test_tracing import ERROR, attributes, wait_for_attempts, wait_for_span
from tools.local_cluster import LocalCluster

DETECTION_BOUND_S = 5.0
CUT_BOUND_S = DETECTION_BOUND_S + 5
KILL_BOUND_S = 1.0
STOPPED_ENGINE_BOUND_S = 2.0
# The ranks the tests broke on purpose, one entry per break.
BROKEN: list[int] = []
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class OtherHost:
    namespace: str
    router_address: str  # this side of the link, where the ranks connect
    link: str  # this side's interface: down is a partition

    def set_link(self, up: bool) -> None:
        ip("link", "set", self.link, "up" if up else "down")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def other_host() -> Iterator[OtherHost]:
    """A network namespace joined to this one by a veth pair (needs root)."""
    tag = f"dpr{os.getpid() % 100000}"
    host_side, far_side = f"{tag}h", f"{tag}n"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
    ip("netns", "add", tag)
    try:
        ip("link", "add", host_side, "type", "veth", "peer", "name", far_side, "netns", tag)
        ip("addr", "add", f"{subnet}.1/24", "dev", host_side)
        ip("link", "set", host_side, "up")
        for args in (
            ("addr", "add", f"{subnet}.2/24", "dev", far_side),
            ("link", "set", far_side, "up"),
            ("link", "set", "lo", "up"),
        ):
            ip("netns", "exec", tag, "ip", *args)
        yield OtherHost(tag, f"{subnet}.1", host_side)
    finally:
        subprocess.run(["ip", "link", "del", host_side], capture_output=True)
        ip("netns", "del", tag)


@pytest.fixture(scope="module")
def far_rank() -> Iterator[OtherHost]:
    with other_host() as host:
        yield host


@pytest.fixture(scope="module")
def broken_cluster(
    far_rank: OtherHost,
    tmp_path_factory: pytest.TempPathFactory,
    otlp_receiver: tuple[OtlpReceiver, int],
) -> Iterator[LocalCluster]:
    spec = tiny_spec(
        "failover",
        tmp_path_factory,
        router_flags=["--grace-period", "5"],
        data_parallel_address=far_rank.router_address,
        rank_netns={1: far_rank.namespace},
        env=otlp_env(otlp_receiver[1]),
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
async def stubs(
    broken_cluster: LocalCluster,
) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(broken_cluster.spec.listen) as channel:
        yield (
            generate_pb2_grpc.GenerateServiceStub(channel),
            ranks_pb2_grpc.RanksServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


async def wait_health(
    health: health_pb2_grpc.HealthStub, name: str, status: int, timeout: float
) -> float:
    """Seconds until the Health name reports `status`, watched with Watch."""
    start = time.monotonic()
    call = health.Watch(health_pb2.HealthCheckRequest(service=name))
    try:
        async with asyncio.timeout(timeout):
            async for reply in call:
                if reply.status == status:
                    return time.monotonic() - start
    finally:
        call.cancel()
    raise AssertionError(f"{name} never became {status}")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in the rich status trailer."""
    trailers: dict[str, bytes] = dict(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def test_a_stopped_rank_is_detected_its_requests_retried_and_it_is_readmitted(
    broken_cluster: LocalCluster,
    stubs: Stubs,
    otlp_receiver: tuple[OtlpReceiver, int],
) -> None:
    generate, ranks, health = stubs
    await wait_health(health, "rank/1", SERVING, timeout=30)
    # It has answered since it joined: a rank that has not gets more time.
    await routed(generate, request("first", data_parallel_rank=1))
    keys = keys_homed_on(1, 4)
    server = broken_cluster.ranks[1]
    os.killpg(server.pid, signal.SIGSTOP)  # a hang, not a death
    BROKEN.append(1)
    try:
        stopped = time.monotonic()
        # Routed to rank 1 before the router knows: they produce nothing there,
        # so they are retried on rank 0 when rank 1 is found out.
        retried = [
            asyncio.ensure_future(
                routed_and_served(generate, request(f"k {k}", max_tokens=8, session_key=k))
            )
            for k in keys
        ]
        detected = await wait_health(health, "rank/1", NOT_SERVING, timeout=DETECTION_BOUND_S + 5)
        detected_after = time.monotonic() - stopped
        assert detected_after < DETECTION_BOUND_S, detected_after
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == SERVING
        async with asyncio.timeout(30):  # none hangs
            results = await asyncio.gather(*retried)
        retried_traces = 0
        for responses, metadata, trailers in results:
            assert responses[0].data_parallel_rank == 0
            assert responses[-1].usage.completion_tokens == 8
            # Its trace: a failed attempt on rank 1 (unless the load bound spilled
            # it to rank 0 at once), then the one that served on rank 0.
            expected = [(0, False)]
            if route_of(metadata)[0] == 1:
                expected.insert(0, (1, True))
                retried_traces += 1
                # The headers name the first rank, the trailers the one that served.
                assert route_of(trailers) == (0, "affinity", "retry_after_rank_failure")
            else:
                assert route_of(trailers) == route_of(metadata)
            trace_id = bytes.fromhex(metadata["x-trace-id"])
            attempts = await wait_for_attempts(otlp_receiver[0], trace_id, len(expected))
            tried = [
                (attributes(a)["vllm.data_parallel_rank"], a.status.code == ERROR) for a in attempts
            ]
            assert tried == expected
        assert retried_traces >= 1
        listed = (await ranks.ListRanks(ranks_pb2.ListRanksRequest())).ranks[1]
        assert listed.state == ranks_pb2.RANK_STATE_UNHEALTHY
        assert listed.failed >= 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await routed(generate, request("pinned", data_parallel_rank=1))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        _, metadata = await routed(generate, request("new", session_key=keys[0]))
        assert route_of(metadata)[0] == 0
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    readmitted = await wait_health(health, "rank/1", SERVING, timeout=10)
    _, metadata = await routed(generate, request("back", data_parallel_rank=1))
    assert route_of(metadata)[0] == 1
    print(f"stopped rank detected after {detected_after:.2f} s (watch: {detected:.2f} s), "
          f"re-admitted {readmitted:.2f} s after SIGCONT")  # fmt: skip


async def test_a_stopped_engine_is_found_by_its_rank_servers_vitals(
    broken_cluster: LocalCluster, stubs: Stubs
) -> None:
    """SIGSTOP of the engine process alone: its rank server, still running,
    reports it stopped, and the rank is failed at once, not after a silence."""
    generate, _, health = stubs
    await wait_health(health, "rank/0", SERVING, timeout=30)
    await routed(generate, request("first", data_parallel_rank=0))
    engine = broken_cluster.engine_process(0)
    engine.suspend()
    BROKEN.append(0)
    try:
        stopped = time.monotonic()
        await wait_health(health, "rank/0", NOT_SERVING, timeout=DETECTION_BOUND_S + 5)
        detected_after = time.monotonic() - stopped
        assert detected_after < STOPPED_ENGINE_BOUND_S, detected_after
        _, metadata = await routed(generate, request("meanwhile"))
        assert route_of(metadata)[0] == 1
    finally:
        engine.resume()
    readmitted = await wait_health(health, "rank/0", SERVING, timeout=10)
    _, metadata = await routed(generate, request("back", data_parallel_rank=0))
    assert route_of(metadata)[0] == 0
    print(f"stopped engine detected after {detected_after:.2f} s, "
          f"re-admitted {readmitted:.2f} s after SIGCONT")  # fmt: skip


async def test_a_killed_engine_ends_its_streams_and_the_restarted_rank_rejoins(
    broken_cluster: LocalCluster,
    stubs: Stubs,
    otlp_receiver: tuple[OtlpReceiver, int],
) -> None:
    generate, _, health = stubs
    await wait_health(health, "rank/1", SERVING, timeout=30)
    calls = [
        generate.Generate(request(f"stream {i}", max_tokens=1500, data_parallel_rank=i % 2))
        for i in range(16)
    ]
    received = [0] * 16
    first = [asyncio.ensure_future(call.read()) for call in calls]
    for i, response in enumerate(await asyncio.gather(*first)):
        assert isinstance(response, generate_pb2.GenerateResponse)
        received[i] += len(response.token_ids)

    async def finish(i: int) -> grpc.StatusCode:
        try:
            while (response := await calls[i].read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                assert isinstance(response, generate_pb2.GenerateResponse)
                received[i] += len(response.token_ids)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            info = error_info(e)
            assert info.metadata["rank"] == "1"
            assert int(info.metadata["delivered_tokens"]) == received[i]
            return e.code()
        return grpc.StatusCode.OK

    ends = [asyncio.ensure_future(finish(i)) for i in range(16)]
    broken_cluster.engine_process(1).kill()  # kill -9
    killed = time.monotonic()
    BROKEN.append(1)
    detected = await wait_health(health, "rank/1", NOT_SERVING, timeout=CUT_BOUND_S)
    assert detected < KILL_BOUND_S, detected
    # Detection counts from the last output the router processed; with 16
    # streams on 2 cores the router can be seconds behind the engines.
    done, _ = await asyncio.wait([ends[i] for i in range(1, 16, 2)], timeout=CUT_BOUND_S)
    cut_after = time.monotonic() - killed
    assert len(done) == 8, f"{8 - len(done)} streams on the dead rank still hang"
    assert all(task.result() == grpc.StatusCode.UNAVAILABLE for task in done)
    assert cut_after < CUT_BOUND_S
    # A cut stream's trace: its attempt on the dead rank failed, and the RPC with UNAVAILABLE.
    trace_id = bytes.fromhex(str(dict(await calls[1].initial_metadata())["x-trace-id"]))
    (attempt,) = await wait_for_attempts(otlp_receiver[0], trace_id, 1)
    assert attempt.status.code == ERROR
    server = await wait_for_span(otlp_receiver[0], lambda s: s.span_id == attempt.parent_span_id)
    assert attributes(server)["error.type"] == "UNAVAILABLE"
    # The other rank's streams finish whole, and new requests go there.
    assert [await ends[i] for i in range(0, 16, 2)] == [grpc.StatusCode.OK] * 8
    assert [received[i] for i in range(0, 16, 2)] == [1500] * 8
    for i in range(4):
        _, metadata = await routed(generate, request(f"after {i}"))
        assert route_of(metadata)[0] == 0

    broken_cluster.restart_rank(1)
    rejoined = await wait_health(health, "rank/1", SERVING, timeout=180)
    _, metadata = await routed(generate, request("rejoined", data_parallel_rank=1))
    assert route_of(metadata)[0] == 1
    print(f"streams on the killed rank ended {cut_after:.2f} s after the kill; "
          f"restarted rank rejoined after {rejoined:.1f} s")  # fmt: skip


async def test_a_rank_whose_join_fails_is_waited_for_again(
    broken_cluster: LocalCluster,
    stubs: Stubs,
) -> None:
    """Rank 1 restarted with another rank's flags (-dp 2 -dpr 1 where its group
    has one rank): the router, which found it dead and waits for it, fails
    that handshake. Restarted with its own flags, it joins all the same."""
    generate, _, health = stubs
    await wait_health(health, "rank/1", SERVING, timeout=180)
    assert broken_cluster.spec.log_dir is not None
    router_log = broken_cluster.spec.log_dir / "router.log"

    def failed_joins() -> int:
        return router_log.read_text(errors="replace").count("rank could not join")

    before = failed_joins()
    wrong = list(broken_cluster.spec.rank_flags(1))
    wrong[wrong.index("-dp") + 1] = "2"
    wrong[wrong.index("-dpr") + 1] = "1"
    broken_cluster.restart_rank(1, wrong)
    BROKEN.append(1)
    await wait_health(health, "rank/1", NOT_SERVING, timeout=CUT_BOUND_S)
    async with asyncio.timeout(120):
        while failed_joins() == before:
            await asyncio.sleep(0.5)
    assert "unexpected data parallel rank: 1" in router_log.read_text(errors="replace")
    broken_cluster.restart_rank(1)
    await wait_health(health, "rank/1", SERVING, timeout=180)
    _, metadata = await routed(generate, request("after a failed join", data_parallel_rank=1))
    assert route_of(metadata)[0] == 1


async def test_a_partitioned_rank_is_detected_failed_over_and_readmitted(
    far_rank: OtherHost,
    stubs: Stubs,
) -> None:
    generate, _, health = stubs
    await wait_health(health, "rank/1", SERVING, timeout=180)
    calls = [
        generate.Generate(request(f"far {i}", max_tokens=LONG_TOKENS, data_parallel_rank=1))
        for i in range(4)
    ]
    for call in calls:
        assert isinstance(await call.read(), generate_pb2.GenerateResponse)
    far_rank.set_link(False)
    BROKEN.append(1)
    try:
        cut = time.monotonic()
        await wait_health(health, "rank/1", NOT_SERVING, timeout=DETECTION_BOUND_S + 5)
        detected_after = time.monotonic() - cut
        cut_at = time.ctime(time.time() - detected_after)  # to set beside the router's log
        assert detected_after < DETECTION_BOUND_S, (detected_after, cut_at)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(CUT_BOUND_S):
                    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                        pass
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(ended.value).metadata["rank"] == "1"
        _, metadata = await routed(generate, request("meanwhile"))
        assert route_of(metadata)[0] == 0
    finally:
        far_rank.set_link(True)
    healed = time.monotonic()
    await wait_health(health, "rank/1", SERVING, timeout=20)
    readmitted = time.monotonic() - healed
    _, metadata = await routed(generate, request("healed", data_parallel_rank=1))
    assert route_of(metadata)[0] == 1
    print(f"partitioned rank detected after {detected_after:.2f} s, "
          f"re-admitted {readmitted:.2f} s after the link came back")  # fmt: skip


def test_no_rank_was_failed_but_those_broken_on_purpose(broken_cluster: LocalCluster) -> None:
    """Last of the module: every failure the router logged was a break above."""
    assert failed_ranks(broken_cluster) == BROKEN
