"""What the servicers share about a call: its metadata, and ending it with
a `RequestError`'s status and details."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from router.errors import RequestError

if TYPE_CHECKING:  # generic only in the type stubs
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    # What a server interceptor is given to find the call's handler.
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


def metadata(context: Context) -> Sequence[tuple[str, str | bytes]]:
    return tuple(context.invocation_metadata() or ())


async def abort(context: Context, error: RequestError, message: str) -> None:
    """Ends the RPC with the error's status, message and rich details (and
    the trailers already set: the trace id)."""
    trailers = (*(context.trailing_metadata() or ()), *error.trailers(message))
    await context.abort(error.code, message, trailing_metadata=trailers)
