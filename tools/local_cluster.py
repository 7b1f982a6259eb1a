"""Starts N rank servers and a router on this host, and stops them all.

`make run` uses it to serve the default model, and the test session uses it
to start the engines once. Each process gets its own process group, so
stopping the cluster also stops the engine processes that vLLM spawns: no
orphans after Ctrl-C.

    python -m tools.local_cluster --model models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.topology import rank_port
from tools.platforms import Platform, detect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (independent rank k joins on
    the router's rpc port + k)."""
    while True:
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


@dataclass
class ClusterSpec:
    model: str
    ranks: int = 2
    listen: str = "127.0.0.1:50051"
    rpc_port: int = 13345
    max_model_len: int = 2048
    # Engine flags after the platform's (tools/platforms.py), which they override.
    engine_flags: list[str] = field(default_factory=list)
    platform: Platform = field(default_factory=detect)
    router_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Where each process's output goes; None inherits the terminal.
    log_dir: Path | None = None
    # False starts the rank servers alone, for another engine client to join.
    with_router: bool = True
    # "independent" (a client per rank) or "coupled" (one client, -dp N); see router/ranks.py.
    topology: str = "independent"
    # Rank servers start their engine again when it dies (`make run`).
    restart_on_crash: bool = False
    # How to reach a router started with --tls-cert (and a client certificate
    # for --tls-client-ca); None is plaintext.
    credentials: grpc.ChannelCredentials | None = None
    # The rank servers' `nice` increment (their engines inherit it); None:
    # the platform's; 0 runs them at the router's priority.
    engine_niceness: int | None = None
    # Where the router takes the ranks' connections (vLLM's data-parallel RPC).
    data_parallel_address: str = "127.0.0.1"
    # Ranks whose server runs in a network namespace (`ip netns exec`), as if
    # on another host: rank -> namespace name.
    rank_netns: dict[int, str] = field(default_factory=dict)

    def channel(self) -> grpc.Channel:
        """A blocking channel to the router, with the spec's credentials."""
        if self.credentials is None:
            return grpc.insecure_channel(self.listen)
        return grpc.secure_channel(self.listen, self.credentials)

    def engine_flags_common(self) -> list[str]:
        """Engine flags the router and every rank must agree on."""
        return [
            "--model", self.model,
            "--max-model-len", str(self.max_model_len),
            "--data-parallel-address", self.data_parallel_address,
            # Prefix-affinity routing pays off only where vLLM reuses the KV blocks.
            "--enable-prefix-caching",
            *self.platform.flags(self.ranks, self.engine_flags),
        ]  # fmt: skip

    def router_engine_flags(self) -> list[str]:
        """The engine flags of the router (or of any client holding all ranks)."""
        return [
            *self.engine_flags_common(),
            "-dp", str(self.ranks),
            "--data-parallel-rpc-port", str(self.rpc_port),
        ]  # fmt: skip

    def rank_flags(self, rank: int) -> list[str]:
        """A rank server's flags: with independent ranks, a data-parallel group
        of one on port rpc_port + rank; coupled, rank `rank` of -dp N."""
        port = rank_port(self.rpc_port, rank)
        group = (
            ["-dp", "1", "-dpr", "0", "--data-parallel-rpc-port", str(port)]
            if self.topology == "independent"
            else ["-dp", str(self.ranks), "-dpr", str(rank),
                  "--data-parallel-rpc-port", str(self.rpc_port)]
        )  # fmt: skip
        return [
            *self.engine_flags_common(), *group,
            "--data-parallel-size-local", "1", "--router-rank", str(rank),
            *(["--restart-on-crash"] if self.restart_on_crash else []),
        ]  # fmt: skip


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.ranks: list[subprocess.Popen[bytes]] = []
        self.router: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []

    def _spawn(
        self, name: str, args: Sequence[str], env: dict[str, str], prefix: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
            self._logs.append(out)
        return subprocess.Popen(
            [*prefix, sys.executable, *args],
            env={**os.environ, **self.spec.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )

    def _spawn_rank(
        self, rank: int, name: str, flags: Sequence[str] | None = None
    ) -> subprocess.Popen[bytes]:
        spec = self.spec
        env = spec.platform.env(spec.ranks, rank, spec.engine_flags)
        netns = spec.rank_netns.get(rank)
        # `ip netns exec` and `nice` exec the command: the process is still the rank server.
        prefix = ["ip", "netns", "exec", netns] if netns else []
        niceness = spec.platform.niceness if spec.engine_niceness is None else spec.engine_niceness
        if niceness:
            prefix += ["nice", "-n", str(niceness)]
        flags = spec.rank_flags(rank) if flags is None else flags
        return self._spawn(name, ["-m", "server", *flags], env, prefix)

    def start(self, timeout: float) -> None:
        """Starts the ranks and the router. Ranks that share a GPU start one
        after another (`Platform.start_waves`): this waits, up to `timeout`,
        for each to serve before the next."""
        spec = self.spec
        waves = spec.platform.start_waves(spec.ranks, spec.engine_flags)
        if not spec.with_router:  # nothing to tell when a rank is up
            waves = [list(range(spec.ranks))]
        started: dict[int, subprocess.Popen[bytes]] = {}
        deadline = time.monotonic() + timeout
        for wave in waves:
            if started:
                self.wait_serving(deadline - time.monotonic(), sorted(started))
            started.update({rank: self._spawn_rank(rank, f"rank{rank}") for rank in wave})
            self.ranks = [started[rank] for rank in sorted(started)]
            if spec.with_router and self.router is None:
                self.router = self._spawn(
                    "router",
                    ["-m", "router", *spec.router_engine_flags(), "--topology", spec.topology,
                     "--listen", spec.listen, *spec.router_flags],
                    {},
                )  # fmt: skip

    @contextlib.contextmanager
    def serving(self, timeout: float) -> Iterator[LocalCluster]:
        """Starts the cluster, waits for SERVING, and stops it on leaving."""
        try:
            self.start(timeout)
            if self.spec.with_router:
                self.wait_serving(timeout)
            yield self
        finally:
            self.stop()

    def restart_rank(self, rank: int, flags: Sequence[str] | None = None) -> None:
        """Stops a rank server (if it still runs) and starts it again, with
        `flags` instead of its own if given."""
        old = self.ranks[rank]
        _signal_group(old, signal.SIGKILL)
        old.wait()
        name = f"rank{rank}-restarted" if flags is None else f"rank{rank}-flags-given"
        self.ranks[rank] = self._spawn_rank(rank, name, flags)

    def engine_process(self, rank: int) -> psutil.Process:
        """The rank's vLLM engine-core process (a child of its rank server)."""
        for child in psutil.Process(self.ranks[rank].pid).children(recursive=True):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        raise LookupError(f"rank {rank} has no engine process")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [*self.ranks, *([self.router] if self.router else [])]

    def check_alive(self) -> None:
        """Raises if any process of the cluster has exited."""
        for proc in self.processes():
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")

    def wait_serving(self, timeout: float, ranks: Sequence[int] | None = None) -> None:
        """Blocks until the router's Health says SERVING for the router and for
        every rank (or those of `ranks`; the router serves as soon as one rank
        has joined); raises if a process died."""
        waited = range(self.spec.ranks) if ranks is None else ranks
        names = ["", *(f"rank/{rank}" for rank in waited)]
        deadline = time.monotonic() + timeout
        waiting = names
        with self.spec.channel() as channel:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    waiting = not_serving(channel, names)
                    if not waiting:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(
            f"not SERVING after {timeout:.0f} s: {waiting} ('' is the router)"
            + self._router_log_tail()
        )

    def _router_log_tail(self, lines: int = 30) -> str:
        """The end of the router's log, for an error message (CI shows no files)."""
        if self.spec.log_dir is None or not (path := self.spec.log_dir / "router.log").exists():
            return ""
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return "\nthe router's log ends:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to every process group (router first), SIGKILL to what remains.
        SIGINT and SIGTERM wait until it is done: a second Ctrl-C half-way
        through would leave engine processes behind."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._stop(timeout)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _stop(self, timeout: float) -> None:
        for proc in self.processes():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                if proc is self.router:
                    _wait(proc, timeout)
        for proc in self.processes():
            _wait(proc, timeout)
            _signal_group(proc, signal.SIGKILL)  # engine processes left in the group
        for out in self._logs:
            out.close()


def not_serving(channel: grpc.Channel, names: Sequence[str]) -> list[str]:
    """Those of `names` the server's standard Health does not call SERVING."""
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    return [
        name
        for name in names
        if health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status != serving
    ]


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Stops a process started in its own session, and every process it
    spawned there: SIGTERM, then SIGKILL after `timeout` or for what remains."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
    _wait(proc, timeout)
    _signal_group(proc, signal.SIGKILL)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--listen", default="127.0.0.1:50051")
    parser.add_argument("--rpc-port", type=int, default=13345)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--topology", choices=("independent", "coupled"), default="independent")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for SERVING")
    parser.add_argument("--metrics-listen", help="the router's Prometheus endpoint (HOST:PORT)")
    parser.add_argument("--platform", choices=("auto", "cpu", "cuda"), default="auto",
                        help="engine defaults; auto: CUDA if nvidia-smi lists GPUs")  # fmt: skip
    parser.add_argument("--engine-flags", default="",
                        help="vLLM flags for every rank, after the platform's")  # fmt: skip
    args = parser.parse_args()
    # SIGTERM stops the cluster the way Ctrl-C does, so no engine is orphaned;
    # so does SIGINT when the shell that started it ignores SIGINT (a
    # background job of a script), which Python would otherwise inherit.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    cluster = LocalCluster(
        ClusterSpec(
            model=args.model,
            ranks=args.ranks,
            listen=args.listen,
            rpc_port=args.rpc_port,
            max_model_len=args.max_model_len,
            topology=args.topology,
            engine_flags=shlex.split(args.engine_flags),
            platform=detect(args.platform),
            restart_on_crash=True,
            router_flags=["--metrics-listen", args.metrics_listen] if args.metrics_listen else [],
        )
    )
    try:
        with cluster.serving(args.timeout):
            print(
                f"\ndprouter is SERVING {args.model} on {args.listen} with {args.ranks} ranks.\n"
                "Stream a completion:\n"
                f"  .venv/bin/dprouter generate --address {args.listen} "
                '"The capital of France is"\n'
                f'  .venv/bin/grpcurl -plaintext -d \'{{"prompt": "The capital of France is", '
                f'"sampling": {{"max_tokens": 16, "temperature": 0}}}}\' {args.listen} '
                "dprouter.v1.GenerateService/Generate\n"
                + (
                    f"Metrics: curl -s http://{args.metrics_listen}/metrics\n"
                    if args.metrics_listen
                    else ""
                )
                + "Press Ctrl-C to stop.\n",
                flush=True,
            )
            while all(proc.poll() is None for proc in cluster.processes()):
                time.sleep(1)
            print("a process exited; stopping the cluster", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
