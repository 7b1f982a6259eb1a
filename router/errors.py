"""The one error type that request handling raises: a gRPC status and a message."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request failed with this gRPC status; the message is for the client.

    `field` names the offending request field (a path such as `sampling.top_p`)
    or metadata key (`x-data-parallel-rank`) for INVALID_ARGUMENT.
    """

    def __init__(self, code: grpc.StatusCode, problem: str, field: str | None = None) -> None:
        super().__init__(problem)
        self.code = code
        self.problem = problem
        self.field = field

    def message(self, field_prefix: str = "") -> str:
        """The client's message; `field_prefix` places request fields inside an
        enclosing message (`request.` for Complete). Metadata keys, which hold
        dashes and no field path does, are not prefixed."""
        if self.field is None:
            return self.problem
        prefix = "" if "-" in self.field else field_prefix
        return f"{prefix}{self.field}: {self.problem}"


def invalid_argument(field: str, problem: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the offending field's path."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, problem, field)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(field: str, problem: str) -> RequestError:
    """The request is well formed but the router's state refuses it (a drained rank)."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, problem, field)
