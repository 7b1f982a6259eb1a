"""Property-based: random and malformed requests thrown at the live router.

Whatever hypothesis makes, the router answers each call within a bound with
OK or a status the request earned (INVALID_ARGUMENT naming a field,
RESOURCE_EXHAUSTED...), never INTERNAL or UNKNOWN, and keeps serving: every
example ends with a good request that must complete. The examples are drawn
from a fixed seed, so a failure in CI reproduces on any machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from tools.local_cluster import LocalCluster

GENERATE = "/dprouter.v1.GenerateService/Generate"
# A malformed request is answered at once; most valid ones run a few tokens,
# and the rare long one meets the client's own deadline.
CALL_BOUND_S = 10.0
EARNED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# "field.path[3].name: problem", or a metadata key.
FIELD_MESSAGE = re.compile(r"^[a-z_][a-z0-9_.\-]*(\[\d+\])?[a-z0-9_.\[\]]*: .+", re.S)

floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from(
    [0.0, 1.0, -1.0, 2.0]
)
ints = st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 50)
small = st.integers(-3, 40)
token_ids = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 300), max_size=20)

sampling = st.builds(
    generate_pb2.SamplingParams,
    max_tokens=small | ints,
    min_tokens=small,
    temperature=floats,
    top_p=floats,
    top_k=small | ints,
    min_p=floats,
    seed=ints,
    stop=st.lists(st.text(max_size=5), max_size=3),
    stop_token_ids=token_ids,
    presence_penalty=floats,
    frequency_penalty=floats,
    repetition_penalty=floats,
    n=st.integers(-2, 4),
    logprobs=st.integers(-3, 25),
    ignore_eos=st.booleans(),
)
messages = st.lists(
    st.builds(
        generate_pb2.ChatMessage,
        role=st.sampled_from(["user", "assistant", "system", "", "robot"]),
        content=st.text(max_size=30),
    ),
    max_size=3,
)
requests = st.builds(
    generate_pb2.GenerateRequest,
    prompt=st.text(max_size=40),
    prompt_token_ids=token_ids,
    messages=messages,
    sampling=sampling,
    request_id=st.text(max_size=140),
    data_parallel_rank=st.none() | st.integers(-2, 3),
    session_key=st.text(max_size=20),
    priority=ints,
)
metadata = st.lists(
    st.tuples(
        st.sampled_from(["x-data-parallel-rank", "x-session-key", "traceparent", "x-other"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    ),
    max_size=3,
)
GOOD = generate_pb2.GenerateRequest(
    prompt="still serving", sampling=generate_pb2.SamplingParams(max_tokens=2, temperature=0)
)


def status_of(call: Iterable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def check(code: grpc.StatusCode, details: str, stub: generate_pb2_grpc.GenerateServiceStub) -> None:
    assert code in EARNED, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert FIELD_MESSAGE.match(details), details
    good = list(stub.Generate(GOOD, timeout=CALL_BOUND_S))
    assert good[-1].usage.completion_tokens == 2


@seed(20261126)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests, metadata=metadata)
def test_random_requests_get_an_earned_status(
    cluster: LocalCluster, request: generate_pb2.GenerateRequest, metadata: list[tuple[str, str]]
) -> None:
    with cluster.spec.channel() as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        code, details = status_of(
            stub.Generate(request, metadata=tuple(metadata), timeout=CALL_BOUND_S)
        )
        check(code, details, stub)


@seed(20261126)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200))
def test_random_bytes_get_an_earned_status(cluster: LocalCluster, payload: bytes) -> None:
    """Bytes that may not parse as a GenerateRequest at all."""
    with cluster.spec.channel() as channel:
        # No serializers: the bytes go as they are.
        raw = channel.unary_stream(GENERATE, None, None)
        code, details = status_of(raw(payload, timeout=CALL_BOUND_S))
        check(code, details, generate_pb2_grpc.GenerateServiceStub(channel))
