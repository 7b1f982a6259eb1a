"""How far one request has got: the one record that its usage, its metrics,
its spans and its log line read. The servicer starts it when the call
arrives (with the call's deadline, read once), the dispatcher writes it once
per engine output, and the rest read it when the request or an attempt ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router.engine_types import EngineDelta
from router.ledger import Outcome


@dataclass
class Progress:
    arrived: float  # when the router began with the request (time.monotonic())
    deadline: float | None = None  # when its gRPC deadline passes (monotonic); None: none
    prompt_tokens: int = 0
    completion_tokens: int = 0  # handed to the client, every choice
    cached_tokens: int = 0  # of the prompt, found in the rank's prefix cache
    finish_reasons: list[str] = field(default_factory=list)
    outcome: Outcome = Outcome.CANCELLED  # SERVED once the engine finished it
    first_token_at: float | None = None
    # Per choice: (its first token's time, its last one's, its tokens).
    choices: dict[int, tuple[float, float, int]] = field(default_factory=dict)

    @classmethod
    def starting(cls, seconds_left: float | None) -> Progress:
        """A request arriving now with `seconds_left` to its deadline (None: none)."""
        now = time.monotonic()
        return cls(now, None if seconds_left is None else now + seconds_left)

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def output(self, delta: EngineDelta) -> None:
        """Counts one engine output, as it is handed to the client."""
        if tokens := len(delta.token_ids):
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            first, _, count = self.choices.get(delta.index, (now, now, 0))
            self.choices[delta.index] = (first, now, count + tokens)
            self.completion_tokens += tokens
        if delta.finish_reason:
            self.finish_reasons.append(delta.finish_reason)
        if delta.finished:
            self.cached_tokens = delta.cached_tokens
            self.outcome = Outcome.SERVED

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds between two tokens of a choice, on average over the
        choices that have two or more (None if none has)."""
        gaps = [
            (last - first) / (count - 1)
            for first, last, count in self.choices.values()
            if count > 1
        ]
        return sum(gaps) / len(gaps) if gaps else None
