"""The one error type that request handling raises: a gRPC status and a message."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

# The trailer gRPC's rich error model reads (grpcio-status, grpc-go status.FromError).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class RequestError(Exception):
    """A request failed with this gRPC status; the message is for the client.

    `field` names the offending request field (a path such as `sampling.top_p`)
    or metadata key (`x-data-parallel-rank`) for INVALID_ARGUMENT.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        problem: str,
        field: str | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(problem)
        self.code = code
        self.problem = problem
        self.field = field
        self.details = details  # google.rpc error details (ErrorInfo, RetryInfo...)

    def message(self, field_prefix: str = "") -> str:
        """The client's message; `field_prefix` places request fields inside an
        enclosing message (`request.` for Complete). Metadata keys, which hold
        dashes and no field path does, are not prefixed."""
        if self.field is None:
            return self.problem
        prefix = "" if "-" in self.field else field_prefix
        return f"{prefix}{self.field}: {self.problem}"

    def trailers(self, message: str) -> tuple[tuple[str, bytes], ...]:
        """The details as a google.rpc.Status trailer, if there are any."""
        if not self.details:
            return ()
        packed = []
        for detail in self.details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(code=self.code.value[0], message=message, details=packed)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def invalid_argument(field: str, problem: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the offending field's path."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, problem, field)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(field: str, problem: str) -> RequestError:
    """The request is well formed but the router's state refuses it (a drained rank)."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, problem, field)
