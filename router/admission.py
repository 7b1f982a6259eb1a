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
output budget at its rank's pace (the ledger's `Backlog`), played out over
the rank's slots (`completion_times`). A request that would have to queue is
admitted only if it can also finish its whole budget before its deadline;
otherwise it is refused with RESOURCE_EXHAUSTED and the time it would have
waited: load, not the request, is what fails it. One that can start at once
is refused (DEADLINE_EXCEEDED) only if its first token cannot come in time.
With no pace known yet (no request has produced two tokens), nothing is
refused for its deadline, and the retry delay is a default.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from router.errors import RequestError
from router.ledger import Backlog, Pace, RankLoad, RankState

# How much longer than at its rank's recent pace a request is allowed to take
# when deciding whether it can finish before its deadline: a rank's pace under
# load moved by up to 2x between waves of requests here.
WORK_MARGIN = 1.5
# A rank's in-flight requests' expected ends (`completion_times`), by rank.
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


def completion_times(backlog: Backlog, capacity: int) -> list[float] | None:
    """Seconds from now at which each in-flight request of a rank can be
    expected to end, soonest first; None while its pace is not known.

    A running request ends its budget at the rank's recent pace from when
    it got its slot, and, the more of its budget it has produced, at its own
    pace so far (a rank's pace changes with its load; a few first tokens
    say little). The others wait, and take the slots as they free up."""
    pace = backlog.pace
    if pace.itl_s is None:
        return None
    running = [
        _remaining_s(pace, prompt, budget, elapsed, tokens)
        for prompt, budget, elapsed, tokens in backlog.running
    ]
    queue: deque[tuple[int, int]] = deque(backlog.waiting)
    while queue and len(running) < capacity:  # a bound lowered, or a slot not yet noted
        prompt, budget = queue.popleft()
        running.append(_request_s(pace, prompt, budget))
    heapq.heapify(running)
    ends = []
    while running:
        end = heapq.heappop(running)
        ends.append(end)
        if queue:
            prompt, budget = queue.popleft()
            heapq.heappush(running, end + _request_s(pace, prompt, budget))
    return ends


def _remaining_s(pace: Pace, prompt: int, budget: int, elapsed: float, tokens: int) -> float:
    by_rank = max(_request_s(pace, prompt, budget) - elapsed, 0.0)
    by_itself = (budget - tokens) * elapsed / tokens if tokens else by_rank
    done = min(tokens / budget, 1.0) if budget else 1.0
    return max(done * by_itself + (1 - done) * by_rank, pace.itl_s or 0.0)


def _request_s(pace: Pace, prompt_tokens: int, budget: int) -> float:
    seconds = pace.request_s(prompt_tokens, budget)
    assert seconds is not None  # the pace between tokens is known
    return seconds


def wait_for_slots(ends: Sequence[float] | None, count: int) -> float | None:
    """Seconds until `count` of the requests have ended (0 for none); None
    when not known."""
    if count <= 0:
        return 0.0
    if ends is None or count > len(ends):
        return None
    return ends[count - 1]


def retry_delay(waits: Sequence[float | None]) -> float:
    """The delay to tell a refused client: the soonest of the known waits."""
    known = [wait for wait in waits if wait is not None]
    if not known:
        return DEFAULT_RETRY_DELAY_S
    return min(max(min(known), MIN_RETRY_DELAY_S), MAX_RETRY_DELAY_S)


def room_wait(load: RankLoad, limits: QueueLimits, ends: Sequence[float] | None) -> float | None:
    """Seconds until a full rank can take one more request."""
    return wait_for_slots(ends, load.in_flight - limits.rank_bound + 1)


def retry_delay_of(error: RequestError) -> float:
    """The retry delay a refusal carries (infinite for one without)."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            delay: float = detail.retry_delay.ToTimedelta().total_seconds()
            return delay
    return float("inf")


def exhausted(problem: str, reason: str, delay_s: float) -> RequestError:
    """RESOURCE_EXHAUSTED with when to retry (`RetryInfo`) and why (`ErrorInfo`)."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(delay_s * 1e9))
    return RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{problem}; retry in {delay_s:.2f} s",
        details=[
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_details_pb2.ErrorInfo(reason=reason, domain="dprouter"),
        ],
    )


def check_router_bound(loads: Sequence[RankLoad], limits: QueueLimits, ends: EndsOf) -> None:
    """RESOURCE_EXHAUSTED when the router holds `max_in_flight` requests."""
    if limits.max_in_flight is None:
        return
    over = sum(load.in_flight for load in loads) - limits.max_in_flight + 1
    if over <= 0:
        return
    known = [e for load in loads if load.in_flight and (e := ends(load.rank)) is not None]
    merged = sorted(end for rank_ends in known for end in rank_ends) if known else None
    raise exhausted(
        f"the router holds its limit of {limits.max_in_flight} requests",
        "ROUTER_QUEUE_FULL",
        retry_delay([wait_for_slots(merged, over)]),
    )


def check_rank_room(load: RankLoad, limits: QueueLimits, ends: EndsOf) -> None:
    """RESOURCE_EXHAUSTED when the chosen rank (a pin) is full."""
    if load.full:
        raise exhausted(
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
    return exhausted(
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
    limits: QueueLimits,
    pace: Pace,
    ends: Sequence[float] | None,
    ask: Ask,
    deadline_s: float,
) -> RequestError | None:
    """Why the rank cannot serve the request before its deadline, if it
    cannot: RESOURCE_EXHAUSTED when it would queue and could not finish its
    budget in time (with WORK_MARGIN; retry when the slot it would wait for
    frees), DEADLINE_EXCEEDED when it can start at once but its first token
    cannot come in time. A request that can start at once is let run: its
    budget is an upper bound (it may stop early), and a rank's recent pace
    says little of its pace with fewer requests (measured at a full batch,
    it refused every request of an idle rank)."""
    if deadline_s <= 0:
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline is already over")
    ahead = load.in_flight + 1 - limits.capacity
    expected = pace.request_s(ask.prompt_tokens, ask.budget)
    work = None if expected is None else expected * WORK_MARGIN
    if ahead > 0:
        start = wait_for_slots(ends, ahead)
        if start is not None and work is not None and start + work > deadline_s:
            return exhausted(
                f"the deadline ({deadline_s:.3f} s) ends before the request could finish on "
                f"rank {load.rank}: {ahead} requests must end before it starts "
                f"(~{start:.2f} s), and it needs ~{work:.2f} s",
                "DEADLINE_BEYOND_QUEUE",
                retry_delay([start]),
            )
        return None
    first = pace.first_token_s(ask.prompt_tokens)
    if first is not None and first > deadline_s:
        return RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the deadline ({deadline_s:.3f} s) ends before the first token can be expected "
            f"on rank {load.rank} ({first:.3f} s for a {ask.prompt_tokens}-token prompt)",
        )
    return None
