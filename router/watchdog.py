"""Gathers the evidence about every rank and acts on the verdict
(`router/liveness.py` decides; nothing here does).

vLLM's engine client does not notice an engine process that died or stopped:
requests to it hang with no error (measured on vLLM 0.32). So the watchdog
collects, every tick and for each rank:
- probes: a rank that sent no output for `interval` seconds gets one (one
  greedy token while it has requests, a light call while it is idle), one
  at a time;
- outputs: the time its engine last sent any;
- its connection: a dropped one (a killed engine) is known at once, and
  stands until the rank answers a light probe sent after the drop: outputs
  the router reads after the drop may have left the engine before it. Where
  the ranks share one connection (coupled), a drop does not say whose
  engine it was: the verdict weighs who has not answered within
  `DROP_CHECK_S`;
- its rank server's vitals (`router/vitals.py`): engine process alive,
  stopped, CPU time advancing.
A rank found unhealthy gets no new requests, its Health name turns
NOT_SERVING, and its running requests are ended at once (the dispatcher
retries elsewhere those that had produced nothing, and ends the others with
UNAVAILABLE). Probing goes on, and a rank that answers again serves again.
A rank whose verdict says so gets a new engine client that waits for its
rank server to come back (vLLM's old client for a restarted engine stays
stuck).

Silence is counted in the router's own running time: a tick counts for at
most `MAX_TICK_S`, however late it comes. While the router itself does not
run (a host starved of CPU: 20-40 runnable threads on 2 cores were seen
while an engine restarted), the engines it does not hear from are no
evidence against them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from router.fleet import Fleet
from router.liveness import DEFAULT_TIMEOUTS, Evidence, Timeouts, Verdict, judge
from router.vitals import VitalsListener

log = logging.getLogger("dprouter")

PROBE_INTERVAL_S = 1.0
# How often each rank's state is decided.
TICK_S = 0.25
MAX_TICK_S = 2 * TICK_S
# How long (router running time) a rank of a shared connection that dropped
# has to answer a probe sent after the drop. A live engine answers between
# two steps; a killed one never does.
DROP_CHECK_S = 1.5


class _Clock:
    """The router's running time, as one rank's watch counts it."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.awake = 0.0
        self.step = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        self.step = min(now - self.now, MAX_TICK_S)
        self.awake += self.step
        self.now = now


class _Seen:
    """When a signal (a monotonic timestamp) last changed, in running time."""

    def __init__(self) -> None:
        self.at = 0.0  # the signal's own timestamp; 0.0: never
        self._awake: float | None = None

    def see(self, at: float, clock: _Clock) -> None:
        if at > self.at:
            self.at = at
            self._awake = clock.awake - min(clock.now - at, clock.step)

    def age(self, clock: _Clock) -> float | None:
        return None if self._awake is None else clock.awake - self._awake


class Watchdog:
    def __init__(
        self,
        fleet: Fleet,
        fail_rank: Callable[[Fleet, int], Awaitable[int]],
        vitals: VitalsListener,
        on_change: Callable[[], Awaitable[None]],
        replace: Callable[[int], bool],
        interval: float = PROBE_INTERVAL_S,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.fleet = fleet
        self._fail_rank = fail_rank  # ends its requests (`Dispatcher.fail_rank`)
        self.vitals = vitals
        self.replace = replace
        self.interval = interval
        self.timeouts = timeouts
        self._on_change = on_change

    async def run(self) -> None:
        """Watches every rank until cancelled."""
        ranks = self.fleet.ledger.ranks
        await asyncio.gather(*(_RankWatch(self, rank).run() for rank in range(ranks)))

    async def fail(self, rank: int, verdict: Verdict, evidence: Evidence) -> None:
        self.fleet.ledger.set_healthy(rank, False)
        log.warning(
            f"rank unhealthy: {verdict.condition.value}",
            extra={"rank": rank, "reason": verdict.reason, **_rounded(evidence)},
        )
        failed = await self._fail_rank(self.fleet, rank)
        log.warning(
            "ended the requests on the failed rank", extra={"rank": rank, "requests": failed}
        )
        await self._on_change()

    async def readmit(self, rank: int, verdict: Verdict) -> None:
        self.fleet.ledger.set_healthy(rank, True)
        log.info("rank healthy again", extra={"rank": rank, "reason": verdict.reason})
        await self._on_change()


def _rounded(evidence: Evidence) -> dict[str, object]:
    return {
        key: round(value, 3) if isinstance(value, float) else getattr(value, "value", value)
        for key, value in asdict(evidence).items()
    }


class _RankWatch:
    """One rank's evidence, gathered every tick."""

    def __init__(self, watchdog: Watchdog, rank: int) -> None:
        self._watchdog = watchdog
        self._fleet = watchdog.fleet
        self._rank = rank
        self._clock = _Clock()
        self._sign = _Seen()  # a probe's answer or an output
        self._answered_sent = 0.0  # when the latest answered probe was sent
        self._vitals_seen = _Seen()
        self._cpu_active = _Seen()
        self._probe: asyncio.Future[float | None] | None = None
        self._probe_sent = 0.0
        self._drop_check: asyncio.Future[float | None] | None = None
        self._drop_check_sent = 0.0
        self._drop_seen = 0.0  # the pool's drop time at the last tick
        self._awake_at_drop = 0.0
        self._joined_awake = 0.0
        self._joined_at = self._clock.now
        self._failed_at = 0.0
        self._failed_awake = 0.0
        self._replaced = False  # since it was last failed
        self._was_healthy = self._fleet.ledger.healthy(rank)

    async def run(self) -> None:
        while True:
            self._clock.tick()
            evidence = self._gather()
            await self._act(judge(evidence, self._watchdog.timeouts), evidence)
            await asyncio.sleep(TICK_S)

    def _busy(self) -> bool:
        """Whether the rank has requests, in the router's count or as its
        engine last reported (counts left stale by aborted requests too)."""
        load = self._fleet.loads()[self._rank]
        return bool(load.in_flight or load.waiting or load.running)

    async def _probe_once(self, step: bool) -> float | None:
        """When the rank answered; None if it did not within the timeout.

        With `step` (a busy rank) it runs one token: proof that it steps, and
        a fresh report of its counts. Otherwise it gets a light call that does
        not run the model (see `EngineClient.probe`). A busy engine answers
        only after its current step, however long: the vitals cover that."""
        pool = self._fleet.pool
        try:
            timeout = self._watchdog.timeouts.timeout_s
            await asyncio.wait_for(pool.probe(self._rank, step), timeout)
        except Exception:  # no answer in time, or the probe failed
            return None
        return time.monotonic()

    def _collect_answers(self) -> None:
        probes = ((self._probe, self._probe_sent), (self._drop_check, self._drop_check_sent))
        for future, sent in probes:
            answer = future.result() if future is not None and future.done() else None
            # Probes overlap: keep the latest sent that answered.
            if answer is not None and sent >= self._answered_sent:
                self._answered_sent = sent
                self._sign.see(answer, self._clock)
        if self._probe is not None and self._probe.done():
            self._probe = None
        if self._drop_check is not None and self._drop_check.done():
            self._drop_check = None

    def _gather(self) -> Evidence:
        clock, rank = self._clock, self._rank
        pool = self._fleet.pool
        healthy = self._fleet.ledger.healthy(rank)
        if healthy and not self._was_healthy:  # it joined, or rejoined with a new client
            # Answers to the old client are no sign of the new one.
            joined = self._fleet.ledger.healthy_since(rank)
            if self._sign.at < joined:
                self._sign, self._answered_sent = _Seen(), 0.0
            self._joined_awake = clock.awake - min(clock.now - joined, clock.step)
            self._joined_at = joined
        self._was_healthy = healthy
        self._collect_answers()
        heard = pool.last_heard(rank)
        self._sign.see(heard, clock)
        # A rank that streamed output within the interval has shown it
        # steps: a probe would only add a request to its batch.
        if self._probe is None and clock.now - max(self._probe_sent, heard) >= (
            self._watchdog.interval
        ):
            self._probe = asyncio.ensure_future(self._probe_once(self._busy()))
            self._probe_sent = clock.now
        drop = pool.dropped_at(rank)
        if drop != self._drop_seen:  # a drop, or a new client
            self._drop_seen, self._awake_at_drop = drop, clock.awake
            if drop and self._drop_check is None:
                self._drop_check = asyncio.ensure_future(self._probe_once(False))
                self._drop_check_sent = clock.now
        vitals = self._watchdog.vitals.get(rank)
        if vitals is not None:
            self._vitals_seen.see(vitals.received_at, clock)
            self._cpu_active.see(vitals.cpu_active_at, clock)
        since_join = clock.awake - self._joined_awake
        silent = self._sign.age(clock)
        return Evidence(
            healthy=healthy,
            silent_s=since_join if silent is None else min(silent, since_join),
            since_join_s=since_join,
            answered_since_join=self._sign.at > self._joined_at,
            answered_since_failure=bool(self._answered_sent)
            and self._answered_sent >= self._failed_at,
            connection_dropped=not pool.shared_connection and drop > self._answered_sent,
            shared_drop_unanswered=pool.shared_connection
            and drop > self._answered_sent
            and clock.awake - self._awake_at_drop >= DROP_CHECK_S,
            vitals_age_s=self._vitals_seen.age(clock),
            engine=vitals.engine if vitals is not None else None,
            stopped_s=clock.now - vitals.stopped_since
            if vitals is not None and vitals.stopped_since
            else 0.0,
            cpu_idle_s=self._cpu_active.age(clock),
            unhealthy_s=0.0 if healthy else clock.awake - self._failed_awake,
        )

    async def _act(self, verdict: Verdict, evidence: Evidence) -> None:
        rank, clock = self._rank, self._clock
        if evidence.healthy and not verdict.healthy:
            self._failed_at, self._failed_awake, self._replaced = clock.now, clock.awake, False
            await self._watchdog.fail(rank, verdict, evidence)
        elif not evidence.healthy and verdict.healthy:
            await self._watchdog.readmit(rank, verdict)
        elif verdict.replace and not self._replaced and self._watchdog.replace(rank):
            self._replaced = True
            log.warning(
                "rank presumed dead; waiting for it to rejoin",
                extra={"rank": rank, "reason": verdict.reason},
            )
        self._was_healthy = self._fleet.ledger.healthy(rank)
