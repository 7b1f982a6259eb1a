"""Bearer-token authentication for every RPC but the probes'.

With tokens configured (`--auth-tokens-file`, `DPROUTER_AUTH_TOKENS`), a call
must carry the metadata `authorization: Bearer <token>` with one of them, or
it ends UNAUTHENTICATED before its handler runs. Health stays open for load
balancers and orchestrators, and reflection for tools: neither reveals or
changes anything a token protects. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

TOKENS_ENV = "DPROUTER_AUTH_TOKENS"
_OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_SCHEME = "bearer "

if TYPE_CHECKING:
    from router.rpc import Context, Continuation, Handler


def load_tokens(path: str | None, env_value: str | None) -> frozenset[str]:
    """The tokens of the file (one a line, blank lines skipped) and of the
    comma-separated environment value; empty means no authentication."""
    tokens: list[str] = []
    if path is not None:
        tokens += Path(path).read_text().splitlines()
    if env_value:
        tokens += env_value.split(",")
    return frozenset(t.strip() for t in tokens if t.strip())


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            # The scheme is case-insensitive (RFC 7235).
            if text[: len(_SCHEME)].lower() == _SCHEME:
                return text[len(_SCHEME) :].strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Ends calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _allowed(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare with every token, so the time does not tell which one was close.
        return sum(hmac.compare_digest(given, t) for t in self._tokens) > 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        if self._allowed(_bearer(handler_call_details.invocation_metadata)):
            return handler

        async def refuse(request: Any, context: Context) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: a valid 'Bearer <token>' metadata entry is required",
            )

        # The refusal must have the method's own shape for gRPC to run it.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                refuse, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
