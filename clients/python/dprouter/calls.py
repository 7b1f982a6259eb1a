"""What the sync and async clients share: the request they build, the
metadata they send, the route the router reports back, and the channel's
retry policy. Nothing here does I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from grpc_health.v1 import health_pb2

from dprouter.v1 import generate_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
# gRPC caps a retry policy at 5 attempts.
MAX_ATTEMPTS = 5

# A prompt: text, chat messages, or a whole request (for any other field).
Prompt = str | Sequence[generate_pb2.ChatMessage] | generate_pb2.GenerateRequest
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class Route:
    """Where the router sent a request and why, from the response metadata."""

    rank: int | None
    policy: str
    reason: str
    request_id: str
    # Set when the router traces (OTEL_EXPORTER_OTLP_ENDPOINT).
    trace_id: str | None

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Route:
        values = {key: value for key, value in metadata or () if isinstance(value, str)}
        rank = values.get("x-data-parallel-rank")
        return cls(
            rank=int(rank) if rank is not None else None,
            policy=values.get("x-route-policy", ""),
            reason=values.get("x-route-reason", ""),
            request_id=values.get("x-request-id", ""),
            trace_id=values.get("x-trace-id"),
        )


class RequestOptions(TypedDict, total=False):
    """The request fields a client call takes as keyword arguments."""

    sampling: generate_pb2.SamplingParams
    # Pins a data-parallel rank; unset lets the router choose.
    rank: int
    # Groups a conversation's requests for session-affinity routing.
    session: str
    request_id: str


class CallOptions(RequestOptions, total=False):
    """The keyword arguments of a client's `generate` and `complete`: the
    request's fields, and the call's own."""

    # A W3C traceparent: the router's span becomes a child of the caller's.
    traceparent: str | None
    # Seconds, the call's deadline; the client's `timeout` where unset.
    timeout: float | None


class CallSettings(TypedDict):
    """What a stub's call takes besides its request."""

    timeout: float
    metadata: Metadata


class ClientOptions(TypedDict, total=False):
    """A client's keyword arguments."""

    # Seconds, the deadline of each call (all its attempts); default 60.
    timeout: float
    # Tries of a call refused with UNAVAILABLE before the router answered; default 5.
    attempts: int


def build_request(prompt: Prompt, options: RequestOptions) -> generate_pb2.GenerateRequest:
    """A GenerateRequest; the options override a given request's fields."""
    if isinstance(prompt, generate_pb2.GenerateRequest):
        request = generate_pb2.GenerateRequest()
        request.CopyFrom(prompt)
    elif isinstance(prompt, str):
        request = generate_pb2.GenerateRequest(prompt=prompt)
    else:
        request = generate_pb2.GenerateRequest(messages=prompt)
    if "sampling" in options:
        request.sampling.CopyFrom(options["sampling"])
    if "rank" in options:
        request.data_parallel_rank = options["rank"]
    if "session" in options:
        request.session_key = options["session"]
    if "request_id" in options:
        request.request_id = options["request_id"]
    return request


def call_settings(options: CallOptions, default_timeout: float) -> CallSettings:
    """A call's deadline and its metadata (a W3C `traceparent` makes the
    router's span a child of the caller's)."""
    timeout, traceparent = options.get("timeout"), options.get("traceparent")
    return CallSettings(
        timeout=default_timeout if timeout is None else timeout,
        metadata=(("traceparent", traceparent),) if traceparent else (),
    )


def client_settings(options: ClientOptions) -> tuple[float, list[tuple[str, str | int]]]:
    """A client's default deadline, and its channel's options."""
    timeout = options.get("timeout", DEFAULT_TIMEOUT_S)
    return timeout, channel_options(options.get("attempts", MAX_ATTEMPTS))


def channel_options(attempts: int) -> list[tuple[str, str | int]]:
    """gRPC's own retries: an RPC that fails with UNAVAILABLE before the router
    sent any response headers (not connected, ranks not joined, shutting down)
    is tried again with backoff, within the call's deadline. Once the router
    has routed a request it sends headers, so a request is never run twice."""
    attempts = max(1, min(attempts, MAX_ATTEMPTS))
    if attempts == 1:
        return [("grpc.enable_retries", 0)]
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    services = ["dprouter.v1.GenerateService", "dprouter.v1.RanksService", "grpc.health.v1.Health"]
    config = {"methodConfig": [{"name": [{"service": s} for s in services], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def status_name(status: int) -> str:
    """A Health status by name ("SERVING", "NOT_SERVING", ...)."""
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return name
