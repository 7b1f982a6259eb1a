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

from collections.abc import Callable

from router.policies.affinity import (
    DEFAULT_PREFIX_BLOCKS_PER_RANK,
    Affinity,
    PrefixAffinity,
    PrefixIndex,
    SessionAffinity,
    block_hashes,
)
from router.policies.base import (
    DEFAULT_LOAD_FACTOR,
    Candidate,
    Decision,
    Policy,
    RouteInput,
    load_score,
    scored,
)
from router.policies.load import LeastLoaded, PowerOfTwo, RoundRobin

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "POLICIES",
    "Affinity",
    "Candidate",
    "Decision",
    "LeastLoaded",
    "Policy",
    "PowerOfTwo",
    "PrefixAffinity",
    "PrefixIndex",
    "RoundRobin",
    "RouteInput",
    "SessionAffinity",
    "block_hashes",
    "load_score",
    "make_policy",
    "scored",
]

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
