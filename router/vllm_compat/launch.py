"""Starting vLLM: its engine flags, the rank server's headless engines, and
the engine flags of one independent rank."""

from __future__ import annotations

import argparse
import os

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import run_headless
from vllm.platforms import current_platform
from vllm.utils.argparse_utils import FlexibleArgumentParser

from router.vllm_compat.versions import make_arg_parser


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
