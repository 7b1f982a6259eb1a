"""Checks a GenerateRequest before the engine is touched.

Every rejection is INVALID_ARGUMENT with the path of the offending field first
in the message (`sampling.top_p: ...`), so a client can tell what to fix. The
checks mirror what vLLM itself would reject later, where vLLM's error would be
less precise or, for some inputs, would reach the engine process.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dprouter.v1 import generate_pb2
from router.errors import RequestError, invalid_argument
from router.limits import (
    NO_LIMITS,
    ModelLimits,
    RequestLimits,
    check_prompt_tokens,
    check_token_ids,
    max_prompt_bytes,
    max_prompt_tokens,
)
from router.sampling import check_sampling
from router.wire import oversized_prompt

# The metadata key vLLM's own gRPC front end uses to pin a rank.
RANK_METADATA_KEY = "x-data-parallel-rank"
MAX_REQUEST_ID_CHARS = 128
MAX_SESSION_KEY_CHARS = 256


@dataclass(frozen=True)
class Prompt:
    """A request's input, before tokenization: exactly one kind is set."""

    text: str | None
    token_ids: list[int] | None
    messages: list[dict[str, str]] | None

    @property
    def field(self) -> str:
        if self.text is not None:
            return "prompt"
        return "prompt_token_ids" if self.token_ids is not None else "messages"


@dataclass(frozen=True)
class Pin:
    """An explicit rank in the request, and where it was set."""

    rank: int
    field: str  # data_parallel_rank, or the x-data-parallel-rank metadata key


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose fields passed every check that needs no tokenizer."""

    request_id: str
    prompt: Prompt
    sampling: generate_pb2.SamplingParams
    rank_pin: Pin | None
    session_key: str
    priority: int


def _check_text_bytes(
    field: str, texts: Sequence[str], limits: ModelLimits, allowed: RequestLimits
) -> None:
    bound = max_prompt_bytes(limits, allowed)
    if bound is None:
        return
    # A character is 1-4 bytes: most prompts pass without being encoded.
    chars = sum(len(t) for t in texts)
    if chars * 4 <= bound:
        return
    size = chars if chars > bound else sum(len(t.encode()) for t in texts)
    if size > bound:
        raise _too_long(field, size, size == chars, bound, limits, allowed)


def _too_long(
    field: str, size: int, at_least: bool, bound: int, limits: ModelLimits, allowed: RequestLimits
) -> RequestError:
    return invalid_argument(
        field,
        f"{'at least ' if at_least else ''}{size} bytes of text, more than "
        f"{max_prompt_tokens(limits, allowed)[1]} tokens can hold ({bound} bytes: "
        f"this model's longest token is {limits.max_token_bytes} bytes)",
    )


def _check_prompt_size(limits: ModelLimits, allowed: RequestLimits) -> None:
    """Refuses a prompt the wire layer found over the byte bound and left
    unparsed (`wire.oversized_prompt`)."""
    size, bound = oversized_prompt(), max_prompt_bytes(limits, allowed)
    if size is not None and bound is not None and size > bound:
        raise _too_long("prompt", size, False, bound, limits, allowed)


def _check_metadata_safe(field: str, value: str) -> None:
    """gRPC metadata holds printable ASCII only: a value with anything else
    that reaches the response headers makes gRPC itself fail the call with
    INTERNAL ("Invalid metadata"), after the router has accepted it."""
    if value.isascii() and value.isprintable():  # exactly 0x20-0x7E, in C
        return
    i, char = next((i, c) for i, c in enumerate(value) if not " " <= c <= "~")
    raise invalid_argument(
        field,
        f"character {i} is {char!r} (U+{ord(char):04X}); only printable ASCII "
        "(0x20-0x7E) is allowed, as it is sent back in response metadata",
    )


def _rank_pin(
    request: generate_pb2.GenerateRequest,
    metadata: Sequence[tuple[str, str | bytes]],
    limits: ModelLimits,
) -> Pin | None:
    pins: list[tuple[str, int]] = []
    if request.HasField("data_parallel_rank"):
        pins.append(("data_parallel_rank", request.data_parallel_rank))
    for key, value in metadata:
        if key == RANK_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                pins.append((RANK_METADATA_KEY, int(text)))
            except ValueError:
                raise invalid_argument(
                    RANK_METADATA_KEY, f"must be an integer rank, got {text!r}"
                ) from None
    for field, rank in pins:
        if not 0 <= rank < limits.data_parallel_size:
            raise invalid_argument(
                field, f"rank {rank} is outside [0, {limits.data_parallel_size})"
            )
    if len({rank for _, rank in pins}) > 1:
        raise invalid_argument(
            "data_parallel_rank", f"disagrees with the {RANK_METADATA_KEY} metadata"
        )
    return Pin(pins[0][1], pins[0][0]) if pins else None


def _prompt(
    request: generate_pb2.GenerateRequest, limits: ModelLimits, allowed: RequestLimits
) -> Prompt:
    # Read once: each read of a string field copies it (10 ms at 4 MB).
    text = request.prompt
    given = [
        name
        for name, present in (
            ("prompt", bool(text) or oversized_prompt() is not None),
            ("prompt_token_ids", bool(request.prompt_token_ids)),
            ("messages", bool(request.messages)),
        )
        if present
    ]
    if not given:
        raise invalid_argument("prompt", "empty input: set prompt, prompt_token_ids or messages")
    if len(given) > 1:
        raise invalid_argument(given[1], f"set only one input, not both {given[0]} and {given[1]}")
    _check_prompt_size(limits, allowed)
    if text:
        _check_text_bytes("prompt", [text], limits, allowed)
        return Prompt(text, None, None)
    if request.prompt_token_ids:
        # Before the copy into a list: a 4 MB message holds a million ids.
        check_prompt_tokens("prompt_token_ids", len(request.prompt_token_ids), limits, allowed)
        return Prompt(
            None, check_token_ids("prompt_token_ids", request.prompt_token_ids, limits), None
        )
    for i, message in enumerate(request.messages):
        if not message.role:
            raise invalid_argument(f"messages[{i}].role", "must not be empty")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    # The template renders roles as text too.
    texts = [text for m in messages for text in (m["role"], m["content"])]
    _check_text_bytes("messages", texts, limits, allowed)
    return Prompt(None, None, messages)


def check_request(
    request: generate_pb2.GenerateRequest,
    metadata: Sequence[tuple[str, str | bytes]],
    limits: ModelLimits,
    allowed: RequestLimits = NO_LIMITS,
) -> CheckedRequest:
    """Every check that needs no tokenizer, in the order a client reads the fields."""
    prompt = _prompt(request, limits, allowed)
    check_sampling(request.sampling, limits, allowed)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    # Sent back in the x-request-id header. The session key is not echoed
    # (only traced and logged), so it may hold any text.
    _check_metadata_safe("request_id", request.request_id)
    if len(request.session_key) > MAX_SESSION_KEY_CHARS:
        raise invalid_argument("session_key", f"longer than {MAX_SESSION_KEY_CHARS} characters")
    return CheckedRequest(
        request_id=request.request_id or f"dpr-{uuid.uuid4().hex}",
        prompt=prompt,
        sampling=request.sampling,
        rank_pin=_rank_pin(request, metadata, limits),
        session_key=request.session_key,
        priority=request.priority,
    )
