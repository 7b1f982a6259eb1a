"""The rank servers' side channel: what each engine process is doing, sent
as a small UDP datagram a few times a second, independent of the engine loop.

A vLLM engine answers the router only between two steps, and a step can take
seconds (a long prefill, a big batch, first-use compilation). So the router
cannot tell a busy engine from a hung one by asking it. The rank server, a
separate process on the engine's host, can: it watches its engine processes
(alive, stopped, CPU time advancing) and reports that to the router's host on
the data-parallel RPC port it already knows (`--data-parallel-address`,
`--data-parallel-rpc-port`), over UDP, whose ports are apart from vLLM's TCP
ones. A lost datagram costs nothing; none for a while is itself evidence (the
rank server stopped, its host went down, or the network was cut).

The channel has the trust of vLLM's data-parallel RPC, which it sits beside:
keep both on a private network.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from router.topology import rank_port

log = logging.getLogger("dprouter")

# How often a rank server reports.
VITALS_INTERVAL_S = 0.25
# A share of one core below which an engine's CPU time counts as standing
# still: a working engine uses most of a core, a blocked one almost none
# (its socket threads wake for the router's probes).
CPU_ACTIVE_SHARE = 0.05
_MAX_DATAGRAM = 2048


class EngineState(enum.Enum):
    STARTING = "starting"  # no engine process yet
    RUNNING = "running"
    STOPPED = "stopped"  # SIGSTOP, or stopped by a debugger
    GONE = "gone"  # the engine process exited (or is a zombie)


@dataclass(frozen=True)
class Vitals:
    """One report of a rank server about its engine processes."""

    rank: int  # the rank's -dpr within its data-parallel group
    boot: str  # the rank server's start: a restarted one has another
    seq: int
    engine: EngineState
    cpu_s: float  # CPU seconds used by the engine processes so far
    sent_at: float  # the sender's monotonic clock

    def encode(self) -> bytes:
        return json.dumps({**asdict(self), "engine": self.engine.value}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Vitals | None:
        """The report, or None for anything that is not one."""
        try:
            raw = json.loads(data)
            return cls(
                rank=int(raw["rank"]),
                boot=str(raw["boot"]),
                seq=int(raw["seq"]),
                engine=EngineState(raw["engine"]),
                cpu_s=float(raw["cpu_s"]),
                sent_at=float(raw["sent_at"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class RankVitals:
    """What the router last heard from one rank's server (its monotonic clock)."""

    received_at: float
    engine: EngineState
    boot: str
    # When the engine's CPU time was last seen advancing (0.0: not yet).
    cpu_active_at: float = 0.0
    # Since when the reports say stopped (0.0: the last one did not).
    stopped_since: float = 0.0
    _last: Vitals | None = None

    def update(self, vitals: Vitals, now: float) -> None:
        last = self._last
        if last is not None and last.boot == vitals.boot and vitals.seq <= last.seq:
            return  # late or repeated
        if last is not None and last.boot == vitals.boot and vitals.sent_at > last.sent_at:
            share = (vitals.cpu_s - last.cpu_s) / (vitals.sent_at - last.sent_at)
            if share >= CPU_ACTIVE_SHARE:
                self.cpu_active_at = now
        elif last is not None:  # a restarted rank server: nothing carries over
            self.cpu_active_at = 0.0
        if vitals.engine is EngineState.STOPPED:
            self.stopped_since = self.stopped_since or now
        else:
            self.stopped_since = 0.0
        self.received_at, self.engine, self.boot, self._last = (
            now,
            vitals.engine,
            vitals.boot,
            vitals,
        )


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, on_vitals: Callable[[Vitals], None]) -> None:
        self._on_vitals = on_vitals

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) <= _MAX_DATAGRAM and (vitals := Vitals.decode(data)) is not None:
            self._on_vitals(vitals)


class VitalsListener:
    """Receives the rank servers' reports: with independent ranks one port per
    rank (rank k on the base port + k, the rank's own -dpr is 0), coupled one
    port for all (the report's -dpr is the rank)."""

    def __init__(self, ranks: int, host: str, base_port: int, per_rank_ports: bool) -> None:
        self._ranks = ranks
        self._host = host
        self._base_port = base_port
        self._per_rank_ports = per_rank_ports
        self._vitals: dict[int, RankVitals] = {}
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        """Binds the ports; a port that cannot be bound leaves its ranks
        without vitals (the watchdog then judges them on probes alone)."""
        loop = asyncio.get_running_loop()
        ports = range(self._ranks) if self._per_rank_ports else range(1)
        for index in ports:
            port = rank_port(self._base_port, index)
            receiver = functools.partial(_Receiver, functools.partial(self._received, index))
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    receiver, local_addr=(self._host, port)
                )
            except OSError as e:
                log.warning(
                    "cannot receive rank vitals; ranks there are judged on probes alone",
                    extra={"address": f"{self._host}:{port}", "error": str(e)},
                )
                continue
            self._transports.append(transport)

    def _received(self, port_index: int, vitals: Vitals) -> None:
        rank = port_index if self._per_rank_ports else vitals.rank
        if not 0 <= rank < self._ranks:
            return
        now = time.monotonic()
        known = self._vitals.get(rank)
        if known is None:
            known = self._vitals[rank] = RankVitals(now, vitals.engine, vitals.boot)
        known.update(vitals, now)

    def get(self, rank: int) -> RankVitals | None:
        """The rank's latest vitals; None if it never sent any."""
        return self._vitals.get(rank)

    def close(self) -> None:
        for transport in self._transports:
            with contextlib.suppress(Exception):
                transport.close()
        self._transports.clear()
