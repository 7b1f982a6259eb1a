"""One span per request reaches a real OTLP receiver, continuing the client's
W3C traceparent."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from tests.conftest import LONG_TOKENS, OtlpReceiver

GENERATE = "dprouter.v1.GenerateService/Generate"


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    values: dict[str, object] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


async def wait_for_span(
    receiver: OtlpReceiver, match: Callable[[trace_pb2.Span], bool], timeout: float = 10
) -> trace_pb2.Span:
    for _ in range(int(timeout / 0.1)):
        found = [s for s in receiver.spans() if match(s)]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no such span arrived")


async def test_span_continues_the_client_traceparent(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    request = generate_pb2.GenerateRequest(
        prompt="Hello", request_id="traced-1", data_parallel_rank=1,
        sampling=generate_pb2.SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
    )  # fmt: skip
    call = generate.Generate(request, metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    responses = [r async for r in call]
    assert dict(await call.initial_metadata())["x-trace-id"] == trace_id

    span = await wait_for_span(
        receiver, lambda s: attributes(s).get("gen_ai.request.id") == "traced-1"
    )
    assert span.name == GENERATE
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == trace_id
    assert span.parent_span_id.hex() == parent_id
    attrs = attributes(span)
    assert attrs["vllm.data_parallel_rank"] == 1
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.usage.input_tokens"] == responses[-1].usage.prompt_tokens
    assert attrs["rpc.grpc.status_code"] == 0
    assert span.status.code != trace_pb2.Status.STATUS_CODE_ERROR


async def test_rejected_request_gets_an_error_span_in_a_new_trace(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    before = {s.span_id for s in receiver.spans()}
    request = generate_pb2.GenerateRequest(
        prompt="x", sampling=generate_pb2.SamplingParams(top_p=3.0)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in generate.Generate(request):
            pass
    span = await wait_for_span(
        receiver,
        lambda s: (
            s.span_id not in before
            and s.status.code == trace_pb2.Status.STATUS_CODE_ERROR
            and "sampling.top_p" in s.status.message
        ),
    )
    assert span.parent_span_id == b""  # no traceparent: a new root
    assert attributes(span)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_deadline_exceeded_request_gets_a_span_with_that_status(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    request = generate_pb2.GenerateRequest(
        prompt="a long one", request_id="too-slow",
        sampling=generate_pb2.SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True),
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in generate.Generate(request, timeout=0.5):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    span = await wait_for_span(
        receiver, lambda s: attributes(s).get("gen_ai.request.id") == "too-slow"
    )
    assert attributes(span)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
