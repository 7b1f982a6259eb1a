"""Pure unit tests on plain data: validation, wire-format checks, routing, errors."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from dprouter.v1 import generate_pb2
from router import limits, validation, wire
from router.errors import RequestError, invalid_argument
from router.sampling import engine_sampling
from router.wire import bad_field

LIMITS = limits.ModelLimits(max_model_len=100, vocab_size=50, data_parallel_size=2)
S = generate_pb2.SamplingParams


def field_of(error: pytest.ExceptionInfo[RequestError]) -> str | None:
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return error.value.field


def test_unset_rank_pin_is_not_rank_zero() -> None:
    checked = validation.check_request(generate_pb2.GenerateRequest(prompt="a"), (), LIMITS)
    assert checked.rank_pin is None
    pinned = generate_pb2.GenerateRequest(prompt="a", data_parallel_rank=0)
    by_field = validation.Pin(0, "data_parallel_rank")
    assert validation.check_request(pinned, (), LIMITS).rank_pin == by_field
    by_metadata = validation.check_request(pinned, [("x-data-parallel-rank", "0")], LIMITS)
    assert by_metadata.rank_pin == by_field
    unpinned = generate_pb2.GenerateRequest(prompt="a")
    by_key = validation.check_request(unpinned, [("x-data-parallel-rank", "1")], LIMITS)
    assert by_key.rank_pin == validation.Pin(1, "x-data-parallel-rank")


def test_request_ids_are_made_when_missing_and_kept_when_given() -> None:
    made = validation.check_request(generate_pb2.GenerateRequest(prompt="a"), (), LIMITS)
    assert made.request_id.startswith("dpr-")
    given = generate_pb2.GenerateRequest(prompt="a", request_id="mine")
    assert validation.check_request(given, (), LIMITS).request_id == "mine"


def test_default_max_tokens_shrinks_to_the_room_left() -> None:
    sampling = engine_sampling(S(), "prompt", 95, LIMITS)
    assert sampling.max_tokens == 5
    assert engine_sampling(S(), "prompt", 10, LIMITS).max_tokens == 16
    with pytest.raises(RequestError) as raised:
        engine_sampling(S(), "prompt", 100, LIMITS)
    assert field_of(raised) == "prompt"
    with pytest.raises(RequestError) as raised:
        engine_sampling(S(max_tokens=6), "messages", 95, LIMITS)
    assert field_of(raised) == "sampling.max_tokens"


def test_sampling_defaults_follow_vllm() -> None:
    sampling = engine_sampling(S(), "prompt", 1, LIMITS)
    assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty, sampling.n) == (
        1.0, 1.0, 1.0, 1,
    )  # fmt: skip
    assert sampling.logprobs is None and sampling.seed is None and sampling.skip_special_tokens
    assert sampling.detokenize
    assert not engine_sampling(S(detokenize=False), "prompt", 1, LIMITS).detokenize
    explicit = engine_sampling(S(temperature=0, seed=0, logprobs=0), "prompt", 1, LIMITS)
    assert (explicit.temperature, explicit.seed, explicit.logprobs) == (0.0, 0, 0)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (S(top_p=float("inf")), "sampling.top_p"),
        (S(min_p=-0.1), "sampling.min_p"),
        (S(frequency_penalty=-2.5), "sampling.frequency_penalty"),
        (S(stop_token_ids=[49, 50]), "sampling.stop_token_ids[1]"),
        (S(logprobs=21), "sampling.logprobs"),
        (S(stop=["x"], detokenize=False), "sampling.stop"),
    ],
)
def test_sampling_checks(sampling: generate_pb2.SamplingParams, field: str) -> None:
    with pytest.raises(RequestError) as raised:
        validation.check_request(
            generate_pb2.GenerateRequest(prompt="a", sampling=sampling), (), LIMITS
        )
    assert field_of(raised) == field


def test_logprobs_bound_follows_the_engine() -> None:
    few = limits.ModelLimits(100, 50, 2, max_logprobs=3)
    with pytest.raises(RequestError):
        validation.check_request(
            generate_pb2.GenerateRequest(prompt="a", sampling=S(logprobs=4)), (), few
        )
    every = limits.ModelLimits(100, 50, 2, max_logprobs=-1)
    request = generate_pb2.GenerateRequest(prompt="a", sampling=S(logprobs=50))
    assert validation.check_request(request, (), every).sampling.logprobs == 50


def test_field_prefix_applies_to_fields_not_metadata_keys() -> None:
    assert invalid_argument("prompt", "bad").message("request.") == "request.prompt: bad"
    assert invalid_argument("x-data-parallel-rank", "bad").message("request.") == (
        "x-data-parallel-rank: bad"
    )


def test_bad_field_walks_nested_and_repeated_fields() -> None:
    message = generate_pb2.GenerateRequest.DESCRIPTOR
    good = generate_pb2.GenerateRequest(
        prompt="ok",
        messages=[generate_pb2.ChatMessage(role="user", content="é")],
        sampling=S(stop=["a", "b"]),
    ).SerializeToString()
    assert bad_field(good, message) is None
    assert bad_field(b"\x1a\x0b\x0a\x04user\x12\x03\xc3\x28!", message) == "messages[0].content"
    assert bad_field(b"\x22\x08\x42\x02ok\x42\x02\xe2\x82", message) == "sampling.stop[1]"
    assert bad_field(b"\x0a\x10short", message) == "request"
    # Unknown fields are skipped, as protobuf itself does.
    assert bad_field(b"\xf8\x07\x01\x0a\x01a", message) is None


def test_vllm_is_imported_in_one_package_only() -> None:
    """Rule: an upgrade of vLLM touches router/vllm_compat/ alone."""
    root = Path(__file__).resolve().parent.parent
    importing = {
        str(path.relative_to(root))
        for folder in ("router", "server", "clients", "tests", "bench")
        for path in (root / folder).rglob("*.py")
        if re.search(r"^\s*(from|import) vllm\b", path.read_text(), re.MULTILINE)
    }
    assert importing and all(path.startswith("router/vllm_compat/") for path in importing)


@pytest.mark.parametrize(
    ("request_id", "at"),
    [("id\n", 2), ("a\rb", 1), ("\tx", 0), ("x\x00", 1), ("del\x7f", 3), ("\x1b[0m", 0),
     ("café", 3), ("日本", 0), ("ok😀", 2), ("e\u0301", 1), ("\ufffd", 0), ("שלום", 0)],
)  # fmt: skip
def test_request_ids_are_printable_ascii(request_id: str, at: int) -> None:
    """The id goes back in the x-request-id header, which gRPC refuses
    (INTERNAL) unless it is printable ASCII."""
    request = generate_pb2.GenerateRequest(prompt="a", request_id=request_id)
    with pytest.raises(RequestError) as raised:
        validation.check_request(request, (), LIMITS)
    assert field_of(raised) == "request_id"
    char = request_id[at]
    assert raised.value.problem.startswith(f"character {at} is {char!r} (U+{ord(char):04X})")
    every = "".join(map(chr, range(0x20, 0x7F)))
    for fine in (every[:128], every[-128:], " "):
        assert (
            validation.check_request(
                generate_pb2.GenerateRequest(prompt="a", request_id=fine), (), LIMITS
            ).request_id
            == fine
        )


def test_other_strings_may_hold_any_text() -> None:
    odd = "\x00\x1b\x7f\n\r\t 😀 日本語 שלום e\u0301 \ufffd"
    request = generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role=odd, content=odd)],
        session_key=odd,
        sampling=S(stop=[odd]),
    )
    checked = validation.check_request(request, (), LIMITS)
    assert checked.prompt.messages == [{"role": odd, "content": odd}]
    assert checked.session_key == odd
    assert validation.check_request(generate_pb2.GenerateRequest(prompt=odd), (), LIMITS)


BYTES = limits.ModelLimits(100, 50, 2, max_token_bytes=5)  # 500 bytes of prompt at most


def test_prompt_text_is_bounded_by_bytes_before_tokenizing() -> None:
    def check(allowed: limits.RequestLimits = limits.NO_LIMITS, **input: object) -> None:
        request = generate_pb2.GenerateRequest(**input)  # type: ignore[arg-type]
        validation.check_request(request, (), BYTES, allowed)

    assert limits.max_prompt_bytes(BYTES, limits.NO_LIMITS) == 500
    check(prompt="a" * 500)
    check(prompt="é" * 250)  # 2 bytes a character
    check(prompt="😀" * 125)  # 4
    for prompt, size in [("a" * 501, "at least 501"), ("é" * 251, "502"), ("😀" * 126, "504")]:
        with pytest.raises(RequestError) as raised:
            check(prompt=prompt)
        assert field_of(raised) == "prompt"
        assert raised.value.problem == (
            f"{size} bytes of text, more than the model's context of 100 tokens can hold "
            "(500 bytes: this model's longest token is 5 bytes)"
        )
    # The router's own limit lowers the bound.
    few = limits.RequestLimits(max_prompt_tokens=10)
    assert limits.max_prompt_bytes(BYTES, few) == 50
    check(few, prompt="a" * 50)
    with pytest.raises(RequestError) as raised:
        check(few, prompt="a" * 51)
    assert "more than this router's limit of 10 tokens can hold (50 bytes" in raised.value.problem
    # Messages count their roles and contents together.
    M = generate_pb2.ChatMessage
    check(messages=[M(role="user", content="a" * 246), M(role="user", content="é" * 123)])
    with pytest.raises(RequestError) as raised:
        check(messages=[M(role="user", content="a" * 246), M(role="user", content="é" * 124)])
    assert field_of(raised) == "messages"
    # Unknown token sizes leave the text to the token count.
    validation.check_request(generate_pb2.GenerateRequest(prompt="a" * 10_000), (), LIMITS)


def test_prompt_token_ids_are_counted_before_they_are_copied() -> None:
    # Out of the vocabulary too: the length is what is refused, before any id is read.
    request = generate_pb2.GenerateRequest(prompt_token_ids=[10**6] * 100)
    with pytest.raises(RequestError) as raised:
        validation.check_request(request, (), LIMITS)
    assert field_of(raised) == "prompt_token_ids"
    with pytest.raises(RequestError) as later:
        engine_sampling(S(), "prompt_token_ids", 100, LIMITS)
    assert (
        raised.value.problem
        == later.value.problem
        == (
            "the prompt is 100 tokens; the model's context is 100, which leaves no room to generate"
        )
    )
    few = limits.RequestLimits(max_prompt_tokens=10)
    request = generate_pb2.GenerateRequest(prompt_token_ids=[10**6] * 11)
    with pytest.raises(RequestError) as raised:
        validation.check_request(request, (), LIMITS, few)
    assert raised.value.problem == "the prompt is 11 tokens, above this router's limit of 10"
    ids = validation.check_request(
        generate_pb2.GenerateRequest(prompt_token_ids=[1] * 99), (), LIMITS
    )
    assert ids.prompt.token_ids == [1] * 99


def test_an_oversized_prompt_is_cut_from_the_wire_bytes_and_the_rest_parses() -> None:
    sampling = generate_pb2.SamplingParams(max_tokens=7, stop=["x" * 300])
    request = generate_pb2.GenerateRequest(
        prompt="é" * 5000, sampling=sampling, request_id="r", session_key="s"
    )
    for message, path in (
        (request, [1]),
        (generate_pb2.CompleteRequest(request=request), [1, 1]),
    ):
        data = message.SerializeToString()
        assert wire.cut_field(data, path, 10_000) is None  # not over the bound
        cut = wire.cut_field(data, path, 9_999)
        assert cut is not None
        rest, size = cut
        assert size == 10_000
        parsed = type(message).FromString(rest)
        inner = parsed if isinstance(parsed, generate_pb2.GenerateRequest) else parsed.request
        assert (inner.prompt, inner.sampling, inner.request_id, inner.session_key) == (
            "",
            sampling,
            "r",
            "s",
        )
    # Only the prompt is cut, not a long string elsewhere; broken bytes are left to the parser.
    assert wire.cut_field(request.SerializeToString(), [1], 100_000) is None
    assert wire.cut_field(b"\x0a\xff\xff\xff", [1], 1) is None
