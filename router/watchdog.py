"""Finds dead and hung ranks, and takes them back when they answer again.

vLLM's engine client does not notice an engine process that died or stopped:
requests to it hang with no error (measured on vLLM 0.32). So the router runs
one greedy token on every rank every `interval` seconds. A rank whose probe
has not come back within `timeout`, while the rank produced no output for
any request either, is unhealthy: it gets no new requests,
its Health name turns NOT_SERVING, and its running requests are ended at once
(the dispatcher retries elsewhere those that had produced nothing, and ends
the others with UNAVAILABLE). Probing goes on, and a rank that answers again
(a stopped process continued) serves again. An independent rank that stays
unhealthy for `replace_after` seconds is presumed dead and gets a new engine
client that waits for its rank server to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from router.dispatcher import Dispatcher

log = logging.getLogger("dprouter")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 3.0
# A probe that timed out gets this long once the router runs again: after a
# whole-machine stall (seen for 7-8 s on 2-core hosts) its answer may be
# waiting to be read.
PROBE_GRACE_S = 0.3
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

    async def _probe(self, rank: int) -> bool:
        pool = self._dispatcher.pool
        assert pool is not None
        probe = asyncio.ensure_future(pool.probe(rank))
        try:
            await asyncio.wait_for(asyncio.shield(probe), self._timeout)
        except TimeoutError:
            await asyncio.wait([probe], timeout=PROBE_GRACE_S)
        except Exception:
            pass  # raised by the probe itself: checked below
        if not probe.done():
            probe.cancel()
            with contextlib.suppress(BaseException):
                await probe
            return False
        return not probe.cancelled() and probe.exception() is None

    async def _watch(self, rank: int) -> None:
        ledger = self._dispatcher.ledger
        unhealthy_since: float | None = None
        while True:
            started = time.monotonic()
            # A slow probe on a rank that streamed output meanwhile is a busy
            # rank, not a hung one.
            ok = await self._probe(rank) or self._dispatcher.last_output.get(rank, 0.0) > started
            healthy = ledger.healthy(rank)
            if ok and not healthy:
                ledger.set_healthy(rank, True)
                unhealthy_since = None
                log.info("rank healthy again", extra={"rank": rank})
                await self._on_change()
            elif not ok and healthy:
                ledger.set_healthy(rank, False)
                unhealthy_since = time.monotonic()
                log.warning(
                    "rank unhealthy: its probe did not answer",
                    extra={"rank": rank, "timeout_s": self._timeout},
                )
                await self._fail_requests(rank)
                await self._on_change()
            elif (
                not ok
                and unhealthy_since is not None
                and time.monotonic() - unhealthy_since > self._replace_after
                and self._replace(rank)
            ):
                log.warning(
                    "rank presumed dead; waiting for it to join again", extra={"rank": rank}
                )
                unhealthy_since = None
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def _fail_requests(self, rank: int) -> None:
        failed = await self._dispatcher.fail_rank(rank)
        log.warning(
            "ended the requests on the failed rank", extra={"rank": rank, "requests": failed}
        )
