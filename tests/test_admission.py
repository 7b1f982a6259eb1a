"""Backpressure and deadline arithmetic over plain load snapshots."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from google.rpc import error_details_pb2

from router import admission
from router.admission import QueueLimits
from router.errors import RequestError
from router.ledger import RankLoad, RankState
from router.policies import LeastLoaded, RouteInput
from tests.test_policies import load

LIMITS = QueueLimits(capacity=2, max_queue_per_rank=2)


def timed(rank: int, in_flight: int, ttft: float = 0.1, duration: float = 2.0) -> RankLoad:
    return dataclasses.replace(load(rank, in_flight), ttft_s=ttft, duration_s=duration)


def test_full_ranks_are_skipped_and_all_full_is_resource_exhausted() -> None:
    loads = admission.mark_full([load(0, 4), load(1, 3)], LIMITS)
    assert [ld.full for ld in loads] == [True, False]
    # The least loaded would be rank 1 anyway; make the full rank look idle to the score.
    loads[0] = dataclasses.replace(loads[0], in_flight=0, running=0)
    assert LeastLoaded().decide(RouteInput([1]), loads).rank == 1
    both = admission.mark_full([load(0, 4), load(1, 5)], LIMITS)
    assert LeastLoaded().decide(RouteInput([1]), both).rank is None
    error = admission.all_full(both, LIMITS)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(error.details[0], error_details_pb2.RetryInfo)


def test_retry_delay_is_when_a_slot_frees_up() -> None:
    # Full by one request: one slot must free; a slot frees every 2.0 / 2 s.
    assert admission.retry_delay([timed(0, 4)], LIMITS) == pytest.approx(1.0)
    # Over the bound by two (after a bound was lowered): two slots.
    assert admission.retry_delay([timed(0, 5)], LIMITS) == pytest.approx(2.0)
    # The soonest rank counts; unhealthy ones do not.
    sick = dataclasses.replace(timed(1, 4, duration=0.2), state=RankState.UNHEALTHY)
    assert admission.retry_delay([timed(0, 4), sick], LIMITS) == pytest.approx(1.0)
    assert admission.retry_delay([load(0, 4)], LIMITS) == admission.DEFAULT_RETRY_DELAY_S
    assert admission.retry_delay([timed(0, 4, duration=1e-6)], LIMITS) == (
        admission.MIN_RETRY_DELAY_S
    )


def test_router_bound() -> None:
    limits = QueueLimits(capacity=2, max_queue_per_rank=2, max_in_flight=5)
    admission.check_router_bound([load(0, 2), load(1, 2)], limits)
    with pytest.raises(RequestError) as raised:
        admission.check_router_bound([load(0, 3), load(1, 2)], limits)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = raised.value.details[1]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "ROUTER_QUEUE_FULL"


def test_first_token_estimate_counts_the_queue_ahead() -> None:
    assert admission.first_token_estimate(load(0, 1), LIMITS) is None  # no history
    assert admission.first_token_estimate(timed(0, 1), LIMITS) == pytest.approx(0.1)
    # Two running, one waiting: two must finish first, one every 1 s.
    assert admission.first_token_estimate(timed(0, 3), LIMITS) == pytest.approx(2.1)


def test_deadline_admission() -> None:
    admission.check_deadline(timed(0, 3), LIMITS, None)
    admission.check_deadline(timed(0, 3), LIMITS, 2.5)
    admission.check_deadline(load(0, 3), LIMITS, 0.01)  # no history: no refusal
    for loaded, deadline in ((timed(0, 3), 1.0), (load(0, 0), 0.0)):
        with pytest.raises(RequestError) as raised:
            admission.check_deadline(loaded, LIMITS, deadline)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
