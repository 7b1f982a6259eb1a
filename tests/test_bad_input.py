"""Every malformed request gets INVALID_ARGUMENT naming the field, and the router
keeps serving: after each bad request a good one still completes."""

from __future__ import annotations

import grpc
import pytest

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tests.conftest import TINY_MAX_MODEL_LEN, wait_for_idle_engines

S = generate_pb2.SamplingParams
R = generate_pb2.GenerateRequest

BAD_REQUESTS: list[tuple[str, generate_pb2.GenerateRequest, str]] = [
    ("empty input", R(), "prompt"),
    ("prompt and token ids", R(prompt="a", prompt_token_ids=[1, 2]), "prompt_token_ids"),
    ("prompt and messages", R(prompt="a", messages=[generate_pb2.ChatMessage(role="user")]), "messages"),
    ("zero max_tokens", R(prompt="a", sampling=S(max_tokens=0)), "sampling.max_tokens"),
    ("negative max_tokens", R(prompt="a", sampling=S(max_tokens=-3)), "sampling.max_tokens"),
    ("negative temperature", R(prompt="a", sampling=S(temperature=-0.5)), "sampling.temperature"),
    ("temperature above two", R(prompt="a", sampling=S(temperature=2.5)), "sampling.temperature"),
    ("NaN temperature", R(prompt="a", sampling=S(temperature=float("nan"))), "sampling.temperature"),
    ("top_p zero", R(prompt="a", sampling=S(top_p=0.0)), "sampling.top_p"),
    ("top_p above one", R(prompt="a", sampling=S(top_p=1.5)), "sampling.top_p"),
    ("top_k below -1", R(prompt="a", sampling=S(top_k=-2)), "sampling.top_k"),
    ("min_p above one", R(prompt="a", sampling=S(min_p=2.0)), "sampling.min_p"),
    ("n zero", R(prompt="a", sampling=S(n=0)), "sampling.n"),
    ("min_tokens over max", R(prompt="a", sampling=S(max_tokens=4, min_tokens=5)), "sampling.min_tokens"),
    ("presence penalty", R(prompt="a", sampling=S(presence_penalty=3)), "sampling.presence_penalty"),
    ("repetition penalty", R(prompt="a", sampling=S(repetition_penalty=0)), "sampling.repetition_penalty"),
    ("n above one with greedy sampling (vLLM's own rule)", R(prompt="a", sampling=S(n=2, temperature=0)), "sampling"),
    ("too many logprobs", R(prompt="a", sampling=S(logprobs=21)), "sampling.logprobs"),
    ("empty stop string", R(prompt="a", sampling=S(stop=["x", ""])), "sampling.stop[1]"),
    ("stop strings without the text", R(prompt="a", sampling=S(stop=["x"], detokenize=False)), "sampling.stop"),
    ("stop token outside vocab", R(prompt="a", sampling=S(stop_token_ids=[10**6])), "sampling.stop_token_ids[0]"),
    ("rank pin too high", R(prompt="a", data_parallel_rank=2), "data_parallel_rank"),
    ("negative rank pin", R(prompt="a", data_parallel_rank=-1), "data_parallel_rank"),
    ("token id outside vocab", R(prompt_token_ids=[5, 10**6]), "prompt_token_ids[1]"),
    ("prompt longer than context", R(prompt_token_ids=[5] * TINY_MAX_MODEL_LEN), "prompt_token_ids"),
    ("text prompt longer than context", R(prompt="hello " * (TINY_MAX_MODEL_LEN + 10)), "prompt"),
    ("output past the context", R(prompt="a", sampling=S(max_tokens=TINY_MAX_MODEL_LEN)), "sampling.max_tokens"),
    ("message without role", R(messages=[generate_pb2.ChatMessage(content="hi")]), "messages[0].role"),
    ("request id too long", R(prompt="a", request_id="x" * 129), "request_id"),
]  # fmt: skip

GOOD = R(prompt="still serving", sampling=S(max_tokens=4, temperature=0))


async def assert_still_serves(generate: generate_pb2_grpc.GenerateServiceAsyncStub) -> None:
    responses = [r async for r in generate.Generate(GOOD)]
    assert responses[-1].usage.completion_tokens == 4


async def expect_invalid(call: object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert (raised.value.details() or "").startswith(f"{field}:"), raised.value.details()


@pytest.mark.parametrize(
    ("request_", "field"), [(r, f) for _, r, f in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS]
)
async def test_bad_request_names_the_field(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    request_: generate_pb2.GenerateRequest,
    field: str,
) -> None:
    await expect_invalid(generate.Generate(request_), field)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate.Complete(generate_pb2.CompleteRequest(request=request_))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"request.{field}:")
    await assert_still_serves(generate)


@pytest.mark.parametrize(
    ("value", "problem"), [("7", "outside [0, 2)"), ("abc", "must be an integer")]
)
async def test_bad_rank_metadata(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, value: str, problem: str
) -> None:
    call = generate.Generate(GOOD, metadata=(("x-data-parallel-rank", value),))
    await expect_invalid(call, "x-data-parallel-rank")
    call = generate.Generate(
        R(prompt="a", data_parallel_rank=0), metadata=(("x-data-parallel-rank", "1"),)
    )
    await expect_invalid(call, "data_parallel_rank")
    await assert_still_serves(generate)


# Hand-made wire bytes: protobuf's Python API cannot build a str that is not UTF-8.
INVALID_UTF8 = [
    ("prompt", b"\x0a\x03a\xff\xfe"),
    # messages[0] = {role: "user", content: <bad>}
    ("messages[0].content", b"\x1a\x0b\x0a\x04user\x12\x03\xc3\x28!"),
    # sampling = {stop: ["ok", <bad>]}
    ("sampling.stop[1]", b"\x0a\x01a\x22\x08\x42\x02ok\x42\x02\xe2\x82"),
    ("request_id", b"\x0a\x01a\x2a\x01\x80"),
]


@pytest.mark.parametrize(("field", "wire"), INVALID_UTF8, ids=[f for f, _ in INVALID_UTF8])
async def test_invalid_utf8_names_the_field(
    channel: grpc.aio.Channel,
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    field: str,
    wire: bytes,
) -> None:
    raw = channel.unary_stream(
        "/dprouter.v1.GenerateService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=generate_pb2.GenerateResponse.FromString,
    )
    await expect_invalid(raw(wire), field)
    await assert_still_serves(generate)


async def test_truncated_message(
    channel: grpc.aio.Channel, generate: generate_pb2_grpc.GenerateServiceAsyncStub
) -> None:
    raw = channel.unary_unary(
        "/dprouter.v1.GenerateService/Complete",
        request_serializer=lambda b: b,
        response_deserializer=generate_pb2.CompleteResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x0a\x10short")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("request:")
    await assert_still_serves(generate)


async def outcomes(ranks: ranks_pb2_grpc.RanksServiceAsyncStub) -> list[tuple[int, int, int]]:
    """Per rank: the requests it served, failed and had cancelled."""
    reply = await ranks.ListRanks(ranks_pb2.ListRanksRequest())
    return [(r.served, r.failed, r.cancelled) for r in reply.ranks]


async def test_bad_requests_leave_no_engine_work(
    channel: grpc.aio.Channel,
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
) -> None:
    """Rejections happen before the engine: nothing is left in flight, and no
    rank counts a request (a request that reached a rank ends as one of
    served, failed or cancelled there)."""
    await wait_for_idle_engines(ranks, timeout=10)
    before = await outcomes(ranks)
    raw = channel.unary_stream(
        "/dprouter.v1.GenerateService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=generate_pb2.GenerateResponse.FromString,
    )
    for _, request, field in BAD_REQUESTS:
        await expect_invalid(generate.Generate(request), field)
        with pytest.raises(grpc.aio.AioRpcError):
            await generate.Complete(generate_pb2.CompleteRequest(request=request))
    for field, wire in INVALID_UTF8:
        await expect_invalid(raw(wire), field)
    await wait_for_idle_engines(ranks, timeout=5)
    assert await outcomes(ranks) == before
