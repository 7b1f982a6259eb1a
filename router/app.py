"""Assembles the router: the gRPC server, its services, the ranks, and shutdown.

Order of life: serve Health (NOT_SERVING) at once; build the engine client
in a thread while the ranks join; flip Health to SERVING; on SIGTERM or
SIGINT, flip Health to NOT_SERVING, refuse new requests with UNAVAILABLE, let
in-flight streams finish within the grace period, then stop the server and
shut the engine client down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router import otlp
from router.auth import BearerTokenInterceptor
from router.config import RouterConfig, TlsConfig
from router.dispatcher import Dispatcher
from router.fleet import Fleet
from router.health import RouterHealth
from router.liveness import DEFAULT_TIMEOUTS
from router.membership import Membership
from router.metrics import Metrics
from router.ranks_service import RanksServicer
from router.service import GenerateServicer
from router.vitals import VitalsListener
from router.vllm_compat import with_traces_endpoint
from router.watchdog import Watchdog
from router.wire import MalformedRequestInterceptor

log = logging.getLogger("dprouter")
T = TypeVar("T")
# After the grace period: how long the requests the router ended get to send
# their status before the server stops (which would cancel them instead).
STATUS_SEND_S = 1.0
# Calls that wait for a handler while the event loop is busy: gRPC would drop
# them past its default limits (CANCELLED, unseen by the router). Every call
# reaches the router, whose admission answers overload with RESOURCE_EXHAUSTED
# and a retry delay instead.
PENDING_CALL_OPTIONS = (
    ("grpc.server.max_pending_requests", 1 << 20),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
    ("grpc.server_max_unrequested_time_in_server", 3600),
)


def build_server(
    dispatcher: Dispatcher, health: RouterHealth, config: RouterConfig
) -> grpc.aio.Server:
    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
    if config.auth_tokens:
        # First, so an unauthenticated call learns nothing about its request.
        interceptors.append(BearerTokenInterceptor(config.auth_tokens))
    interceptors.append(MalformedRequestInterceptor(dispatcher.prompt_bytes_bound))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Ping idle connections so a vanished client (killed, cut off) is noticed
            # and its requests are cancelled, freeing their engine slots.
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            *PENDING_CALL_OPTIONS,
        ],
    )
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(
        GenerateServicer(dispatcher, config.model_name), server
    )
    ranks_pb2_grpc.add_RanksServiceServicer_to_server(RanksServicer(dispatcher, health), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name,
            ranks_pb2.DESCRIPTOR.services_by_name["RanksService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server


def serve_port(server: grpc.aio.Server, config: RouterConfig) -> None:
    """Binds --listen, over TLS when a certificate is given."""
    if config.tls is None:
        server.add_insecure_port(config.listen)
    else:
        server.add_secure_port(config.listen, _credentials(config.tls))


def _credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read(tls.key), read(tls.cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def serve(config: RouterConfig) -> int:
    """Runs the router until a signal; the process exit code."""
    config = _with_tracing(config)
    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    metrics.watch(dispatcher.loads)
    metrics_server = _serve_metrics(metrics, config)
    health = RouterHealth()
    server = build_server(dispatcher, health, config)
    serve_port(server, config)
    await server.start()
    await health.starting(config.data_parallel_size)
    _log_listening(config)
    stopping = asyncio.ensure_future(_stop_signal().wait())
    vitals = _vitals_listener(config)
    await vitals.start()
    membership = Membership(config, dispatcher, health)
    membership.start()
    joined = membership.first_join
    await asyncio.wait([joined, stopping], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    grace = None  # for the calls in flight: none unless the router served
    if not joined.done():
        log.info("stopped before the ranks joined")
        code = 0
    elif (error := joined.exception()) is not None:
        log.error("the ranks could not join", exc_info=error)
        code = 1
    else:
        fleet = joined.result()
        await health.update(fleet.loads())
        watchdog = asyncio.ensure_future(
            _watchdog(config, fleet, dispatcher, vitals, health, membership)
        )
        await stopping
        watchdog.cancel()
        await _drain(config, fleet, dispatcher, health)
        code, grace = 0, 1.0
    await server.stop(grace=grace)
    membership.close()
    vitals.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    otlp.shutdown()
    log.info("stopped")
    return code


def _with_tracing(config: RouterConfig) -> RouterConfig:
    """The config, with vLLM's request tracing on where the router's is."""
    if not otlp.setup():
        return config
    endpoint = otlp.traces_endpoint()
    assert endpoint is not None  # tracing is on
    log.info("tracing to OTLP", extra={"endpoint": endpoint})
    return dataclasses.replace(
        config, engine_args=with_traces_endpoint(config.engine_args, endpoint)
    )


def _serve_metrics(metrics: Metrics, config: RouterConfig) -> WSGIServer | None:
    if config.metrics_listen is None:
        return None
    server = metrics.serve(config.metrics_listen)
    log.info(
        "serving metrics", extra={"address": config.metrics_listen, "port": server.server_port}
    )
    return server


def _log_listening(config: RouterConfig) -> None:
    log.info(
        "listening",
        extra={
            "address": config.listen,
            "ranks": config.data_parallel_size,
            "tls": "off" if config.tls is None else "mutual" if config.tls.client_ca else "on",
            "auth": bool(config.auth_tokens),
        },
    )


def _stop_signal() -> asyncio.Event:
    """An event set at SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _vitals_listener(config: RouterConfig) -> VitalsListener:
    engine_args = config.engine_args
    return VitalsListener(
        config.data_parallel_size,
        engine_args.data_parallel_address or "127.0.0.1",
        engine_args.data_parallel_rpc_port,
        per_rank_ports=config.topology == "independent",
    )


async def _watchdog(
    config: RouterConfig,
    fleet: Fleet,
    dispatcher: Dispatcher,
    vitals: VitalsListener,
    health: RouterHealth,
    membership: Membership,
) -> None:
    async def health_changed() -> None:
        await health.update(fleet.loads())

    await Watchdog(
        fleet,
        dispatcher.fail_rank,
        vitals,
        health_changed,
        membership.replace,
        timeouts=dataclasses.replace(DEFAULT_TIMEOUTS, busy_timeout_s=config.busy_timeout),
    ).run()


async def _drain(
    config: RouterConfig, fleet: Fleet, dispatcher: Dispatcher, health: RouterHealth
) -> None:
    """After a signal: no new requests, and the grace period for those in flight."""
    log.info("draining", extra={"grace_period_s": config.grace_period})
    await health.shutting_down()
    for rank in range(config.data_parallel_size):
        fleet.ledger.set_drained(rank, True)
    if not await dispatcher.drain(config.grace_period):
        ended = dispatcher.end_all()
        log.warning("grace period over; ended the remaining requests", extra={"requests": ended})
        await dispatcher.drain(STATUS_SEND_S)
