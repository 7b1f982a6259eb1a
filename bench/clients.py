"""One load driver per system, and the closed loop that runs them.

Every driver sends the same `Request` (token ids, exact greedy length) and
timestamps each streamed message that carries tokens:
- `DprouterGrpc`: dprouter's GenerateService over grpc.aio (raw stubs: the
  SDK's retries and deadlines are not what is measured), with text or, like
  vLLM's gRPC server, token ids only (`detokenize` false);
- `VllmGrpc`: vLLM's own gRPC server (`smg-grpc-servicer`'s VllmEngine API;
  it does not detokenize, the gateway in front of it does);
- `VllmHttp`: vLLM's OpenAI-compatible server, /v1/completions with SSE
  streaming and `return_token_ids` (vLLM's extension) to count tokens;
- `InProcess`: the router's engine client in this process, no network: the floor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2

from bench.workload import Request, Run, Timing
from dprouter.v1 import generate_pb2, generate_pb2_grpc

# Enough for 64 concurrent streams and more; aiohttp's default pool holds 100.
_MAX_CONNECTIONS = 1024


class Driver(Protocol):
    async def send(self, request: Request) -> Timing: ...

    async def close(self) -> None: ...


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The `RetryInfo` delay of a RESOURCE_EXHAUSTED from dprouter."""
    trailers: dict[str, bytes] = dict(error.trailing_metadata() or ())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Unpack(info):
            delay: float = info.retry_delay.ToTimedelta().total_seconds()
            return delay
    raise AssertionError(f"no RetryInfo in {error}")


class DprouterGrpc:
    """Told RESOURCE_EXHAUSTED (dprouter bounds what it queues), a request
    waits the `RetryInfo` delay and is sent again, as a client of the router
    should: its TTFT counts from the first send, and the refusals are counted."""

    def __init__(self, address: str, detokenize: bool = True) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generate_pb2_grpc.GenerateServiceStub(self._channel)
        self._detokenize = detokenize

    async def send(self, request: Request) -> Timing:
        message = generate_pb2.GenerateRequest(
            prompt_token_ids=request.prompt,
            sampling=generate_pb2.SamplingParams(
                max_tokens=request.max_tokens,
                temperature=0,
                ignore_eos=True,
                detokenize=self._detokenize,
            ),
        )
        timing = Timing(time.perf_counter())
        while True:
            try:
                async for response in self._stub.Generate(message):
                    timing.add(time.perf_counter(), len(response.token_ids))
                return timing
            except grpc.aio.AioRpcError as e:
                if e.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or timing.arrivals:
                    raise
                timing.refusals += 1
                await asyncio.sleep(retry_delay(e))

    async def close(self) -> None:
        await self._channel.close(None)


class VllmGrpc:
    def __init__(self, address: str) -> None:
        # Optional: only this driver needs smg-grpc-servicer's protos.
        from smg_grpc_proto import vllm_engine_pb2, vllm_engine_pb2_grpc

        self._pb = vllm_engine_pb2
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = vllm_engine_pb2_grpc.VllmEngineStub(self._channel)
        self._ids = itertools.count()

    async def send(self, request: Request) -> Timing:
        pb = self._pb
        message = pb.GenerateRequest(
            request_id=f"bench-{next(self._ids)}",
            tokenized=pb.TokenizedInput(input_ids=request.prompt),
            sampling_params=pb.SamplingParams(
                temperature=0, top_p=1, max_tokens=request.max_tokens, ignore_eos=True,
                skip_special_tokens=True, n=1,
            ),
            stream=True,
        )  # fmt: skip
        timing = Timing(time.perf_counter())
        async for response in self._stub.Generate(message):
            # The closing `complete` message repeats the last chunk's tokens.
            if response.HasField("chunk"):
                timing.add(time.perf_counter(), len(response.chunk.token_ids))
        return timing

    async def close(self) -> None:
        await self._channel.close(None)


class VllmHttp:
    def __init__(self, base_url: str, model: str) -> None:
        self._url = f"{base_url}/v1/completions"
        self._model = model
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def send(self, request: Request) -> Timing:
        body = {
            "model": self._model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
        }  # fmt: skip
        timing = Timing(time.perf_counter())
        async with self._session.post(self._url, json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue  # blank separators and "data: [DONE]"
                chunk: dict[str, Any] = json.loads(line[6:])
                tokens = sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ()))
                timing.add(time.perf_counter(), tokens)
        return timing

    async def close(self) -> None:
        await self._session.close()


async def closed_loop(driver: Driver, requests: Sequence[Request], concurrency: int) -> Run:
    """`concurrency` workers, each sending its next request as soon as the
    previous one has finished, until the requests run out."""
    pending = iter(requests)
    timings: list[Timing] = []
    errors: list[str] = []

    async def worker() -> None:
        for request in pending:
            try:
                timings.append(await driver.send(request))
            except (grpc.RpcError, aiohttp.ClientError) as e:
                errors.append(f"{type(e).__name__}: {e}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(concurrency, time.perf_counter() - start, timings, errors=errors)
