"""The ranks the router serves with, as one object: the engine side
(`RankPool`), the router's books on them (`Ledger`), the routing policy and
the queue limits. Membership builds it whole when the first rank joins;
routing, admission's room checks, the watchdog and the admin RPCs read it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import grpc

from router import admission, policies, validation
from router.backlog import Ends, completion_times
from router.errors import RequestError, failed_precondition, invalid_argument, unavailable
from router.ledger import Ledger, RankLoad, RankState
from router.limits import NO_LIMITS, ModelLimits, RequestLimits, max_prompt_bytes
from router.pace import Pace
from router.ranks import RankPool

PIN_POLICY = "pin"
# The policy's rank could not serve the request before its deadline; this one can.
DEADLINE_REASON = "deadline"
# How long a rank's estimated backlog serves admission before it is worked
# out again: a burst of refusals shares one.
BACKLOG_TTL_S = 0.1


def build(
    pool: RankPool,
    routing_policy: str,
    load_factor: float = policies.DEFAULT_LOAD_FACTOR,
    max_queue_per_rank: int | None = None,
    max_in_flight: int | None = None,
    allowed: RequestLimits = NO_LIMITS,
    healthy: bool = True,
) -> Fleet:
    """The fleet of `pool`'s ranks, routed by the named policy, with a new
    ledger (each rank `healthy` or not to begin with). An unset per-rank
    queue is as long as a rank runs at once."""
    ranks = pool.limits.data_parallel_size
    policy = policies.make_policy(
        routing_policy, ranks, pool.block_size, load_factor, pool.kv_blocks
    )
    capacity = pool.capacity
    ledger = Ledger(ranks, capacity, healthy, pool.kv_blocks, pool.block_size)
    queue = capacity if max_queue_per_rank is None else max_queue_per_rank
    limits = admission.QueueLimits(capacity, queue, max_in_flight)
    return Fleet(pool, ledger, policy, limits, allowed)


class Fleet:
    def __init__(
        self,
        pool: RankPool,
        ledger: Ledger,
        policy: policies.Policy,
        limits: admission.QueueLimits,
        allowed: RequestLimits = NO_LIMITS,
    ) -> None:
        self.pool = pool
        self.ledger = ledger
        self.policy = policy
        self.queue_limits = limits
        self.allowed = allowed  # the router's own per-request limits
        # Per rank: (when, the ledger's version of it, its pace, its slots,
        # its in-flight requests' expected ends).
        self._backlogs: dict[int, tuple[float, int, Pace, int, list[float] | None]] = {}
        self._returns = admission.Returns()  # when refused clients were told to retry

    @property
    def limits(self) -> ModelLimits:
        return self.pool.limits

    def prompt_bytes_bound(self) -> int | None:
        """The most bytes of prompt text the ranks' context could hold."""
        return max_prompt_bytes(self.pool.limits, self.allowed)

    def loads(self) -> list[RankLoad]:
        return self.ledger.loads(self.pool.engine_loads())

    def _marked_loads(self) -> list[RankLoad]:
        return admission.mark_full(self.loads(), self.queue_limits)

    def _backlog(self, rank: int) -> tuple[Pace, int, Ends | None]:
        """The rank's pace, its slots and its requests' expected ends
        (`backlog.completion_times`), worked out again when a request came
        or went, or after BACKLOG_TTL_S: a burst of refusals shares one."""
        now = time.monotonic()
        version = self.ledger.version(rank)
        cached = self._backlogs.get(rank)
        if cached is None or cached[1] != version or now - cached[0] >= BACKLOG_TTL_S:
            backlog = self.ledger.backlog(rank, self.pool.step_times(rank))
            ends = completion_times(backlog)
            cached = self._backlogs[rank] = (now, version, backlog.pace, backlog.slots, ends)
        at, _, pace, slots, ends = cached
        return pace, slots, None if ends is None else Ends(ends, now - at)

    def _ends(self, rank: int) -> Ends | None:
        return self._backlog(rank)[2]

    def check_room(self, pin: validation.Pin | None) -> None:
        """Refuses a request at once when the router, its pinned rank or
        every serving rank is full: before any work is spent on it."""
        self._check_room(self._marked_loads(), pin, full_only=True)

    def _check_room(
        self, loads: Sequence[RankLoad], pin: validation.Pin | None, full_only: bool
    ) -> None:
        """Refuses the request when the router, or its pinned rank, or every
        serving rank, is full; unless `full_only`, also when its pinned rank
        does not serve or no rank does."""
        limits = self.queue_limits
        admission.check_router_bound(loads, limits, self._ends)
        if pin is not None:
            state = loads[pin.rank].state
            if state is RankState.SERVING:
                admission.check_rank_room(loads[pin.rank], limits, self._ends)
            elif full_only:
                pass
            elif state is RankState.DRAINING:
                raise failed_precondition(pin.field, f"rank {pin.rank} is draining")
            else:
                raise unavailable(f"rank {pin.rank} is unhealthy")
            return
        serving = [load for load in loads if load.state is RankState.SERVING]
        if not serving and not full_only:
            raise unavailable("no rank is serving")
        if serving and all(load.full for load in serving):
            raise admission.all_full(loads, limits, self._ends)

    def route(
        self,
        route: policies.RouteInput,
        pin: validation.Pin | None,
        ask: admission.Ask,
        deadline_s: float | None,
    ) -> tuple[int, policies.Decision]:
        """The rank, and the policy's decision or the pin's; nothing is committed yet.
        Refuses the request when no rank has room for it, or it cannot be
        served before its deadline."""
        loads = self._marked_loads()
        self._check_room(loads, pin, full_only=False)
        if pin is None:
            decision = self.policy.decide(route, loads)
            if decision.rank is None:  # every rank with room is draining
                raise admission.all_full(loads, self.queue_limits, self._ends)
            rank = decision.rank
        else:
            explain = policies.scored(loads)
            decision = policies.Decision(pin.rank, PIN_POLICY, pin.field, explain)
            rank = pin.rank
        if deadline_s is None:
            return rank, decision
        refused = self._deadline_refusal(loads[rank], ask, deadline_s)
        if refused is None:
            return rank, decision
        if pin is not None or refused.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise refused
        return self._in_time_elsewhere(loads, decision, ask, deadline_s, refused)

    def reroute(self, route: policies.RouteInput) -> policies.Decision:
        """The policy's rank for a request moved off a failed rank."""
        return self.policy.decide(route, self._marked_loads())

    def _deadline_refusal(
        self, load: RankLoad, ask: admission.Ask, deadline_s: float
    ) -> RequestError | None:
        pace, slots, ends = self._backlog(load.rank)
        return admission.deadline_refusal(load, slots, pace, ends, ask, deadline_s)

    def _in_time_elsewhere(
        self,
        loads: Sequence[RankLoad],
        decision: policies.Decision,
        ask: admission.Ask,
        deadline_s: float,
        refused: RequestError,
    ) -> tuple[int, policies.Decision]:
        """Another rank that can serve the request before its deadline, when
        the policy's choice would queue it too long; else the refusal of the
        rank that could take it soonest."""
        refusals = [refused]
        others = sorted(
            (ld for ld in loads if ld.state is RankState.SERVING and not ld.full
             and ld.rank != decision.rank),
            key=policies.load_score,
        )  # fmt: skip
        for load in others:
            other = self._deadline_refusal(load, ask, deadline_s)
            if other is None:
                moved = policies.Decision(
                    load.rank, decision.policy, DEADLINE_REASON, decision.explain
                )
                return load.rank, moved
            refusals.append(other)
        raise min(refusals, key=admission.retry_delay_of)

    @contextlib.contextmanager
    def turns(self) -> Iterator[None]:
        """A refusal raised inside gets its client's own turn to come back
        (`admission.Returns`)."""
        try:
            yield
        except admission.Refusal as refusal:
            serving = [load.rank for load in self.loads() if load.state is RankState.SERVING]
            interval = admission.slot_interval([self._ends(rank) for rank in serving])
            delay = self._returns.assign(time.monotonic(), refusal.delay_s, interval)
            raise refusal.later(delay) from None

    def set_drained(self, rank: int, drained: bool) -> RankLoad:
        """Drains or resumes one rank; its load after the change."""
        ranks = self.pool.limits.data_parallel_size
        if not 0 <= rank < ranks:
            raise invalid_argument("rank", f"rank {rank} is outside [0, {ranks})")
        self.ledger.set_drained(rank, drained)
        return self.loads()[rank]
