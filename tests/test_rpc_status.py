"""The status the router counts and logs for a Generate RPC is the one its
client saw, also when the handler fails in a way no check foresaw (a bug, a
send that gRPC refuses). The real servicers over real gRPC, in front of a
dispatcher stand-in that fails on cue; no engine is involved."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from prometheus_client import generate_latest

from bench.standin import StandInRank
from dprouter.v1 import generate_pb2, generate_pb2_grpc
from router.dispatcher import Dispatcher
from router.engine_types import EngineDelta
from router.fleet import Fleet
from router.fleet import build as build_fleet
from router.intake import Admitted
from router.ledger import Outcome
from router.metrics import Metrics
from router.progress import Progress
from router.service import GenerateServicer
from tests.test_metrics import parse, value

METHODS = ("Generate", "Complete")


class FailingDispatcher:
    """Admits over a one-rank stand-in fleet, then prepares one job, or
    raises `error`; the job's stream yields one finished delta, after `hold_s`."""

    def __init__(
        self, error: Exception | None = None, route_reason: str = "next_in_turn", hold_s: float = 0
    ) -> None:
        self.metrics = Metrics()
        pool = StandInRank()
        self._fleet = build_fleet(pool, "round_robin")
        self.error = error
        self.hold_s = hold_s
        self.released: list[Outcome] = []  # jobs released without running
        self.job = SimpleNamespace(
            request_id="r-1",
            rank=0,
            route_policy="round_robin",
            route_reason=route_reason,
            prompt_token_ids=[1, 2],
        )

    def fleet(self) -> Fleet:
        return self._fleet

    def prepare(self, admitted: Admitted, trace: object, progress: Progress) -> Any:
        if self.error is not None:
            raise self.error
        return self.job

    def release(self, job: Any, outcome: Outcome) -> None:
        self.released.append(outcome)

    async def run(self, job: Any) -> AsyncGenerator[EngineDelta, None]:
        await asyncio.sleep(self.hold_s)
        yield EngineDelta(
            index=0, text="x", token_ids=[7], logprobs=[], finish_reason="length",
            stop_reason="", finished=True, cached_tokens=0,
        )  # fmt: skip

    def counted(self, method: str) -> dict[str, float]:
        """The RPCs of `method` counted so far, by status."""
        samples = parse(generate_latest(self.metrics.registry).decode())
        name = f"dprouter.v1.GenerateService/{method}"
        return {
            code.name: n
            for code in grpc.StatusCode
            if (n := value(samples, "dprouter_requests_total", method=name, code=code.name))
        }


@asynccontextmanager
async def serve(
    dispatcher: FailingDispatcher,
) -> AsyncIterator[generate_pb2_grpc.GenerateServiceAsyncStub]:
    server = grpc.aio.server()
    servicer = GenerateServicer(cast(Dispatcher, dispatcher), "test-model")
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield generate_pb2_grpc.GenerateServiceStub(channel)
    finally:
        await server.stop(None)


async def call(
    stub: generate_pb2_grpc.GenerateServiceAsyncStub, method: str, timeout: float | None = None
) -> grpc.StatusCode:
    request = generate_pb2.GenerateRequest(prompt="hi")
    try:
        if method == "Generate":
            _ = [r async for r in stub.Generate(request, timeout=timeout)]
        else:
            await stub.Complete(generate_pb2.CompleteRequest(request=request), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def counted_once(dispatcher: FailingDispatcher, method: str) -> dict[str, float]:
    """The handler counts as it ends, which may come after the client's end."""
    start = time.monotonic()
    while not (counted := dispatcher.counted(method)) and time.monotonic() - start < 5:
        await asyncio.sleep(0.01)
    return counted


CASES: list[tuple[str, dict[str, Any], grpc.StatusCode]] = [
    ("served", {}, grpc.StatusCode.OK),
    ("a bug", {"error": RuntimeError("bug")}, grpc.StatusCode.INTERNAL),
    # gRPC itself would fail the call after the handler sent them, and
    # cancel the handler as if the client had gone.
    ("headers gRPC refuses", {"route_reason": "two\nlines"}, grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("failing", "code"), [(f, c) for _, f, c in CASES], ids=[n for n, _, _ in CASES]
)
async def test_the_status_counted_is_the_one_the_client_saw(
    failing: dict[str, Any], code: grpc.StatusCode, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = FailingDispatcher(**failing)
    with caplog.at_level(logging.INFO, logger="dprouter.requests"):
        async with serve(dispatcher) as stub:
            assert await call(stub, method) == code
            assert await counted_once(dispatcher, method) == {code.name: 1}
    [line] = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert line.__dict__["status"] == code.name
    # An unforeseen failure is logged with its traceback.
    assert (line.exc_info is not None) == (code is grpc.StatusCode.INTERNAL)
    # A routed job that cannot run leaves its rank.
    assert dispatcher.released == ([Outcome.FAILED] if "route_reason" in failing else [])


@pytest.mark.parametrize("method", METHODS)
async def test_the_client_going_away_stays_cancelled_or_past_its_deadline(method: str) -> None:
    dispatcher = FailingDispatcher(hold_s=30)
    async with serve(dispatcher) as stub:
        assert await call(stub, method, timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await counted_once(dispatcher, method) == {"DEADLINE_EXCEEDED": 1}
        dispatcher.metrics = Metrics()
        request = generate_pb2.GenerateRequest(prompt="hi")
        gone = (
            stub.Generate(request)
            if method == "Generate"
            else stub.Complete(generate_pb2.CompleteRequest(request=request))
        )
        await asyncio.sleep(0.3)  # the handler waits on the stream
        gone.cancel()
        assert await counted_once(dispatcher, method) == {"CANCELLED": 1}
