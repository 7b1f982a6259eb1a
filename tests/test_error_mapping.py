"""What the dispatcher hands a rank and makes of its failures. An engine error
raised mid-generation becomes a precise gRPC status, and the job leaves the
ledger as failed; the request's priority reaches the rank. Unit level: a real
`Dispatcher` over a one-rank stand-in pool; no engine is involved."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2

from bench.standin import StandInRank
from dprouter.v1 import generate_pb2
from router import intake, tracing
from router.dispatcher import Dispatcher, Job
from router.engine_types import EngineDelta, EngineRequest
from router.errors import RequestError
from router.fleet import build as build_fleet
from router.metrics import Metrics
from router.progress import Progress
from router.ranks import RankNotJoined
from router.vllm_compat import EngineClientError, EngineDeadError


class ScriptedRank(StandInRank):
    """A rank that notes the priority of each request it is given and, with
    an `error`, yields one delta and then raises it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.priorities: list[int] = []

    async def generate(self, request: EngineRequest, rank: int) -> AsyncIterator[EngineDelta]:
        self.priorities.append(request.priority)
        if self.error is None:
            async for delta in super().generate(request, rank):
                yield delta
            return
        yield EngineDelta(
            index=0, text="x", token_ids=[7], logprobs=[], finish_reason=None,
            stop_reason="", finished=False, cached_tokens=0,
        )  # fmt: skip
        raise self.error


def dispatcher_over(pool: StandInRank) -> Dispatcher:
    dispatcher = Dispatcher(Metrics())
    dispatcher.attach(build_fleet(pool, "round_robin"))
    return dispatcher


async def prepared(dispatcher: Dispatcher, request: generate_pb2.GenerateRequest) -> Job:
    admitted = await intake.admit(request, (), dispatcher.fleet())
    return dispatcher.prepare(admitted, tracing.start("test", (), "test"), Progress.starting(None))


ERRORS: list[tuple[Exception, grpc.StatusCode, str]] = [
    (EngineDeadError(), grpc.StatusCode.UNAVAILABLE, "rank 0 failed after 1 tokens"),
    (RankNotJoined("rank 0 has not joined"), grpc.StatusCode.UNAVAILABLE, "rank 0 failed"),
    (EngineClientError("bad"), grpc.StatusCode.INVALID_ARGUMENT, "rejected by the engine: bad"),
    (ValueError("odd"), grpc.StatusCode.INVALID_ARGUMENT, "rejected by the engine: odd"),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "engine failure: RuntimeError: boom"),
]


@pytest.mark.parametrize(
    ("error", "code", "message"), ERRORS, ids=[type(e).__name__ for e, _, _ in ERRORS]
)
async def test_an_engine_error_mid_stream_maps_to_its_status_and_frees_the_rank(
    error: Exception, code: grpc.StatusCode, message: str
) -> None:
    dispatcher = dispatcher_over(ScriptedRank(error))
    request = generate_pb2.GenerateRequest(
        prompt="hello", sampling=generate_pb2.SamplingParams(max_tokens=8)
    )
    job = await prepared(dispatcher, request)
    assert dispatcher.loads()[0].in_flight == 1

    deltas = []
    with pytest.raises(RequestError) as raised:
        async for delta in dispatcher.run(job):
            deltas.append(delta)
    assert len(deltas) == 1  # the error came after the stream had begun
    assert raised.value.code == code
    assert message in raised.value.problem, raised.value.problem
    if code == grpc.StatusCode.UNAVAILABLE:
        [info] = raised.value.details
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert info.reason == "RANK_FAILED"
        assert dict(info.metadata) == {"rank": "0", "delivered_tokens": "1"}
    else:
        assert not raised.value.details

    load = dispatcher.loads()[0]
    assert (load.in_flight, load.failed, load.served, load.cancelled) == (0, 1, 0, 0)
    assert await dispatcher.drain(0.1)  # a SIGTERM drain would not wait for it


async def test_the_request_priority_reaches_the_rank() -> None:
    pool = ScriptedRank()
    dispatcher = dispatcher_over(pool)
    for priority in (0, -3, 7):
        request = generate_pb2.GenerateRequest(
            prompt="hello", priority=priority, sampling=generate_pb2.SamplingParams(max_tokens=2)
        )
        job = await prepared(dispatcher, request)
        assert len([delta async for delta in dispatcher.run(job)]) == 2
    assert pool.priorities == [0, -3, 7]
