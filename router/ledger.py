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

from router.pace import Pace

# Weight of the newest request in the moving average of its rank's prefill
# rate: about the last ten requests count.
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
    full: bool = False  # at its queue bound: takes no new request (admission.py)


@dataclass(frozen=True)
class Backlog:
    """A rank's in-flight requests, in arrival order, and its pace: what the
    time until one of its slots frees is estimated from (admission.py)."""

    pace: Pace
    # (prompt tokens, output budget, seconds since it got its slot, output
    # tokens so far) of the requests the engine runs.
    running: list[tuple[int, int, float, int]]
    # (prompt tokens, output budget) of those waiting for a slot, oldest first.
    waiting: list[tuple[int, int]]


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + EWMA_WEIGHT * (sample - mean)


@dataclass
class _Counts:
    in_flight: int = 0
    queued_prompt_tokens: int = 0
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    prefill_tps: float | None = None
    version: int = 0  # counts the requests that came and went


@dataclass(slots=True)
class Entry:
    """One routed request. The dispatcher counts its output tokens here."""

    rank: int
    prompt_tokens: int
    budget: int  # output tokens it may produce (max_tokens x n)
    routed_at: float
    # When the engine could start it: at once, or when a request before it
    # left a rank that was running all it can (0.0: still waiting). Wall
    # time, not token counts: the router reads a stream's tokens late when
    # it is busy.
    slot_at: float
    first_at: float = 0.0  # its first output token (0.0: none yet)
    tokens: int = 0
    released: bool = False


class Ledger:
    """A rank serves when it is healthy (the watchdog's call) and not drained
    (the operator's call, or shutdown's)."""

    def __init__(self, ranks: int, capacity: int, healthy: bool = True) -> None:
        self._capacity = capacity  # requests one engine runs at once
        self._counts = [_Counts() for _ in range(ranks)]
        self._healthy = [healthy] * ranks
        self._healthy_since = [time.monotonic()] * ranks
        self._drained = [False] * ranks
        # By engine request id, per rank, in arrival order.
        self._entries: list[dict[str, Entry]] = [{} for _ in range(ranks)]
        self._rank_of: dict[str, int] = {}

    @property
    def ranks(self) -> int:
        return len(self._counts)

    def state(self, rank: int) -> RankState:
        if not self._healthy[rank]:
            return RankState.UNHEALTHY
        return RankState.DRAINING if self._drained[rank] else RankState.SERVING

    def healthy(self, rank: int) -> bool:
        return self._healthy[rank]

    def healthy_since(self, rank: int) -> float:
        """When the rank last turned healthy (or the ledger began)."""
        return self._healthy_since[rank]

    def set_healthy(self, rank: int, healthy: bool) -> None:
        if healthy and not self._healthy[rank]:
            self._healthy_since[rank] = time.monotonic()
        self._healthy[rank] = healthy

    def set_drained(self, rank: int, drained: bool) -> None:
        self._drained[rank] = drained

    def reserve(self, request_id: str, rank: int, prompt_tokens: int, budget: int) -> Entry:
        """A request was routed to `rank`; its entry counts its output."""
        counts = self._counts[rank]
        now = time.monotonic()
        entry = Entry(
            rank, prompt_tokens, budget, now, now if counts.in_flight < self._capacity else 0.0
        )
        counts.in_flight += 1
        counts.version += 1
        counts.queued_prompt_tokens += prompt_tokens
        self._entries[rank][request_id] = entry
        self._rank_of[request_id] = rank
        return entry

    def version(self, rank: int) -> int:
        """Changes whenever a request comes to or leaves the rank."""
        return self._counts[rank].version

    def entry(self, request_id: str) -> Entry | None:
        rank = self._rank_of.get(request_id)
        return None if rank is None else self._entries[rank].get(request_id)

    def output(self, entry: Entry, tokens: int) -> None:
        """The request produced `tokens` more output tokens."""
        entry.tokens += tokens
        if entry.first_at or not tokens or entry.released:
            return
        # Its first: its prompt is no longer queued.
        entry.first_at = time.monotonic()
        counts = self._counts[entry.rank]
        counts.queued_prompt_tokens -= entry.prompt_tokens
        if entry.slot_at:
            ttft = max(entry.first_at - entry.slot_at, 1e-6)
            counts.prefill_tps = _average(counts.prefill_tps, entry.prompt_tokens / ttft)

    def release(self, request_id: str, outcome: Outcome) -> bool:
        """The request left its rank; False if it had already been released."""
        rank = self._rank_of.pop(request_id, None)
        if rank is None:
            return False
        entries = self._entries[rank]
        entry = entries.pop(request_id)
        entry.released = True
        now = time.monotonic()
        if entry.slot_at:  # its slot goes to the oldest request waiting for one
            waiting = next((e for e in entries.values() if not e.slot_at), None)
            if waiting is not None:
                waiting.slot_at = now
        counts = self._counts[rank]
        counts.in_flight -= 1
        counts.version += 1
        if not entry.first_at:
            counts.queued_prompt_tokens -= entry.prompt_tokens
        if outcome is Outcome.SERVED:
            counts.served += 1
        elif outcome is Outcome.FAILED:
            counts.failed += 1
        else:
            counts.cancelled += 1
        return True

    def backlog(self, rank: int, steps: tuple[tuple[float, float], ...]) -> Backlog:
        """The rank's in-flight requests and its pace: its engine's recent
        `steps` (`Pace.steps`) and its recent requests' prefill rate."""
        now = time.monotonic()
        running, waiting = [], []
        for entry in self._entries[rank].values():
            if entry.slot_at:
                running.append(
                    (entry.prompt_tokens, entry.budget, now - entry.slot_at, entry.tokens)
                )
            else:
                waiting.append((entry.prompt_tokens, entry.budget))
        counts = self._counts[rank]
        return Backlog(Pace(steps, counts.prefill_tps), running, waiting)

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
            )
            for rank, (c, report) in enumerate(zip(self._counts, reports, strict=True))
        ]
