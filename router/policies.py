"""Routing policies: pure functions of the ranks' load snapshots.

A policy returns the rank for a new request, or None when no rank takes
requests. An explicit pin in the request bypasses the policy altogether.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.ranks import RankLoad, RankState


class RoundRobin:
    """Each serving rank in turn, skipping ranks that take no new requests."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[RankLoad]) -> int | None:
        for step in range(len(loads)):
            candidate = (self._next + step) % len(loads)
            if loads[candidate].state is RankState.SERVING:
                self._next = candidate + 1
                return candidate
        return None
