"""What every routing policy shares: the routing inputs, the decision and
what it weighed, and how busy a rank is (`load_score`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.ledger import RankLoad, RankState

# Prompt tokens still to prefill that weigh as much as one more request in
# flight: a long prompt holds a rank's batch for far longer than a short one.
PREFILL_TOKENS_PER_REQUEST = 512
# Affinity keeps a rank's requests in flight under this factor times the mean
# (consistent hashing with bounded loads, Mirrokni et al. 2018).
DEFAULT_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class RouteInput:
    """What the policies may look at in a request."""

    prompt_token_ids: Sequence[int]
    session_key: str = ""


@dataclass(frozen=True)
class Candidate:
    """What a policy weighed for one serving rank."""

    rank: int
    score: float  # the least-loaded score: lower is less loaded
    prefix_match_tokens: int = 0
    within_load_bound: bool = True


def no_commit() -> None:
    pass


def no_candidates() -> list[Candidate]:
    return []


@dataclass(frozen=True)
class Decision:
    rank: int | None  # None: no rank takes requests
    policy: str
    reason: str
    # What it weighed for each serving rank, worked out only when asked
    # (ExplainRoute, a recording span): most decisions never are.
    explain: Callable[[], list[Candidate]] = field(default=no_candidates, compare=False)
    prefix_match_tokens: int = 0  # on the chosen rank
    affinity_rank: int | None = None  # where the session or prefix pointed, before any spill
    commit: Callable[[], None] = field(default=no_commit, compare=False)

    @property
    def candidates(self) -> list[Candidate]:
        return self.explain()

    @property
    def affinity_hit(self) -> bool:
        """The request goes to its home rank (its session key's, or the one
        holding the longest known prefix of its prompt). False after a spill,
        for a pin, and when neither points anywhere."""
        return self.affinity_rank is not None and self.rank == self.affinity_rank


class Policy(Protocol):
    name: str

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision: ...


def load_score(load: RankLoad) -> float:
    """How busy a rank is, in requests. The requests on the rank: the larger
    of the router's in-flight count (exact for what it sent, and ahead of the
    engine's report by the requests just routed) and the engine's running +
    waiting as of its last step (which counts a request with n choices as
    the n it runs; an idle engine's report keeps requests aborted after its
    last step until the watchdog's probe makes it step, within a second).
    Requests the engine reports waiting count again, because a rank with a
    queue is saturated; prompt tokens still to prefill and the KV cache's
    fill (near 1, vLLM starts preempting) weigh as fractions of a request."""
    return (
        max(load.in_flight, load.running + load.waiting)
        + load.waiting
        + load.queued_prompt_tokens / PREFILL_TOKENS_PER_REQUEST
        + load.kv_cache_usage
    )


def takes_requests(load: RankLoad) -> bool:
    return load.state is RankState.SERVING and not load.full


def serving_loads(loads: Sequence[RankLoad]) -> list[RankLoad]:
    """The ranks that take new requests: serving, and not at their queue bound."""
    return [load for load in loads if takes_requests(load)]


def scored(loads: Sequence[RankLoad]) -> Callable[[], list[Candidate]]:
    """The candidates of a policy that weighs load alone."""
    return lambda: [Candidate(load.rank, load_score(load)) for load in loads]


def least_loaded(scores: Sequence[float], start: int) -> int:
    """The index of the lowest score; among equal ones the first at or after
    `start`, round the list: ties rotate, so an idle pool still spreads."""
    low = min(scores)
    ties = [i for i, score in enumerate(scores) if score == low]
    start %= len(scores)
    return next((i for i in ties if i >= start), ties[0])


def load_bound(serving: Sequence[RankLoad], load_factor: float) -> int:
    """The most requests a rank may have in flight, this one included, before
    affinity spills to another rank."""
    total = sum(load.in_flight for load in serving) + 1
    return math.ceil(load_factor * total / len(serving))
