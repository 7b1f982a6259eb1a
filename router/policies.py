"""Routing policies: which rank takes a new request, and why.

A policy looks at the request's routing inputs and every rank's load snapshot
and returns a `Decision`: the rank, a short reason, and what it weighed for
each rank, which is what ExplainRoute shows. Deciding changes nothing; the
dispatcher calls `Decision.commit()` only for a request it actually sends (it
advances round robin, remembers the prompt's blocks on the chosen rank). An
explicit pin in the request bypasses the policy (see the dispatcher).

Loads count requests the router itself has in flight on each rank, exact and
without polling lag, plus what each engine reports with every step it runs
(the scheduler stats that come with its outputs: `vllm_compat.patches.watch_output_batches`).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.ledger import RankLoad, RankState

# Prompt tokens still to prefill that weigh as much as one more request in
# flight: a long prompt holds a rank's batch for far longer than a short one.
PREFILL_TOKENS_PER_REQUEST = 512
# Affinity keeps a rank's requests in flight under this factor times the mean
# (consistent hashing with bounded loads, Mirrokni et al. 2018).
DEFAULT_LOAD_FACTOR = 1.25
# Points per rank on the session ring: enough for an even split of keys.
RING_POINTS_PER_RANK = 64
# Prompt blocks remembered per rank where the engine's KV cache size is not
# given; vLLM evicts the least recently used.
DEFAULT_PREFIX_BLOCKS_PER_RANK = 65536


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


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Decision:
    rank: int | None  # None: no rank takes requests
    policy: str
    reason: str
    candidates: list[Candidate]
    prefix_match_tokens: int = 0  # on the chosen rank
    affinity_rank: int | None = None  # where the session or prefix pointed, before any spill
    commit: Callable[[], None] = field(default=_nothing, compare=False)

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


def _takes_requests(load: RankLoad) -> bool:
    return load.state is RankState.SERVING and not load.full


def _serving(loads: Sequence[RankLoad]) -> list[RankLoad]:
    """The ranks that take new requests: serving, and not at their queue bound."""
    return [load for load in loads if _takes_requests(load)]


def _load_bound(serving: Sequence[RankLoad], load_factor: float) -> int:
    """The most requests a rank may have in flight, this one included, before
    affinity spills to another rank."""
    total = sum(load.in_flight for load in serving) + 1
    return math.ceil(load_factor * total / len(serving))


class LeastLoaded:
    """The rank with the lowest `load_score`; ties rotate, so an idle pool
    still spreads requests."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._start = 0

    def pick(self, candidates: Sequence[RankLoad]) -> tuple[int, Callable[[], None]]:
        """The least loaded of `candidates` (not empty), and the commit that
        moves the tie-break on."""
        n = len(candidates)
        best = min(range(n), key=lambda i: (load_score(candidates[i]), (i - self._start) % n))
        chosen = candidates[best].rank

        def commit() -> None:
            self._start = (self._start + 1) % n

        return chosen, commit

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        serving = _serving(loads)
        candidates = [Candidate(load.rank, load_score(load)) for load in serving]
        if not serving:
            return Decision(None, self.name, "no rank is serving", candidates)
        rank, commit = self.pick(serving)
        return Decision(rank, self.name, "least_loaded", candidates, commit=commit)


class RoundRobin:
    """Each serving rank in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        candidates = [Candidate(load.rank, load_score(load)) for load in _serving(loads)]
        for step in range(len(loads)):
            rank = (self._next + step) % len(loads)
            if _takes_requests(loads[rank]):

                def commit(rank: int = rank) -> None:
                    self._next = rank + 1

                return Decision(rank, self.name, "next_in_turn", candidates, commit=commit)
        return Decision(None, self.name, "no rank is serving", candidates)


def _stable_hash(text: str) -> int:
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
        serving = _serving(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving", [])
        # The draw is a hash of a counter that only commit moves on, so a dry
        # run (ExplainRoute) names the same two ranks as the next real request.
        n = len(serving)
        h = _stable_hash(f"{self._seed}:{self._draws}")
        first = h % n
        second = (first + 1 + (h // n) % (n - 1)) % n if n > 1 else first
        drawn = [serving[first], serving[second]] if n > 1 else [serving[first]]
        best = min(drawn, key=load_score)

        def commit() -> None:
            self._draws += 1

        candidates = [Candidate(load.rank, load_score(load)) for load in drawn]
        return Decision(best.rank, self.name, "less_loaded_of_two", candidates, commit=commit)


class SessionAffinity:
    """Requests with the same session key go to the same rank: the key's point
    on a consistent-hash ring of the ranks, walking on past ranks that are not
    serving or are over the load bound. Requests without a key go to the
    least loaded rank."""

    name = "session"

    def __init__(self, ranks: int, load_factor: float = DEFAULT_LOAD_FACTOR) -> None:
        self._load_factor = load_factor
        self._least_loaded = LeastLoaded()
        # The ring holds every rank, serving or not, so that draining one rank
        # moves only that rank's sessions.
        points = sorted(
            (_stable_hash(f"rank {rank} point {i}"), rank)
            for rank in range(ranks)
            for i in range(RING_POINTS_PER_RANK)
        )
        self._ring_hashes = [h for h, _ in points]
        self._ring_ranks = [rank for _, rank in points]

    def ring_walk(self, session_key: str) -> Iterator[int]:
        """The ranks in the order the key's walk round the ring meets them."""
        start = bisect.bisect(self._ring_hashes, _stable_hash(session_key))
        seen: set[int] = set()
        for i in range(len(self._ring_ranks)):
            rank = self._ring_ranks[(start + i) % len(self._ring_ranks)]
            if rank not in seen:
                seen.add(rank)
                yield rank

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        if not request.session_key:
            decision = self._least_loaded.decide(request, loads)
            if decision.rank is None:
                return decision
            return Decision(
                decision.rank, self.name, "no_session_key", decision.candidates,
                commit=decision.commit,
            )  # fmt: skip
        serving = _serving(loads)
        bound = _load_bound(serving, self._load_factor) if serving else 0
        by_rank = {load.rank: load for load in serving}
        candidates = [
            Candidate(load.rank, load_score(load), within_load_bound=load.in_flight + 1 <= bound)
            for load in serving
        ]
        home: int | None = None
        for rank in self.ring_walk(request.session_key):
            load = by_rank.get(rank)
            if load is None:
                continue
            if home is None:
                home = rank
            if load.in_flight + 1 <= bound:
                reason = "session_home" if rank == home else "session_spill"
                return Decision(rank, self.name, reason, candidates, affinity_rank=home)
        return Decision(None, self.name, "no rank is serving", candidates)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block of the prompt, each chained to the blocks before
    it, as vLLM's prefix cache keys its KV blocks: two prompts share a block's
    hash only if they share every token up to the block's end."""
    hashes: list[int] = []
    parent = 0
    for end in range(block_size, len(token_ids) + 1, block_size):
        parent = hash((parent, tuple(token_ids[end - block_size : end])))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Per rank, the prompt blocks recently sent there, least recently used
    first: the router's picture of each rank's prefix cache."""

    def __init__(self, ranks: int, blocks_per_rank: int) -> None:
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(ranks)]
        self._capacity = blocks_per_rank

    def match(self, hashes: Sequence[int], rank: int) -> int:
        """How many leading blocks of the prompt the rank holds."""
        blocks = self._blocks[rank]
        for i, h in enumerate(hashes):
            if h not in blocks:
                return i
        return len(hashes)

    def remember(self, hashes: Sequence[int], rank: int) -> None:
        blocks = self._blocks[rank]
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)


class PrefixAffinity:
    """Requests go to the rank that holds the longest leading part of their
    prompt in its prefix cache, unless that rank is over the load bound;
    otherwise to the least loaded rank."""

    name = "prefix"

    def __init__(
        self,
        ranks: int,
        block_size: int,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        blocks_per_rank: int = DEFAULT_PREFIX_BLOCKS_PER_RANK,
    ) -> None:
        self.block_size = block_size
        self._load_factor = load_factor
        self._index = PrefixIndex(ranks, blocks_per_rank)
        self._least_loaded = LeastLoaded()

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        serving = _serving(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving", [])
        hashes = block_hashes(request.prompt_token_ids, self.block_size)
        bound = _load_bound(serving, self._load_factor)
        matches = {load.rank: self._index.match(hashes, load.rank) for load in serving}
        candidates = [
            Candidate(
                load.rank,
                load_score(load),
                prefix_match_tokens=matches[load.rank] * self.block_size,
                within_load_bound=load.in_flight + 1 <= bound,
            )
            for load in serving
        ]
        within = [load for load in serving if load.in_flight + 1 <= bound]
        # The longest match; among equal matches, the least loaded.
        best = min(serving, key=lambda load: (-matches[load.rank], load_score(load)))
        home = best.rank if matches[best.rank] else None
        if home is None:  # nothing to stay near: the least loaded, bound or not
            rank, tie_break = self._least_loaded.pick(serving)
            reason = "prefix_miss"
        elif best in within:
            rank, reason, tie_break = home, "prefix_hit", _nothing
        else:
            rank, tie_break = self._least_loaded.pick(within)
            reason = "prefix_spill"

        def commit() -> None:
            tie_break()
            self.remember(hashes, rank)

        return Decision(
            rank,
            self.name,
            reason,
            candidates,
            prefix_match_tokens=matches[rank] * self.block_size,
            affinity_rank=home,
            commit=commit,
        )

    def remember(self, hashes: Sequence[int], rank: int) -> None:
        """The rank now holds these blocks (vLLM caches a prompt's full blocks)."""
        self._index.remember(hashes, rank)


class Affinity:
    """The default: session affinity for requests with a session key, prefix
    affinity for the rest, both load-bounded. Without shared prefixes or
    session keys it is least loaded. Every request's blocks are remembered,
    so a session's prefix is known if its key is later dropped."""

    name = "affinity"

    def __init__(self, session: SessionAffinity, prefix: PrefixAffinity) -> None:
        self._session = session
        self._prefix = prefix

    def decide(self, request: RouteInput, loads: Sequence[RankLoad]) -> Decision:
        by_prefix = self._prefix.decide(request, loads)
        if not request.session_key:
            return Decision(
                by_prefix.rank, self.name, by_prefix.reason, by_prefix.candidates,
                by_prefix.prefix_match_tokens, by_prefix.affinity_rank, by_prefix.commit,
            )  # fmt: skip
        by_session = self._session.decide(request, loads)
        rank = by_session.rank
        if rank is None:
            return by_session
        # Record the prompt's blocks on the session's rank, not the prefix's pick.
        hashes = block_hashes(request.prompt_token_ids, self._prefix.block_size)
        match = next((c.prefix_match_tokens for c in by_prefix.candidates if c.rank == rank), 0)
        candidates = [
            Candidate(s.rank, s.score, p.prefix_match_tokens, s.within_load_bound)
            for s, p in zip(by_session.candidates, by_prefix.candidates, strict=True)
        ]

        def commit() -> None:
            self._prefix.remember(hashes, rank)

        return Decision(
            rank, self.name, by_session.reason, candidates, match, by_session.affinity_rank, commit
        )


POLICIES = ("affinity", "least_loaded", "power_of_two", "prefix", "round_robin", "session")


def make_policy(
    name: str,
    ranks: int,
    block_size: int,
    load_factor: float,
    blocks_per_rank: int = DEFAULT_PREFIX_BLOCKS_PER_RANK,
) -> Policy:
    """The policy a --routing-policy flag names; `blocks_per_rank` is the
    size of each rank's KV cache in blocks, which the prefix index mirrors."""
    session = SessionAffinity(ranks, load_factor)
    prefix = PrefixAffinity(ranks, block_size, load_factor, blocks_per_rank)
    policies: dict[str, Callable[[], Policy]] = {
        "affinity": lambda: Affinity(session, prefix),
        "least_loaded": LeastLoaded,
        "power_of_two": PowerOfTwo,
        "prefix": lambda: prefix,
        "round_robin": RoundRobin,
        "session": lambda: session,
    }
    return policies[name]()
