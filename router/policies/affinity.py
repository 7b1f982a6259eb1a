"""The affinity policies: a session key's rank (consistent hashing with
bounded loads), the rank holding the longest known prefix of the prompt
(vLLM's prefix cache), and both together."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from router.ledger import RankLoad
from router.policies.base import (
    DEFAULT_LOAD_FACTOR,
    Candidate,
    Decision,
    RouteInput,
    load_bound,
    load_score,
    no_commit,
    serving_loads,
)
from router.policies.load import LeastLoaded, stable_hash

# Points per rank on the session ring: enough for an even split of keys.
RING_POINTS_PER_RANK = 64
# Prompt blocks remembered per rank where the engine's KV cache size is not
# given; vLLM evicts the least recently used.
DEFAULT_PREFIX_BLOCKS_PER_RANK = 65536


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
            (stable_hash(f"rank {rank} point {i}"), rank)
            for rank in range(ranks)
            for i in range(RING_POINTS_PER_RANK)
        )
        self._ring_hashes = [h for h, _ in points]
        self._ring_ranks = [rank for _, rank in points]

    def ring_walk(self, session_key: str) -> Iterator[int]:
        """The ranks in the order the key's walk round the ring meets them."""
        start = bisect.bisect(self._ring_hashes, stable_hash(session_key))
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
        serving = serving_loads(loads)
        bound = load_bound(serving, self._load_factor) if serving else 0
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
        serving = serving_loads(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving", [])
        hashes = block_hashes(request.prompt_token_ids, self.block_size)
        bound = load_bound(serving, self._load_factor)
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
            rank, reason, tie_break = home, "prefix_hit", no_commit
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
