"""The benchmark's workload and what one request measures.

Every system gets the same requests: prompts of random token ids (no
tokenizer differences between front ends) and exact output lengths (greedy,
EOS ignored), drawn from a fixed seed. Each round and concurrency draws its
own prompts from that seed, so no system is served from a prefix cache warmed
by an earlier run of the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shape:
    """The ranges that prompt and output lengths are drawn from (inclusive)."""

    prompt_tokens: tuple[int, int] = (16, 256)
    output_tokens: tuple[int, int] = (16, 128)
    # Token ids are drawn from [first_token_id, vocab_size): above the special tokens.
    first_token_id: int = 3


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def requests(seed: int, count: int, vocab_size: int, shape: Shape) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(shape.first_token_id, vocab_size) for _ in range(
                rng.randint(*shape.prompt_tokens))],
            rng.randint(*shape.output_tokens),
        )
        for _ in range(count)
    ]  # fmt: skip


@dataclass
class Timing:
    """One request, in seconds of time.perf_counter() in the load process:
    when it was sent, and when each streamed message with tokens arrived and
    how many tokens it carried."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    refusals: int = 0  # RESOURCE_EXHAUSTED answers before it was admitted

    def add(self, at: float, tokens: int) -> None:
        if tokens:
            self.arrivals.append(at)
            self.tokens.append(tokens)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def output_tokens(self) -> int:
        return sum(self.tokens)

    def inter_token(self) -> list[float]:
        """Per token after the first: the gap before its message, shared out
        among the tokens of that message (a message of k tokens counts k
        times, gap / k each)."""
        gaps = []
        for i in range(1, len(self.arrivals)):
            k = self.tokens[i]
            gaps += [(self.arrivals[i] - self.arrivals[i - 1]) / k] * k
        return gaps


@dataclass
class Run:
    """One system at one concurrency, one round: what the load process reports."""

    concurrency: int
    wall_s: float
    timings: list[Timing]
    # CPU seconds (user + system) the system's front-end process used during the run.
    front_end_cpu_s: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        timings = [Timing(**t) for t in data.pop("timings")]
        return cls(timings=timings, **data)
