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


def report_vitals(router: tuple[str, int], rank: int) -> threading.Thread:
    """Starts the reporting thread: to `router` (the data-parallel address and
    RPC port), as rank `rank` of its group."""
    thread = threading.Thread(target=_report, args=(router, rank), name="vitals", daemon=True)
    thread.start()
    return thread


def _report(router: tuple[str, int], rank: int) -> None:
    watch = EngineWatch()
    boot = uuid.uuid4().hex
    family = socket.getaddrinfo(router[0], router[1], type=socket.SOCK_DGRAM)[0][0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        seq = 0
        while True:
            engine, cpu = watch.sample()
            seq += 1
            datagram = Vitals(rank, boot, seq, engine, cpu, time.monotonic()).encode()
            with contextlib.suppress(OSError):  # unreachable now: the router will notice
                sock.sendto(datagram, router)
            time.sleep(VITALS_INTERVAL_S)
