"""A request's sampling parameters as vLLM takes them, and the error vLLM
raises for parameters that this model cannot take."""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.sampling_params import RequestOutputKind, SamplingParams

from router.engine_types import Sampling
from router.vllm_compat.versions import VLLMClientError

# The engine rejected the request itself (bad parameters for this model).
EngineClientError = VLLMClientError
# vLLM's sampling parameters, built once per request by `engine_sampling_params`.
EngineSamplingParams = SamplingParams


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
