"""A client that cancels, disconnects or runs out of deadline frees its engine
slot. Observed in the engines: their own waiting and running counts (reported
through vLLM's data-parallel coordinator) drop to zero, long before the
request could have finished by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2_grpc
from server.local_cluster import LocalCluster
from tests.conftest import ROOT, wait_for_engines

# Generating this many tokens takes the tiny model well over 5 s on these CPUs
# (about 2-4 ms per token), so an idle engine within 3 s means an abort.
LONG_TOKENS = 3500
ABORT_BOUND_S = 3.0


def long_request(rank: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt="Tell me a long story",
        data_parallel_rank=rank,
        sampling=generate_pb2.SamplingParams(
            max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True
        ),
    )


@pytest.mark.parametrize("rank", [0, 1])
async def test_cancel_aborts_the_engine_request(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    rank: int,
) -> None:
    await wait_for_engines(ranks, busy=False, timeout=10)
    call = generate.Generate(long_request(rank))
    first = await call.read()
    assert isinstance(first, generate_pb2.GenerateResponse)
    await wait_for_engines(ranks, busy=True, timeout=5)
    call.cancel()
    assert await wait_for_engines(ranks, busy=False, timeout=ABORT_BOUND_S) < ABORT_BOUND_S


async def test_deadline_aborts_the_engine_request(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    await wait_for_engines(ranks, busy=False, timeout=10)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in generate.Generate(long_request(1), timeout=1.0):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    await wait_for_engines(ranks, busy=False, timeout=ABORT_BOUND_S)


async def test_client_process_killed_mid_stream_aborts_the_engine_request(
    cluster: LocalCluster, ranks: ranks_pb2_grpc.RanksServiceAsyncStub
) -> None:
    """kill -9 of the client: its TCP connection drops with no cancel message."""
    await wait_for_engines(ranks, busy=False, timeout=10)
    client = subprocess.Popen(
        [sys.executable, "-m", "clients.python.generate", "--address", cluster.spec.listen,
         "--max-tokens", str(LONG_TOKENS), "--ignore-eos", "--rank", "0", "Tell me a story"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_for_engines(ranks, busy=True, timeout=20)
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        await wait_for_engines(ranks, busy=False, timeout=ABORT_BOUND_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
