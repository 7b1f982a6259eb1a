"""Finds dead and hung ranks, and takes them back when they answer again.

vLLM's engine client does not notice an engine process that died or stopped:
requests to it hang with no error (measured on vLLM 0.32). So the router
probes every rank that sent no output for `interval` seconds (one greedy
token while it has requests, a light call while it is idle), and watches each engine's
connection: a dropped one (a killed engine) fails the rank at once. Where
the ranks share one connection (coupled), a drop does not say whose engine
it was: each rank gets a light probe at once, and the ranks that do not
answer it within `DROP_CHECK_S` are failed.
Otherwise a rank that has neither answered a probe nor sent output for any
request within `timeout` is unhealthy: it gets no new requests, its Health
name turns NOT_SERVING, and its running requests are ended at once (the
dispatcher retries elsewhere those that had produced nothing, and ends the
others with UNAVAILABLE). Probing goes on, and a rank that answers again (a
stopped process continued) serves again. An independent rank that stays
unhealthy for `replace_after` seconds is presumed dead and gets a new engine
client that waits for its rank server to come back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from router.dispatcher import Dispatcher

log = logging.getLogger("dprouter")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 3.0
# How often each rank's state is decided.
TICK_S = 0.25
# Silence is counted in the router's own running time: a tick counts for at
# most this much, however late it comes. While the router itself does not
# run (a host starved of CPU: 20-40 runnable threads on 2 cores were seen
# while an engine restarted), the engines it does not hear from are no
# evidence against them.
MAX_TICK_S = 2 * TICK_S
# How long (router running time) a rank of a shared connection that dropped
# has to answer a probe sent after the drop. A live engine answers between
# two steps (milliseconds); a killed one never does.
DROP_CHECK_S = 1.5
# A rank that has just joined has this many timeouts to give its first answer.
JOIN_GRACE_TIMEOUTS = 3
# Long enough that a rank that is only slow (a host starved of CPU) is not
# given up on: its old client is shut down, so it could not come back alone.
REPLACE_AFTER_S = 30.0


class Watchdog:
    def __init__(
        self,
        dispatcher: Dispatcher,
        on_change: Callable[[], Awaitable[None]],
        replace: Callable[[int], bool],
        interval: float = PROBE_INTERVAL_S,
        timeout: float = PROBE_TIMEOUT_S,
        replace_after: float = REPLACE_AFTER_S,
    ) -> None:
        self._dispatcher = dispatcher
        self._on_change = on_change
        self._replace = replace
        self._interval = interval
        self._timeout = timeout
        self._replace_after = replace_after

    async def run(self) -> None:
        """Watches every rank until cancelled."""
        ranks = self._dispatcher.ledger.ranks
        await asyncio.gather(*(self._watch(rank) for rank in range(ranks)))

    def _busy(self, rank: int) -> bool:
        """Whether the rank has requests, in the router's count or as its
        engine last reported (counts left stale by aborted requests too)."""
        load = self._dispatcher.loads()[rank]
        return bool(load.in_flight or load.waiting or load.running)

    async def _probe(self, rank: int, step: bool) -> float | None:
        """When the rank answered; None if it did not within the timeout.

        With `step` (a busy rank) it runs one token: proof that it steps, and
        a fresh report of its counts. Otherwise it gets a light call that does
        not run the model (see `EngineClient.probe`)."""
        pool = self._dispatcher.pool
        assert pool is not None
        try:
            await asyncio.wait_for(pool.probe(rank, step), self._timeout)
        except Exception:  # no answer in time, or the probe failed
            return None
        return time.monotonic()

    async def _watch(self, rank: int) -> None:
        """Every tick: a rank is alive if a probe answered, or it streamed any
        output, within the timeout. Probes run in the background, one at a
        time, every `interval`."""
        ledger = self._dispatcher.ledger
        pool = self._dispatcher.pool
        assert pool is not None
        answered_at = 0.0  # when a probe last answered
        answered_sent = 0.0  # when that probe was sent
        drop_seen = 0.0  # pool.dropped_at at the last tick
        awake_at_drop = 0.0  # the router's running time when it was seen
        drop_check: asyncio.Future[float | None] | None = None
        drop_check_sent = 0.0
        failed_at = 0.0  # when the rank was last found unhealthy
        # The router's running time (see MAX_TICK_S), at the last sign of
        # life and at the (re)join: a rank that has not answered since it
        # joined (first answers took 3-7 s on a busy 2-core host) is not
        # failed for JOIN_GRACE_TIMEOUTS timeouts.
        awake = awake_at_sign = awake_at_join = 0.0
        last_sign = 0.0  # wall time of the last sign seen
        unhealthy_since: float | None = None
        probe: asyncio.Future[float | None] | None = None
        probe_started = 0.0
        was_healthy = ledger.healthy(rank)
        tick = time.monotonic()
        while True:
            now = time.monotonic()
            step = min(now - tick, MAX_TICK_S)
            awake += step
            tick = now
            for future, sent in ((probe, probe_started), (drop_check, drop_check_sent)):
                answer = future.result() if future is not None and future.done() else None
                # Probes overlap: keep the latest sent that answered.
                if answer is not None and sent >= answered_sent:
                    answered_at, answered_sent = answer, sent
            if probe is not None and probe.done():
                probe = None
            if drop_check is not None and drop_check.done():
                drop_check = None
            # A rank that streamed output within the interval has shown it
            # steps: a probe would only add a request to its batch.
            heard = pool.last_heard(rank)
            if probe is None and now - max(probe_started, heard) >= self._interval:
                probe = asyncio.ensure_future(self._probe(rank, self._busy(rank)))
                probe_started = now
            if (drop := pool.dropped_at(rank)) != drop_seen:  # a drop, or a new client
                drop_seen, awake_at_drop = drop, awake
                if drop and pool.shared_connection and drop_check is None:
                    drop_check = asyncio.ensure_future(self._probe(rank, False))
                    drop_check_sent = now
            healthy = ledger.healthy(rank)
            if healthy and not was_healthy:  # it joined (or rejoined with a new client)
                # Answers to the old client are no sign of the new one.
                answered_at, unhealthy_since, awake_at_join = 0.0, None, awake
            sign = max(answered_at, heard)
            if sign > last_sign:
                last_sign, awake_at_sign = sign, awake - min(now - sign, step)
            silent = awake - max(awake_at_sign, awake_at_join)
            # A dropped connection (a killed engine) is evidence: a rank's own
            # at once; a shared one's if no probe sent after it has answered.
            if pool.shared_connection:
                dropped = drop > answered_sent and awake - awake_at_drop >= DROP_CHECK_S
            else:
                dropped = drop > sign
            answered = silent < self._timeout and not dropped
            first_answer_due = not sign and (
                awake - awake_at_join < JOIN_GRACE_TIMEOUTS * self._timeout
            )
            # Back only on a probe sent after the failure: outputs the router
            # reads late (it was busy) may have left the engine before.
            if answered and sign and not healthy and answered_sent >= failed_at:
                ledger.set_healthy(rank, True)
                unhealthy_since = None
                log.info("rank healthy again", extra={"rank": rank})
                await self._on_change()
            elif healthy and (dropped or not (answered or first_answer_due)):
                ledger.set_healthy(rank, False)
                unhealthy_since = failed_at = now
                log.warning(
                    "rank unhealthy: its connection dropped"
                    if dropped
                    else "rank unhealthy: no answer and no output",
                    extra={
                        "rank": rank,
                        "timeout_s": self._timeout,
                        "silent_s": round(silent, 3),  # in the router's running time
                        "last_answer_s_ago": round(now - answered_at, 3) if answered_at else None,
                        "last_output_s_ago": round(now - heard, 3),
                        "probe_running_s": round(now - probe_started, 3) if probe else None,
                    },
                )
                await self._fail_requests(rank)
                await self._on_change()
            elif (
                not answered
                and unhealthy_since is not None
                and now - unhealthy_since > self._replace_after
                and self._replace(rank)
            ):
                log.warning("rank presumed dead; waiting for it to rejoin", extra={"rank": rank})
                unhealthy_since = None
            was_healthy = ledger.healthy(rank)
            await asyncio.sleep(TICK_S)

    async def _fail_requests(self, rank: int) -> None:
        failed = await self._dispatcher.fail_rank(rank)
        log.warning(
            "ended the requests on the failed rank", extra={"rank": rank, "requests": failed}
        )
