"""One run of a job on one rank: its engine stream, its span, its place in
the ledger, and how the router interrupts it (its rank failed, the shutdown's
grace period is over, its deadline passed), and what the client is told when
it fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2

from router.engine_types import EngineDelta, EngineRequest
from router.errors import RequestError
from router.ledger import Entry
from router.ranks import RankNotJoined
from router.tracing import Attempt as AttemptSpan
from router.vllm_compat import EngineClientError, EngineDeadError


class RankFailed(Exception):
    """The job's rank was found dead or hung while the job ran there."""


@dataclass
class RankAttempt:
    """A job's engine stream on one rank, and the task consuming it."""

    request: EngineRequest
    rank: int
    task: asyncio.Task[Any]
    entry: Entry | None  # the ledger's, where it counts the outputs
    span: AttemptSpan
    deltas: AsyncIterator[EngineDelta]
    in_engine: bool = False  # awaiting the engine's next output, not sending
    # Why the router ends it: RankFailed (its rank was found dead or hung),
    # or a RequestError (the router's grace period is over).
    ended: Exception | None = None

    async def next_delta(self) -> EngineDelta | None:
        """The engine's next output; None at the end."""
        self.in_engine = True
        try:
            return await self.deltas.__anext__()
        except StopAsyncIteration:
            return None
        finally:
            self.in_engine = False

    def end(self, error: Exception) -> None:
        """Ends the attempt with `error` at its next output, or at once where
        it waits on the engine. Only a wait on the engine is interrupted:
        cancelled anywhere else (a send to the client), the handler would end
        without a status."""
        self.ended = error
        self.interrupt("ended by the router")

    def interrupt(self, why: str) -> None:
        """Cancels a wait on the engine, as gRPC's own cancel would."""
        if self.in_engine:
            self.task.cancel(why)

    def check_ended(self) -> None:
        """Raises the router's reason to end it, found out while the client
        was sent an output."""
        if self.ended is not None:
            raise self.ended

    def retries(self, error: BaseException, delivered: int, pinned: bool) -> bool:
        """After the attempt failed with `error`: whether the job moves to
        another rank (its rank failed before it produced anything, and it
        was not pinned); else raises what the job ends with, or returns False
        for the caller to re-raise `error`."""
        if not isinstance(error, asyncio.CancelledError):
            self.span.fail(error)
            return isinstance(error, EngineDeadError | RankNotJoined) and not (delivered or pinned)
        self.span.fail(self.ended or error)
        if self.ended is None:
            return False  # the client's cancel
        self.task.uncancel()
        if isinstance(self.ended, RequestError) or delivered or pinned:
            raise self.ended from None
        return True


def client_error(error: Exception, rank: int, delivered: int) -> RequestError:
    """What the client is told of a job that failed."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, EngineDeadError | RankNotJoined | RankFailed):
        return RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"rank {rank} failed after {delivered} tokens were delivered",
            details=[
                error_details_pb2.ErrorInfo(
                    reason="RANK_FAILED",
                    domain="dprouter",
                    metadata={"rank": str(rank), "delivered_tokens": str(delivered)},
                )
            ],
        )
    if isinstance(error, EngineClientError | ValueError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"rejected by the engine: {error}")
    return RequestError(
        grpc.StatusCode.INTERNAL, f"engine failure: {type(error).__name__}: {error}"
    )
