"""The rank server's half of the vitals side channel (`router/vitals.py`):
a daemon thread that watches this process's engine processes and reports
them to the router's host a few times a second."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import psutil

from router.vitals import VITALS_INTERVAL_S, EngineState, Vitals

# How often the engine processes are looked for again (a walk of /proc);
# in between only the known ones are read.
RESCAN_S = 2.0
_STOPPED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}
_GONE = {psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD}


def _is_engine(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline())
    return False


class EngineWatch:
    """This process's descendants (vLLM's engine core and its workers)."""

    def __init__(self) -> None:
        self._procs: list[tuple[psutil.Process, bool]] = []  # (process, is the engine core)
        self._scanned = 0.0
        self._seen_engine = False

    def _rescan(self) -> None:
        # vLLM names its engine process once it runs: a child not yet named
        # is looked at again next time.
        engines = {proc.pid: proc for proc, engine in self._procs if engine}
        self._procs = [
            (engines[child.pid], True) if child.pid in engines else (child, _is_engine(child))
            for child in psutil.Process().children(recursive=True)
        ]
        self._scanned = time.monotonic()

    def sample(self) -> tuple[EngineState, float]:
        """The engine's state and its live processes' CPU seconds so far."""
        if time.monotonic() - self._scanned >= RESCAN_S:
            self._rescan()
        engine, cpu, stopped, lost = EngineState.GONE, 0.0, False, False
        for proc, is_engine in self._procs:
            try:
                with proc.oneshot():
                    status = proc.status()
                    times = proc.cpu_times()
            except psutil.Error:
                lost = True
                continue
            if status in _GONE:
                lost = True
                continue
            cpu += times.user + times.system
            stopped |= status in _STOPPED
            if is_engine:
                engine = EngineState.RUNNING
        if lost:
            self._scanned = 0.0  # something exited: look again next time
        if engine is EngineState.RUNNING:
            self._seen_engine = True
            if stopped:
                engine = EngineState.STOPPED
        elif not self._seen_engine:
            engine = EngineState.STARTING
        return engine, cpu


class VitalsReporter:
    """Sends this rank server's vitals to the router's host (the data-parallel
    address and RPC port), as rank `rank` of its group."""

    def __init__(self, router: tuple[str, int], rank: int) -> None:
        self._router, self._rank = router, rank
        self._boot = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        self._exited = False
        family = socket.getaddrinfo(router[0], router[1], type=socket.SOCK_DGRAM)[0][0]
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def start(self) -> None:
        """Reports a few times a second from a daemon thread."""
        threading.Thread(target=self._run, name="vitals", daemon=True).start()

    def engines_exited(self) -> None:
        """Reports the engines gone, as the last report: vLLM's headless
        server reaps a dead engine and exits at once, often before the next
        sample could say so."""
        with self._lock:
            self._exited = True
            self._send(EngineState.GONE, 0.0)

    def _run(self) -> None:
        watch = EngineWatch()
        while True:
            sample = watch.sample()
            with self._lock:
                if self._exited:  # a sample taken before would contradict the last report
                    return
                self._send(*sample)
            time.sleep(VITALS_INTERVAL_S)

    def _send(self, engine: EngineState, cpu: float) -> None:
        self._seq += 1
        datagram = Vitals(self._rank, self._boot, self._seq, engine, cpu, time.monotonic()).encode()
        with contextlib.suppress(OSError):  # unreachable now: the router will notice
            self._sock.sendto(datagram, self._router)
