"""A request's sampling parameters: checked field by field (INVALID_ARGUMENT
naming the field), then, once the prompt's length is known, with vLLM's
defaults filled in and checked against the context (`Sampling`)."""

from __future__ import annotations

import math

from dprouter.v1 import generate_pb2
from router.engine_types import Sampling
from router.errors import invalid_argument
from router.limits import (
    NO_LIMITS,
    ModelLimits,
    RequestLimits,
    check_prompt_tokens,
    check_token_ids,
)

DEFAULT_MAX_TOKENS = 16


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise invalid_argument(field, f"must be a finite number, got {value}")
    return value


def check_sampling(
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
    check_token_ids(field("stop_token_ids"), s.stop_token_ids, limits)


def max_tokens_or_default(s: generate_pb2.SamplingParams) -> int:
    return s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS


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
