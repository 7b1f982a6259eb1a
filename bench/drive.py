"""The benchmark's side of its load processes (`bench.load`, or the Go load
client, which speaks the same protocol): start them, hand them runs, read
the results back."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

from bench import systems
from bench.workload import Request, Run
from tools.local_cluster import stop_group

ROOT = Path(__file__).resolve().parent.parent
PYTHON_LOAD = [sys.executable, "-m", "bench.load"]
GO_LOAD = ROOT / "build" / "go" / "load"


class LoadProcess:
    """A `bench.load` process (or the Go client, which speaks its protocol):
    one system's driver, run after run."""

    def __init__(
        self,
        program: Sequence[str],
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        read, write = os.pipe()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self._proc = subprocess.Popen(
                [*program, "--results-fd", str(write), *argv],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=(write,), env={**os.environ, **(env or {})}, start_new_session=True,
            )  # fmt: skip
        os.close(write)
        self._results: IO[bytes] = os.fdopen(read, "rb")
        if not self._results.readline():  # {"ready": true}, or EOF when it died
            self.close()
            raise systems.Unavailable(f"its load process failed to start (log: {log})")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, batch: Sequence[Request], concurrency: int) -> None:
        """Starts one closed-loop run; `receive` returns it."""
        assert self._proc.stdin is not None
        command = {
            "concurrency": concurrency,
            "requests": [[r.prompt, r.max_tokens] for r in batch],
        }
        self._proc.stdin.write(json.dumps(command).encode() + b"\n")
        self._proc.stdin.flush()

    def receive(self) -> Run:
        line = self._results.readline()
        if not line:
            raise RuntimeError(f"load process {self._proc.args!r} died")
        return Run.from_json(json.loads(line))

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        stop_group(self._proc, timeout=60)
        self._results.close()


class LoadGroup:
    """One system's load, from one process per load core: each runs its share
    of the streams and of the requests, all at once (one clock: the load
    processes' perf_counter is the host's monotonic clock)."""

    def __init__(self, processes: Sequence[LoadProcess]) -> None:
        self.processes = list(processes)

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    def run(self, batch: Sequence[Request], concurrency: int, front_end: int | None) -> Run:
        """One closed-loop run; the front end's CPU time is read around it."""
        process = psutil.Process(front_end) if front_end is not None else None
        before = sum(process.cpu_times()[:2]) if process else 0.0
        count = min(len(self.processes), concurrency)
        shares = [(batch[i::count], concurrency // count + (i < concurrency % count))
                  for i in range(count)]  # fmt: skip
        for load, (part, streams) in zip(self.processes, shares, strict=False):
            load.send(part, streams)
        runs = [load.receive() for load in self.processes[:count]]
        run = Run(
            concurrency,
            max(r.wall_s for r in runs),
            [t for r in runs for t in r.timings],
            errors=[e for r in runs for e in r.errors],
        )
        if process is not None:
            run.front_end_cpu_s = sum(process.cpu_times()[:2]) - before
        return run

    def close(self) -> None:
        for load in self.processes:
            load.close()


def load_group(
    system: systems.System,
    target: str,
    model: Path,
    cores: Sequence[int],
    logs: Path,
    engine: systems.Deployment,
) -> LoadGroup:
    """The system's load: for the floor one process that holds the engine
    (`engine`), else one process pinned to each of `cores`."""
    name = system.label.replace(" ", "-")
    if system.holds_engine:
        argv = [system.driver, "-", "--", *engine.engine_flags()]
        return LoadGroup([LoadProcess(PYTHON_LOAD, argv, logs / f"load-{name}.log",
                                      engine.engine_env())])  # fmt: skip
    if system.driver == systems.GO_DRIVER and not GO_LOAD.exists():
        raise systems.Unavailable(f"{GO_LOAD} is not built (make build/go/load)")
    group = LoadGroup([])
    try:
        for core in cores:
            log = logs / f"load-{name}-{core}.log"
            if system.driver == systems.GO_DRIVER:
                load = LoadProcess(["taskset", "-c", str(core), str(GO_LOAD)], [target], log)
            else:
                argv = [system.driver, target, "--model", str(model), "--pin", str(core)]
                load = LoadProcess(PYTHON_LOAD, argv, log)
            group.processes.append(load)
    except systems.Unavailable:
        group.close()
        raise
    return group
