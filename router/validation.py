"""Checks a GenerateRequest before the engine is touched.

Every rejection is INVALID_ARGUMENT with the path of the offending field first
in the message (`sampling.top_p: ...`), so a client can tell what to fix. The
checks mirror what vLLM itself would reject later, where vLLM's error would be
less precise or, for some inputs, would reach the engine process.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dprouter.v1 import generate_pb2
from router.engine_types import Sampling
from router.errors import RequestError, invalid_argument
from router.wire import oversized_prompt

# The metadata key vLLM's own gRPC front end uses to pin a rank.
RANK_METADATA_KEY = "x-data-parallel-rank"
MAX_REQUEST_ID_CHARS = 128
MAX_SESSION_KEY_CHARS = 256
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ModelLimits:
    """What the served model and the rank pool allow."""

    max_model_len: int
    vocab_size: int
    data_parallel_size: int
    # The engine's --max-logprobs (vLLM's default 20; -1 means the vocabulary).
    max_logprobs: int = 20
    # The most UTF-8 bytes of text that one token of the vocabulary stands
    # for (at least 4); None where unknown, which leaves prompts unbounded
    # by bytes.
    max_token_bytes: int | None = None


@dataclass(frozen=True)
class RequestLimits:
    """What the operator allows one request (router flags), on top of what the
    model allows; None is no limit of the router's own."""

    max_prompt_tokens: int | None = None
    max_n: int | None = None
    max_tokens: int | None = None


NO_LIMITS = RequestLimits()


def max_prompt_tokens(limits: ModelLimits, allowed: RequestLimits) -> tuple[int, str]:
    """The most prompt tokens a request may have, and what sets that limit."""
    if allowed.max_prompt_tokens is not None and allowed.max_prompt_tokens < limits.max_model_len:
        return allowed.max_prompt_tokens, f"this router's limit of {allowed.max_prompt_tokens}"
    return limits.max_model_len, f"the model's context of {limits.max_model_len}"


def max_prompt_bytes(limits: ModelLimits, allowed: RequestLimits) -> int | None:
    """The most UTF-8 bytes of prompt text that could tokenize within the
    prompt token limit: a longer text is refused before a tokenizer spends
    time on it (4 MB took the tiny test model's tokenizer 2-3 s)."""
    if limits.max_token_bytes is None:
        return None
    return max_prompt_tokens(limits, allowed)[0] * limits.max_token_bytes


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


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise invalid_argument(field, f"must be a finite number, got {value}")
    return value


def _check_tokens(field: str, ids: Sequence[int], limits: ModelLimits) -> list[int]:
    """The ids as a list, once each is known to be in the vocabulary. `max`
    over a list, then a search only for a bad id: a Python loop over every
    id cost 80 us at 1,024 tokens."""
    ids = list(ids)
    if ids and max(ids) >= limits.vocab_size:
        i, token = next((i, t) for i, t in enumerate(ids) if t >= limits.vocab_size)
        raise invalid_argument(
            f"{field}[{i}]",
            f"token id {token} is outside the vocabulary [0, {limits.vocab_size})",
        )
    return ids


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


def check_prompt_tokens(
    field: str, prompt_tokens: int, limits: ModelLimits, allowed: RequestLimits = NO_LIMITS
) -> None:
    """The prompt's length in tokens against the router's limit and the context."""
    if allowed.max_prompt_tokens is not None and prompt_tokens > allowed.max_prompt_tokens:
        raise invalid_argument(
            field,
            f"the prompt is {prompt_tokens} tokens, above this router's limit of "
            f"{allowed.max_prompt_tokens}",
        )
    if prompt_tokens >= limits.max_model_len:
        raise invalid_argument(
            field,
            f"the prompt is {prompt_tokens} tokens; the model's context is "
            f"{limits.max_model_len}, which leaves no room to generate",
        )


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
            None, _check_tokens("prompt_token_ids", request.prompt_token_ids, limits), None
        )
    for i, message in enumerate(request.messages):
        if not message.role:
            raise invalid_argument(f"messages[{i}].role", "must not be empty")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    # The template renders roles as text too.
    texts = [text for m in messages for text in (m["role"], m["content"])]
    _check_text_bytes("messages", texts, limits, allowed)
    return Prompt(None, None, messages)


def _check_sampling(
    s: generate_pb2.SamplingParams, limits: ModelLimits, allowed: RequestLimits
) -> None:
    def field(name: str) -> str:
        return f"sampling.{name}"

    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise invalid_argument(field("max_tokens"), f"must be at least 1, got {s.max_tokens}")
    if (
        s.HasField("max_tokens")
        and allowed.max_tokens is not None
        and s.max_tokens > allowed.max_tokens
    ):
        raise invalid_argument(
            field("max_tokens"),
            f"{s.max_tokens} is above this router's limit of {allowed.max_tokens}",
        )
    if s.HasField("min_tokens") and not 0 <= s.min_tokens <= max_tokens_or_default(s):
        raise invalid_argument(
            field("min_tokens"), f"must be in [0, max_tokens], got {s.min_tokens}"
        )
    if s.HasField("temperature") and not 0 <= _finite(field("temperature"), s.temperature) <= 2:
        raise invalid_argument(field("temperature"), f"must be in [0, 2], got {s.temperature}")
    if s.HasField("top_p") and not 0 < _finite(field("top_p"), s.top_p) <= 1:
        raise invalid_argument(field("top_p"), f"must be in (0, 1], got {s.top_p}")
    if s.HasField("top_k") and s.top_k < -1:
        raise invalid_argument(field("top_k"), f"must be -1, 0 or positive, got {s.top_k}")
    if s.HasField("min_p") and not 0 <= _finite(field("min_p"), s.min_p) <= 1:
        raise invalid_argument(field("min_p"), f"must be in [0, 1], got {s.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        if s.HasField(name) and not -2 <= _finite(field(name), getattr(s, name)) <= 2:
            raise invalid_argument(field(name), f"must be in [-2, 2], got {getattr(s, name)}")
    if (
        s.HasField("repetition_penalty")
        and not 0 < _finite(field("repetition_penalty"), s.repetition_penalty) <= 2
    ):
        raise invalid_argument(
            field("repetition_penalty"), f"must be in (0, 2], got {s.repetition_penalty}"
        )
    if s.HasField("n") and s.n < 1:
        raise invalid_argument(field("n"), f"must be at least 1, got {s.n}")
    if allowed.max_n is not None and s.n > allowed.max_n:
        raise invalid_argument(field("n"), f"{s.n} is above this router's limit of {allowed.max_n}")
    most = limits.vocab_size if limits.max_logprobs < 0 else limits.max_logprobs
    if s.HasField("logprobs") and not 0 <= s.logprobs <= most:
        raise invalid_argument(field("logprobs"), f"must be in [0, {most}], got {s.logprobs}")
    for i, stop in enumerate(s.stop):
        if not stop:
            raise invalid_argument(f"{field('stop')}[{i}]", "must not be empty")
    if s.stop and s.HasField("detokenize") and not s.detokenize:
        raise invalid_argument(
            field("stop"), "stop strings are matched in the text, which detokenize=false leaves out"
        )
    _check_tokens(field("stop_token_ids"), s.stop_token_ids, limits)


def max_tokens_or_default(s: generate_pb2.SamplingParams) -> int:
    return s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS


def check_request(
    request: generate_pb2.GenerateRequest,
    metadata: Sequence[tuple[str, str | bytes]],
    limits: ModelLimits,
    allowed: RequestLimits = NO_LIMITS,
) -> CheckedRequest:
    """Every check that needs no tokenizer, in the order a client reads the fields."""
    prompt = _prompt(request, limits, allowed)
    _check_sampling(request.sampling, limits, allowed)
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


def tokenize(
    prompt: Prompt,
    encode: Callable[[str], list[int]],
    render_chat: Callable[[list[dict[str, str]]], list[int]],
) -> list[int]:
    """The prompt as token ids; a chat template that rejects the messages is the
    client's error."""
    if prompt.token_ids is not None:
        return prompt.token_ids
    if prompt.text is not None:
        return encode(prompt.text)
    assert prompt.messages is not None
    try:
        return render_chat(prompt.messages)
    except Exception as e:  # jinja2 raises its own types from templates
        raise invalid_argument("messages", f"the chat template rejected them: {e}") from None


def engine_sampling(
    s: generate_pb2.SamplingParams,
    prompt_field: str,
    prompt_tokens: int,
    limits: ModelLimits,
    allowed: RequestLimits = NO_LIMITS,
) -> Sampling:
    """The sampling parameters with defaults filled in, checked against the
    context and the router's limits."""
    check_prompt_tokens(prompt_field, prompt_tokens, limits, allowed)
    room = limits.max_model_len - prompt_tokens
    # An unset max_tokens defaults within the context and the router's limit.
    default = min(DEFAULT_MAX_TOKENS, room, allowed.max_tokens or DEFAULT_MAX_TOKENS)
    max_tokens = s.max_tokens if s.HasField("max_tokens") else default
    if max_tokens > room:
        raise invalid_argument(
            "sampling.max_tokens",
            f"{max_tokens} tokens after a {prompt_tokens}-token prompt exceed the "
            f"model's context of {limits.max_model_len}",
        )
    return Sampling(
        max_tokens=max_tokens,
        min_tokens=s.min_tokens,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        n=s.n if s.HasField("n") else 1,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        ignore_eos=s.ignore_eos,
        skip_special_tokens=s.skip_special_tokens if s.HasField("skip_special_tokens") else True,
        detokenize=s.detokenize if s.HasField("detokenize") else True,
    )
