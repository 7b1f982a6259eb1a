"""The policies that weigh load alone: least loaded, round robin, and the
less loaded of two drawn at random."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from router.ledger import RankLoad
from router.policies.base import (
    Decision,
    RouteInput,
    least_loaded,
    load_score,
    scored,
    serving_loads,
    takes_requests,
)


class LeastLoaded:
    """The rank with the lowest `load_score`; ties rotate, so an idle pool
    still spreads requests."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._start = 0

    def pick(
        self, candidates: Sequence[RankLoad], scores: Sequence[float]
    ) -> tuple[int, Callable[[], None]]:
        """The least loaded of `candidates` (not empty; `scores` their
        `load_score`s), and the commit that moves the tie-break on."""
        n = len(candidates)
        chosen = candidates[least_loaded(scores, self._start)].rank

        def commit() -> None:
            self._start = (self._start + 1) % n

        return chosen, commit

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        serving = serving_loads(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving")
        rank, commit = self.pick(serving, [load_score(load) for load in serving])
        return Decision(rank, self.name, "least_loaded", scored(serving), commit=commit)


class RoundRobin:
    """Each serving rank in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        explain = scored(serving_loads(loads))
        for step in range(len(loads)):
            rank = (self._next + step) % len(loads)
            if takes_requests(loads[rank]):

                def commit(rank: int = rank) -> None:
                    self._next = rank + 1

                return Decision(rank, self.name, "next_in_turn", explain, commit=commit)
        return Decision(None, self.name, "no rank is serving", explain)


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's `hash` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PowerOfTwo:
    """The less loaded of two serving ranks drawn at random: near least-loaded
    balance at a constant cost however many ranks there are."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._draws = 0

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        serving = serving_loads(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving")
        # The draw is a hash of a counter that only commit moves on, so a dry
        # run (ExplainRoute) names the same two ranks as the next real request.
        n = len(serving)
        h = stable_hash(f"{self._seed}:{self._draws}")
        first = h % n
        second = (first + 1 + (h // n) % (n - 1)) % n if n > 1 else first
        drawn = [serving[first], serving[second]] if n > 1 else [serving[first]]
        best = min(drawn, key=load_score)

        def commit() -> None:
            self._draws += 1

        return Decision(best.rank, self.name, "less_loaded_of_two", scored(drawn), commit=commit)
