"""The standard grpc.health.v1 service, with a name per rank.

Names: "" (the router as a whole), `dprouter.v1.GenerateService`, and
`rank/<N>` for each data-parallel rank. The whole router and the Generate
service are SERVING while at least one rank is. This wraps grpc's own
servicer, which implements Check and Watch; it only decides the statuses.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from router.ledger import RankLoad, RankState

GENERATE_SERVICE = "dprouter.v1.GenerateService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rank_name(rank: int) -> str:
    return f"rank/{rank}"


class RouterHealth:
    def __init__(self) -> None:
        self.servicer = HealthServicer()

    async def starting(self, data_parallel_size: int) -> None:
        """Before the ranks have joined, every name is NOT_SERVING."""
        for name in ["", GENERATE_SERVICE, *map(rank_name, range(data_parallel_size))]:
            await self.servicer.set(name, NOT_SERVING)

    async def update(self, loads: Sequence[RankLoad]) -> None:
        any_serving = False
        for load in loads:
            serving = load.state is RankState.SERVING
            any_serving |= serving
            await self.servicer.set(rank_name(load.rank), SERVING if serving else NOT_SERVING)
        overall = SERVING if any_serving else NOT_SERVING
        await self.servicer.set(GENERATE_SERVICE, overall)
        await self.servicer.set("", overall)

    async def shutting_down(self) -> None:
        """Every name turns NOT_SERVING for good."""
        await self.servicer.enter_graceful_shutdown()
