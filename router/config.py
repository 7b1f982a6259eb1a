"""The router's command line: its own flags plus every vLLM engine flag.

The engine flags (--model, --dtype, --max-model-len, -dp,
--data-parallel-address, --data-parallel-rpc-port, ...) must match the ones
the rank servers were started with: vLLM checks the configuration at the
handshake.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from router.vllm_compat import add_engine_args, new_flexible_parser


@dataclass(frozen=True)
class RouterConfig:
    listen: str
    grace_period: float
    log_level: str
    engine_args: argparse.Namespace

    @property
    def data_parallel_size(self) -> int:
        size: int = self.engine_args.data_parallel_size
        return size


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    parser = new_flexible_parser(
        "dprouter router: serves gRPC Generate, Ranks, Health and reflection for "
        "data-parallel vLLM ranks that join it from rank servers (python -m server)."
    )
    router = parser.add_argument_group("router")
    router.add_argument(
        "--listen", default="127.0.0.1:50051", help="gRPC address to serve on (host:port)"
    )
    router.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds that in-flight requests get to finish after SIGTERM",
    )
    add_engine_args(parser)
    args = parser.parse_args(argv)
    return RouterConfig(
        listen=args.listen,
        grace_period=args.grace_period,
        # vLLM's own --log-level sets the router's level too.
        log_level=getattr(args, "log_level", "info").upper(),
        engine_args=args,
    )
