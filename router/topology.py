"""Where independent ranks join the router: the one rule the router, its
vitals listener and the local cluster launcher all follow."""

from __future__ import annotations


def rank_port(base_port: int, rank: int) -> int:
    """An independent rank is a data-parallel group of one of its own: rank k
    joins on the router's --data-parallel-rpc-port + k, and sends its vitals
    to that port."""
    return base_port + rank
