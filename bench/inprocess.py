"""The in-process floor: the engine client the router itself holds, called
with no network. Apart from bench.clients, so that the network drivers'
load processes never import vLLM.
"""

from __future__ import annotations

import itertools
import time

from bench.workload import Request, Timing
from router.engine_types import EngineRequest, Sampling
from router.membership import in_daemon_thread
from router.vllm_compat import (
    EngineClient,
    add_engine_args,
    engine_sampling_params,
    new_flexible_parser,
)


class InProcess:
    """The engine client, in the load process."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self._ids = itertools.count()

    async def send(self, request: Request) -> Timing:
        params = engine_sampling_params(Sampling.greedy(request.max_tokens))
        deltas = self._client.generate(
            EngineRequest(f"bench-{next(self._ids)}", request.prompt, params), None
        )
        timing = Timing(time.perf_counter())
        async for delta in deltas:
            timing.add(time.perf_counter(), len(delta.token_ids))
        return timing

    async def close(self) -> None:
        self._client.shutdown()

    @classmethod
    async def start(cls, engine_argv: list[str]) -> InProcess:
        parser = new_flexible_parser("in-process engine")
        add_engine_args(parser)
        engine_args = parser.parse_args(engine_argv)
        return cls(await in_daemon_thread(lambda: EngineClient.start(engine_args, in_process=True)))
