"""The router's command line: its own flags plus every vLLM engine flag.

The engine flags (--model, --dtype, --max-model-len, -dp,
--data-parallel-address, --data-parallel-rpc-port, ...) must match the ones
the rank servers were started with: vLLM checks the configuration at the
handshake.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from router.auth import TOKENS_ENV, load_tokens
from router.limits import RequestLimits
from router.liveness import DEFAULT_TIMEOUTS
from router.policies import DEFAULT_LOAD_FACTOR, POLICIES
from router.vllm_compat import add_engine_args, new_flexible_parser

# gRPC's own default for the largest request it receives.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsConfig:
    """PEM files of the gRPC port's certificate; `client_ca` set requires and
    verifies client certificates (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None


@dataclass(frozen=True)
class RouterConfig:
    listen: str
    grace_period: float
    routing_policy: str
    load_factor: float
    topology: str
    log_level: str
    engine_args: argparse.Namespace
    limits: RequestLimits
    max_queue_per_rank: int | None
    max_in_flight: int | None
    max_message_bytes: int
    tls: TlsConfig | None
    auth_tokens: frozenset[str]
    metrics_listen: str | None
    busy_timeout: float

    @property
    def data_parallel_size(self) -> int:
        size: int = self.engine_args.data_parallel_size
        return size

    @property
    def model_name(self) -> str:
        """The model as vLLM names it (--served-model-name, else --model)."""
        names = self.engine_args.served_model_name
        name: str = names[0] if names else self.engine_args.model
        return name


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    parser = new_flexible_parser(
        "dprouter router: serves gRPC Generate, Ranks, Health and reflection for "
        "data-parallel vLLM ranks that join it from rank servers (python -m server)."
    )
    _add_router_args(parser)
    _add_security_args(parser)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        tokens = load_tokens(args.auth_tokens_file, os.environ.get(TOKENS_ENV))
    except OSError as e:
        parser.error(f"--auth-tokens-file: {e}")
    if args.auth_tokens_file is not None and not tokens:
        parser.error("--auth-tokens-file holds no token")
    return _config(args, tokens)


def _add_router_args(parser: argparse.ArgumentParser) -> None:
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
    router.add_argument(
        "--rank-busy-timeout",
        type=float,
        default=DEFAULT_TIMEOUTS.busy_timeout_s,
        help="seconds a rank whose engine is alive and using CPU may go without any output "
        "or answer before it is presumed hung (a long prefill or first-use compilation is "
        "normal work up to this)",
    )
    router.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
        "(default: off; port 0 picks a free one)",
    )


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with the usage and the reason when flags do not go together."""
    if args.metrics_listen is not None and not _is_host_port(args.metrics_listen):
        parser.error(f"--metrics-listen must be HOST:PORT, got {args.metrics_listen!r}")
    if args.rank_busy_timeout <= DEFAULT_TIMEOUTS.timeout_s:
        parser.error(
            f"--rank-busy-timeout must be above the probe timeout ({DEFAULT_TIMEOUTS.timeout_s} s)"
        )
    if args.affinity_load_factor < 1:
        parser.error("--affinity-load-factor must be at least 1")
    for flag in (
        "max_prompt_tokens",
        "max_n",
        "max_tokens_limit",
        "max_message_bytes",
        "max_in_flight",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue_per_rank is not None and args.max_queue_per_rank < 0:
        parser.error("--max-queue-per-rank must be at least 0")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")


def _config(args: argparse.Namespace, tokens: frozenset[str]) -> RouterConfig:
    return RouterConfig(
        listen=args.listen,
        grace_period=args.grace_period,
        routing_policy=args.routing_policy,
        load_factor=args.affinity_load_factor,
        topology=args.topology,
        # vLLM's own --log-level sets the router's level too.
        log_level=getattr(args, "log_level", "info").upper(),
        engine_args=args,
        limits=RequestLimits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_n=args.max_n,
            max_tokens=args.max_tokens_limit,
        ),
        max_queue_per_rank=args.max_queue_per_rank,
        max_in_flight=args.max_in_flight,
        max_message_bytes=args.max_message_bytes,
        tls=TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        auth_tokens=tokens,
        metrics_listen=args.metrics_listen,
        busy_timeout=args.rank_busy_timeout,
    )


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and int(port) < 65536


def _add_security_args(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("request limits")
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="refuse prompts longer than this many tokens (default: the model's context)",
    )
    limits.add_argument("--max-n", type=int, help="refuse sampling.n above this")
    limits.add_argument(
        "--max-tokens-limit", type=int, help="refuse sampling.max_tokens above this"
    )
    limits.add_argument(
        "--max-queue-per-rank",
        type=int,
        help="requests a rank holds beyond what its engine runs at once (--max-num-seqs); "
        "when every serving rank is full, requests get RESOURCE_EXHAUSTED with a retry "
        "delay (default: --max-num-seqs)",
    )
    limits.add_argument(
        "--max-in-flight",
        type=int,
        help="requests the router holds in all; beyond, RESOURCE_EXHAUSTED with a retry "
        "delay (default: only the per-rank bounds)",
    )
    limits.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request message gRPC accepts; larger ones get RESOURCE_EXHAUSTED",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS")
    security.add_argument("--tls-key", help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    security.add_argument(
        "--auth-tokens-file",
        help=f"file of bearer tokens, one a line (also: {TOKENS_ENV}, comma separated); "
        "when any is set, every RPC but Health and reflection needs "
        "'authorization: Bearer <token>' metadata",
    )
