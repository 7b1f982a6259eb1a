"""The one error type that request handling raises: a gRPC status and a message."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request failed with this gRPC status; the message is for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(field: str, problem: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the offending field's path."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)
