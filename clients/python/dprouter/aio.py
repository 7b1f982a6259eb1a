"""The asyncio client: `AsyncClient` over grpc.aio.

async with AsyncClient("127.0.0.1:50051") as client:
    stream = client.generate("The capital of France is", sampling=SamplingParams(max_tokens=8))
    async for response in stream:
        print(response.text, end="")
    print((await stream.route()).rank)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter import calls
from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc


class AsyncStream:
    """A streamed generation: iterate it for the responses; `route()` says
    which rank serves it (awaits the response headers)."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall[generate_pb2.GenerateRequest, generate_pb2.GenerateResponse],
    ) -> None:
        self._call = call

    def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        return self._call.__aiter__()

    async def route(self) -> calls.Route:
        return calls.Route.from_metadata(await self._call.initial_metadata())

    def cancel(self) -> None:
        """Stops the generation; the router aborts it in the engine."""
        self._call.cancel()


class AsyncClient:
    """dprouter's GenerateService, RanksService and Health over one channel.

    Every call has a deadline (`timeout` seconds, per client or per call) that
    covers all its attempts; calls that fail with UNAVAILABLE before the router
    answered are retried (see `calls.channel_options`)."""

    def __init__(
        self, address: str = calls.DEFAULT_ADDRESS, **options: Unpack[calls.ClientOptions]
    ) -> None:
        self.address = address
        self.timeout, channel = calls.client_settings(options)
        self.channel = grpc.aio.insecure_channel(address, options=channel)
        self._generate = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self._ranks = ranks_pb2_grpc.RanksServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: calls.Prompt, **options: Unpack[calls.CallOptions]) -> AsyncStream:
        call = self._generate.Generate(
            calls.build_request(prompt, options), **calls.call_settings(options, self.timeout)
        )
        return AsyncStream(call)

    async def complete(
        self, prompt: calls.Prompt, **options: Unpack[calls.CallOptions]
    ) -> tuple[generate_pb2.CompleteResponse, calls.Route]:
        request = generate_pb2.CompleteRequest(request=calls.build_request(prompt, options))
        call = self._generate.Complete(request, **calls.call_settings(options, self.timeout))
        return await call, calls.Route.from_metadata(await call.initial_metadata())

    async def health(self, service: str = "") -> str:
        """The Health status of `service` ("", "dprouter.v1.GenerateService", "rank/N")."""
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return calls.status_name(reply.status)

    async def watch_health(self, service: str = "") -> AsyncGenerator[str]:
        """The Health status of `service` now and on every change, until cancelled
        (no deadline)."""
        async for reply in self._health.Watch(health_pb2.HealthCheckRequest(service=service)):
            yield calls.status_name(reply.status)

    async def ranks(self) -> list[ranks_pb2.RankStatus]:
        reply = await self._ranks.ListRanks(ranks_pb2.ListRanksRequest(), timeout=self.timeout)
        return list(reply.ranks)

    async def drain(self, rank: int) -> ranks_pb2.RankStatus:
        request = ranks_pb2.DrainRankRequest(rank=rank)
        return (await self._ranks.DrainRank(request, timeout=self.timeout)).status

    async def resume(self, rank: int) -> ranks_pb2.RankStatus:
        request = ranks_pb2.ResumeRankRequest(rank=rank)
        return (await self._ranks.ResumeRank(request, timeout=self.timeout)).status

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
