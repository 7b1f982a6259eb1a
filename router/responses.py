"""What a client is sent: each engine output as a GenerateResponse, the
choices of a CompleteResponse gathered from them, the usage from the
request's record, and where the request went as response metadata."""

from __future__ import annotations

from dprouter.v1 import generate_pb2
from router.dispatcher import Job
from router.engine_types import EngineDelta, EngineTokenLogprob
from router.progress import Progress
from router.validation import RANK_METADATA_KEY

# Response metadata: why the request went to its rank.
ROUTE_POLICY_METADATA_KEY = "x-route-policy"
ROUTE_REASON_METADATA_KEY = "x-route-reason"

_FINISH_REASONS: dict[str, generate_pb2.FinishReason.ValueType] = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
}


def _finish_reason(reason: str | None) -> generate_pb2.FinishReason.ValueType:
    return _FINISH_REASONS.get(reason or "", generate_pb2.FINISH_REASON_UNSPECIFIED)


def _logprobs(items: list[EngineTokenLogprob]) -> list[generate_pb2.TokenLogprob]:
    return [
        generate_pb2.TokenLogprob(
            token_id=item.token_id,
            logprob=item.logprob,
            token=item.token,
            top_logprobs=[
                generate_pb2.TopLogprob(token_id=t, logprob=lp, token=text)
                for t, lp, text in item.top
            ],
        )
        for item in items
    ]


def route_metadata(job: Job) -> list[tuple[str, str]]:
    """Where the job went and why, as response metadata."""
    return [
        (RANK_METADATA_KEY, str(job.rank)),
        (ROUTE_POLICY_METADATA_KEY, job.route_policy),
        (ROUTE_REASON_METADATA_KEY, job.route_reason),
    ]


def usage(progress: Progress) -> generate_pb2.Usage:
    return generate_pb2.Usage(
        prompt_tokens=progress.prompt_tokens,
        completion_tokens=progress.completion_tokens,
        cached_tokens=progress.cached_tokens,
    )


def generate_response(delta: EngineDelta) -> generate_pb2.GenerateResponse:
    """One engine output of one choice, as streamed."""
    return generate_pb2.GenerateResponse(
        index=delta.index,
        text=delta.text,
        token_ids=delta.token_ids,
        logprobs=_logprobs(delta.logprobs),
        finish_reason=_finish_reason(delta.finish_reason),
        stop_reason=delta.stop_reason,
    )


def add_to_choice(choices: dict[int, generate_pb2.Choice], delta: EngineDelta) -> None:
    """Adds one engine output to its choice of a CompleteResponse."""
    choice = choices.setdefault(delta.index, generate_pb2.Choice(index=delta.index))
    choice.text += delta.text
    choice.token_ids.extend(delta.token_ids)
    choice.logprobs.extend(_logprobs(delta.logprobs))
    if delta.finish_reason:
        choice.finish_reason = _finish_reason(delta.finish_reason)
        choice.stop_reason = delta.stop_reason


def complete_response(
    choices: dict[int, generate_pb2.Choice], job: Job, progress: Progress
) -> generate_pb2.CompleteResponse:
    return generate_pb2.CompleteResponse(
        choices=[choices[i] for i in sorted(choices)],
        usage=usage(progress),
        data_parallel_rank=job.rank,
        request_id=job.request_id,
    )
