"""The blocking client: `Client` over a grpc channel.

with Client("127.0.0.1:50051") as client:
    stream = client.generate("The capital of France is", sampling=SamplingParams(max_tokens=8))
    for response in stream:
        print(response.text, end="")
    print(stream.route().rank)
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.calls import (
    DEFAULT_ADDRESS,
    CallOptions,
    ClientOptions,
    Prompt,
    Route,
    build_request,
    call_settings,
    client_settings,
    status_name,
)
from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc


class Stream:
    """A streamed generation: iterate it for the responses; `route()` says
    which rank serves it (waits for the response headers)."""

    def __init__(self, call: grpc.CallIterator[generate_pb2.GenerateResponse]) -> None:
        self._call = call

    def __iter__(self) -> Iterator[generate_pb2.GenerateResponse]:
        return iter(self._call)

    def route(self) -> Route:
        return Route.from_metadata(self._call.initial_metadata())

    def cancel(self) -> None:
        """Stops the generation; the router aborts it in the engine."""
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


class Client:
    """dprouter's GenerateService, RanksService and Health over one channel;
    the blocking twin of `dprouter.aio.AsyncClient` (same calls, deadlines
    and retries)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **options: Unpack[ClientOptions]) -> None:
        self.address = address
        self.timeout, channel = client_settings(options)
        self.channel = grpc.insecure_channel(address, options=channel)
        self._generate = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self._ranks = ranks_pb2_grpc.RanksServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: Prompt, **options: Unpack[CallOptions]) -> Stream:
        request = build_request(prompt, options)
        return Stream(self._generate.Generate(request, **call_settings(options, self.timeout)))

    def complete(
        self, prompt: Prompt, **options: Unpack[CallOptions]
    ) -> tuple[generate_pb2.CompleteResponse, Route]:
        request = generate_pb2.CompleteRequest(request=build_request(prompt, options))
        call_with = self._generate.Complete.with_call
        response, call = call_with(request, **call_settings(options, self.timeout))
        return response, Route.from_metadata(call.initial_metadata())

    def health(self, service: str = "") -> str:
        """The Health status of `service` ("", "dprouter.v1.GenerateService", "rank/N")."""
        request = health_pb2.HealthCheckRequest(service=service)
        return status_name(self._health.Check(request, timeout=self.timeout).status)

    def ranks(self) -> list[ranks_pb2.RankStatus]:
        reply = self._ranks.ListRanks(ranks_pb2.ListRanksRequest(), timeout=self.timeout)
        return list(reply.ranks)

    def drain(self, rank: int) -> ranks_pb2.RankStatus:
        request = ranks_pb2.DrainRankRequest(rank=rank)
        return self._ranks.DrainRank(request, timeout=self.timeout).status

    def resume(self, rank: int) -> ranks_pb2.RankStatus:
        request = ranks_pb2.ResumeRankRequest(rank=rank)
        return self._ranks.ResumeRank(request, timeout=self.timeout).status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
