"""Backpressure and deadline admission: whether a routed request may start.

vLLM queues whatever it is sent (its waiting list has no bound), and a queue
with no bound turns overload into latency for everyone and memory with no
end. So the router bounds it: a rank holds at most what its engine runs at
once (`max_num_seqs`) plus `max_queue_per_rank` waiting requests, and the
router at most `max_in_flight` in all. A full rank gets no new request; when
every serving rank is full, or the router is, a request gets
RESOURCE_EXHAUSTED at once, with a `google.rpc.RetryInfo` delay: when a slot
can be expected to free up.

That expectation comes from what is in flight: each request's remaining
output budget at its rank's pace (the ledger's `Backlog`; `pace.py`),
played out over the rank's slots (`backlog.py`). A request with a
deadline is admitted only if it can also finish its whole budget in time,
in the batch it would join, having waited for a slot if it must; otherwise
it is refused with RESOURCE_EXHAUSTED and when that would change: load, not
the request, is what fails it. One that could not finish even alone, or
whose first token cannot come in time, is judged by its first token alone
(DEADLINE_EXCEEDED). With no pace known yet (the rank's engine has not
stepped with work), nothing is refused for its deadline, and the retry
delay is a default.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from router.backlog import wait_for_slots
from router.errors import RequestError
from router.ledger import RankLoad, RankState
from router.pace import Pace

# How much longer than at its rank's recent pace a request is allowed to take
# when deciding whether it can finish before its deadline: a rank's pace under
# load moved by up to 2x between waves of requests here.
WORK_MARGIN = 1.5
# A rank's in-flight requests' expected ends (`backlog.completion_times`), by rank.
EndsOf = Callable[[int], Sequence[float] | None]
# The retry delay when nothing is known to estimate it from, and the range
# an estimate is kept in.
DEFAULT_RETRY_DELAY_S = 1.0
MIN_RETRY_DELAY_S = 0.05
MAX_RETRY_DELAY_S = 300.0


@dataclass(frozen=True)
class QueueLimits:
    capacity: int  # requests one rank's engine runs at once (vLLM's max_num_seqs)
    max_queue_per_rank: int  # requests a rank holds beyond `capacity`
    max_in_flight: int | None = None  # requests the router holds in all; None: no bound

    @property
    def rank_bound(self) -> int:
        return self.capacity + self.max_queue_per_rank


def mark_full(loads: Sequence[RankLoad], limits: QueueLimits) -> list[RankLoad]:
    """The loads, with `full` set on ranks at their bound (policies skip them)."""
    return [
        dataclasses.replace(load, full=True) if load.in_flight >= limits.rank_bound else load
        for load in loads
    ]


def _request_s(pace: Pace, prompt_tokens: int, budget: int, running: int) -> float:
    seconds = pace.request_s(prompt_tokens, budget, running)
    assert seconds is not None  # the pace is known
    return seconds


def retry_delay(waits: Sequence[float | None]) -> float:
    """The delay to tell a refused client: the soonest of the known waits."""
    known = [wait for wait in waits if wait is not None]
    if not known:
        return DEFAULT_RETRY_DELAY_S
    return min(max(min(known), MIN_RETRY_DELAY_S), MAX_RETRY_DELAY_S)


def room_wait(load: RankLoad, limits: QueueLimits, ends: Sequence[float] | None) -> float | None:
    """Seconds until a full rank can take one more request."""
    return wait_for_slots(ends, load.in_flight - limits.rank_bound + 1)


class Refusal(RequestError):
    """RESOURCE_EXHAUSTED with when to retry (`RetryInfo`) and why
    (`ErrorInfo`)."""

    def __init__(self, cause: str, reason: str, delay_s: float) -> None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(delay_s * 1e9))
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{cause}; retry in {delay_s:.2f} s",
            details=[
                error_details_pb2.RetryInfo(retry_delay=delay),
                error_details_pb2.ErrorInfo(reason=reason, domain="dprouter"),
            ],
        )
        self.cause = cause
        self.reason = reason
        self.delay_s = delay_s

    def later(self, delay_s: float) -> Refusal:
        """The same refusal with another retry delay."""
        return Refusal(self.cause, self.reason, delay_s)


def retry_delay_of(error: RequestError) -> float:
    """The retry delay a refusal carries (infinite for another error)."""
    return error.delay_s if isinstance(error, Refusal) else float("inf")


class Returns:
    """When refused clients were told to come back, so that each next one is
    told a later time. Told one time, they would all come back at once, to
    room for a few: the rest are refused again, and the router spends its
    time on that herd while every other call waits. Each gets its own turn
    instead, `interval_s` after the one before: how often a slot can be
    expected to free. A turn may be later than MAX_RETRY_DELAY_S, the bound
    of one estimate: capped, every client past it would be told the same time
    and come back as one herd.

    Finding a free turn walks the turns given from the client's own
    estimate on. The last walk's stretch is remembered (`_run`) with the
    widest gap between two of its turns: a walk that enters it at an
    interval wider than half that gap finds no free turn in it and skips to
    its end. Without that, a burst of n refusals took n^2 / 2 steps (0.4 s
    of the router's loop for 1,280)."""

    def __init__(self) -> None:
        self._due: list[float] = []  # the promised times, ascending
        self._run: tuple[float, float, float] = (0.0, 0.0, float("inf"))  # first, last, widest gap

    def assign(self, now: float, delay_s: float, interval_s: float) -> float:
        """The retry delay for a refusal whose own estimate is `delay_s`: the
        first turn from then on that no other client was given."""
        due = self._due
        del due[: bisect.bisect_right(due, now)]  # those came due
        at = now + delay_s
        first, last, run_gap = self._run
        i = start = bisect.bisect_left(due, at - interval_s)
        gap = 0.0  # the widest between the turns walked past
        while i < len(due) and due[i] - at < interval_s:  # no free turn before this one
            if i > start:
                gap = max(gap, due[i] - due[i - 1])
            if first <= due[i] < last and run_gap < 2 * interval_s:
                i = bisect.bisect_left(due, last)
                gap = max(gap, run_gap)
            at = max(at, due[i] + interval_s)
            i += 1
        if start < i:
            gap = max(gap, at - due[i - 1])
        self._run = (due[start] if start < i else at, at, gap)
        bisect.insort(due, at)
        return at - now


def slot_interval(ends: Sequence[Sequence[float] | None]) -> float:
    """Seconds between two slots freeing on any of the ranks, on average,
    from each rank's in-flight requests' expected ends; 0 if none are known."""
    rate = sum(len(rank) / rank[-1] for rank in ends if rank and rank[-1] > 0)
    return 1 / rate if rate else 0.0


def check_router_bound(loads: Sequence[RankLoad], limits: QueueLimits, ends: EndsOf) -> None:
    """RESOURCE_EXHAUSTED when the router holds `max_in_flight` requests."""
    if limits.max_in_flight is None:
        return
    over = sum(load.in_flight for load in loads) - limits.max_in_flight + 1
    if over <= 0:
        return
    known = [e for load in loads if load.in_flight and (e := ends(load.rank)) is not None]
    merged = sorted(end for rank_ends in known for end in rank_ends) if known else None
    raise Refusal(
        f"the router holds its limit of {limits.max_in_flight} requests",
        "ROUTER_QUEUE_FULL",
        retry_delay([wait_for_slots(merged, over)]),
    )


def check_rank_room(load: RankLoad, limits: QueueLimits, ends: EndsOf) -> None:
    """RESOURCE_EXHAUSTED when the chosen rank (a pin) is full."""
    if load.full:
        raise Refusal(
            f"rank {load.rank} holds its limit of {limits.rank_bound} requests",
            "RANK_QUEUE_FULL",
            retry_delay([room_wait(load, limits, ends(load.rank))]),
        )


def all_full(loads: Sequence[RankLoad], limits: QueueLimits, ends: EndsOf) -> RequestError:
    """The error for a request that no serving rank has room for."""
    waits = [
        room_wait(load, limits, ends(load.rank))
        for load in loads
        if load.state is RankState.SERVING
    ]
    return Refusal(
        f"every serving rank holds its limit of {limits.rank_bound} requests",
        "RANK_QUEUE_FULL",
        retry_delay(waits),
    )


@dataclass(frozen=True)
class Ask:
    """What one request asks of its rank: its prompt and its output budget."""

    prompt_tokens: int
    budget: int  # max_tokens x n


def deadline_refusal(
    load: RankLoad,
    slots: int,
    pace: Pace,
    ends: Sequence[float] | None,
    ask: Ask,
    deadline_s: float,
) -> RequestError | None:
    """Why the rank cannot serve the request before its deadline, if it
    cannot, with WORK_MARGIN to spare; the rank runs `slots` requests at
    once (`Ledger.slots`). RESOURCE_EXHAUSTED when load is the
    cause: it would queue and then could not finish its budget in time, or
    it could start at once but not finish in a batch that large; retry when
    enough requests have ended for a batch it could finish in (or, if it
    could not finish even alone, when the slot it would wait for frees).
    DEADLINE_EXCEEDED when its first token cannot come in time. A request
    that could not finish its budget in time even alone is let run: its
    budget is an upper bound (it may stop early)."""
    if deadline_s <= 0:
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline is already over")
    if not pace.known:
        return None
    batch = load.in_flight + 1
    ahead = batch - slots
    if ahead > 0:
        start = wait_for_slots(ends, ahead)
        work = _work_s(pace, ask, slots)
        if start is not None and start + work > deadline_s:
            fits = largest_batch_in_time(pace, ask, deadline_s, slots)
            return Refusal(
                f"the deadline ({deadline_s:.3f} s) ends before the request could finish on "
                f"rank {load.rank}: {ahead} requests must end before it starts "
                f"(~{start:.2f} s), and it needs ~{work:.2f} s",
                "DEADLINE_BEYOND_QUEUE",
                retry_delay([wait_for_slots(ends, batch - fits) if fits else start]),
            )
        return None
    work = _work_s(pace, ask, batch)
    if work > deadline_s and (fits := largest_batch_in_time(pace, ask, deadline_s, batch)):
        return Refusal(
            f"the deadline ({deadline_s:.3f} s) ends before the request could finish on "
            f"rank {load.rank} in a batch of {batch} (~{work:.2f} s); it could in one of {fits}",
            "DEADLINE_BEYOND_BATCH",
            retry_delay([wait_for_slots(ends, batch - fits)]),  # down to `fits`
        )
    first = pace.first_token_s(ask.prompt_tokens, batch)
    if first is not None and first > deadline_s:
        return RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the deadline ({deadline_s:.3f} s) ends before the first token can be expected "
            f"on rank {load.rank} ({first:.3f} s for a {ask.prompt_tokens}-token prompt)",
        )
    return None


def _work_s(pace: Pace, ask: Ask, batch: int) -> float:
    return _request_s(pace, ask.prompt_tokens, ask.budget, batch) * WORK_MARGIN


def largest_batch_in_time(pace: Pace, ask: Ask, deadline_s: float, limit: int) -> int:
    """The largest batch (up to `limit`) in which the request can finish
    before its deadline with WORK_MARGIN to spare; 0 for none. A step takes
    longer the more requests it runs, so the answer is found by bisection."""
    if _work_s(pace, ask, 1) > deadline_s:
        return 0
    low, high = 1, limit  # low fits; above high does not matter
    while low < high:
        middle = (low + high + 1) // 2
        if _work_s(pace, ask, middle) <= deadline_s:
            low = middle
        else:
            high = middle - 1
    return low
