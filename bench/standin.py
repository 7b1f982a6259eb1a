"""dprouter's real gRPC server and dispatcher over an engine stand-in: the
streaming ceiling of one router process (how many tokens a second it can
carry), with no engine behind it.

    python -m bench.standin --listen 127.0.0.1:PORT

The stand-in answers every request at once with `max_tokens` one-token deltas,
yielding to the event loop between them as vLLM's output handler does. It
does no detokenizing or output processing (vLLM's engine client does that in
the real router), so the ceiling it shows is that of the router's own path:
validation, routing, the ledger, protobuf and gRPC. Only the ceiling line of
the benchmark uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from bench.refuser import until_stopped
from router.app import build_server, serve_port
from router.config import parse_args
from router.dispatcher import Dispatcher
from router.engine_types import EngineDelta, EngineRequest
from router.fleet import build as build_fleet
from router.health import RouterHealth
from router.ledger import EngineLoad
from router.limits import ModelLimits
from router.metrics import Metrics
from router.vllm_compat import EngineSamplingParams

BLOCK = 128


class StandInRank:
    """A `RankPool` of one rank that produces tokens as fast as it is read."""

    limits = ModelLimits(max_model_len=1 << 20, vocab_size=1 << 16, data_parallel_size=1)
    block_size = BLOCK
    kv_blocks = 1 << 16
    capacity = 256  # vLLM's default max_num_seqs: more than the benchmark's streams
    shared_connection = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    async def generate(self, request: EngineRequest, rank: int) -> AsyncIterator[EngineDelta]:
        params = request.params
        assert isinstance(params, EngineSamplingParams)
        count = params.max_tokens or 1
        for i in range(count):
            await asyncio.sleep(0)
            last = i == count - 1
            yield EngineDelta(
                index=0, text="x", token_ids=[i], logprobs=[],
                finish_reason="length" if last else None, stop_reason="", finished=last,
                cached_tokens=0,
            )  # fmt: skip

    async def abort(self, request_id: str, rank: int) -> None:
        pass

    async def probe(self, rank: int, step: bool) -> None:
        pass

    def last_heard(self, rank: int) -> float:
        return time.monotonic()  # always answering: the watchdog is not measured

    def step_times(self, rank: int) -> tuple[tuple[float, float], ...]:
        return ()  # no engine steps: nothing is refused for its deadline

    def dropped_at(self, rank: int) -> float:
        return 0.0

    async def fail(self, rank: int, request_ids: Sequence[str]) -> None:
        pass

    def engine_loads(self) -> list[EngineLoad]:
        return [EngineLoad()]

    def close(self) -> None:
        pass


async def serve(listen: str, model: str) -> None:
    config = parse_args(["--model", model, "--listen", listen])
    dispatcher = Dispatcher(Metrics())
    pool = StandInRank()
    dispatcher.attach(
        build_fleet(
            pool, config.routing_policy, config.load_factor,
            allowed=config.limits,
        )
    )  # fmt: skip
    health = RouterHealth()
    server = build_server(dispatcher, health, config)
    serve_port(server, config)
    await server.start()
    await health.starting(1)
    await health.update(dispatcher.loads())
    await until_stopped(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--model", default="models/tiny-llama", help="only parsed, not loaded")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.model))


if __name__ == "__main__":
    main()
