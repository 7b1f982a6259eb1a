"""What a request may ask for: the model's and the rank pool's limits, the
router's own per-request limits (its flags), and the prompt bounds they set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.errors import invalid_argument


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


def check_token_ids(field: str, ids: Sequence[int], limits: ModelLimits) -> list[int]:
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
