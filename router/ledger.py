"""The router's book of its ranks: each rank's state and the requests the
router has on it, counted the moment a request is routed.

Counting at routing time, not when the engine starts the request, is what
lets a burst of requests spread out: each decision sees the ones before it.
The counts are the router's own, so they hold for any topology.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Weight of the newest request in the moving averages of time to first token
# and duration: about the last ten requests count.
EWMA_WEIGHT = 0.2


class RankState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


class Outcome(enum.Enum):
    SERVED = "served"  # ran to its end (length, stop)
    FAILED = "failed"
    CANCELLED = "cancelled"  # the client cancelled, vanished or ran out of deadline


@dataclass(frozen=True)
class EngineLoad:
    """What a rank's engine reports about itself (with some lag)."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class RankLoad:
    """A snapshot of one rank: the router's own counts and the engine's report."""

    rank: int
    state: RankState
    in_flight: int
    queued_prompt_tokens: int  # prompt tokens of in-flight requests with no output yet
    waiting: int
    running: int
    kv_cache_usage: float
    served: int
    failed: int
    cancelled: int
    # Moving averages over recent requests (None before the first): seconds
    # from routing to the first output, and to the end of a served request.
    ttft_s: float | None = None
    duration_s: float | None = None
    full: bool = False  # at its queue bound: takes no new request (admission.py)


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + EWMA_WEIGHT * (sample - mean)


@dataclass
class _Counts:
    in_flight: int = 0
    queued_prompt_tokens: int = 0
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    ttft_s: float | None = None
    duration_s: float | None = None


@dataclass
class _Entry:
    rank: int
    queued_prompt_tokens: int
    routed_at: float


class Ledger:
    """A rank serves when it is healthy (the watchdog's call) and not drained
    (the operator's call, or shutdown's)."""

    def __init__(self, ranks: int, healthy: bool = True) -> None:
        self._counts = [_Counts() for _ in range(ranks)]
        self._healthy = [healthy] * ranks
        self._drained = [False] * ranks
        self._entries: dict[str, _Entry] = {}  # by engine request id

    @property
    def ranks(self) -> int:
        return len(self._counts)

    def state(self, rank: int) -> RankState:
        if not self._healthy[rank]:
            return RankState.UNHEALTHY
        return RankState.DRAINING if self._drained[rank] else RankState.SERVING

    def healthy(self, rank: int) -> bool:
        return self._healthy[rank]

    def set_healthy(self, rank: int, healthy: bool) -> None:
        self._healthy[rank] = healthy

    def set_drained(self, rank: int, drained: bool) -> None:
        self._drained[rank] = drained

    def reserve(self, request_id: str, rank: int, prompt_tokens: int) -> None:
        """A request was routed to `rank`."""
        counts = self._counts[rank]
        counts.in_flight += 1
        counts.queued_prompt_tokens += prompt_tokens
        self._entries[request_id] = _Entry(rank, prompt_tokens, time.monotonic())

    def prefilled(self, request_id: str) -> None:
        """The request produced its first output: its prompt is no longer queued."""
        entry = self._entries.get(request_id)
        if entry is not None and entry.queued_prompt_tokens:
            counts = self._counts[entry.rank]
            counts.queued_prompt_tokens -= entry.queued_prompt_tokens
            counts.ttft_s = _average(counts.ttft_s, time.monotonic() - entry.routed_at)
            entry.queued_prompt_tokens = 0

    def release(self, request_id: str, outcome: Outcome) -> bool:
        """The request left its rank; False if it had already been released."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        counts = self._counts[entry.rank]
        counts.in_flight -= 1
        counts.queued_prompt_tokens -= entry.queued_prompt_tokens
        if outcome is Outcome.SERVED:
            counts.served += 1
            counts.duration_s = _average(counts.duration_s, time.monotonic() - entry.routed_at)
        elif outcome is Outcome.FAILED:
            counts.failed += 1
        else:
            counts.cancelled += 1
        return True

    def loads(self, engine: Sequence[EngineLoad] | None) -> list[RankLoad]:
        """Every rank's snapshot, with the engines' reports when there are any."""
        reports = engine or [EngineLoad()] * len(self._counts)
        return [
            RankLoad(
                rank=rank,
                state=self.state(rank),
                in_flight=c.in_flight,
                queued_prompt_tokens=c.queued_prompt_tokens,
                waiting=report.waiting,
                running=report.running,
                kv_cache_usage=report.kv_cache_usage,
                served=c.served,
                failed=c.failed,
                cancelled=c.cancelled,
                ttft_s=c.ttft_s,
                duration_s=c.duration_s,
            )
            for rank, (c, report) in enumerate(zip(self._counts, reports, strict=True))
        ]
