"""vLLM alone, offline: the engine's own rate, for the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from vllm import LLM
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams

from router.vllm_compat.launch import add_engine_args, new_flexible_parser


class OfflineEngine:
    """vLLM's offline `LLM`, built from engine flags as the servers take them,
    the way vLLM's own throughput benchmark builds it."""

    def __init__(self, engine_argv: Sequence[str]) -> None:
        parser = new_flexible_parser("offline engine")
        add_engine_args(parser)
        engine_args = EngineArgs.from_cli_args(parser.parse_args(list(engine_argv)))
        self._llm = LLM.from_engine_args(engine_args)

    def generate(self, prompts: Sequence[list[int]], max_tokens: Sequence[int]) -> int:
        """Generates greedily, EOS ignored, all at once; the output tokens."""
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        outputs = self._llm.generate(list(prompts), params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)
