"""The patches of vLLM's internals, each a named function that the engine
client applies when it starts, each refused on a vLLM release it was not
written for (`versions.check_written_for`): its docstring says why it exists
and how to tell whether a newer vLLM still needs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import tokenizers
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

from router.pace import StepTimes
from router.vllm_compat.versions import check_written_for

# (waiting, running, KV-cache usage) of one engine, as it last reported them.
EngineCounts = tuple[int, int, float]


# Prompt tokens that prime a request's detokenizer: enough left context for
# any token's text (a byte-level merge or a multi-byte character spans a few).
DETOKENIZER_PROMPT_TAIL = 32
# A UTF-8 character is at most 4 bytes: byte tokens of an unfinished one.
_UNFINISHED_CHARACTER_TOKENS = 3


def primed_decode_stream(
    tokenizer: tokenizers.Tokenizer, prompt: Sequence[int], skip_special_tokens: bool
) -> tokenizers.decoders.DecodeStream:
    """An incremental detokenizer for the text after `prompt`, primed with the
    prompt's tail.

    vLLM primes it with the whole prompt, decoded when the first token comes
    back: 0.25 us per prompt token here (1 ms at 4,096 tokens), on the event
    loop and in that request's time to first token. Only the left context
    matters, so the tail gives the same text (`tests/test_detokenizer.py`),
    as vLLM's detokenizer did before it primed with the whole prompt (with
    its last 4-23 tokens).

    A tail that ends in an unfinished character (a prompt of token ids cut
    mid-character) would leave the stream with no text to subtract, and the
    first delta would repeat the prompt (vLLM issue 48853). Those last byte
    tokens are stepped in after priming instead: they are held until the
    output finishes the character."""
    tail = list(prompt[-DETOKENIZER_PROMPT_TAIL:])
    held: list[int] = []
    while (
        tail
        and len(held) < _UNFINISHED_CHARACTER_TOKENS
        and tokenizer.decode(tail, skip_special_tokens=skip_special_tokens).endswith("\ufffd")
    ):
        held.insert(0, tail.pop())
    stream = tokenizers.decoders.DecodeStream(ids=tail, skip_special_tokens=skip_special_tokens)
    for token in held:
        stream.step(tokenizer, token)
    return stream


def prime_detokenizers_with_prompt_tail() -> None:
    """Makes vLLM's fast detokenizer start from `primed_decode_stream` (once
    per process). Still needed while vLLM's `FastIncrementalDetokenizer`
    decodes the whole prompt to prime its stream: `tests/test_detokenizer.py`
    checks that the text stays the same; time a 4,096-token prompt's first
    token with and without the patch to see whether it still pays."""
    check_written_for("prime_detokenizers_with_prompt_tail", ("0.26.", "0.32."))
    if getattr(FastIncrementalDetokenizer.__init__, "primed_with_tail", False):
        return
    init = FastIncrementalDetokenizer.__init__

    def init_with_tail(self: FastIncrementalDetokenizer, tokenizer: Any, request: Any) -> None:
        init(self, tokenizer, request)
        prompt = request.prompt_token_ids or []
        self.stream = primed_decode_stream(self.tokenizer, prompt, self.skip_special_tokens)

    init_with_tail.primed_with_tail = True  # type: ignore[attr-defined]
    FastIncrementalDetokenizer.__init__ = init_with_tail  # type: ignore[method-assign]


def watch_output_batches(
    llm: AsyncLLM,
    heard: dict[int, float],
    counts: dict[int, EngineCounts],
    steps: dict[int, StepTimes],
) -> None:
    """Notes when each engine last sent outputs, the scheduler counts it
    sent with them and how long its steps take (by the engine's clock, which
    a busy router's late reading does not skew), and makes vLLM's two output
    loops let other tasks run between messages.

    The time an output batch was read is the watchdog's proof that an engine
    with work makes progress, whether or not the request handlers keep up
    (a handler waits while its client reads slowly).

    vLLM reads engine outputs in two loops: one moves messages from the ZMQ
    socket to a queue, the other takes them from the queue to the requests.
    Each awaits data that, when the router is behind the engines (a busy
    host), is already there, and such an await does not yield to the event
    loop. Each loop then works through its backlog with nothing else running,
    and an engine that produces as fast as the router reads keeps it there:
    the router answered nothing for 10-20 s while one 15,000-token request
    streamed (deadlines, cancels and the watchdog all waited), and a 6,000-
    token stream arrived as one message. So each loop yields once before a
    message that is already waiting; an await that has to wait yields anyway,
    and an extra turn of the event loop per message costs CPU on every token.

    A newer vLLM still needs it while `AsyncMPClient` reads its output socket
    and queue with awaits that do not yield when data is waiting, and sends
    `scheduler_stats` and a timestamp with each step's outputs.
    """
    check_written_for("watch_output_batches", ("0.26.", "0.32."))
    socket = llm.engine_core.resources.output_socket
    receive = socket.recv_multipart

    async def receive_fairly(*args: Any, **kwargs: Any) -> Any:
        frames = receive(*args, **kwargs)  # a future, done if the message was waiting
        if frames.done():
            await asyncio.sleep(0)
        return await frames

    socket.recv_multipart = receive_fairly
    core = llm.engine_core
    get_output = core.get_output_async

    async def get_output_fairly() -> Any:
        if not core.outputs_queue.empty():
            await asyncio.sleep(0)
        outputs = await get_output()
        engine = outputs.engine_index
        heard[engine] = time.monotonic()
        if (stats := outputs.scheduler_stats) is not None:  # sent after each step
            waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
            counts[engine] = (waiting, stats.num_running_reqs, stats.kv_cache_usage)
            if engine not in steps:
                steps[engine] = StepTimes(llm.vllm_config.scheduler_config.max_num_seqs)
            steps[engine].note(outputs.timestamp, stats.num_running_reqs, waiting)
        return outputs

    core.get_output_async = get_output_fairly
