"""The affinity policies: a session key's rank (consistent hashing with
bounded loads), the rank holding the longest known prefix of the prompt
(vLLM's prefix cache), and both together."""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

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
            return dataclasses.replace(decision, policy=self.name, reason="no_session_key")
        serving = serving_loads(loads)
        bound = load_bound(serving, self._load_factor) if serving else 0
        by_rank = {load.rank: load for load in serving}

        def explain() -> list[Candidate]:
            return [
                Candidate(load.rank, load_score(load), within_load_bound=load.in_flight < bound)
                for load in serving
            ]

        home: int | None = None
        for rank in self.ring_walk(request.session_key):
            load = by_rank.get(rank)
            if load is None:
                continue
            if home is None:
                home = rank
            if load.in_flight < bound:
                reason = "session_home" if rank == home else "session_spill"
                return Decision(rank, self.name, reason, explain, affinity_rank=home)
        return Decision(None, self.name, "no rank is serving", explain)


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
    first: the router's picture of each rank's prefix cache; and per block,
    the ranks holding it, so that a prompt is matched against the ranks that
    share its first block, not every rank."""

    def __init__(self, ranks: int, blocks_per_rank: int) -> None:
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(ranks)]
        self._holders: dict[int, set[int]] = {}
        self._capacity = blocks_per_rank

    def matches(self, hashes: Sequence[int]) -> dict[int, int]:
        """How many leading blocks of the prompt each rank holds, for the
        ranks that hold one or more."""
        found: dict[int, int] = {}
        holding = set(self._holders.get(hashes[0], ())) if hashes else set()
        for i, h in enumerate(hashes[1:], start=1):
            still = holding & self._holders.get(h, set())
            for rank in holding - still:
                found[rank] = i
            if not (holding := still):
                return found
        return found | dict.fromkeys(holding, len(hashes))

    def remember(self, hashes: Sequence[int], rank: int) -> None:
        blocks = self._blocks[rank]
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
            self._holders.setdefault(h, set()).add(rank)
        while len(blocks) > self._capacity:
            h, _ = blocks.popitem(last=False)
            holders = self._holders[h]
            holders.discard(rank)
            if not holders:
                del self._holders[h]


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
        return self.decide_blocks(block_hashes(request.prompt_token_ids, self.block_size), loads)

    def decide_blocks(self, hashes: list[int], loads: Sequence[RankLoad]) -> Decision:
        """`decide` for a prompt whose block hashes are known."""
        serving = serving_loads(loads)
        if not serving:
            return Decision(None, self.name, "no rank is serving")
        bound = load_bound(serving, self._load_factor)
        matches = self._index.matches(hashes)
        scores = [load_score(load) for load in serving]
        explain = self.explain(serving, matches, bound, scores)
        # The longest match; among equal matches, the least loaded.
        longest = max((matches.get(load.rank, 0) for load in serving), default=0)
        if not longest:  # nothing to stay near: the least loaded, bound or not
            home = None
            rank, tie_break = self._least_loaded.pick(serving, scores)
            reason = "prefix_miss"
        else:
            top = [i for i, load in enumerate(serving) if matches.get(load.rank) == longest]
            best = serving[min(top, key=scores.__getitem__)]
            home = best.rank
            if best.in_flight < bound:
                rank, reason, tie_break = home, "prefix_hit", no_commit
            else:
                within = [i for i, load in enumerate(serving) if load.in_flight < bound]
                rank, tie_break = self._least_loaded.pick(
                    [serving[i] for i in within], [scores[i] for i in within]
                )
                reason = "prefix_spill"

        def commit() -> None:
            tie_break()
            self.remember(hashes, rank)

        match_tokens = matches.get(rank, 0) * self.block_size
        return Decision(rank, self.name, reason, explain, match_tokens, home, commit)

    def explain(
        self, serving: list[RankLoad], matches: dict[int, int], bound: int, scores: list[float]
    ) -> Callable[[], list[Candidate]]:
        """The candidates of a decision, made when asked."""
        size = self.block_size
        return lambda: [
            Candidate(load.rank, score, matches.get(load.rank, 0) * size, load.in_flight < bound)
            for load, score in zip(serving, scores, strict=True)
        ]

    def matches(self, hashes: Sequence[int]) -> dict[int, int]:
        """Per rank holding the prompt's first block, how many it holds."""
        return self._index.matches(hashes)

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
        hashes = block_hashes(request.prompt_token_ids, self._prefix.block_size)
        if not request.session_key:
            return dataclasses.replace(self._prefix.decide_blocks(hashes, loads), policy=self.name)
        by_session = self._session.decide(request, loads)
        rank = by_session.rank
        if rank is None:
            return by_session
        # Record the prompt's blocks on the session's rank, not the prefix's pick.
        matches, size = self._prefix.matches(hashes), self._prefix.block_size

        def explain() -> list[Candidate]:
            return [
                dataclasses.replace(c, prefix_match_tokens=matches.get(c.rank, 0) * size)
                for c in by_session.candidates
            ]

        def commit() -> None:
            self._prefix.remember(hashes, rank)

        match = matches.get(rank, 0) * size
        return Decision(
            rank, self.name, by_session.reason, explain, match, by_session.affinity_rank, commit
        )
