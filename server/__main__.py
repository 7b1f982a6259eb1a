"""`python -m server --model DIR -dp N -dpr R --data-parallel-address ROUTER_HOST
--data-parallel-rpc-port PORT [engine flags]`: one headless vLLM data-parallel rank.

It takes vLLM's own `serve` flags (headless is implied) and has no API of its
own: the engine joins the router, which holds the engine client. The flags
that shape the model (--model, --dtype, --max-model-len, ...) must match the
router's.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import psutil

from router import logs
from router.vllm_compat import make_rank_server_parser, run_rank_server
from server.vitals import VitalsReporter

log = logging.getLogger("dprouter.server")
RESTART_FLAG = "--restart-on-crash"


def _router_connections(router_host: str, rpc_port: int) -> bool:
    """True once an engine process has a connection to the router's host other
    than the handshake port: after the handshake, the engine talks to the
    router's request and output sockets."""
    for child in psutil.Process().children(recursive=True):
        try:
            connections = child.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in connections:
            if (
                conn.status == psutil.CONN_ESTABLISHED
                and conn.raddr
                and conn.raddr.ip == router_host
                and conn.raddr.port != rpc_port
            ):
                return True
    return False


def _announce_join(rank: int, router_host: str, rpc_port: int) -> None:
    while not _router_connections(router_host, rpc_port):
        time.sleep(0.5)
    log.info("rank joined the router", extra={"rank": rank, "router": f"{router_host}:{rpc_port}"})


def _supervise(argv: list[str], rank: int) -> int:
    """Runs the rank server in a child process and starts it again whenever
    it exits, until this process is told to stop: vLLM's headless server
    exits when its engine dies, and the router takes a restarted rank back."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        child = subprocess.Popen([sys.executable, "-m", "server", *argv])
        code = child.wait()
        if stopping:
            return code
        log.warning("rank server exited; restarting it", extra={"rank": rank, "exit_code": code})
        time.sleep(1)


def main() -> int:
    parser = make_rank_server_parser(
        "dprouter rank server: one headless vLLM data-parallel rank that joins a router"
    )
    parser.add_argument(
        "--router-rank",
        type=int,
        help="this rank's number at the router, for the logs (default: -dpr); "
        "independent ranks are each rank 0 of a group of one",
    )
    parser.add_argument(
        RESTART_FLAG,
        action="store_true",
        help="start the engine again whenever it exits or crashes (until SIGTERM/SIGINT)",
    )
    args = parser.parse_args()
    logs.setup()
    host = args.data_parallel_address or "127.0.0.1"
    port = args.data_parallel_rpc_port
    rank = args.router_rank
    if rank is None:
        rank = args.data_parallel_start_rank or 0  # what -dpr sets in vLLM 0.32
    if args.restart_on_crash:
        return _supervise([a for a in sys.argv[1:] if a != RESTART_FLAG], rank)
    del args.router_rank, args.restart_on_crash  # not vLLM flags
    args.data_parallel_address = host
    log.info(
        "rank starting; waiting for the router",
        extra={"rank": rank, "router": f"{host}:{port}", "model": args.model},
    )
    threading.Thread(
        target=_announce_join, args=(rank, host, port), name="announce-join", daemon=True
    ).start()
    # The router tells a busy engine from a hung one by these (router/vitals.py).
    vitals = VitalsReporter((host, port), args.data_parallel_start_rank or 0)
    vitals.start()
    try:
        run_rank_server(args)
    finally:
        vitals.engines_exited()
    return 0


if __name__ == "__main__":
    sys.exit(main())
