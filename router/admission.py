"""Backpressure and deadline admission: whether a routed request may start.

vLLM queues whatever it is sent (its waiting list has no bound), and a queue
with no bound turns overload into latency for everyone and memory with no
end. So the router bounds it: a rank holds at most what its engine runs at
once (`max_num_seqs`) plus `max_queue_per_rank` waiting requests, and the
router at most `max_in_flight` in all. A full rank gets no new request; when
every serving rank is full, or the router is, a request gets
RESOURCE_EXHAUSTED at once, with a `google.rpc.RetryInfo` delay: when a slot
can be expected to free up.

A request whose deadline ends before its first token can be expected is
refused with DEADLINE_EXCEEDED rather than queued to die. The expectation
comes from the rank's recent requests (the ledger keeps moving averages of
their time to first token and duration) and the queue ahead of it; with no
history yet, only a deadline already over is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from router.errors import RequestError
from router.ledger import RankLoad, RankState

# The retry delay when no request has finished yet to estimate it from, and
# the range an estimate is kept in.
DEFAULT_RETRY_DELAY_S = 1.0
MIN_RETRY_DELAY_S = 0.05
MAX_RETRY_DELAY_S = 30.0


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


def queued_ahead(load: RankLoad, limits: QueueLimits) -> int:
    """Requests that must finish on the rank before one more can start."""
    return max(0, load.in_flight + 1 - limits.capacity)


def first_token_estimate(load: RankLoad, limits: QueueLimits) -> float | None:
    """Seconds until a request sent to the rank now can expect its first
    token; None with no history. A running request ends, and frees a slot,
    every `duration / capacity` seconds on average."""
    if load.ttft_s is None:
        return None
    ahead = queued_ahead(load, limits)
    if not ahead:
        return load.ttft_s
    if load.duration_s is None:
        return None
    return load.ttft_s + ahead * load.duration_s / limits.capacity


def retry_delay(loads: Sequence[RankLoad], limits: QueueLimits) -> float:
    """When a serving rank can be expected to have room again, in seconds: a
    running request ends, and frees a slot, every `duration / capacity`."""
    waits = [
        max(1, load.in_flight - limits.rank_bound + 1) * load.duration_s / limits.capacity
        for load in loads
        if load.state is RankState.SERVING and load.duration_s is not None
    ]
    if not waits:
        return DEFAULT_RETRY_DELAY_S
    return min(max(min(waits), MIN_RETRY_DELAY_S), MAX_RETRY_DELAY_S)


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


def check_router_bound(loads: Sequence[RankLoad], limits: QueueLimits) -> None:
    """RESOURCE_EXHAUSTED when the router holds `max_in_flight` requests."""
    if limits.max_in_flight is None:
        return
    if sum(load.in_flight for load in loads) >= limits.max_in_flight:
        raise exhausted(
            f"the router holds its limit of {limits.max_in_flight} requests",
            "ROUTER_QUEUE_FULL",
            retry_delay(loads, limits),
        )


def check_rank_room(load: RankLoad, limits: QueueLimits) -> None:
    """RESOURCE_EXHAUSTED when the chosen rank (a pin) is full."""
    if load.full:
        raise exhausted(
            f"rank {load.rank} holds its limit of {limits.rank_bound} requests",
            "RANK_QUEUE_FULL",
            retry_delay([load], limits),
        )


def all_full(loads: Sequence[RankLoad], limits: QueueLimits) -> RequestError:
    """The error for a request that no serving rank has room for."""
    return exhausted(
        f"every serving rank holds its limit of {limits.rank_bound} requests",
        "RANK_QUEUE_FULL",
        retry_delay(loads, limits),
    )


def check_deadline(load: RankLoad, limits: QueueLimits, deadline_s: float | None) -> None:
    """DEADLINE_EXCEEDED when the deadline ends before the request's first
    token can be expected on the rank."""
    if deadline_s is None:
        return
    if deadline_s <= 0:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline is already over")
    expected = first_token_estimate(load, limits)
    if expected is not None and expected > deadline_s:
        raise RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the deadline ({deadline_s:.3f} s) ends before the first token can be expected "
            f"on rank {load.rank} ({expected:.3f} s, with {queued_ahead(load, limits)} "
            "requests to finish first)",
        )
