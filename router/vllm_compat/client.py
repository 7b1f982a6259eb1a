"""The router's engine client: vLLM's `AsyncLLM` for ranks in rank servers,
behind plain types (token ids, `EngineDelta`s, load tuples)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import zmq
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import PrometheusStatLogger
from zmq.utils.monitor import parse_monitor_message

from router.engine_types import EngineDelta, EngineRequest, EngineTokenLogprob
from router.pace import StepTimes
from router.tracing import UNSAMPLED_HEADERS
from router.vllm_compat.patches import (
    EngineCounts,
    prime_detokenizers_with_prompt_tail,
    watch_output_batches,
)
from router.vllm_compat.tokens import longest_token_bytes

__all__ = ["EngineClient", "EngineDeadError"]


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
    DuplicateTimeseries, and a rank that never joined."""

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
        watch_output_batches(llm, self._heard, self._counts, self._steps)
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
        prime_detokenizers_with_prompt_tail()
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
        self, request: EngineRequest, rank: int | None
    ) -> AsyncIterator[EngineDelta]:
        """Streams the request's deltas; cancelling the iteration aborts it.
        `rank` None leaves the choice to vLLM's own data-parallel balancer."""
        params = request.params
        assert isinstance(params, SamplingParams)  # made by engine_sampling_params
        # Already tokenized and checked by the router: hand the engine its own
        # input type, not a prompt for vLLM's renderer to process again.
        prompt = tokens_input(request.prompt_token_ids)
        async for out in self._llm.generate(
            prompt,
            params,
            request.request_id,
            trace_headers=request.trace_headers,
            priority=request.priority,
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
