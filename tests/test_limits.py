"""The router's own request limits (--max-prompt-tokens, --max-n,
--max-tokens-limit, --max-message-bytes), against a live router of their own:
each refusal has a precise status naming the field, and the router keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from tests.conftest import tiny_spec
from tests.test_bad_input import GOOD, assert_still_serves, expect_invalid
from tools.local_cluster import LocalCluster

S = generate_pb2.SamplingParams
R = generate_pb2.GenerateRequest
MAX_PROMPT_TOKENS = 32
MAX_N = 2
MAX_TOKENS = 8
MAX_MESSAGE_BYTES = 64 * 1024
LIMIT_FLAGS = [
    "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
    "--max-n", str(MAX_N),
    "--max-tokens-limit", str(MAX_TOKENS),
    "--max-message-bytes", str(MAX_MESSAGE_BYTES),
]  # fmt: skip


@pytest.fixture(scope="module")
def limited_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = tiny_spec(
        "limits",
        tmp_path_factory,
        ranks=1,
        router_flags=LIMIT_FLAGS,
    )
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


@pytest.fixture
async def generate(
    limited_cluster: LocalCluster,
) -> AsyncIterator[generate_pb2_grpc.GenerateServiceAsyncStub]:
    async with grpc.aio.insecure_channel(limited_cluster.spec.listen) as channel:
        yield generate_pb2_grpc.GenerateServiceStub(channel)


LONG_CHAT = [generate_pb2.ChatMessage(role="user", content="hi " * MAX_PROMPT_TOKENS)]
OVER_LIMITS: list[tuple[str, generate_pb2.GenerateRequest, str]] = [
    ("token ids", R(prompt_token_ids=[5] * (MAX_PROMPT_TOKENS + 1)), "prompt_token_ids"),
    ("text", R(prompt="hello " * (MAX_PROMPT_TOKENS + 1)), "prompt"),
    ("messages", R(messages=LONG_CHAT), "messages"),
    ("n", R(prompt="a", sampling=S(n=MAX_N + 1, temperature=1)), "sampling.n"),
    ("max_tokens", R(prompt="a", sampling=S(max_tokens=MAX_TOKENS + 1)), "sampling.max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "field"), [(r, f) for _, r, f in OVER_LIMITS], ids=[n for n, _, _ in OVER_LIMITS]
)
async def test_over_a_limit_names_the_field(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    request_: generate_pb2.GenerateRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate.Complete(generate_pb2.CompleteRequest(request=request_))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this router's limit" in (raised.value.details() or ""), raised.value.details()
    await expect_invalid(generate.Generate(request_), field)
    await assert_still_serves(generate)


async def test_at_the_limits_is_served(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    request = R(
        prompt_token_ids=[5] * MAX_PROMPT_TOKENS,
        sampling=S(n=MAX_N, temperature=1, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    reply = await generate.Complete(generate_pb2.CompleteRequest(request=request))
    assert reply.usage.completion_tokens == MAX_N * MAX_TOKENS


async def test_an_unset_max_tokens_defaults_within_the_limit(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    request = R(prompt="a", sampling=S(temperature=0, ignore_eos=True))
    reply = await generate.Complete(generate_pb2.CompleteRequest(request=request))
    assert reply.usage.completion_tokens == MAX_TOKENS


async def test_a_message_over_max_message_bytes_is_resource_exhausted(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in generate.Generate(R(prompt="x" * MAX_MESSAGE_BYTES, sampling=GOOD.sampling)):
            pass
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
    await assert_still_serves(generate)
