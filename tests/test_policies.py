"""Routing policies fed load tables directly (plain data, no engines)."""

from __future__ import annotations

from collections import Counter

from router.ledger import RankLoad, RankState
from router.policies import (
    Affinity,
    LeastLoaded,
    PowerOfTwo,
    PrefixAffinity,
    RoundRobin,
    RouteInput,
    SessionAffinity,
    block_hashes,
    load_score,
    make_policy,
)

BLOCK = 4
PLAIN = RouteInput([1, 2, 3])


def load(
    rank: int,
    in_flight: int = 0,
    state: RankState = RankState.SERVING,
    waiting: int = 0,
    queued_prompt_tokens: int = 0,
    kv: float = 0.0,
    running: int | None = None,
) -> RankLoad:
    """By default the engine runs the router's in-flight requests that are
    not waiting, as in a steady state."""
    if running is None:
        running = max(in_flight - waiting, 0)
    return RankLoad(
        rank=rank, state=state, in_flight=in_flight, queued_prompt_tokens=queued_prompt_tokens,
        waiting=waiting, running=running, kv_cache_usage=kv, served=0, failed=0, cancelled=0,
    )  # fmt: skip


def idle(ranks: int) -> list[RankLoad]:
    return [load(rank) for rank in range(ranks)]


def routed(policy: object, request: RouteInput, loads: list[RankLoad]) -> int | None:
    """Decides and commits, as the dispatcher does for a request it sends."""
    decision = policy.decide(request, loads)  # type: ignore[attr-defined]
    decision.commit()
    rank: int | None = decision.rank
    return rank


def test_round_robin_cycles_and_skips_ranks_not_serving() -> None:
    policy = RoundRobin()
    loads = idle(3)
    assert [routed(policy, PLAIN, loads) for _ in range(4)] == [0, 1, 2, 0]
    loads[2] = load(2, state=RankState.DRAINING)
    assert [routed(policy, PLAIN, loads) for _ in range(3)] == [1, 0, 1]
    assert routed(policy, PLAIN, [load(0, state=RankState.UNHEALTHY)]) is None


def test_deciding_without_commit_changes_nothing() -> None:
    """ExplainRoute's dry run must agree with the next real request."""
    for policy in (RoundRobin(), LeastLoaded(), PowerOfTwo(seed=7), PrefixAffinity(4, BLOCK)):
        loads = idle(4)
        for _ in range(5):
            dry = policy.decide(PLAIN, loads)
            assert policy.decide(PLAIN, loads).rank == dry.rank
            assert routed(policy, PLAIN, loads) == dry.rank


def test_load_score_weighs_queues_long_prompts_and_kv() -> None:
    assert load_score(load(0, in_flight=2)) == 2
    assert load_score(load(0, in_flight=2, waiting=1)) == 3  # a queue means saturation
    assert load_score(load(0, in_flight=1, queued_prompt_tokens=1024)) == 3
    assert load_score(load(0, kv=0.5)) == 0.5


def test_load_score_takes_the_larger_of_in_flight_and_the_engines_count() -> None:
    # Just routed, not in the engine's last report yet: the router's count holds.
    assert load_score(load(0, in_flight=3, running=1)) == 3
    # One request with n=4 choices runs as four in the engine.
    assert load_score(load(0, in_flight=1, running=4)) == 4
    assert load_score(load(0, in_flight=1, running=2, waiting=2)) == 4 + 2  # the queue again
    # In-flight counts alone would pick rank 0; its engine runs more.
    loads = [load(0, in_flight=1, running=4), load(1, in_flight=2)]
    assert routed(LeastLoaded(), PLAIN, loads) == 1
    assert routed(PowerOfTwo(), PLAIN, loads) == 1


def test_least_loaded_picks_the_lowest_score_and_rotates_ties() -> None:
    policy = LeastLoaded()
    loads = [load(0, in_flight=3), load(1, in_flight=1), load(2, in_flight=2)]
    assert routed(policy, PLAIN, loads) == 1
    # One long prompt outweighs two short requests.
    loads = [load(0, in_flight=1, queued_prompt_tokens=2048), load(1, in_flight=2)]
    assert routed(policy, PLAIN, loads) == 1
    fresh = LeastLoaded()
    assert [routed(fresh, PLAIN, idle(3)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    drained = [load(0, state=RankState.DRAINING), load(1, in_flight=9)]
    assert routed(policy, PLAIN, drained) == 1


def test_power_of_two_never_picks_the_more_loaded_of_its_pair() -> None:
    policy = PowerOfTwo(seed=1)
    loads = [load(rank, in_flight=rank) for rank in range(8)]
    picks = Counter(routed(policy, PLAIN, loads) for _ in range(2000))
    assert 7 not in picks  # the most loaded rank loses every pair it is drawn in
    assert picks[0] > picks[1] > picks[6]
    assert routed(policy, PLAIN, [load(0), load(1, state=RankState.DRAINING)]) == 0


def test_session_keys_stick_to_one_rank_and_spread_over_ranks() -> None:
    policy = SessionAffinity(4)
    homes = {}
    for i in range(200):
        key = f"user-{i}"
        ranks = {routed(policy, RouteInput([1], key), idle(4)) for _ in range(3)}
        assert len(ranks) == 1
        homes[key] = ranks.pop()
    counts = Counter(homes.values())
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 25, counts
    decision = policy.decide(RouteInput([1], "user-0"), idle(4))
    assert (decision.reason, decision.affinity_rank) == ("session_home", homes["user-0"])
    assert decision.affinity_hit


def test_a_hot_session_spills_past_the_load_bound() -> None:
    policy = SessionAffinity(2, load_factor=1.25)
    hot = RouteInput([1], "hot")
    home = policy.decide(hot, idle(2)).rank
    assert home is not None
    other = 1 - home
    loads = idle(2)
    ranks = []
    for _ in range(8):
        rank = routed(policy, hot, loads)
        assert rank is not None
        ranks.append(rank)
        loads[rank] = load(rank, in_flight=loads[rank].in_flight + 1)
    # Within the bound ceil(1.25 * (in flight + 1) / 2) the home rank takes it,
    # beyond it the next rank on the ring does.
    assert ranks[:2] == [home, home] and other in ranks
    assert loads[home].in_flight <= 5 and loads[other].in_flight >= 3
    spilled = policy.decide(hot, [load(home, in_flight=4), load(other, in_flight=0)])
    assert (spilled.rank, spilled.reason, spilled.affinity_rank) == (other, "session_spill", home)
    assert not spilled.affinity_hit


def test_draining_a_rank_moves_only_its_sessions() -> None:
    policy = SessionAffinity(4)
    keys = [f"k{i}" for i in range(100)]
    before = {k: policy.decide(RouteInput([1], k), idle(4)).rank for k in keys}
    loads = idle(4)
    loads[2] = load(2, state=RankState.DRAINING)
    after = {k: policy.decide(RouteInput([1], k), loads).rank for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == 2}
    assert all(after[k] != 2 for k in keys)


def test_block_hashes_chain_whole_blocks_only() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BLOCK)
    assert len(a) == 2  # the ninth token is not a whole block
    b = block_hashes([1, 2, 3, 4, 5, 6, 7, 0], BLOCK)
    assert a[0] == b[0] and a[1] != b[1]
    # A block's hash depends on every token before it, not only its own.
    assert block_hashes([0, 0, 0, 0, 5, 6, 7, 8], BLOCK)[1] != a[1]


def test_prefix_affinity_follows_the_longest_cached_prefix() -> None:
    policy = PrefixAffinity(3, BLOCK)
    system = list(range(100, 108))  # two whole blocks
    first = policy.decide(RouteInput([*system, 1]), idle(3))
    assert (first.reason, first.prefix_match_tokens, first.affinity_rank) == (
        "prefix_miss", 0, None,
    )  # fmt: skip
    assert not first.affinity_hit
    first.commit()
    again = policy.decide(RouteInput([*system, 2, 3]), idle(3))
    assert (again.rank, again.reason, again.prefix_match_tokens) == (first.rank, "prefix_hit", 8)
    assert again.affinity_hit
    match = {c.rank: c.prefix_match_tokens for c in again.candidates}
    assert sorted(match.values()) == [0, 0, 8]
    # A different system prompt starts elsewhere (ties rotate).
    other = policy.decide(RouteInput([*range(200, 208), 1]), idle(3))
    assert other.reason == "prefix_miss" and other.rank != first.rank


def test_prefix_affinity_spills_to_the_least_loaded_past_the_bound() -> None:
    policy = PrefixAffinity(2, BLOCK, load_factor=1.25)
    prompt = RouteInput(list(range(12)))
    home = routed(policy, prompt, idle(2))
    assert home is not None
    busy = [load(0), load(1)]
    busy[home] = load(home, in_flight=4)
    spilled = policy.decide(prompt, busy)
    assert (spilled.rank, spilled.reason, spilled.affinity_rank) == (1 - home, "prefix_spill", home)
    assert not spilled.affinity_hit
    spilled.commit()  # the other rank now holds the prefix as well
    again = policy.decide(prompt, idle(2))
    assert again.reason == "prefix_hit"
    assert {c.prefix_match_tokens for c in again.candidates} == {12}


def test_prefix_index_forgets_the_least_recently_used_blocks() -> None:
    # Sized as the engine's KV cache: two blocks per rank.
    policy = make_policy("prefix", ranks=1, block_size=BLOCK, load_factor=1.25, blocks_per_rank=2)
    routed(policy, RouteInput(list(range(8))), idle(1))
    routed(policy, RouteInput(list(range(50, 58))), idle(1))
    assert policy.decide(RouteInput(list(range(8))), idle(1)).prefix_match_tokens == 0
    assert policy.decide(RouteInput(list(range(50, 58))), idle(1)).prefix_match_tokens == 8


def test_affinity_uses_the_session_key_else_the_prefix() -> None:
    policy = make_policy("affinity", ranks=2, block_size=BLOCK, load_factor=1.25)
    assert isinstance(policy, Affinity)
    prompt = list(range(8))
    keyed = policy.decide(RouteInput(prompt, "s"), idle(2))
    assert keyed.reason == "session_home"
    keyed.commit()
    # The session's rank now holds the prompt's blocks, so a keyless request
    # with the same prefix follows it there.
    keyless = policy.decide(RouteInput([*prompt, 9]), idle(2))
    assert (keyless.rank, keyless.reason) == (keyed.rank, "prefix_hit")
    assert policy.decide(RouteInput([7, 7]), idle(2)).reason == "prefix_miss"
    assert policy.decide(RouteInput([1]), [load(0, state=RankState.DRAINING)]).rank is None
