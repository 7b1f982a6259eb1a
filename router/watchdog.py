"""Finds dead and hung ranks, and takes them back when they answer again.

vLLM's engine client does not notice an engine process that died or stopped:
requests to it hang with no error (measured on vLLM 0.32). So the router
runs one greedy token on every rank every `interval` seconds, and watches
each engine's connection: a dropped one (a killed engine) fails the rank at
once. Otherwise a rank that has neither answered a probe nor sent output
for any request within `timeout` is unhealthy: it gets no new requests, its Health name turns
NOT_SERVING, and its running requests are ended at once (the dispatcher
retries elsewhere those that had produced nothing, and ends the others with
UNAVAILABLE). Probing goes on, and a rank that answers again
(a stopped process continued) serves again. An independent rank that stays
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
# A tick this late means the router itself was not running (whole-machine
# stalls of 7-8 s were seen on 2-core hosts).
STALL_S = 1.0
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

    async def _probe(self, rank: int) -> float | None:
        """When the rank answered a one-token request; None if it did not
        within the timeout (the request is then aborted)."""
        pool = self._dispatcher.pool
        assert pool is not None
        try:
            await asyncio.wait_for(pool.probe(rank), self._timeout)
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
        failed_at = 0.0  # when the rank was last found unhealthy
        # A rank is not failed without evidence: until it has answered once
        # since it joined (first answers took 3-7 s on a busy 2-core host),
        # for up to JOIN_GRACE_TIMEOUTS timeouts, and until `grace_until`
        # after a stall of the router.
        joined_at = grace_until = stalled_at = time.monotonic()
        unhealthy_since: float | None = None
        probe: asyncio.Future[float | None] | None = None
        probe_started = 0.0
        was_healthy = ledger.healthy(rank)
        tick = time.monotonic()
        while True:
            now = time.monotonic()
            if now - tick > TICK_S + STALL_S:
                # The router itself did not run (a whole-machine stall): what
                # it did not see is no evidence against the rank.
                grace_until = max(grace_until, now + self._timeout)
                stalled_at = now
            tick = now
            if probe is not None and probe.done():
                if (answer := probe.result()) is not None:
                    answered_at, answered_sent = answer, probe_started
                probe = None
            if probe is None and now - probe_started >= self._interval:
                probe, probe_started = asyncio.ensure_future(self._probe(rank)), now
            healthy = ledger.healthy(rank)
            if healthy and not was_healthy:  # it joined (or rejoined with a new client)
                # Answers to the old client are no sign of the new one.
                joined_at, answered_at, unhealthy_since = now, 0.0, None
            last_sign = max(answered_at, pool.last_heard(rank))
            # A dropped connection (a killed engine) is evidence: no grace.
            dropped = pool.dropped_at(rank) > last_sign
            answered = last_sign > now - self._timeout and not dropped
            # The engine client has never heard from its engine (a new
            # client's `last_heard` starts at 0).
            first_answer_due = not last_sign and (
                now < joined_at + JOIN_GRACE_TIMEOUTS * self._timeout
            )
            # Back only on a probe sent after the failure: outputs the router
            # reads late (it was busy) may have left the engine before.
            if answered and not healthy and answered_sent >= failed_at:
                ledger.set_healthy(rank, True)
                unhealthy_since = None
                log.info("rank healthy again", extra={"rank": rank})
                await self._on_change()
            elif healthy and (
                dropped or (now > grace_until and not first_answer_due and not answered)
            ):
                ledger.set_healthy(rank, False)
                unhealthy_since = failed_at = now
                log.warning(
                    "rank unhealthy: its connection dropped"
                    if dropped
                    else "rank unhealthy: no answer and no output",
                    extra={
                        "rank": rank,
                        "timeout_s": self._timeout,
                        "last_answer_s_ago": round(now - answered_at, 3),
                        "last_output_s_ago": round(now - pool.last_heard(rank), 3),
                        "probe_running_s": round(now - probe_started, 3) if probe else None,
                        "router_stall_s_ago": round(now - stalled_at, 3),
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
