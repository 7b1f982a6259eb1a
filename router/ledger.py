"""The router's book of its ranks: each rank's state and the requests the
router has on it, counted the moment a request is routed.

Counting at routing time, not when the engine starts the request, is what
lets a burst of requests spread out: each decision sees the ones before it.
The counts are the router's own, so they hold for any topology.
"""

from __future__ import annotations

import enum
import itertools
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
    slots: int  # requests its engine can run at once (`Ledger.slots`)
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
    running: int = 0  # in-flight requests with a slot
    blocks: int = 0  # KV blocks the in-flight requests' prompts and budgets fill


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

    def __init__(
        self,
        ranks: int,
        capacity: int,
        healthy: bool = True,
        kv_blocks: int | None = None,
        block_size: int = 1,
    ) -> None:
        self._capacity = capacity  # requests one engine runs at once
        self._kv_blocks = kv_blocks  # blocks one engine's KV cache holds (None: unknown)
        self._block_size = block_size  # tokens a block holds
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
        entry = Entry(rank, prompt_tokens, budget, time.monotonic(), 0.0)
        counts.in_flight += 1
        counts.version += 1
        counts.queued_prompt_tokens += prompt_tokens
        counts.blocks += self._blocks(entry)
        self._entries[rank][request_id] = entry
        self._rank_of[request_id] = rank
        self._fill_slots(rank, entry.routed_at)
        return entry

    def slots(self, rank: int) -> int:
        """Requests the rank's engine can run at once: its max_num_seqs, or
        fewer where the in-flight requests' prompts and budgets would not
        fit its KV cache (vLLM preempts the newest then, to recompute later)."""
        counts = self._counts[rank]
        if self._kv_blocks is None or not counts.in_flight:
            return self._capacity
        per_request = counts.blocks / counts.in_flight
        return max(1, min(self._capacity, int(self._kv_blocks // per_request)))

    def _blocks(self, entry: Entry) -> int:
        """The KV blocks a request fills once its whole budget is out."""
        return -(-(entry.prompt_tokens + entry.budget) // self._block_size)

    def _fill_slots(self, rank: int, now: float) -> None:
        """Gives free slots to the oldest requests waiting for one. Slots go
        oldest first, so those waiting are the newest entries: they are
        found from the end, not by a walk past every running one."""
        counts = self._counts[rank]
        waiting = counts.in_flight - counts.running
        free = min(self.slots(rank) - counts.running, waiting)
        if free <= 0:
            return
        newest_first = list(itertools.islice(reversed(self._entries[rank].values()), waiting))
        for entry in newest_first[-free:]:
            entry.slot_at = now
        counts.running += free

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
        counts = self._counts[rank]
        counts.in_flight -= 1
        counts.version += 1
        counts.blocks -= self._blocks(entry)
        if entry.slot_at:  # its slot goes to the oldest request waiting for one
            counts.running -= 1
            self._fill_slots(rank, time.monotonic())
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
        return Backlog(Pace(steps, counts.prefill_tps), self.slots(rank), running, waiting)

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
