"""A bare grpc.aio server that refuses every call at once with
RESOURCE_EXHAUSTED and a `RetryInfo`, as dprouter refuses, with dprouter's
limits on calls waiting for a handler: no routing, no books, no logs. Its
refusal latency under a burst is the floor of any Python gRPC front end on
the same machine (bench.overload prints it).

    python -m bench.refuser --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from router.admission import Refusal
from router.app import PENDING_CALL_OPTIONS
from router.rpc import abort

REFUSAL = Refusal("every serving rank holds its limit", "RANK_QUEUE_FULL", 1.0)


class Refuser(generate_pb2_grpc.GenerateServiceServicer):
    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        await abort(context, REFUSAL, REFUSAL.message())
        yield generate_pb2.GenerateResponse()  # unreachable: abort raises

    async def Complete(
        self, request: generate_pb2.CompleteRequest, context: Any
    ) -> generate_pb2.CompleteResponse:
        await abort(context, REFUSAL, REFUSAL.message())
        raise AssertionError("unreachable: abort raises")


async def until_stopped(server: grpc.aio.Server) -> None:
    """Serves until SIGTERM or SIGINT, then stops at once."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=None)


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=PENDING_CALL_OPTIONS)
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(Refuser(), server)
    server.add_insecure_port(listen)
    await server.start()
    await until_stopped(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
