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

from router.policies import DEFAULT_LOAD_FACTOR, POLICIES
from router.vllm_compat import add_engine_args, new_flexible_parser


@dataclass(frozen=True)
class RouterConfig:
    listen: str
    grace_period: float
    routing_policy: str
    load_factor: float
    topology: str
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
    router.add_argument(
        "--topology",
        choices=("independent", "coupled"),
        default="independent",
        help="independent: one engine client per rank, rank k joining on "
        "--data-parallel-rpc-port + k as a data-parallel group of one (a dead rank "
        "cannot stall the others); coupled: one client for all -dp ranks (vLLM's "
        "multi-instance data parallelism, for models whose ranks step together)",
    )
    router.add_argument(
        "--routing-policy",
        choices=POLICIES,
        default="affinity",
        help="how to pick a rank for a request that pins none: affinity (session key, "
        "else prompt prefix, both load-bounded; least loaded otherwise), least_loaded, "
        "power_of_two, prefix, session or round_robin",
    )
    router.add_argument(
        "--affinity-load-factor",
        type=float,
        default=DEFAULT_LOAD_FACTOR,
        help="affinity policies spill a request to another rank when its rank would "
        "have more than this times the mean in-flight requests",
    )
    add_engine_args(parser)
    args = parser.parse_args(argv)
    if args.affinity_load_factor < 1:
        parser.error("--affinity-load-factor must be at least 1")
    return RouterConfig(
        listen=args.listen,
        grace_period=args.grace_period,
        routing_policy=args.routing_policy,
        load_factor=args.affinity_load_factor,
        topology=args.topology,
        # vLLM's own --log-level sets the router's level too.
        log_level=getattr(args, "log_level", "info").upper(),
        engine_args=args,
    )
