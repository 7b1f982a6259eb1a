"""Backpressure and deadline arithmetic over plain load snapshots."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from google.rpc import error_details_pb2

from router import admission
from router.admission import Ask, QueueLimits
from router.backlog import completion_times
from router.errors import RequestError
from router.ledger import Backlog, Ledger, Outcome, RankState
from router.pace import MIN_STEPS, Pace, StepTimes
from router.policies import LeastLoaded, RouteInput
from tests.test_policies import load

LIMITS = QueueLimits(capacity=2, max_queue_per_rank=2)
# 0.01 s between two tokens of a request, whatever the batch (steps of 1 and
# of 2 requests took as long); 1,000 prompt tokens a second.
PACE = Pace(steps=((1, 0.01), (2, 0.01)), prefill_tps=1000.0)
# A CPU's: each step takes 0.01 s per request it runs.
IN_PROPORTION = Pace(steps=((1, 0.01), (8, 0.08)), prefill_tps=1000.0)


def no_ends(rank: int) -> None:
    return None


def test_full_ranks_are_skipped_and_all_full_is_resource_exhausted() -> None:
    loads = admission.mark_full([load(0, 4), load(1, 3)], LIMITS)
    assert [ld.full for ld in loads] == [True, False]
    # The least loaded would be rank 1 anyway; make the full rank look idle to the score.
    loads[0] = dataclasses.replace(loads[0], in_flight=0, running=0)
    assert LeastLoaded().decide(RouteInput([1]), loads).rank == 1
    both = admission.mark_full([load(0, 4), load(1, 5)], LIMITS)
    assert LeastLoaded().decide(RouteInput([1]), both).rank is None
    error = admission.all_full(both, LIMITS, no_ends)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(error.details[0], error_details_pb2.RetryInfo)


def test_completion_times_play_the_backlog_out_over_the_slots() -> None:
    no_pace = Backlog(Pace(), 2, [(0, 10, 0.0, 0)], [])
    assert completion_times(no_pace) is None
    # Two running: 100 tokens, half of them out in 2 s, at half the rank's
    # pace (by it: 2 s left; by the rank's: none; half of each: 1 s); 20
    # tokens, just started, none out (the rank's pace: 0.2 s). Then two
    # waiting take the slots as they free: a 1,000-token prompt and 50
    # tokens (1.5 s), then 10 tokens (0.1 s).
    backlog = Backlog(PACE, 2, [(0, 100, 2.0, 50), (0, 20, 0.0, 0)], [(1000, 50), (0, 10)])
    ends = completion_times(backlog)
    assert ends == pytest.approx([0.2, 1.0, 1.1, 1.7])
    # With a third slot the first waiting one starts at once, in its prefill.
    third = dataclasses.replace(backlog, slots=3)
    assert completion_times(third) == pytest.approx([0.2, 0.3, 1.0, 1.5])
    # One past its expected end with no output yet is taken to end within a token.
    overdue = Backlog(PACE, 2, [(0, 10, 5.0, 0)], [])
    assert completion_times(overdue) == pytest.approx([0.01])


def test_retry_delay_is_when_a_slot_frees_up() -> None:
    ends = [0.2, 1.0, 1.1, 1.7]
    # Full by one request: one must end; over the bound by two (a bound was lowered): two.
    assert admission.room_wait(load(0, 4), LIMITS, ends) == pytest.approx(0.2)
    assert admission.room_wait(load(0, 5), LIMITS, ends) == pytest.approx(1.0)
    assert admission.room_wait(load(0, 4), LIMITS, None) is None
    # The soonest known wait counts, kept within bounds; none known: the default.
    assert admission.retry_delay([None, 3.0, 2.0]) == 2.0
    assert admission.retry_delay([None]) == admission.DEFAULT_RETRY_DELAY_S
    assert admission.retry_delay([1e-6]) == admission.MIN_RETRY_DELAY_S
    assert admission.retry_delay([1e6]) == admission.MAX_RETRY_DELAY_S
    # Unhealthy ranks do not count.
    sick = dataclasses.replace(load(1, 4), state=RankState.UNHEALTHY)
    error = admission.all_full([load(0, 4), sick], LIMITS, lambda rank: [[5.0], [0.1]][rank])
    retry = error.details[0]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(5.0)


def test_router_bound() -> None:
    limits = QueueLimits(capacity=2, max_queue_per_rank=2, max_in_flight=5)
    admission.check_router_bound([load(0, 2), load(1, 2)], limits, no_ends)
    with pytest.raises(RequestError) as raised:
        # Two over: the second end of all ranks' merged frees room for one.
        admission.check_router_bound(
            [load(0, 4), load(1, 2)], limits, lambda rank: [[0.5, 3.0], [1.0, 4.0]][rank]
        )
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry, info = raised.value.details
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "ROUTER_QUEUE_FULL"
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(1.0)


def refusal(
    in_flight: int, pace: Pace, ends: list[float] | None, ask: Ask, deadline: float
) -> RequestError | None:
    return admission.deadline_refusal(
        load(0, in_flight), LIMITS.capacity, pace, ends, ask, deadline
    )


def test_deadline_admission_is_per_request() -> None:
    ends = [2.0, 30.0]  # two running: one ends in 2 s, the other in 30 s
    short, long = Ask(prompt_tokens=4, budget=4), Ask(prompt_tokens=1000, budget=500)
    # Room at once: only its first token must come in time.
    assert refusal(1, PACE, ends, short, 0.05) is None
    assert refusal(1, PACE, ends, long, 1.5) is None  # 1 s to its first token
    refused = refusal(1, PACE, ends, long, 0.5)
    assert refused is not None and refused.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "1000-token prompt" in refused.problem
    # It would wait for one slot (2 s), then needs 0.04 s (0.06 with the
    # margin): served within 2.5 s.
    assert refusal(2, PACE, ends, short, 2.5) is None
    refused = refusal(2, PACE, ends, short, 1.0)
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission.retry_delay_of(refused) == pytest.approx(2.0)
    # The long one would need 6 s after its 2 s wait (9 s with the margin).
    assert refusal(2, PACE, ends, long, 11.5) is None
    assert refusal(2, PACE, ends, long, 10.5) is not None
    # No pace known: only a deadline already over is refused.
    assert refusal(3, Pace(), None, long, 0.01) is None
    refused = refusal(0, Pace(), None, short, 0.0)
    assert refused is not None and refused.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_steps_time_follows_its_batch() -> None:
    assert Pace().itl_at(4) is None
    # One batch size seen: in proportion to it.
    assert Pace(steps=((4, 0.04),)).itl_at(8) == pytest.approx(0.08)
    # Between two seen: on the line through them; beyond: on the last line.
    steps = Pace(steps=((1, 0.010), (8, 0.012), (64, 0.040)))
    assert steps.itl_at(4) == pytest.approx(0.010 + 0.002 * 3 / 7)
    assert steps.itl_at(128) == pytest.approx(0.040 + 0.028 * 64 / 56)
    assert steps.itl_at(0) == steps.itl_at(1) == pytest.approx(0.010)
    # A line that falls (noise) stops at a share of the quickest step seen.
    falling = Pace(steps=((4, 0.04), (8, 0.02)))
    assert falling.itl_at(64) == pytest.approx(0.02 * 0.25)
    assert IN_PROPORTION.request_s(500, 100, 3) == pytest.approx(0.5 + 100 * 0.03)


def test_step_times_come_from_steps_that_followed_work() -> None:
    steps = StepTimes(capacity=4)
    clock = [0.0]

    def step(seconds: float, running: int, waiting: int = 0) -> None:
        clock[0] += seconds
        steps.note(clock[0], running, waiting)

    step(0.0, 2)  # the first: nothing to measure from
    for _ in range(MIN_STEPS - 1):
        step(0.1, 2)
    assert steps.points() == ()  # too few steps of that batch size to count
    step(0.1, 3)  # batches of 2 and 3 share a range
    step(5.0, 2, waiting=1)  # a prompt waits with slots free: a burst's prefill
    step(0.1, 0)  # the last request ended
    step(10.0, 1)  # after idle: not a step's time
    for _ in range(MIN_STEPS):
        step(0.2, 4, waiting=2)  # a full batch with more waiting: kept
    (two, two_s), full = steps.points()
    assert (two, two_s) == pytest.approx(((7 * 2 + 3) / 8, 0.1))
    assert full == pytest.approx((4, 0.2))


def test_deadline_admission_judges_the_batch_it_would_join() -> None:
    ends = [0.5, 1.0, 2.0, 4.0, 8.0]
    ask = Ask(prompt_tokens=4, budget=100)  # 1 s a request in its batch, 1.5x to spare

    def judged(in_flight: int, deadline: float) -> RequestError | None:
        rank = load(0, in_flight)
        return admission.deadline_refusal(rank, 8, IN_PROPORTION, ends, ask, deadline)

    # In 6 s it can finish in a batch of 3, not 4.
    assert admission.largest_batch_in_time(IN_PROPORTION, ask, 6.0, 8) == 3
    assert judged(2, 6.0) is None
    refused = judged(3, 6.0)
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "in a batch of 4" in refused.problem
    _, info = refused.details
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "DEADLINE_BEYOND_BATCH"
    assert admission.retry_delay_of(refused) == pytest.approx(0.5)  # one must end
    refused = judged(5, 6.0)
    assert refused is not None and admission.retry_delay_of(refused) == pytest.approx(2.0)
    # Not even alone in 1 s: its budget is an upper bound, so only its first token counts.
    assert judged(5, 1.0) is None


def test_refused_clients_are_given_turns_to_come_back() -> None:
    returns = admission.Returns()
    # Three refused at once, each told a slot frees in 1 s; slots free every 0.5 s.
    assert [returns.assign(10.0, 1.0, 0.5) for _ in range(3)] == [1.0, 1.5, 2.0]
    # One whose own estimate is later keeps it.
    assert returns.assign(10.0, 5.0, 0.5) == 5.0
    # Turns that came due count no more, and a later one leaves the turns before it free.
    assert returns.assign(13.0, 1.0, 0.5) == pytest.approx(1.0)
    assert returns.assign(13.0, 1.8, 0.5) == pytest.approx(2.5)  # too close to the turn at 15
    # Past the bound of one estimate each still gets a turn of its own.
    cap, later = admission.MAX_RETRY_DELAY_S, admission.Returns()
    assert [later.assign(0.0, cap, 1.0) for _ in range(3)] == [cap, cap + 1, cap + 2]
    # A burst: each refusal is given the turn after the last; one with a
    # later estimate keeps its own, and leaves the turns before it free.
    burst = admission.Returns()
    n = 200
    assert [burst.assign(0.0, 1.0, 0.5) for _ in range(n)] == [1.0 + 0.5 * i for i in range(n)]
    assert burst.assign(0.0, 500.0, 0.5) == 500.0
    assert burst.assign(0.0, 1.0, 0.5) == 1.0 + 0.5 * n
    # A shorter interval finds room between the turns given at a longer one.
    assert burst.assign(0.0, 1.0, 0.2) == pytest.approx(1.2)
    # Two ranks, each freeing a slot every 2 s on average: one every second.
    assert admission.slot_interval([[1.0, 4.0], None, [2.0, 3.0, 6.0]]) == pytest.approx(1.0)
    assert admission.slot_interval([None, []]) == 0.0


def test_a_rank_runs_as_many_as_its_kv_cache_holds() -> None:
    # 4 slots, but 10 KV blocks of 100 tokens: requests of 300 tokens (prompt
    # and budget) fit 3 at a time; the fourth waits for a slot.
    ledger = Ledger(1, capacity=4, kv_blocks=10, block_size=100)
    entries = [ledger.reserve(f"r{i}", 0, prompt_tokens=100, budget=200) for i in range(4)]
    assert ledger.slots(0) == 3
    assert [bool(e.slot_at) for e in entries] == [True, True, True, False]
    backlog = ledger.backlog(0, ())
    assert (backlog.slots, len(backlog.running), len(backlog.waiting)) == (3, 3, 1)
    # One ends: its slot goes to the one waiting.
    ledger.release("r0", Outcome.SERVED)
    assert entries[3].slot_at
    # A request fills whole blocks: 201 tokens take 3 of them.
    partial = Ledger(1, capacity=4, kv_blocks=10, block_size=100)
    partial.reserve("p", 0, prompt_tokens=1, budget=200)
    assert partial.slots(0) == 3
    # Short requests fit as many as the engine runs; no KV size known, likewise.
    short = Ledger(1, capacity=4, kv_blocks=10, block_size=100)
    for i in range(4):
        short.reserve(f"s{i}", 0, prompt_tokens=10, budget=10)
    assert short.slots(0) == 4
    assert Ledger(1, capacity=4).slots(0) == 4
