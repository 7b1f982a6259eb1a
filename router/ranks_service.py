"""The rank admin RPCs (`RanksService`): list the ranks, drain and resume
one, and explain where a request would go (a dry run of admission and
routing)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dprouter.v1 import ranks_pb2, ranks_pb2_grpc
from router import intake
from router.dispatcher import Dispatcher
from router.errors import RequestError
from router.health import RouterHealth
from router.ledger import RankLoad, RankState
from router.rpc import abort, metadata

if TYPE_CHECKING:
    from router.rpc import Context

log = logging.getLogger("dprouter.requests")
_RANK_STATES = {
    RankState.SERVING: ranks_pb2.RANK_STATE_SERVING,
    RankState.DRAINING: ranks_pb2.RANK_STATE_DRAINING,
    RankState.UNHEALTHY: ranks_pb2.RANK_STATE_UNHEALTHY,
}


def _rank_status(load: RankLoad) -> ranks_pb2.RankStatus:
    return ranks_pb2.RankStatus(
        rank=load.rank,
        state=_RANK_STATES[load.state],
        in_flight=load.in_flight,
        queued_prompt_tokens=load.queued_prompt_tokens,
        waiting=load.waiting,
        running=load.running,
        kv_cache_usage=load.kv_cache_usage,
        served=load.served,
        failed=load.failed,
        cancelled=load.cancelled,
    )


class RanksServicer(ranks_pb2_grpc.RanksServiceServicer):
    def __init__(self, dispatcher: Dispatcher, health: RouterHealth) -> None:
        self._dispatcher = dispatcher
        self._health = health

    async def ListRanks(
        self, request: ranks_pb2.ListRanksRequest, context: Context
    ) -> ranks_pb2.ListRanksResponse:
        return ranks_pb2.ListRanksResponse(
            ranks=[_rank_status(load) for load in self._dispatcher.loads()]
        )

    async def _set_drained(self, rank: int, drained: bool, context: Context) -> RankLoad:
        try:
            load = self._dispatcher.fleet().set_drained(rank, drained)
        except RequestError as e:
            await abort(context, e, e.message())
            raise AssertionError("unreachable: abort raises") from e
        await self._health.update(self._dispatcher.loads())
        log.info("rank drained" if drained else "rank resumed", extra={"rank": rank})
        return load

    async def DrainRank(
        self, request: ranks_pb2.DrainRankRequest, context: Context
    ) -> ranks_pb2.DrainRankResponse:
        load = await self._set_drained(request.rank, True, context)
        return ranks_pb2.DrainRankResponse(status=_rank_status(load))

    async def ResumeRank(
        self, request: ranks_pb2.ResumeRankRequest, context: Context
    ) -> ranks_pb2.ResumeRankResponse:
        load = await self._set_drained(request.rank, False, context)
        return ranks_pb2.ResumeRankResponse(status=_rank_status(load))

    async def ExplainRoute(
        self, request: ranks_pb2.ExplainRouteRequest, context: Context
    ) -> ranks_pb2.ExplainRouteResponse:
        try:
            fleet = self._dispatcher.fleet()
            admitted = await intake.admit(request.request, metadata(context), fleet)
            rank, decision = fleet.route(admitted.route, admitted.pin, admitted.ask, None)
        except RequestError as e:
            await abort(context, e, e.message("request."))
            raise AssertionError("unreachable: abort raises") from e
        response = ranks_pb2.ExplainRouteResponse(
            rank=rank,
            policy=decision.policy,
            reason=decision.reason,
            scores=[
                ranks_pb2.RankScore(
                    rank=c.rank,
                    score=c.score,
                    prefix_match_tokens=c.prefix_match_tokens,
                    within_load_bound=c.within_load_bound,
                )
                for c in decision.candidates
            ],
            prefix_match_tokens=decision.prefix_match_tokens,
            prompt_tokens=len(admitted.prompt_token_ids),
            affinity_hit=decision.affinity_hit,
        )
        if decision.affinity_rank is not None:
            response.affinity_rank = decision.affinity_rank
        return response
