"""Plain types that cross between the router and the engine client (no vLLM here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters, named as vLLM's SamplingParams names them."""

    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    n: int
    logprobs: int | None
    ignore_eos: bool
    skip_special_tokens: bool
    detokenize: bool

    @classmethod
    def greedy(cls, max_tokens: int) -> Sampling:
        """Exactly max_tokens greedy tokens (references and benchmarks)."""
        return cls(
            max_tokens=max_tokens, min_tokens=0, temperature=0.0, top_p=1.0, top_k=0,
            min_p=0.0, seed=None, stop=[], stop_token_ids=[], presence_penalty=0.0,
            frequency_penalty=0.0, repetition_penalty=1.0, n=1, logprobs=None,
            ignore_eos=True, skip_special_tokens=True, detokenize=True,
        )  # fmt: skip


@dataclass(frozen=True)
class EngineRequest:
    """One request as an engine runs it, checked and tokenized by the router."""

    request_id: str  # the engine's id, unique among the requests it holds
    prompt_token_ids: list[int]
    # vLLM's sampling parameters, made by `vllm_compat.engine_sampling_params`:
    # opaque outside the vLLM boundary.
    params: object
    priority: int = 0  # lower first, on ranks that run vLLM's priority scheduling
    trace_headers: Mapping[str, str] | None = None  # the W3C context vLLM's span joins


@dataclass(frozen=True)
class EngineTokenLogprob:
    """The logprob of one generated token and of its top alternatives."""

    token_id: int
    logprob: float
    token: str
    top: list[tuple[int, float, str]]


@dataclass(slots=True)
class EngineDelta:
    """What one engine step added to one choice of a request. One is made per
    streamed token: not frozen, whose `__init__` (object.__setattr__ per
    field) took 1.5 us against 0.6 (timeit); treat it as read-only."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[EngineTokenLogprob]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str
    # Set on the request's last delta.
    finished: bool
    cached_tokens: int
